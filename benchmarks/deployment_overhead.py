"""Framework overhead of a real deployment: 4 TLS sites on loopback, seconds per round and where they go.

(Over 400 lines on purpose: one benchmark script that writes its own plain-Flower baseline app inline.)

One run stands up, side by side on 127.0.0.1, (1) a plain Flower federation running a no-op app that
this script writes to a temporary folder (ServerApp: FedAvg over a 4-float array; ClientApp: train
returns the arrays unchanged) on Flower's stock SuperNodes, and (2) carefl's heart-disease study on
4 site agents (kits, TLS, SuperNode authentication, the code gate, DP-SGD, ledger, audit logs), both
behind the same kind of SuperLink (TLS, node auth, persistent state). Runs of the two alternate.
Then (3) carefl's hippocampus segmentation (3 sites, 3-D U-Net, DP-SGD) as the compute-bound case.

Per round (rounds after the first, whose query/noise planning is not steady state) the seconds
between two ``evaluate_fn`` calls of the ServerApp: carefl's ``rounds.jsonl``, and the no-op app's
own record of the same call. The breakdown follows the slowest site of each phase (train, evaluate)
through timestamps the deployment writes anyway: the gate's ``timing.jsonl`` (message pulled, stored,
reply ready, sent), the warm executor's child line in the same file (task acquired, fork, FAB
installed and app imported, handler start/end, reply pushed), the site's audit log (``dp-round`` right
after data/model load, policy check and ledger charge; ``reply`` right after training) and the
coordinator's audit log (``update`` once the ServerApp has the train replies; ``aggregate`` at round
end). Nothing is added to what sites send.

    python -m benchmarks.deployment_overhead [--full] [--keep DIR] [--write]   # quick: 4-7 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.figures import Figure, markdown_table

REPO = Path(__file__).resolve().parent.parent
CENTRES = ("cleveland", "hungarian", "switzerland", "va")
# The quick pass leaves the compute-bound (seg) figure to --full: a short seg round is not compute-bound.
QUICK = {"ehr_rounds": 3, "repeats": 1, "seg_rounds": 0, "seg_cases": 10, "seg_steps": 20, "cold": False}
FULL = {"ehr_rounds": 6, "repeats": 2, "seg_rounds": 2, "seg_cases": 20, "seg_steps": 100, "cold": True}

NOOP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "noop"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "noop_app.server_app:app"
clientapp = "noop_app.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
num-sites = 4
out = ""
"""

NOOP_SERVER = '''\
"""No-op ServerApp: FedAvg over a 4-float array; records when each round ends."""
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out, n, ends = Path(str(cfg["out"])), int(cfg["num-sites"]), []

    def evaluate_fn(server_round, arrays):
        ends.append([server_round, time.time()])
        out.write_text(json.dumps(ends))
        return None

    FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n).start(
        grid=grid, initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]),
        num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=evaluate_fn)
'''

NOOP_CLIENT = '''\
"""No-op ClientApp: train returns the arrays unchanged; evaluate returns a count."""
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
'''


def write_noop_app(folder: Path) -> Path:
    (folder / "noop_app").mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(NOOP_PYPROJECT)
    (folder / "noop_app" / "__init__.py").write_text("")
    (folder / "noop_app" / "server_app.py").write_text(NOOP_SERVER)
    (folder / "noop_app" / "client_app.py").write_text(NOOP_CLIENT)
    return folder


