"""Secure aggregation: what it costs a round, and what distributed DP buys (docs/BENCHMARKS.md).

1. Round time and bytes on the wire with and without it, the same study on the same machine one after the
   other: heart disease, 4 sites, over real processes (a loopback consortium: TLS, node auth, gates, warm
   executors); seg, 3 hippocampus sites (the U-Net, every parameter trained and masked) in this process
   (quick) and over real processes (``--full``). Bytes: every message's content as Flower serialises it,
   both ways, counted in the in-process runs (the real processes send the same contents).
2. Heart disease at ε = 1 (δ = 1e-4), one DP-SGD step per round: local DP (each site plans its own σ for
   ε = 1) against distributed DP (every site assumes the four sites honest and adds σ/2 of a sum σ chosen
   so that every site's assumed ε is at most 1). Mean-centre accuracy over seeds; exact evaluation (the
   sites' policy) so that runs differ only by the training noise.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.figures import Figure, markdown_table

CENTRES = ("cleveland", "hungarian", "switzerland", "va")
GOAL = 1.10  # seg round time with secure aggregation ≤ 1.10 × without (Fed-BioMed: < 1 % on CPU)
QUICK = {"ehr_rounds": 4, "seg_rounds": 3, "seg_cases": 8, "seg_steps": 2, "seeds": 1, "dp_rounds": 20,
         "real_seg": False}
FULL = {"ehr_rounds": 6, "seg_rounds": 4, "seg_cases": 16, "seg_steps": 5, "seeds": 5, "dp_rounds": 40,
        "real_seg": True}
DP_STUDY = {"local-steps": 1, "optimizer": "sgd", "batch-size": 8, "lr": 0.5, "clip-norm": 1.0,
            "min-sites": 4, "sites": "", "round-timeout": 30}
EPSILON, DELTA, HONEST = 1.0, 1e-4, 4


def _log(text: str) -> None:
    print(text, flush=True)


# -- one study in this process, counting bytes ---------------------------------------------------------
def in_process(folder: Path, sites: dict[str, Path], config: dict, run_id: int = 1) -> dict:
    """The real ServerApp and ClientApps in this process; returns the run's summary, its rounds and the
    bytes of every message content (to the sites, from the sites)."""
    from flwr.app import Context, RecordDict
    from flwr.common.serde import recorddict_to_proto

    from client.client_app import app as client_app
    from deploy.demo.inprocess import InProcessGrid
    from server.server_app import app as server_app

    sent = {"down": 0, "up": 0}

    def counted(msg, context):
        sent["down"] += recorddict_to_proto(msg.content).ByteSize()
        reply = client_app(msg, context)
        if not reply.has_error():
            sent["up"] += recorddict_to_proto(reply.content).ByteSize()
        return reply

    nodes = {10 + i: {"site-config": str(path)} for i, path in enumerate(sites.values())}
    out = folder / "run"
    config = {**config, "out-dir": str(out)}
    grid = InProcessGrid(counted, nodes, config, run_id)
    server_app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    return {"summary": json.loads((out / "summary.json").read_text()), "rounds": rounds,
            "bytes": {k: v / len(rounds) for k, v in sent.items()}}


def _heart_sites(folder: Path, **policy) -> dict[str, Path]:
    from client.ingest.heart_disease import centre_file
    from client.site import write_site_config
    from deploy.datasets.data_dir import resolve_data_dir

    data, _ = resolve_data_dir(None)
    return {c: write_site_config(folder / "sites" / c / "site.toml", c, centre_file(data, c), device="cpu",
                                 **{"epsilon_budget": 1000.0, "delta": DELTA, "evaluation": "exact",
                                    "accountant": "rdp", **policy}) for c in CENTRES}


def _seconds(rounds: list[dict]) -> float:
    """Median round time, round 1 aside (it also caches the data and plans σ)."""
    return statistics.median(r["seconds"] for r in rounds[1:])


# -- 1. overhead ---------------------------------------------------------------------------------------
def overhead(work: Path, size: dict) -> dict:
    from benchmarks.deployment_overhead import run_carefl, seg_sites, snapshot_app
    from deploy.coordinator.follow import app_run_config
    from deploy.demo.loopback import LocalFederation

    results: dict = {}
    ehr = app_run_config(**{"num-server-rounds": size["ehr_rounds"], "local-steps": 50, "sites": "",
                            "min-sites": 4, "round-timeout": 300})
    for secure in (False, True):
        folder = work / f"ehr-bytes-{secure}"
        results[("ehr", secure, "bytes")] = in_process(folder, _heart_sites(folder), {
            **ehr, "num-server-rounds": 2, "secure-aggregation": secure})["bytes"]
    app = snapshot_app(work / "app")
    with LocalFederation(work / "ehr", _heart_sites(work / "ehr"), app_dir=app) as fed:
        for secure in (False, True):
            t = time.monotonic()
            out = work / f"ehr-real-{secure}"
            run_carefl(fed, {**ehr, "secure-aggregation": secure}, out, 300 + 120 * size["ehr_rounds"])
            rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
            results[("ehr", secure, "seconds")] = _seconds(rounds)
            _log(f"heart disease, real processes, secure={secure}: {[r['seconds'] for r in rounds]} "
                 f"({time.monotonic() - t:.0f} s)")
    seg = app_run_config(**{
        "task": "seg", "model": "seg-unet3d", "num-server-rounds": size["seg_rounds"],
        "local-steps": size["seg_steps"], "batch-size": 4, "optimizer": "adam", "lr": 2e-3, "seg-shape": "32,32,32",
        "target-epsilon": 0.0, "noise-multiplier": 1.0, "sites": "", "min-sites": 3, "round-timeout": 900})
    sites = seg_sites(work / "seg", size["seg_cases"])
    for secure in (False, True):
        t = time.monotonic()
        study = in_process(work / f"seg-{secure}", sites, {**seg, "secure-aggregation": secure},
                           run_id=2 if secure else 1)  # the same sites: another run for their ledgers
        results[("seg", secure, "seconds")] = _seconds(study["rounds"])
        results[("seg", secure, "bytes")] = study["bytes"]
        _log(f"seg, in process, secure={secure}: {[r['seconds'] for r in study['rounds']]} "
             f"({time.monotonic() - t:.0f} s)")
    if size["real_seg"]:
        with LocalFederation(work / "seg-real", sites, app_dir=app) as fed:
            for secure in (False, True):
                out = work / f"seg-real-{secure}"
                run_carefl(fed, {**seg, "secure-aggregation": secure}, out, 600 + 900 * size["seg_rounds"])
                rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
                results[("seg-real", secure, "seconds")] = _seconds(rounds)
                _log(f"seg, real processes, secure={secure}: {[r['seconds'] for r in rounds]}")
    return results


# -- 2. distributed DP against local DP ----------------------------------------------------------------
def sum_sigma(folder: Path, rounds: int) -> float:
    """The sum's σ for distributed DP: the largest any site needs for ε = 1 over the study (each site's own
    N and q), so that every site's assumed ε is at most 1."""
    from client.site import load_site_config
    from client.tasks import load_task
    from privacy.accounting import plan_noise

    sigmas = []
    for path in _heart_sites(folder).values():
        task = load_task(load_site_config(path), {"task": "ehr"}, "")
        sigmas.append(plan_noise(EPSILON, DELTA, task.n_train, DP_STUDY["batch-size"], rounds, "rdp"))
    return max(sigmas)


