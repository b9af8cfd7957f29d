"""Faults and a misbehaving app on a real loopback consortium (kits, TLS, node auth, 4 site agents): a
site's SuperNode killed mid-round and the coordinator's SuperLink killed after a round, then resumed; then
an app version every site approved (so the code gate lets it run) that misbehaves at three of the four
sites, one way per site and round: each gated SuperNode's egress guard blocks what its app tries to send,
logs the block in the site's signed audit log, the coordinator gets an error in its place, the study
completes on the honest site, and nothing the app tried to smuggle out reaches the coordinator."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

from benchmarks.attacks import TRAIN_REPLY, patched_app
from deploy.site.approval import app_hash, approve
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
    with running_consortium_with_policy(tmp_path_factory.mktemp("faults"), SITES, accountant="rdp") as c:
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
    """The "no-charge" version trains and replies without ever charging the site's ledger."""
    if _PLAN.get((site_id, server_round)) != "no-charge":
        return charge

    def skipped(plan, policy, ledger_path, dataset, n, run_id, server_round, *rest):
        from privacy.ledger import Charge
        return release.Release(run_id, server_round, dataset, plan.request, plan.sample_rate, plan.steps_per_round,
                               n, policy.epsilon_budget, Charge(dataset, 0.0, 0.5, policy.delta_for(n),
                                                                policy.accountant))
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
    charge = "    charged = release.charge_training("
    return patched_app(folder, {
        charge: '    charged = _charge_or_skip(site.site_id, int(config["server-round"]), release.charge_training)(',
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
