"""Faults, a misbehaving app and secure aggregation on one real loopback consortium (kits, TLS, node auth,
4 site agents behind their code gates and egress guards), studies one after the other:

1. a site's SuperNode killed mid-round and the coordinator's SuperLink killed after a round, then resumed;
2. an app version every site approved (so the code gate lets it run) that misbehaves at three of the four
   sites, one way per site and round: each gated SuperNode's egress guard blocks what its app tries to send,
   logs the block in the site's signed audit log, the coordinator gets an error in its place, the study
   completes on the honest site, and nothing the app tried to smuggle out reaches the coordinator;
3. a study whose sites mask their updates (secure aggregation), one of which dies after its masked update
   arrived: what the coordinator received, what it could unmask, and what sites and the run config refuse.
   The app every site approves then is this repository's with two recorders compiled in (each site writes
   its plain update before masking, the coordinator writes the replies it received), so the test can compare
   what left a site with what the coordinator held.

One consortium serves all three (starting one costs minutes of CI on 2 cores)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.attacks import TRAIN_REPLY, patched_app
from deploy import processes
from deploy.site.approval import app_hash, approve
from privacy import secure_aggregation as sa
from server.checkpoint import load
from server.run_dir import read_jsonl
from tests.helpers import default_run_config, running_consortium_with_policy, wait_for, wait_online, wait_run

SITES = {"cleveland": "cleveland", "hungarian": "hungarian", "switzerland": "switzerland", "va": "va"}


def _gate_pgid(config: Path) -> int | None:
    """The process group of the site's gated SuperNode (its agent keeps running)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "deploy.site.gate" in cmd and str(config) in cmd:
            return os.getpgid(pid)
    return None


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    # RDP accounting at the sites: neither the faults nor the egress guard depend on the accountant, and PRV's
    # composition at every plan and charge costs seconds of CPU per site and run
    with running_consortium_with_policy(tmp_path_factory.mktemp("faults"), SITES, accountant="rdp",
                                        epsilon_budget=30.0) as c:  # three studies of ε ≈ 4
        yield c


def test_a_site_dies_mid_round_then_the_coordinator_crashes_and_the_study_resumes(consortium):
    """One study, two faults: va's SuperNode is killed in round 1 (the round completes with the other
    three), then the coordinator's SuperLink dies after round 1's checkpoint; it is restarted, every
    site reconnects on its own (va's agent restarts its SuperNode), and the run resumes to the end."""
    coord, kits, root = consortium["coord"], consortium["kits"], consortium["root"]
    out = root / "run"
    va_log = kits / "va" / "agent" / "supernode.log"
    seen = va_log.read_text().count("Receiving: train message")
    config = default_run_config(**{"num-server-rounds": 3, "local-steps": 20, "min-sites": 3, "round-timeout": 60,
                                   "sites": "", "out-dir": str(out)})
    coord.submit(config)
    wait_for(lambda: va_log.read_text().count("Receiving: train message") > seen, 120, "va's first train message")
    os.killpg(_gate_pgid(kits / "va" / "site.toml"), signal.SIGKILL)  # va's SuperNode dies mid-round

    wait_for(lambda: (out / "checkpoint.pt").exists(), 300, "the checkpoint of round 1")
    coord.stop()  # SuperLink, SuperExec and the ServerApp: the coordinator host goes down
    assert not (out / "summary.json").exists() and load(out).round >= 1
    first = read_jsonl(out / "rounds.jsonl")[0]
    assert first["round"] == 1 and first["sites_replied"] == ["cleveland", "hungarian", "switzerland"]

    coord.start()  # same state directory: the database still knows every site's key
    wait_online(coord, list(SITES), timeout=300)
    run_id = coord.submit({**config, "resume-from": str(out)})
    assert wait_run(coord, run_id, timeout=400) == "finished:completed", coord.run_log(run_id)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["sites"] == sorted(SITES)
    assert sorted(r["round"] for r in read_jsonl(out / "rounds.jsonl")) == [1, 2, 3]
    va = {r["round"]: r for r in read_jsonl(out / "metrics.jsonl") if r["site"] == "va"}
    assert "error" in va[1] and "error" not in va[3] and va[3]["accuracy"] >= 0  # left out, then back
    assert math.isfinite(summary["mean_centre_accuracy"])  # from DP evaluation releases: judged with their noise
    assert summary["mean_centre_accuracy"] > 0.6 - 3 * summary["mean_centre_accuracy_std"]
    assert "reconnecting in" in (root / "va" / "agent.log").read_text()
    # the lost site is named in the coordinator's audit log, never as "?"
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert all(r["payload"]["site"] in SITES for r in audit if r["event"] in ("rejection", "update"))