def dp_comparison(work: Path, size: dict) -> dict:
    from deploy.coordinator.follow import app_run_config

    sigma = sum_sigma(work / "sigma", size["dp_rounds"])
    base = app_run_config(**{**DP_STUDY, "num-server-rounds": size["dp_rounds"]})
    modes = {
        "local DP (each site σ for ε = 1)": ({}, {"target-epsilon": EPSILON}),
        f"distributed DP ({HONEST} honest assumed; sum σ = {sigma:.2f})": (
            {"distributed_dp_honest_sites": HONEST, "distributed_dp_budget": "assumed"},
            {"secure-aggregation": True, "distributed-dp": True, "noise-multiplier": sigma, "target-epsilon": 0.0}),
    }
    results = {}
    for mode, (policy, config) in modes.items():
        runs = []
        for seed in range(42, 42 + size["seeds"]):
            t = time.monotonic()
            folder = work / f"dp-{len(results)}-{seed}"
            study = in_process(folder, _heart_sites(folder, **policy), {**base, **config, "seed": seed})
            per_site = study["summary"]["per_site"]
            runs.append({"accuracy": study["summary"]["mean_centre_accuracy"],
                         "epsilon": {c: per_site[c].get("epsilon") for c in CENTRES},
                         "sigma": _site_sigmas(folder)})
            _log(f"{mode}, seed {seed}: mean-centre accuracy {runs[-1]['accuracy']:.3f} "
                 f"({time.monotonic() - t:.0f} s)")
            shutil.rmtree(folder, ignore_errors=True)
        results[mode] = runs
    return results


def _site_sigmas(folder: Path) -> dict[str, tuple[float, float, float]]:
    """Per site: (its own σ, ε of its own noise, ε assuming the honest sites) after the study."""
    from privacy.ledger import PrivacyLedger

    out = {}
    for centre in CENTRES:
        rows = PrivacyLedger(folder / "sites" / centre / "privacy-ledger.sqlite").rounds("heart-disease")
        last = rows[-1]
        out[centre] = (last["noise_multiplier"], last["epsilon_after"],
                       last["epsilon_assumed_after"] if last["epsilon_assumed_after"] is not None
                       else last["epsilon_after"])
    return out


# -- figures ---------------------------------------------------------------------------------------------
def _kb(value: float) -> str:
    return f"{value / 1024:.1f} KiB"


