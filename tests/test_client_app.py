"""The site's ClientApp handlers, called directly with real Flower Messages and Contexts.

Incoming messages are built the way the SuperNode hands them to a ClientApp: a RecordDict plus
the Metadata of a received instruction (``flwr.app.message.make_message``), so no process-wide
Flower identity has to be faked. Data: the real Cleveland file from $CAREFL_DATA.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests import helpers
import torch
from flwr.app import (DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata,
                      RecordDict)
from flwr.app.message import make_message

from client import client_app
from client.ingest import heart_disease
from privacy.ledger import PrivacyLedger
from shared_models.metrics import SCORE_BINS, binary_figures
from shared_models.registry import build_model, model_names

SERVER_NODE, SITE_NODE = 1, 42
_ids = itertools.count(1)


def _context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=7, node_id=SITE_NODE, node_config=node_config, state=RecordDict(),
                   run_config=run_config or {})


@pytest.fixture
def cleveland_ctx(data_dir, tmp_path) -> Context:
    return _context({"site-config": str(helpers.site_config(tmp_path, "cleveland"))})


def _incoming(content: RecordDict, message_type: str) -> Message:
    """An instruction from the coordinator, as delivered to the site."""
    metadata = Metadata(run_id=7, message_id=f"msg-{next(_ids)}", src_node_id=SERVER_NODE, dst_node_id=SITE_NODE,
                        reply_to_message_id="", group_id="3", created_at=time.time(), ttl=DEFAULT_TTL,
                        message_type=message_type)
    return make_message(metadata=metadata, content=content)


def _model(name="ehr-logreg"):
    torch.manual_seed(0)
    return build_model(name, n_features=13)


def _train_config(**overrides) -> ConfigRecord:
    cfg = {"model": "ehr-logreg", "local-steps": 20, "local-epochs": 1, "batch-size": 4, "optimizer": "sgd",
           "lr": 0.05, "seed": 42, "server-round": 3, "dp": True, "noise-multiplier": 1.0, "clip-norm": 1.0,
           "target-epsilon": 0.0, "num-server-rounds": 5}
    cfg.update(overrides)
    return ConfigRecord(cfg)


def _train_msg(weights=None, **overrides) -> Message:
    weights = weights if weights is not None else _model(overrides.get("model", "ehr-logreg"))
    return _incoming(RecordDict({"arrays": ArrayRecord(weights.state_dict()), "config": _train_config(**overrides)}),
                     MessageType.TRAIN)


def _evaluate_msg(model=None, name="ehr-logreg", **config) -> Message:
    model = model if model is not None else _model(name)
    config = {"model": name, "server-round": 3, "dp": True, "eval-noise-multiplier": 2.0, **config}
    return _incoming(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(config)}),
                     MessageType.EVALUATE)


def _assert_reply_to(reply: Message, msg: Message) -> None:
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.dst_node_id == SERVER_NODE
    assert reply.metadata.src_node_id == SITE_NODE
    assert reply.metadata.message_type == msg.metadata.message_type


# ---- query ----

def test_query_reports_identity_and_counts_only(cleveland_ctx):
    msg = _incoming(RecordDict({}), MessageType.QUERY)
    reply = client_app.query(msg, cleveland_ctx)
    assert not reply.has_error()
    _assert_reply_to(reply, msg)
    content = reply.content
    assert set(content.keys()) == {"site", "counts", "audit-head"}  # the head of the site's signed log
    assert content.array_records == {}
    assert set(content.config_records["audit-head"]) == {"seq", "hash", "sig"}
    site = content.config_records["site"]
    assert dict(site) == {"site-id": "cleveland", "task": "ehr", "dataset": "heart-disease",
                          "models": model_names("ehr")}
    counts = content.metric_records["counts"]
    assert dict(counts) == {"nominal-size": 1, "n-features": 13}  # no nominal_size disclosed: weight 1, never N


# ---- train ----

def test_train_returns_new_weights_and_counts(cleveland_ctx):
    start = _model()
    msg = _train_msg(start)
    reply = client_app.train(msg, cleveland_ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    _assert_reply_to(reply, msg)
    arrays = reply.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    new_state = arrays.to_torch_state_dict()
    assert set(new_state) == set(start.state_dict())
    changed = [k for k in new_state if not torch.equal(new_state[k], start.state_dict()[k])]
    assert set(changed) == set(start.state_dict())  # every tensor moved
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 1  # the public weight (no nominal_size in site.toml), not N = 199
    assert metrics["local-steps"] == 20
    assert "train-loss" not in metrics and "sample-rate" not in metrics  # not DP / B over N: stay at the site
    # the returned weights load into the coordinator's copy of the architecture
    build_model("ehr-logreg", n_features=13).load_state_dict(new_state)


def test_train_mlp(cleveland_ctx):
    start = _model("ehr-mlp")
    reply = client_app.train(_train_msg(start, model="ehr-mlp", **{"local-steps": 5}), cleveland_ctx)
    assert not reply.has_error()
    assert set(reply.content["arrays"].keys()) == set(start.state_dict())


def test_train_honours_proximal_mu_from_config(tmp_path):
    # without DP noise, so the comparison is deterministic (this site's policy allows it)
    ctx = _context({"site-config": str(helpers.site_config(tmp_path, "cleveland", allow_non_dp=True))})
    start = _model()
    replies = [client_app.train(_train_msg(start, **{"proximal-mu": mu, "local-steps": 60, "server-round": r,
                                                     "dp": False}), ctx)
               for r, mu in ((1, 0.0), (2, 2.0))]
    flat_start = torch.cat([p.flatten() for p in start.state_dict().values()])
    dist = [torch.linalg.norm(torch.cat([t.flatten() for t in r.content["arrays"].to_torch_state_dict().values()])
                              - flat_start).item() for r in replies]
    assert dist[1] < dist[0]


# ---- evaluate ----

BINARY_RELEASE = {"tp", "fp", "tn", "fn", "score-hist-pos", "score-hist-neg", "loss-sum", "loss-bound"}


def test_evaluate_releases_noisy_counts_charged_to_the_ledger_before_computing(cleveland_ctx, tmp_path):
    msg = _evaluate_msg()
    reply = client_app.evaluate(msg, cleveland_ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    _assert_reply_to(reply, msg)
    assert set(reply.content.keys()) == {"metrics", "audit-head"}
    m = reply.content["metrics"]
    assert set(m) == BINARY_RELEASE | {"eval-dp", "noise-std", "epsilon", "delta", "noise-multiplier", "l2-bound"}
    assert m["eval-dp"] == 1.0 and m["noise-multiplier"] == 2.0 and m["noise-std"] == pytest.approx(2 * 3 ** 0.5)
    assert len(m["score-hist-pos"]) == len(m["score-hist-neg"]) == SCORE_BINS
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == pytest.approx(104, abs=6 * 2 * m["noise-std"])  # 4 noisy counts
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] != 104  # … noisy: none of them is the exact count
    rows = PrivacyLedger(tmp_path / "cleveland" / "privacy-ledger.sqlite").rounds("heart-disease")
    assert [(r["round"], r["kind"], r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows] == \
        [(3, "evaluation", 2.0, 1.0, 1)]
    assert m["epsilon"] == rows[0]["epsilon_after"] and m["delta"] == 1e-4
    log = [json.loads(line) for line in (tmp_path / "cleveland" / "audit.jsonl").read_text().splitlines()]
    dp_round = next(r["payload"] for r in log if r["event"] == "dp-round")
    assert dp_round["mechanism"] == "evaluation" and dp_round["round"] == 3 and dp_round["n"] == 104
    assert [r["event"] for r in log].index("dp-round") < [r["event"] for r in log].index("reply")
    again = client_app.evaluate(_evaluate_msg(), cleveland_ctx)  # the same round's release is never charged twice
    assert again.has_error() and again.error.code == client_app.CODE_PRIVACY and "already charged" in again.error.reason


def test_exact_evaluation_is_logged_as_not_dp_and_marked_in_the_reply(tmp_path, caplog):
    ctx = _context({"site-config": str(helpers.site_config(tmp_path, "cleveland", evaluation="exact"))})
    trained = client_app.train(_train_msg(**{"local-steps": 200}), ctx)
    model = build_model("ehr-logreg", n_features=13)
    model.load_state_dict(trained.content["arrays"].to_torch_state_dict())
    m = client_app.evaluate(_evaluate_msg(model), ctx).content["metrics"]
    assert set(m) == BINARY_RELEASE | {"eval-dp", "noise-std"} and m["eval-dp"] == 0.0 and m["noise-std"] == 0.0
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == 104
    assert sum(m["score-hist-pos"]) + sum(m["score-hist-neg"]) == 104
    assert sum(m["score-hist-pos"]) == m["tp"] + m["fn"] and 0 < m["loss-sum"] <= 104 * m["loss-bound"]
    assert binary_figures(m)["accuracy"] > 0.7  # the trained model, judged from its counts
    rows = PrivacyLedger(tmp_path / "cleveland" / "privacy-ledger.sqlite").rounds("heart-disease")
    assert [r["kind"] for r in rows] == ["training"]  # nothing charged for the exact release
    log = [json.loads(line) for line in (tmp_path / "cleveland" / "audit.jsonl").read_text().splitlines()]
    exact = [r["payload"] for r in log if r["event"] == "non-dp-release"]
    assert len(exact) == 1 and exact[0]["dp"] is False and "exact" in exact[0]["reason"]
    assert "EXACT EVALUATION" in caplog.text


# ---- errors become replies ----

def _config_for(tmp_path, data_path: Path) -> Context:
    from client.site import write_site_config

    path = write_site_config(tmp_path / "site" / "site.toml", "cleveland", data_path, epsilon_budget=10.0)
    return _context({"site-config": str(path)})


def test_missing_data_file_is_a_site_error_reply(tmp_path, caplog):
    missing = tmp_path / "processed.cleveland.data"
    ctx = _config_for(tmp_path, missing)
    for handler, msg in ((client_app.query, _incoming(RecordDict({}), MessageType.QUERY)),
                         (client_app.train, _train_msg()),
                         (client_app.evaluate, _evaluate_msg())):
        reply = handler(msg, ctx)
        assert reply.has_error()
        assert not reply.has_content()
        _assert_reply_to(reply, msg)
        assert reply.error.code == client_app.CODE_SITE_ERROR
        assert reply.error.reason.startswith("site error:")
        assert "data is missing" in reply.error.reason and str(tmp_path) not in reply.error.reason
        assert str(missing) in caplog.text  # the site's own log has the path


def test_malformed_data_reply_does_not_echo_values(tmp_path, data_dir, caplog):
    lines = heart_disease.centre_file(data_dir, "cleveland").read_text().splitlines()[:20]
    fields = lines[5].split(",")
    fields[3] = "XYZZY123"
    lines[5] = ",".join(fields)
    path = tmp_path / "processed.cleveland.data"
    path.write_text("\n".join(lines) + "\n")
    reply = client_app.query(_incoming(RecordDict({}), MessageType.QUERY), _config_for(tmp_path, path))
    assert reply.has_error()
    assert reply.error.code == client_app.CODE_SITE_ERROR
    assert "malformed" in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert "line 6" in caplog.text and "'trestbps'" in caplog.text  # the details stay at the site
    assert "XYZZY123" not in reply.error.reason and "XYZZY123" not in caplog.text


def test_node_config_without_site_config_is_a_site_error_reply(caplog):
    reply = client_app.query(_incoming(RecordDict({}), MessageType.QUERY), _context({"site-id": "cleveland"}))
    assert reply.has_error()
    assert reply.error.code == client_app.CODE_SITE_ERROR
    assert "site-config" in caplog.text


def test_incomplete_site_config_is_a_site_error_reply(tmp_path, caplog):
    path = tmp_path / "site.toml"
    path.write_text('[site]\nid = "cleveland"\n\n[datasets.heart-disease]\npath = "x.data"\n')
    reply = client_app.query(_incoming(RecordDict({}), MessageType.QUERY), _context({"site-config": str(path)}))
    assert reply.has_error() and reply.error.code == client_app.CODE_SITE_ERROR
    assert str(path) not in reply.error.reason
    assert str(path) in caplog.text and "epsilon_budget is required" in caplog.text


@pytest.mark.parametrize("handler", ["train", "evaluate"])
def test_unknown_model_is_refused(cleveland_ctx, handler):
    model = _model()
    if handler == "train":
        msg = _train_msg(model, model="ehr-gpt")
    else:
        msg = _incoming(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                    "config": ConfigRecord({"model": "ehr-gpt"})}), MessageType.EVALUATE)
    reply = getattr(client_app, handler)(msg, cleveland_ctx)
    assert reply.has_error()
    _assert_reply_to(reply, msg)
    assert reply.error.code == client_app.CODE_BAD_REQUEST
    assert reply.error.reason.startswith("refused:")
    assert "ehr-gpt" in reply.error.reason and "ehr-logreg" in reply.error.reason


def test_bad_train_settings_are_refused(cleveland_ctx):
    reply = client_app.train(_train_msg(**{"batch-size": 0}), cleveland_ctx)
    assert reply.has_error()
    assert reply.error.code == client_app.CODE_BAD_REQUEST
    assert "batch-size" in reply.error.reason


def test_weights_of_another_model_are_refused(cleveland_ctx):
    """An MLP's weights sent under the logreg name: refused, not an internal error."""
    msg = _incoming(RecordDict({"arrays": ArrayRecord(_model("ehr-mlp").state_dict()),
                                "config": ConfigRecord({"model": "ehr-logreg"})}), MessageType.EVALUATE)
    reply = client_app.evaluate(msg, cleveland_ctx)
    assert reply.has_error()
    assert reply.error.code == client_app.CODE_BAD_REQUEST
    assert "Traceback" not in reply.error.reason