CANARY = "QZXV-canary-Doe"
# (site, round) → what this app version does wrong, and the guard's rule that must stop it
PLAN = {("cleveland", 1): ("extra-key", "keys"), ("hungarian", 1): ("string", "record"),
        ("switzerland", 1): ("shape", "arrays"), ("cleveland", 2): ("raw-data", "arrays"),
        ("hungarian", 2): ("no-charge", "ledger"), ("switzerland", 2): ("oversized", "size")}

MISBEHAVIOUR = f'''

# ---- tests/test_fault_injection.py: what this app version does wrong, by site and round ----
_PLAN = {{k: v[0] for k, v in {PLAN!r}.items()}}


def _charge_or_skip(site_id, server_round, charge):
    """The "no-charge" version plans its noise, trains and replies without ever charging the site's ledger."""
    if _PLAN.get((site_id, server_round)) != "no-charge":
        return charge

    def skipped(config, data, run_id, batch_size, steps_per_round, trained_parameters, group=None, cache=None):
        from privacy.ledger import Charge
        plan = release.plan_study(config, data, batch_size, steps_per_round, cache)
        return release.Release(run_id, server_round, data.name, plan.request, plan.sample_rate, plan.steps_per_round,
                               data.n, data.policy.epsilon_budget,
                               Charge(data.name, 0.0, 0.5, data.policy.delta_for(data.n), data.policy.accountant))
    return skipped


def _misbehave(site_id, server_round, reply, task):
    import numpy as np
    from flwr.app import Array
    what = _PLAN.get((site_id, server_round))
    if what == "extra-key":
        reply["metrics"]["train-loss"] = 0.4
    elif what == "string":
        reply["note"] = ConfigRecord({{"comment": "{CANARY[:4]}" + "{CANARY[4:]}"}})  # not one literal in the FAB
    elif what == "shape":
        name = next(iter(reply["arrays"]))
        reply["arrays"][name] = Array(np.zeros((3, 3), dtype=np.float32))
    elif what == "raw-data":
        reply["arrays"]["x_train"] = Array(np.asarray(task.data.x_train, dtype=np.float32))
    elif what == "oversized":
        reply["pad"] = ConfigRecord({{"bytes": b"\\0" * 2_000_000}})
    return reply
'''


def malicious_app(folder: Path) -> Path:
    """This repository's app with the misbehaviour above compiled into its ClientApp's train handler."""
    charge = "    charged = release.charge_round("
    return patched_app(folder, {
        charge: '    charged = _charge_or_skip(site.site_id, int(config["server-round"]), release.charge_round)(',
        TRAIN_REPLY: '    reply = _misbehave(site.site_id, int(config["server-round"]), reply, task)\n' + TRAIN_REPLY,
    }, MISBEHAVIOUR)


@pytest.fixture(scope="module")
def malicious_study(consortium):
    """After the faults, on the same consortium: every site approves the misbehaving app version (so the
    gate lets it run; the egress guard must stop it), which then runs a two-round study."""
    root, kits, coord = consortium["root"], consortium["kits"], consortium["coord"]
    app = malicious_app(root)
    digest = app_hash(app)
    for site in SITES:
        approve(kits / site / "site.toml", digest)
    wait_online(coord, list(SITES), timeout=300)
    coord.app_dir = app
    out = root / "malicious-run"
    config = default_run_config(**{"num-server-rounds": 2, "local-steps": 5, "min-sites": 1, "round-timeout": 90,
                                   "sites": "", "out-dir": str(out)})
    run_id = coord.submit(config)
    status = wait_run(coord, run_id, timeout=400)
    return {**consortium, "out": out, "status": status, "run_log": coord.run_log(run_id), "run_id": str(run_id)}


def test_an_approved_app_that_misbehaves_at_three_sites_is_blocked_at_each_and_the_study_completes(
        malicious_study):
    study = malicious_study
    assert study["status"] == "finished:completed", study["run_log"][-3000:]
    out, kits = study["out"], study["kits"]
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [(r["round"], r["sites_replied"]) for r in rounds] == [(1, ["va"]), (2, ["va"])]
    errors = {(r["site"], r["round"]): r.get("error", "") for r in read_jsonl(out / "metrics.jsonl")}
    for (site, server_round), (_, rule) in PLAN.items():
        assert "egress guard" in errors[site, server_round] and f"(rule: {rule})" in errors[site, server_round]
        blocks = _blocks(kits / site / "audit.jsonl", study["run_id"])
        assert {"round": server_round, "rule": rule, "message_type": "train"}.items() <= next(
            b for b in blocks if b["round"] == server_round).items()
    assert not _blocks(kits / "va" / "audit.jsonl", study["run_id"])