def snapshot_app(folder: Path) -> Path:
    """A copy of the app's files as they are now (others may edit the working tree meanwhile)."""
    for name in ("server", "client", "shared_models", "privacy", "deploy"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", folder / "pyproject.toml")
    return folder


# -- the plain Flower federation -----------------------------------------------------------------------
@contextmanager
def plain_flower(root: Path, n_sites: int = 4):
    """SuperLink (TLS, node auth, --database, as carefl's) and n stock flower-supernode processes."""
    from deploy import processes
    from deploy.coordinator.superlink import Coordinator
    from deploy.coordinator.provision import load_consortium, provision

    spec = root / "consortium.toml"
    root.mkdir(parents=True, exist_ok=True)
    spec.write_text(f'[consortium]\nname = "noop"\n[coordinator]\nhosts = ["127.0.0.1"]\n'
                    f'port = {processes.free_port()}\nlisten-host = "127.0.0.1"\n'
                    + "".join(f"[sites.n{i}]\n" for i in range(n_sites)))
    provision(load_consortium(spec), root / "kits")
    coord = Coordinator(root / "state", root / "kits" / "coordinator")
    nodes = []
    try:
        coord.start()
        for i in range(n_sites):
            kit = root / "kits" / f"n{i}"
            nodes.append(processes.start(f"noop-node-{i}", [
                processes.tool("flower-supernode"), "--root-certificates", str(kit / "ca.crt"),
                "--superlink", f"127.0.0.1:{coord.port}", "--auth-supernode-private-key", str(kit / "supernode.key"),
                "--port", str(processes.free_port())], processes.flower_env(root / f"n{i}"), root / f"n{i}.log"))
        _wait_nodes(coord, n_sites)
        yield coord
    finally:
        for node in nodes:
            node.stop()
        coord.stop()


def _wait_nodes(coord, n: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for node in coord.nodes() if node.get("status") == "online") >= n:
            return
        time.sleep(1)
    raise RuntimeError(f"fewer than {n} SuperNodes online after {timeout:.0f} s")


def _wait_run(status_of, run_id: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        status = status_of(run_id)
        if status.startswith("finished"):
            return status
        time.sleep(1)
    raise RuntimeError(f"run {run_id} still '{status}' after {timeout:.0f} s")


def run_noop(coord, app: Path, rounds: int, out: Path) -> list[float]:
    """Seconds of each round after the first (ServerApp evaluate_fn to evaluate_fn)."""
    from deploy.coordinator.superlink import CONNECTION, toml_value
    overrides = out.with_suffix(".toml")
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in
                                 {"num-server-rounds": rounds, "out": str(out)}.items()))
    done = coord.flwr("run", str(app), CONNECTION, "--run-config", str(overrides), "--format", "json", timeout=180)
    run_id = int(json.loads(done.stdout)["run-id"])
    status = _wait_run(coord.run_status, run_id, 60 + 60 * rounds)
    if status != "finished:completed":
        raise RuntimeError(f"no-op run {run_id}: {status}\n{coord.run_log(run_id)[-2000:]}")
    ends = [t for _, t in sorted(json.loads(out.read_text()))]
    return [b - a for a, b in itertools.pairwise(ends[1:])]  # rounds 2.. (ends[0]: before round 1)


# -- carefl federations --------------------------------------------------------------------------------
def ehr_sites(root: Path) -> dict[str, Path]:
    from deploy.datasets.data_dir import resolve_data_dir
    from client.ingest.heart_disease import centre_file
    from client.site import write_site_config
    data, _ = resolve_data_dir(None)
    return {c: write_site_config(root / "sites" / c / "site.toml", c, centre_file(data, c), device="cpu",
                                 epsilon_budget=10.0, delta=1e-4) for c in CENTRES}


def seg_sites(root: Path, cases_per_site: int) -> dict[str, Path]:
    """3 hippocampus sites from the NIfTI data (no DICOM step: that is ingestion, not a round)."""
    from deploy.datasets.data_dir import resolve_data_dir
    from deploy.datasets import hippocampus
    from client.ingest.imaging.manifest import default_split
    from client.site import write_site_config
    data, _ = resolve_data_dir(None)
    configs = {}
    for site, cases in hippocampus.split_sites(hippocampus.cases(data), 3).items():
        rows = [(c.case_id, c.image, c.label, default_split(c.case_id)) for c in cases[:cases_per_site]]
        manifest = hippocampus.write_manifest(root / "sites" / site / "hippocampus.csv", rows)
        configs[site] = write_site_config(root / "sites" / site / "site.toml", site, manifest, device="cpu",
                                          dataset="hippocampus", manifest=True, labels=sorted(hippocampus.LABELS),
                                          epsilon_budget=1000.0, delta=1e-3, max_sample_rate=1.0)
    return configs