# ---- simulation ----

def test_simulation_partition_node_config(data_dir, tmp_path):
    run_config = {"sim-data-dir": str(data_dir), "out-dir": str(tmp_path)}
    sizes = {}
    for pid in range(8):
        ctx = _context({"partition-id": pid, "num-partitions": 8}, run_config)
        reply = client_app.query(_incoming(RecordDict({}), MessageType.QUERY), ctx)
        assert not reply.has_error(), reply.error.reason
        site = reply.content["site"]
        centre = heart_disease.CENTRES[pid % 4]
        assert site["site-id"] == f"sim-{pid:04d}-{centre}"
        _, shard, shards = heart_disease.partition_for(pid, 8)
        rows = heart_disease.load_centre(heart_disease.centre_file(data_dir, centre), shard, shards).y_train
        sizes.setdefault(centre, []).append(len(rows))
        assert reply.content["counts"]["nominal-size"] == 1  # a virtual site discloses no size either
    assert {c: sum(v) for c, v in sizes.items()} == {"cleveland": 199, "hungarian": 172, "switzerland": 30, "va": 85}

    ctx = _context({"partition-id": 1, "num-partitions": 8}, run_config)  # hungarian, shard 0 of 2
    trained = client_app.train(_train_msg(**{"local-steps": 5}), ctx)
    assert not trained.has_error(), trained.error.reason
    assert trained.content["metrics"]["num-examples"] == 1
    evaluated = client_app.evaluate(_evaluate_msg(dp=False), ctx)  # a non-DP study its policy allows: exact
    m = evaluated.content["metrics"]
    assert m["eval-dp"] == 0.0 and m["tp"] + m["fp"] + m["tn"] + m["fn"] == 89  # the centre's whole test split


def test_simulation_without_data_dir_is_a_site_error(caplog):
    reply = client_app.query(_incoming(RecordDict({}), MessageType.QUERY),
                             _context({"partition-id": 0, "num-partitions": 2},
                                      {"sim-data-dir": "", "out-dir": "/tmp"}))
    assert reply.has_error()
    assert reply.error.code == client_app.CODE_SITE_ERROR
    assert "sim-data-dir" in caplog.text