def test_nothing_the_misbehaving_app_tried_to_smuggle_reaches_the_coordinator(malicious_study):
    study = malicious_study
    root = study["root"]
    coordinator_side = [p for p in (root / "state").rglob("*") if p.is_file()] + \
                       [p for p in study["out"].rglob("*") if p.is_file()]
    leaked = [p for p in coordinator_side if CANARY.encode() in p.read_bytes()]
    assert coordinator_side and not leaked


def _blocks(log: Path, run_id: str) -> list[dict]:
    """The egress guard's blocks of that run in a site's audit log."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["payload"] for r in records if r["event"] == "egress-blocked" and r["payload"]["run_id"] == run_id]


DIES = ("va", 2)  # this site kills its own SuperNode when asked to unmask that round: after its update arrived
# Each summand is stochastically rounded to within one step 2·8/2²² (3.8e-6); four of them, divided by the
# sum's share of the weights (at least half here), then float32: the unmasked average may differ by this.
TOLERANCE = 4 * 2 * sa.CLIP_RANGE / sa.QUANT_RANGE / 0.5 + 1e-6

SITE_RECORDER = '''

# ---- tests/test_fault_injection.py: record the plain update; one site dies at unmasking ----
import os as _os  # noqa: E402
import signal as _signal  # noqa: E402

import numpy as _np  # noqa: E402

_DUMPS = {dumps!r}
_masked_update = secagg.masked_update


def _recording(msg, context, trained, names):
    r = int(msg.content["config"]["server-round"])
    base = _np.concatenate([msg.content["arrays"][n].numpy().astype(_np.float64).ravel() for n in names])
    plain = _np.concatenate([trained[n].numpy().astype(_np.float64).ravel() for n in names]) - base
    _np.savez(f"{{_DUMPS}}/site-{{context.node_id}}-round-{{r}}.npz", base=base, plain=plain)
    return _masked_update(msg, context, trained, names)


secagg.masked_update = _recording
_unmask = secagg.unmask


def _dying(msg, context):
    site = site_from_configs(context.node_config, context.run_config).site_id
    if (site, int(msg.content["config"]["server-round"])) == {dies!r}:
        _os.killpg(_os.getpgid(0), _signal.SIGKILL)  # the gate, its executor and this ClientApp
    return _unmask(msg, context)


secagg.unmask = _dying
'''

SERVER_RECORDER = '''

# ---- tests/test_fault_injection.py: what the coordinator received ----
_exchange = SiteGrid._exchange


def _recording_exchange(self, messages, timeout, *rest):
    replies = _exchange(self, messages, timeout, *rest)
    import numpy as _np
    for reply in replies:
        if reply.metadata.message_type == "train" and not reply.has_error():
            arrays = next(iter(reply.content.array_records.values()))
            _np.save(f"{dumps}/received-{{reply.metadata.src_node_id}}-round-{{reply.metadata.group_id}}.npy",
                     _np.concatenate([a.numpy().ravel() for a in arrays.values()]))
    return replies


SiteGrid._exchange = _recording_exchange
'''


@pytest.fixture(scope="module")
def secure_study(consortium):
    """After the misbehaving app's study, on the same consortium: every site approves the recording app."""
    coord, root, kits = consortium["coord"], consortium["root"], consortium["kits"]
    dumps = root / "dumps"
    dumps.mkdir()
    app = patched_app(root / "secagg", {}, SITE_RECORDER.format(dumps=str(dumps), dies=DIES))
    sites_py = app / "server" / "sites.py"
    sites_py.write_text(sites_py.read_text() + SERVER_RECORDER.format(dumps=str(dumps)))
    for site in SITES:
        approve(kits / site / "site.toml", app_hash(app))
    wait_online(coord, list(SITES), timeout=300)
    coord.app_dir = app
    consortium = {**consortium, "dumps": dumps}
    out = root / "secure-run"
    config = default_run_config(**{"num-server-rounds": 2, "local-steps": 5, "min-sites": 3, "round-timeout": 90,
                                   "sites": "", "out-dir": str(out), "secure-aggregation": True})
    run_id = coord.submit(config)
    status = wait_run(coord, run_id, timeout=400)
    return {**consortium, "out": out, "status": status, "run_log": coord.run_log(run_id)}