def run_carefl(fed, run_config: dict, out: Path, timeout: float) -> int:
    run_id = fed.submit({**run_config, "out-dir": str(out)})
    status = _wait_run(fed.run_status, run_id, timeout)
    if status != "finished:completed":
        raise RuntimeError(f"carefl run {run_id}: {status}\n{fed.run_log(run_id)[-3000:]}")
    return run_id


# -- reading the timestamps ----------------------------------------------------------------------------
def _epoch(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def site_messages(site_dir: Path, run_id: int) -> dict[tuple[str, int], dict]:
    """(message type, round) → every timestamp the site has for that message of this run."""
    merged: dict[str, dict] = {}
    for rec in _jsonl(site_dir / "agent" / "timing.jsonl"):
        merged.setdefault(rec["message_id"], {}).update(rec)
    out = {}
    for rec in merged.values():
        if rec.get("run_id") == run_id and rec.get("round") is not None:
            out[(rec["type"], int(rec["round"]))] = dict(rec)
    for rec in _jsonl(site_dir / "audit.jsonl"):
        p = rec["payload"]
        if p.get("run_id") != str(run_id) or p.get("round") is None:
            continue
        if rec["event"] == "dp-round":
            out.setdefault(("train", int(p["round"])), {})["dp_round"] = _epoch(rec["time"])
        elif rec["event"] == "reply":
            out.setdefault((p["message_type"], int(p["round"])), {})["reply_logged"] = _epoch(rec["time"])
    return out


CATEGORIES = [
    ("start", "ClientApp process start, imports, FAB install, app import"),
    ("load", "data + model load, policy check, ledger charge (train)"),
    ("compute", "local compute: DP-SGD steps + evaluation"),
    ("serialise", "reply (de)serialisation and hand-over to the SuperNode"),
    ("gate", "code gate: approval check + signed audit record per message"),
    ("transfer", "Fleet transfer over TLS: message download + reply upload"),
    ("node_wait", "wait for the SuperNode's next pull (Flower: every 3 s when idle), incl. the ServerApp's dispatch"),
    ("waits", "wait for the executor's next acquire (0.25 s) and the SuperNode's reply pick-up (0.5 s)"),
    ("server_wait", "wait for the ServerApp's next pull of replies (Flower: every 3 s)"),
    ("server", "coordinator: update validation + FedAvg average (timed in-process on same-size arrays)"),
]


def server_cost(model: str, model_kwargs: dict, n_sites: int, repeats: int = 5) -> float:
    """Seconds the coordinator spends checking and averaging one round's updates, timed here on
    arrays of the real model (the deployment logs no timestamp between these steps and its polling)."""
    import torch
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from server.validation import UpdateValidator
    from shared_models.registry import build_model

    torch.manual_seed(0)
    global_arrays = ArrayRecord(build_model(model, **model_kwargs).state_dict())
    contents = [RecordDict({"arrays": ArrayRecord(build_model(model, **model_kwargs).state_dict()),
                            "metrics": MetricRecord({"num-examples": 10})}) for _ in range(n_sites)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        UpdateValidator().check_all(contents, global_arrays, [10] * n_sites, average_by="num-examples")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_breakdown(run_dir: Path, coordinator_dir: Path, site_dirs: list[Path], run_id: int,
                    server_seconds: float = 0.0) -> list[dict]:
    """Per round: wall seconds, the slowest site's local compute, and CATEGORIES on the critical path."""
    rounds = {r["round"]: r["seconds"] for r in _jsonl(run_dir / "rounds.jsonl")}
    audit = [r for r in _jsonl(coordinator_dir / "audit.jsonl") if r["payload"].get("run_id") == str(run_id)]
    ends = {r["payload"]["round"]: _epoch(r["time"]) for r in audit if r["event"] == "aggregate"}
    updates: dict[int, float] = {}
    for r in audit:
        if r["event"] in ("update", "rejection"):
            updates[r["payload"]["round"]] = max(updates.get(r["payload"]["round"], 0.0), _epoch(r["time"]))
    sites = [site_messages(d, run_id) for d in site_dirs]
    out = []
    for rnd, wall in sorted(rounds.items()):
        if rnd not in ends or rnd not in updates:
            continue
        start = ends[rnd] - wall
        row = {"round": rnd, "wall": wall, **{k: 0.0 for k, _ in CATEGORIES}}
        compute = [0.0] * len(sites)
        phases = (("train", start, updates[rnd]), ("evaluate", updates[rnd], ends[rnd]))
        for kind, phase_start, phase_end in phases:
            msgs = [(i, s.get((kind, rnd), {})) for i, s in enumerate(sites)]
            msgs = [(i, m) for i, m in msgs if "sent" in m and "pulled" in m]
            if not msgs:
                continue
            for i, m in msgs:
                compute[i] += _compute(kind, m)
            _, m = max(msgs, key=lambda im: im[1]["sent"])
            parts = _phase_parts(kind, m)
            for key, value in parts.items():
                row[key] += value
            approved = m.get("approved", m["pulled"])
            row["node_wait"] += m["pulled"] - phase_start
            row["server_wait"] += phase_end - m["sent"]
            row["gate"] += approved - m["pulled"]
            row["transfer"] += (m["stored"] - approved) + (m["sent"] - m["reply_ready"])
        row["slowest_compute"] = max(compute)
        row["server"] = server_seconds  # it happened inside the ServerApp's wait above (between two polls)
        row["server_wait"] -= server_seconds
        out.append(row)
    return out


def _compute(kind: str, m: dict) -> float:
    if kind == "train" and "dp_round" in m and "reply_logged" in m:
        return m["reply_logged"] - m["dp_round"]
    if "handler_start" in m:
        return m["handler_end"] - m["handler_start"]
    return 0.0


def _phase_parts(kind: str, m: dict) -> dict:
    """Site-side parts of one message; warm children have exact handler timestamps, cold ones do not."""
    parts = {"start": 0.0, "load": 0.0, "compute": 0.0, "serialise": 0.0}
    parts_waits = 0.0
    if "handler_start" in m:  # warm: the executor's child wrote its line
        parts_waits += max(0.0, m["acquired"] - m["stored"])
        parts["start"] = m["handler_start"] - max(m["acquired"], m["stored"])
        if kind == "train":
            parts["load"] = m["dp_round"] - m["handler_start"]
            parts["compute"] = m["reply_logged"] - m["dp_round"]
            parts["serialise"] = m["pushed"] - m["reply_logged"]
        else:
            parts["compute"] = m["handler_end"] - m["handler_start"]
            parts["serialise"] = m["pushed"] - m["handler_end"]
        parts_waits += m["reply_ready"] - m["pushed"]
    else:  # cold: from "stored" to the audit records; start, imports and load are one span
        if kind == "train":
            parts["start"] = m["dp_round"] - m["stored"]
            parts["compute"] = m["reply_logged"] - m["dp_round"]
        else:
            parts["start"] = m["reply_logged"] - m["stored"]
        parts["serialise"] = m["reply_ready"] - m["reply_logged"]  # includes process exit and the 0.5 s poll
    parts["waits"] = parts_waits
    return parts


def summarise(rows: list[dict]) -> dict:
    keys = ["wall", "slowest_compute", *[k for k, _ in CATEGORIES]]
    return {k: statistics.mean(r[k] for r in rows) for k in keys} if rows else {}


# -- the figures -----------------------------------------------------------------------------------------
def _log(text: str) -> None:
    print(text, flush=True)


def measure(full: bool, work: Path, log=_log) -> dict:
    from deploy.demo.loopback import LocalFederation

    size = FULL if full else QUICK
    app = snapshot_app(work / "app")
    noop = write_noop_app(work / "noop")
    ehr_config = {"num-server-rounds": size["ehr_rounds"], "local-steps": 50, "sites": "", "min-sites": 4,
                  "round-timeout": 300}  # the rest: the app's defaults (the demo's study)
    results: dict = {"noop": [], "warm": [], "cold": [], "seg": []}
    ehr_server = server_cost("ehr-logreg", {"n_features": 13}, 4)
    seg_server = server_cost("seg-unet3d", {}, 3)
    modes = ["warm", "cold"] if size["cold"] else ["warm"]
    with ExitStack() as stack:
        t = time.monotonic()
        flower = stack.enter_context(plain_flower(work / "plain"))
        feds = {}
        for mode in modes:
            feds[mode] = stack.enter_context(LocalFederation(work / f"ehr-{mode}", ehr_sites(work / f"ehr-{mode}"),
                                                             app_dir=app, warm=mode == "warm"))
            _wait_nodes(feds[mode].coordinator, 4)
        log(f"federations up in {time.monotonic() - t:.0f} s")
        for rep in range(size["repeats"]):
            t = time.monotonic()
            results["noop"] += run_noop(flower, noop, size["ehr_rounds"], work / f"noop-{rep}.json")
            log(f"no-op Flower: {results['noop'][-size['ehr_rounds'] + 1:]} ({time.monotonic() - t:.0f} s)")
            for mode in modes:
                t = time.monotonic()
                out = work / f"ehr-{mode}-run-{rep}"
                run_id = run_carefl(feds[mode], ehr_config, out, 120 + 120 * size["ehr_rounds"])
                deployment = work / f"ehr-{mode}"
                rows = round_breakdown(out, deployment / "coordinator", [deployment / "sites" / c for c in CENTRES],
                                       run_id, ehr_server)
                results[mode] += [r for r in rows if r["round"] > 1]
                log(f"carefl {mode}: {[round(r['wall'], 1) for r in rows]} ({time.monotonic() - t:.0f} s)")
    seg_config = {
        "task": "seg", "model": "seg-unet3d", "num-server-rounds": size["seg_rounds"], "local-steps": size["seg_steps"],
        "batch-size": 4, "optimizer": "adam", "lr": 2e-3, "seg-shape": "32,32,32", "target-epsilon": 0.0,
        "noise-multiplier": 1.0, "sites": "", "min-sites": 3, "round-timeout": 900}
    for mode in ["warm"] if size["seg_rounds"] else []:  # compute-bound: process start matters little
        t = time.monotonic()
        root = work / f"seg-{mode}"
        sites = seg_sites(root, size["seg_cases"])
        with LocalFederation(root, sites, app_dir=app, warm=mode == "warm") as fed:
            _wait_nodes(fed.coordinator, 3)
            out = root / "run"
            run_id = run_carefl(fed, seg_config, out, 300 + 600 * size["seg_rounds"])
        rows = round_breakdown(out, root / "coordinator", [root / "sites" / s for s in sites], run_id, seg_server)
        results["seg"] = rows
        log(f"carefl seg {mode}: {[round(r['wall'], 1) for r in rows]} ({time.monotonic() - t:.0f} s)")
    return results


def _s(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds >= 0.1 else f"{seconds:.3f}" if seconds >= 0.0005 else "< 0.001"


def _median_wall(rows: list[dict]) -> float:
    return statistics.median(r["wall"] for r in rows)


def figures(results: dict, full: bool) -> list[Figure]:
    command = "python -m benchmarks --only deployment_overhead" + (" --full" if full else "")
    size = FULL if full else QUICK
    noop = statistics.median(results["noop"])
    warm, cold = summarise(results["warm"]), summarise(results["cold"])
    ratio = _median_wall(results["warm"]) / noop
    cold_ratio = _median_wall(results["cold"]) / noop if results["cold"] else None
    header = ["seconds per round (mean)", "carefl, warm sites (default)"] + (["carefl, --no-warm"] if cold else [])
    rows = []
    in_row = {"load": "in the first row", "waits": "in the first and the reply row"}  # nothing of ours runs in
    # flwr-clientapp: Flower's SuperExec poll (1 s) and process start are one span, exit and reply pick-up another
    for key, label in CATEGORIES:
        cell = [in_row.get(key, _s(cold[key]))] if cold else []
        if cold and key == "start":
            label += " (--no-warm: with Flower's SuperExec poll, data/model load and evaluation)"
        if cold and key == "serialise":
            label += " (--no-warm: with process exit and reply pick-up)"
        rows.append([label, _s(warm[key]), *cell])
    rows.append(["**round wall time**", f"**{warm['wall']:.2f}**", *([f"**{cold['wall']:.2f}**"] if cold else [])])
    rows.append(["no-op Flower app on stock SuperNodes, median", f"{noop:.2f}", *([f"{noop:.2f}"] if cold else [])])
    rows.append(["carefl / no-op, medians", f"**{ratio:.2f}×**", *([f"{cold_ratio:.2f}×"] if cold else [])])
    ehr = Figure(
        key="overhead-ehr", title="Framework overhead: heart disease (latency-bound)", command=command,
        goal="carefl ≤ 1.2× a no-op Flower app in seconds per round, same machine, same run",
        anchor=f"no-op Flower app (FedAvg over 4 floats, train returns its input) on 4 stock SuperNodes, TLS + node "
               f"auth, same SuperLink settings: {noop:.1f} s per round (median)",
        ours=f"{_median_wall(results['warm']):.1f} s per round with warm sites, {ratio:.2f}×"
             + (f"; {_median_wall(results['cold']):.1f} s with --no-warm, {cold_ratio:.2f}×" if cold_ratio else ""),
        met=ratio <= 1.2, table=markdown_table(header, rows), full=full,
        notes=f"{len(results['warm'])} rounds (after the first) of 4 sites, 50 DP-SGD steps each, "
              f"{size['repeats']} run(s) alternating with the no-op app's; breakdown along the slowest site of "
              f"each phase, train + evaluate summed.")
    seg_rows = results.get("seg", [])
    if not seg_rows:
        return [ehr]
    seg = summarise(seg_rows)
    seg_ratio = statistics.mean(r["wall"] / r["slowest_compute"] for r in seg_rows)
    fixed = seg["wall"] - seg["slowest_compute"]
    srows = [[label, _s(seg[key])] for key, label in CATEGORIES]
    srows += [["**round wall time**", f"**{seg['wall']:.2f}**"],
              ["slowest site's local compute (train + evaluate handlers)", f"{seg['slowest_compute']:.2f}"],
              ["wall − compute (what the framework adds)", f"{fixed:.2f}"],
              ["wall / slowest site's compute", f"**{seg_ratio:.2f}×**"]]
    seg_fig = Figure(
        key="overhead-seg", title="Framework overhead: hippocampus segmentation (compute-bound)", command=command,
        goal="round wall time ≤ 1.10× the slowest site's local compute",
        anchor="the slowest site's own compute in the same round (its train and evaluate handlers, timed at the site)",
        ours=f"{seg_ratio:.2f}× ({seg['wall']:.1f} s per round, {seg['slowest_compute']:.1f} s of it compute); "
             f"≤ 1.10× once a round computes ≥ {10 * fixed:.0f} s",
        met=seg_ratio <= 1.10, table=markdown_table(["seconds per round (mean)", "carefl, warm sites"], srows),
        full=full,
        notes=f"{len(seg_rows)} round(s), 3 sites × {size['seg_cases']} cases, 3-D U-Net on 32³ crops, batch 4, "
              f"DP-SGD with σ = 1 given (no noise planning in round 1), {size['seg_steps']} local steps.")
    return [ehr, seg_fig]


def run(full: bool) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="carefl-overhead-") as tmp:
        results = measure(full, Path(tmp))
    return figures(results, full)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs, timings)")
    parser.add_argument("--write", action="store_true", help="also refresh the figures in docs/BENCHMARKS.md")
    parser.add_argument("--results", type=Path, default=None, help="render the figures of a kept results.json")
    args = parser.parse_args()
    if args.results:  # only render figures from a kept run
        results = json.loads(args.results.read_text())
    elif args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = measure(args.full, args.keep.resolve())
        (args.keep / "results.json").write_text(json.dumps(results, indent=1))
    else:
        with tempfile.TemporaryDirectory(prefix="carefl-overhead-") as tmp:
            results = measure(args.full, Path(tmp))
    figs = figures(results, args.full)
    for fig in figs:
        print(f"\n## {fig.title}\n\n{fig.markdown()}\n")
    if args.write:
        from benchmarks.__main__ import DOCUMENT
        from benchmarks.figures import update_document
        update_document(DOCUMENT, figs)


if __name__ == "__main__":
    main()
