"""The egress guard on real processes: an app version every site approved (so the code gate lets it run)
that misbehaves at three of four sites, one way per site and round. Each gated SuperNode blocks what
its site's app tries to send, logs the block in the site's signed audit log, and the coordinator gets
an error in its place; the study completes on the honest site. Nothing the app tried to smuggle out
reaches the coordinator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deploy.site.approval import app_hash, approve
from server.run_dir import read_jsonl
from tests.helpers import REPO, default_run_config, running_consortium, wait_run

SITES = {"site-a": "cleveland", "site-b": "hungarian", "site-c": "switzerland", "site-d": "va"}
CANARY = "QZXV-canary-Doe"
# (site, round) → what this app version does wrong, and the guard's rule that must stop it
PLAN = {("site-a", 1): ("extra-key", "keys"), ("site-b", 1): ("string", "record"), ("site-c", 1): ("shape", "arrays"),
        ("site-a", 2): ("raw-data", "arrays"), ("site-b", 2): ("no-charge", "ledger"),
        ("site-c", 2): ("oversized", "size")}

MISBEHAVIOUR = f'''

# ---- tests/test_egress_deployment.py: what this app version does wrong, by site and round ----
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
    app = folder / "app"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("server", "client", "shared_models", "privacy"):
        shutil.copytree(REPO / part, app / part, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", app / "pyproject.toml")
    handler = app / "client" / "client_app.py"
    source = handler.read_text()
    charge = "    charged = release.charge_training("
    reply = "    return Message(reply, reply_to=msg)\n\n\n@app.evaluate()"
    assert source.count(charge) == 1 and source.count(reply) == 1, "the train handler changed; update this test"
    source = source.replace(charge, '    charged = _charge_or_skip(site.site_id, int(config["server-round"]), '
                                    'release.charge_training)(')
    source = source.replace(reply, '    reply = _misbehave(site.site_id, int(config["server-round"]), reply, task)\n'
                            + reply)
    handler.write_text(source + MISBEHAVIOUR)
    return app


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("egress")
    with running_consortium(root, SITES) as c:
        app = malicious_app(root)
        digest = app_hash(app)
        for site in SITES:  # every site approves this version: the gate lets it run, the guard must stop it
            approve(c["kits"] / site / "site.toml", digest)
        c["coord"].app_dir = app
        out = root / "run"
        config = default_run_config(**{"num-server-rounds": 2, "local-steps": 5, "min-sites": 1, "round-timeout": 90,
                                       "sites": "", "out-dir": str(out)})
        run_id = c["coord"].submit(config)
        status = wait_run(c["coord"], run_id, timeout=400)
        yield {**c, "out": out, "status": status, "run_log": c["coord"].run_log(run_id)}


def test_every_misbehaviour_is_blocked_logged_and_the_study_completes_on_the_honest_site(study):
    assert study["status"] == "finished:completed", study["run_log"][-3000:]
    out, kits = study["out"], study["kits"]
    rounds = read_jsonl(out / "rounds.jsonl")
    assert [(r["round"], r["sites_replied"]) for r in rounds] == [(1, ["site-d"]), (2, ["site-d"])]
    errors = {(r["site"], r["round"]): r.get("error", "") for r in read_jsonl(out / "metrics.jsonl")}
    for (site, server_round), (_, rule) in PLAN.items():
        assert f"egress guard" in errors[site, server_round] and f"(rule: {rule})" in errors[site, server_round]
        blocks = [r["payload"] for r in _audit(kits / site / "audit.jsonl") if r["event"] == "egress-blocked"]
        assert {"round": server_round, "rule": rule, "message_type": "train"}.items() <= next(
            b for b in blocks if b["round"] == server_round).items()
    assert not [r for r in _audit(kits / "site-d" / "audit.jsonl") if r["event"] == "egress-blocked"]


def test_nothing_the_app_tried_to_smuggle_reaches_the_coordinator(study):
    root = study["root"]
    coordinator_side = [p for p in (root / "state").rglob("*") if p.is_file()] + \
                       [p for p in study["out"].rglob("*") if p.is_file()]
    leaked = [p for p in coordinator_side if CANARY.encode() in p.read_bytes()]
    assert coordinator_side and not leaked


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
