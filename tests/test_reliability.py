"""Faults a multi-day study meets, injected into the real ServerApp and ClientApps (in-process
transport): broken updates, too few sites, a crashed coordinator resumed from its checkpoint, a
site that crashes after charging its ledger."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.client_app import app as client_app
from client.tasks import EhrTask
from deploy.demo.inprocess import InProcessGrid
from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger
from server.checkpoint import CHECKPOINT_FILE, load
from server.run_dir import read_jsonl
from server.server_app import StudyStopped
from server.server_app import app as server_app
from tests.helpers import default_run_config, site_config

CENTRES = ("cleveland", "hungarian", "switzerland", "va")


def _nodes(folder, **policy) -> dict[int, dict]:
    # RDP accounting at the sites unless a test is about PRV's numbers (PRV's composition at every ledger charge
    # cost a sixth of this module's CPU time). RDP's looser ε needs a larger budget for every site to take part:
    # switzerland's 2 rounds of σ = 1 cost ε = 9.8 with PRV, 11.1 with RDP.
    policy = {"accountant": "rdp", "epsilon_budget": 20.0, **policy}
    return {10 + i: {"site-config": str(site_config(folder / "sites", c, **policy))} for i, c in enumerate(CENTRES)}


def _config(out, **overrides) -> dict:
    return default_run_config(**{"num-server-rounds": 2, "local-steps": 20, "out-dir": str(out), "round-timeout": 5,
                                 "noise-multiplier": 1.0, "target-epsilon": 0.0, "min-sites": 3, **overrides})


def _serve(app, nodes, cfg, run_id=7):
    grid = InProcessGrid(app, nodes, cfg, run_id=run_id)
    server_app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    return grid


def _corrupt(state: dict, mode: str) -> dict:
    name = next(iter(state))
    if mode == "nan":
        state[name] = state[name].clone().fill_(math.nan)
    elif mode == "inf":
        state[name] = state[name].clone().fill_(math.inf)
    elif mode == "shape":
        state[name] = torch.zeros(*[d + 1 for d in state[name].shape])
    elif mode == "huge":
        state = {k: v * 1e6 for k, v in state.items()}
    return state


def corrupting_app(bad_sites: tuple[str, ...], mode: str):
    """The real ClientApp; at the named sites its train replies are damaged on the way out."""
    def app(msg, context):
        reply = client_app(msg, context)
        site = context.node_config["site-config"].split("/")[-2]
        if msg.metadata.message_type == "train" and site in bad_sites and not reply.has_error():
            reply.content["arrays"] = ArrayRecord(_corrupt(reply.content["arrays"].to_torch_state_dict(), mode))
        return reply
    return app


@pytest.mark.parametrize("mode", ["nan", "inf", "shape", "huge"])
def test_a_broken_update_is_rejected_every_round_and_the_model_stays_sane(tmp_path, mode):
    out = tmp_path / "run"
    _serve(corrupting_app(("va",), mode), _nodes(tmp_path, evaluation="exact"), _config(out))  # exact figures
    records = read_jsonl(out / "metrics.jsonl")
    va = [r for r in records if r["site"] == "va"]
    assert len(va) == 2 and all("update rejected by the coordinator" in r["error"] for r in va)
    assert all("error" not in r for r in records if r["site"] != "va")
    model = torch.load(out / "final_model.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() and v.abs().max() < 100 for v in model.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_centre_accuracy"] > 0.6 and summary["rounds_completed"] == 2
    # the coordinator's audit log names each rejection
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    rejections = [r["payload"] for r in audit if r["event"] == "rejection"]
    assert [r["site"] for r in rejections] == ["va", "va"] and all("rejected" in r["reason"] for r in rejections)
    assert {r["payload"]["site"] for r in audit if r["event"] == "update"} == {"cleveland", "hungarian", "switzerland"}


def test_too_few_valid_updates_retries_then_stops_with_the_first_reasons_and_a_report(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(StudyStopped) as err:
        _serve(corrupting_app(("va", "switzerland"), "nan"), _nodes(tmp_path), _config(out))
    message = str(err.value)
    assert "round 1: only 2 valid update(s), min-sites is 3 (re-sent 1 time(s))" in message
    # the first failure is named with its own reason, not the ledger's refusal of the re-send
    assert re.search(r"(switzerland|va) failed first: update rejected by the coordinator: .*NaN", message)
    assert "already" not in message
    # re-sent, the round was refused by each site's ledger: never charged twice
    rounds = PrivacyLedger(tmp_path / "sites" / "va" / "privacy-ledger.sqlite").rounds("heart-disease")
    assert [r["round"] for r in rounds] == [1]
    # the run directory says why, per site and for the run, and the report shows it
    records = read_jsonl(out / "metrics.jsonl")
    stop = records[-1]
    assert stop["event"] == "stopped" and stop["round"] == 1 and stop["reason"] == message
    by_site = {r["site"]: r for r in records if "site" in r}
    assert "NaN" in by_site["va"]["error"] and "NaN" in by_site["switzerland"]["error"]
    assert "did not complete" in by_site["cleveland"]["error"] and by_site["cleveland"]["epsilon"] > 0
    html = (out / "report.html").read_text()
    assert "stopped after 0 of 2 round(s)" in html and "failed first" in html


def test_a_study_a_site_cannot_afford_stops_before_anyone_trains(tmp_path):
    """va's lifetime budget cannot hold the study: it says so at discovery, and no site is charged."""
    nodes = _nodes(tmp_path)
    nodes[13] = {"site-config": str(site_config(tmp_path / "sites", "va", epsilon_budget=0.05))}
    with pytest.raises(StudyStopped) as err:
        _serve(client_app, nodes, _config(tmp_path / "run", **{"sites": ",".join(CENTRES)}))
    assert "site va cannot take this study's 2 round(s)" in str(err.value)
    for centre in CENTRES:
        ledger = tmp_path / "sites" / centre / "privacy-ledger.sqlite"
        assert not ledger.exists() or PrivacyLedger(ledger).rounds("heart-disease") == []
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["event"] == "stopped"