def figures(cost: dict, dp: dict, size: dict, full: bool) -> list[Figure]:
    rows = []
    for task, label in (("ehr", "heart disease, 4 sites, real processes"),
                        ("seg", "seg U-Net, 3 sites, in process"), ("seg-real", "seg U-Net, 3 sites, real processes")):
        if (task, False, "seconds") not in cost:
            continue
        plain, secure = cost[(task, False, "seconds")], cost[(task, True, "seconds")]
        wire = task.removesuffix("-real")
        down = cost.get((wire, False, "bytes"), {}), cost.get((wire, True, "bytes"), {})
        rows.append([label, f"{plain:.2f} s", f"{secure:.2f} s", f"{secure / plain:.2f}×",
                     f"{_kb(down[0]['down'])} / {_kb(down[0]['up'])}", f"{_kb(down[1]['down'])} / {_kb(down[1]['up'])}"])
    seg_key = "seg-real" if ("seg-real", False, "seconds") in cost else "seg"
    ratio = cost[(seg_key, True, "seconds")] / cost[(seg_key, False, "seconds")]
    cost_figure = Figure(
        key="secure-aggregation-cost",
        title="Secure aggregation: round time and bytes",
        command="python -m benchmarks --only secure_aggregation" + (" --full" if full else ""),
        goal=f"seg round time with secure aggregation ≤ {GOAL:.2f}× without",
        anchor="the same study without it, run just before on the same machine; Fed-BioMed reports < 1 % on CPU for "
               "its Joye-Libert scheme (Taiello et al. 2024)",
        ours=f"seg {ratio:.2f}× ({'real processes' if seg_key == 'seg-real' else 'in process'}); heart disease "
             f"{cost[('ehr', True, 'seconds')] / cost[('ehr', False, 'seconds')]:.2f}× over real processes",
        met=ratio <= GOAL,
        table=markdown_table(["study", "round, plain", "round, secure", "ratio", "bytes per round, plain (to / from "
                              "sites)", "secure (to / from sites)"], rows),
        notes=f"Median round time, round 1 aside. Heart disease: the app's defaults with local-steps 50, "
              f"{size['ehr_rounds']} rounds; seg: seg-unet3d at 32³, {size['seg_steps']} local steps, "
              f"{size['seg_cases']} cases per site, {size['seg_rounds']} rounds, σ = 1, every parameter trained. "
              f"Secure aggregation adds three exchanges per round (keys, shares, unmask); the masked update has the "
              f"float32 update's bytes (uint32 words).",
    )
    modes = list(dp)
    dp_rows = []
    for mode in modes:
        runs = dp[mode]
        accuracy = [r["accuracy"] for r in runs]
        sigma = runs[0]["sigma"]
        dp_rows.append([mode, f"{statistics.mean(accuracy):.3f} ± "
                              f"{statistics.stdev(accuracy) if len(accuracy) > 1 else 0:.3f}",
                        ", ".join(f"{sigma[c][0]:.2f}" for c in CENTRES),
                        ", ".join(f"{sigma[c][1]:.2f}" for c in CENTRES),
                        ", ".join(f"{sigma[c][2]:.2f}" for c in CENTRES)])
    local, distributed = (statistics.mean(r["accuracy"] for r in dp[m]) for m in modes)
    dp_figure = Figure(
        key="distributed-dp",
        title="Distributed DP against local DP, heart disease at ε = 1",
        command="python -m benchmarks --only secure_aggregation" + (" --full" if full else ""),
        goal="context: what the noise reduction buys at the same assumed ε",
        anchor="local DP: each site adds the whole noise for its own ε = 1",
        ours=f"mean-centre accuracy {local:.3f} (local DP) → {distributed:.3f} (distributed DP, {HONEST} sites "
             f"assumed honest), mean of {size['seeds']} seeds",
        met=None,
        table=markdown_table(["mode", "mean-centre accuracy", f"σ per site ({', '.join(CENTRES)})",
                              "ε own noise", "ε assumed"], dp_rows),
        notes=f"{size['dp_rounds']} rounds of one DP-SGD step (batch {DP_STUDY['batch-size']}, lr {DP_STUDY['lr']}, "
              f"C = {DP_STUDY['clip-norm']}), δ = {DELTA:g}, RDP accountant, exact evaluation (site policy); seeds "
              f"42…{41 + size['seeds']} (DP noise is not seeded). Distributed DP's guarantee holds only if the "
              f"{HONEST} sites are honest and none drops after masking; alone, each site's own noise gives the "
              f"'ε own noise' column.",
    )
    return [cost_figure, dp_figure]


def run(full: bool) -> list[Figure]:
    size = FULL if full else QUICK
    with tempfile.TemporaryDirectory(prefix="carefl-secagg-") as tmp:
        work = Path(tmp)
        dp = dp_comparison(work, size)
        cost = overhead(work, size)
    return figures(cost, dp, size, full)