def test_the_study_completes_on_the_unmasked_sum_with_a_site_that_died_after_masking(secure_study):
    out, nodes = secure_study["out"], secure_study["coord"].site_nodes()
    assert secure_study["status"] == "finished:completed", secure_study["run_log"][-3000:]
    first, second = (r["secure_aggregation"] for r in read_jsonl(out / "rounds.jsonl"))
    assert first["summed"] == sorted(SITES) and first["recovered"] == []
    assert second["summed"] == sorted(SITES) and second["recovered"] == [DIES[0]]  # in the sum, mask rebuilt
    # the unmasked sum is FedAvg of the very updates the sites computed (their public weights)
    weights = json.loads((out / "summary.json").read_text())["per_site"]
    dumps = {site: np.load(secure_study["dumps"] / f"site-{nodes[site]}-round-2.npz") for site in SITES}
    total = sum(weights[s]["weight"] for s in SITES)
    fedavg = dumps["cleveland"]["base"] + sum(weights[s]["weight"] * dumps[s]["plain"] for s in SITES) / total
    state = torch.load(out / "final_model.pt", weights_only=False)
    state = state.get("state_dict", state)
    final = np.concatenate([v.numpy().astype(np.float64).ravel() for v in state.values()])
    assert np.abs(final - fedavg).max() < TOLERANCE


def test_what_the_coordinator_received_holds_no_site_update(secure_study):
    dumps, nodes = secure_study["dumps"], secure_study["coord"].site_nodes()
    received = sorted(dumps.glob("received-*.npy"))
    assert len(received) == 2 * len(SITES)
    for site in SITES:
        for server_round in (1, 2):
            words = np.load(dumps / f"received-{nodes[site]}-round-{server_round}.npy")
            plain = np.load(dumps / f"site-{nodes[site]}-round-{server_round}.npz")["plain"]
            assert words.dtype == np.uint32 and words.size == plain.size
            alone = sa.dequantised_sum(words.astype(np.int64) % (sa.QUANT_RANGE + 1), 1)  # read as one update
            assert np.abs(alone - plain).mean() > 20 * np.abs(plain).mean()
    # each site logged the hash of the masked reply it sent; the coordinator logged the same hash received
    audit = [json.loads(x) for x in (secure_study["out"] / "audit.jsonl").read_text().splitlines()]
    received_hashes = {(r["payload"]["site"], r["payload"]["round"]): r["payload"]["arrays_sha256"]
                       for r in audit if r["event"] == "update"}
    for site in SITES:
        site_log = [json.loads(x) for x in (secure_study["kits"] / site / "audit.jsonl").read_text().splitlines()]
        sent = {r["payload"]["round"]: r["payload"]["arrays_sha256"] for r in site_log
                if r["event"] == "reply" and r["payload"].get("message_type") == "train"
                and r["payload"].get("arrays_sha256")}
        assert all(sent[rnd] == received_hashes[(site, rnd)] for rnd in (1, 2) if rnd in sent)
        assert 1 in sent
    sums = [r["payload"] for r in audit if r["event"] == "secure-aggregation"]
    assert [s["recovered"] for s in sums] == [[], [DIES[0]]]


def test_a_site_requiring_secure_aggregation_refuses_a_plain_run_and_a_robust_strategy_is_refused(secure_study):
    coord, kits, root = secure_study["coord"], secure_study["kits"], secure_study["root"]
    with (kits / "cleveland" / "site.toml").open("a") as fh:  # the dataset's section is the file's last
        fh.write("require_secure_aggregation = true\n")
    wait_online(coord, ["cleveland", "hungarian"], timeout=120)
    plain = default_run_config(**{"num-server-rounds": 1, "min-sites": 2, "round-timeout": 60,
                                  "sites": "cleveland,hungarian", "out-dir": str(root / "plain-run")})
    run_id = coord.submit(plain)
    assert wait_run(coord, run_id, timeout=200) != "finished:completed"
    stop = read_jsonl(root / "plain-run" / "metrics.jsonl")[-1]
    assert "requires secure aggregation" in stop["reason"] and "cleveland" in stop["reason"]
    assert not (root / "plain-run" / "checkpoint.pt").exists()

    # the operator's command refuses a robust strategy under secure aggregation before anything is submitted
    done = subprocess.run([processes.tool("carefl"), "coordinator", "run", "--kit", str(kits / "coordinator"),
                           "--state-dir", str(root / "state"), "--sites", "cleveland,hungarian", "--rounds", "1",
                           "--strategy", "fedmedian", "--secure-aggregation", "--out", str(root / "robust-run")],
                          capture_output=True, text=True, env={**processes.flower_env(root / "cli"), "COLUMNS": "300"},
                          timeout=120, stdin=subprocess.DEVNULL)
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and "strategy 'fedmedian' needs every site's own update" in text, text
    assert "Traceback" not in text and not (root / "robust-run").exists()