class LostSiteGrid(InProcessGrid):
    """The real ClientApps, except that va's SuperNode is gone: Flower's SuperLink answers for it with
    its own NODE_UNAVAILABLE reply (made by Flower's own function), sent from the SuperLink, not from va."""

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as a real Grid's push does
            if msg.metadata.dst_node_id == 13 and msg.metadata.message_type == "train":
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))
            else:
                replies += super().send_and_receive([msg], timeout=timeout)
        return replies


class SilentSiteGrid(InProcessGrid):
    """The real ClientApps, except that va's train messages get no reply at all before the deadline (a site
    whose heartbeat outlives the round: Flower has not yet declared it lost)."""

    def send_and_receive(self, messages, *, timeout=None):
        return super().send_and_receive([m for m in messages if not (m.metadata.dst_node_id == 13
                                                                     and m.metadata.message_type == "train")])


@pytest.mark.parametrize("grid_class, cause", [
    (LostSiteGrid, "train: site lost: its SuperNode sent no heartbeat"),
    (SilentSiteGrid, "train: no reply before the round deadline"),
])
def test_a_lost_or_silent_site_is_named_with_its_cause_in_the_metrics_and_the_audit_log(tmp_path, grid_class, cause):
    out = tmp_path / "run"
    cfg = _config(out, **{"num-server-rounds": 1})
    grid = grid_class(client_app, _nodes(tmp_path), cfg, run_id=7)
    server_app(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    va = next(r for r in read_jsonl(out / "metrics.jsonl") if r["site"] == "va")
    assert va["error"].startswith(cause)
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    rejections = [r["payload"] for r in audit if r["event"] == "rejection"]
    assert [r["site"] for r in rejections] == ["va"] and rejections[0]["reason"].startswith(cause)


class Crash(RuntimeError):
    pass


def test_a_crashed_coordinator_resumes_from_its_checkpoint_to_the_same_model(tmp_path):
    """Non-DP FedAdam (deterministic, with server-side moments to restore) whose published model is the moving
    average of global models (also restored): crash after round 2 of 3, resume, and end with the model an
    uninterrupted run reaches."""
    policy = {"allow_non_dp": True}
    common = {"num-server-rounds": 3, "strategy": "fedadam", "dp": False, "noise-multiplier": 0.0,
              "server-lr": 0.05, "weight-average": 0.7}
    _serve(client_app, _nodes(tmp_path / "a", **policy), _config(tmp_path / "a" / "run", **common))
    reference = torch.load(tmp_path / "a" / "run" / "final_model.pt", weights_only=True)["state_dict"]

    out = tmp_path / "b" / "run"
    nodes = _nodes(tmp_path / "b", **policy)
    trains = []

    def crashing(msg, context):
        if msg.metadata.message_type == "train":
            trains.append(msg)
            if len(trains) > 2 * len(CENTRES):
                raise Crash("coordinator host lost power")
        return client_app(msg, context)

    with pytest.raises(StudyStopped, match=r"internal error \(Crash\)"):  # one line; the traceback in the run dir
        _serve(crashing, nodes, _config(out, **common))
    assert "coordinator host lost power" in (out / "error.txt").read_text()
    assert load(out).round == 2 and set(load(out).strategy_state) == {"m_t", "v_t"}
    assert load(out).weight_average["weight"] == 1 + 0.7
    assert not (out / "summary.json").exists()

    _serve(client_app, nodes, _config(out, **common, **{"resume-from": str(out)}), run_id=8)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert sorted(r["round"] for r in read_jsonl(out / "rounds.jsonl")) == [1, 2, 3]
    resumed = torch.load(out / "final_model.pt", weights_only=True)["state_dict"]
    for name, value in reference.items():
        np.testing.assert_allclose(resumed[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)
    assert (out / CHECKPOINT_FILE).exists()


def test_a_site_that_crashes_after_charging_continues_with_a_correct_ledger(tmp_path, monkeypatch):
    real_train, calls = EhrTask.train, []

    def flaky(self, *args, **kwargs):
        calls.append(self.dataset.path.name)
        if len(calls) == 1:  # the first site to train dies mid-training, after its ledger charge
            raise RuntimeError("GPU preempted")
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(EhrTask, "train", flaky)
    out = tmp_path / "run"
    _serve(client_app, _nodes(tmp_path, accountant="prv", epsilon_budget=10.0), _config(out))  # PRV figures checked
    crashed = calls[0].split(".")[1]  # processed.<centre>.data
    first = [r for r in read_jsonl(out / "metrics.jsonl") if r["site"] == crashed]
    assert "internal error" in first[0]["error"] and "error" not in first[1]
    ledger = PrivacyLedger(tmp_path / "sites" / crashed / "privacy-ledger.sqlite")
    rounds = ledger.rounds("heart-disease")
    # the lost round is charged, once; the next one too; each with its evaluation release
    assert [(r["round"], r["kind"]) for r in rounds] == [(1, "training"), (1, "evaluation"), (2, "training"),
                                                         (2, "evaluation")]
    spent = ledger.spent("heart-disease", 1e-4, "prv")
    history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rounds]
    assert spent == pytest.approx(epsilon(history, 1e-4, "prv"), rel=1e-9)
    assert first[1]["epsilon"] == pytest.approx(spent, rel=1e-6)


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_aggregators_train_a_sane_model_with_dp(tmp_path, strategy):
    out = tmp_path / "run"
    _serve(client_app, _nodes(tmp_path, evaluation="exact"), _config(out, strategy=strategy, **{"trim-beta": 0.25}))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["rounds_completed"] == 2
    assert summary["mean_centre_accuracy"] > 0.55
    model = torch.load(out / "final_model.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in model.values())
