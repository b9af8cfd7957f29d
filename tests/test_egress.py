"""The site's egress rules (deploy/site/egress.py) on replies the real ClientApp produced.

Each honest reply comes from the ClientApp's own handler (real data, real Opacus, the site's real
ledger) and passes; each mutation is what an approved-but-malicious app version might send instead,
and must be blocked by the rule that names it. The gate's wiring of these rules into a running
SuperNode is tested on real processes in tests/test_fault_injection.py.
"""

from __future__ import annotations

import copy
import itertools
import time

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata
from flwr.app import MetricRecord, RecordDict
from flwr.app.message import make_message

from client import client_app
from client.site import load_site_config
from deploy.site import egress
from deploy.site.egress_hook import instruction_of
from deploy.site.flower_seam import as_transported
from shared_models.registry import build_model
from tests import helpers

RUN, ROUND = 7, 3
_ids = itertools.count(1)


def _incoming(content: RecordDict, message_type: str, group: str = str(ROUND)) -> Message:
    metadata = Metadata(run_id=RUN, message_id=f"in-{next(_ids)}", src_node_id=1, dst_node_id=42,
                        reply_to_message_id="", group_id=group, created_at=time.time(), ttl=DEFAULT_TTL,
                        message_type=message_type)
    message = make_message(metadata=metadata, content=content)
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink numbers messages
    return message


def _contents(message: Message) -> dict[str, bytes]:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


def _size(message: Message) -> int:
    return sum(len(c) for c in _contents(message).values())


@pytest.fixture(scope="module")
def site(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("egress")
    toml = helpers.site_config(folder, "cleveland", nominal_size=200)
    return toml, load_site_config(toml)


@pytest.fixture(scope="module")
def trained(site):
    """One honest DP round through the ClientApp: (instruction, its reply)."""
    toml, _ = site
    torch.manual_seed(0)
    model = build_model("ehr-logreg", n_features=13)
    config = {"model": "ehr-logreg", "local-steps": 5, "local-epochs": 1, "batch-size": 8, "optimizer": "sgd",
              "lr": 0.05, "seed": 1, "server-round": ROUND, "dp": True, "noise-multiplier": 1.0, "clip-norm": 1.0,
              "target-epsilon": 0.0, "num-server-rounds": 5}
    msg = _incoming(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(config)}),
                    MessageType.TRAIN)
    context = Context(run_id=RUN, node_id=42, node_config={"site-config": str(toml)}, state=RecordDict(),
                      run_config={"task": "ehr"})
    reply = client_app.train(msg, context)
    assert not reply.has_error(), reply.error.reason
    return msg, reply


def _check(reply: Message, msg: Message, site, run_config=None) -> egress.Verdict:
    instruction = instruction_of(msg, _contents(msg))
    return egress.check_reply(egress.Reply(reply, _size(reply)), instruction, site[1], run_config or {"task": "ehr"},
                              RUN)


def _variant(reply: Message, change) -> Message:
    """A copy of ``reply`` whose content ``change`` edited (as another app version would have built it)."""
    content = as_transported(reply.content)
    change(content)
    return make_message(metadata=reply.metadata, content=content)


def test_an_honest_train_reply_leaves(site, trained):
    msg, reply = trained
    assert _check(reply, msg, site) == egress.ALLOWED
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 200 and "train-loss" not in metrics and "sample-rate" not in metrics


def _set_metric(key, value):
    def change(content):
        content["metrics"][key] = value
    return change


def _reshape_first_array(content):
    arrays = content["arrays"]
    name = next(iter(arrays))
    arrays[name] = Array(np.zeros((3, 3), dtype=np.float32))


def _add_raw_data(content):
    content["arrays"]["x_train"] = Array(np.random.default_rng(0).standard_normal((200, 13)).astype(np.float32))


def _poison(content):
    arrays = content["arrays"]
    name = next(iter(arrays))
    values = arrays[name].numpy().copy()
    values.flat[0] = np.nan
    arrays[name] = Array(values)


@pytest.mark.parametrize("change, rule", [
    (_set_metric("train-loss", 0.41), "keys"),                         # an extra metric key
    (lambda c: c.__setitem__("note", ConfigRecord({"comment": "Jane Doe"})), "record"),  # a string value
    (_reshape_first_array, "arrays"),                                   # an array of another shape
    (_add_raw_data, "arrays"),                                          # a raw data array
    (_poison, "arrays"),                                                # NaN in the weights
    (lambda c: c.__setitem__("pad", ConfigRecord({"b": b"\0" * 600_000})), "size"),  # far over the size bound
    (_set_metric("num-examples", 197), "weight"),                       # the exact N instead of the nominal size
    (_set_metric("epsilon", 0.01), "ledger"),                           # an ε the ledger did not charge
    (_set_metric("local-steps", [1.0] * 5000), "numbers"),              # a long list of numbers
])
def test_a_malicious_train_reply_is_blocked_by_the_rule_that_names_it(site, trained, change, rule):
    msg, reply = trained
    verdict = _check(_variant(reply, change), msg, site)
    assert verdict.rule == rule and verdict.blocked
    assert "Jane" not in verdict.reason and "0.41" not in verdict.reason  # names keys at most, never values


def test_weights_without_a_ledger_charge_are_blocked(site, trained):
    """Round 4 was never charged: the same reply, as if answering round 4, may not leave."""
    msg, reply = trained
    later = _incoming(msg.content, MessageType.TRAIN, group="4")
    metadata = copy.copy(reply.metadata)
    metadata.group_id = "4"
    moved = make_message(metadata=metadata, content=reply.content)
    verdict = _check(moved, later, site)
    assert verdict.rule == "ledger" and "round 4" in verdict.reason


def test_a_reply_of_another_type_or_to_an_unseen_message_is_blocked(site, trained):
    msg, reply = trained
    assert egress.check_reply(egress.Reply(reply, _size(reply)), None, site[1], {"task": "ehr"}, RUN).rule == \
        "unknown-instruction"
    query = _incoming(RecordDict(), MessageType.QUERY)
    assert _check(reply, query, site).rule == "message-type"


def test_the_query_reply_names_only_the_site_and_its_public_size(site):
    toml, _ = site
    msg = _incoming(RecordDict(), MessageType.QUERY, group="")
    context = Context(run_id=RUN, node_id=42, node_config={"site-config": str(toml)}, state=RecordDict(),
                      run_config={"task": "ehr"})
    reply = client_app.query(msg, context)
    assert _check(reply, msg, site) == egress.ALLOWED
    assert dict(reply.content["counts"]) == {"nominal-size": 200, "n-features": 13}
    forged = _variant(reply, lambda c: c["site"].__setitem__("site-id", "Jane Doe"))
    assert _check(forged, msg, site).rule == "strings"
    counted = _variant(reply, lambda c: c["counts"].__setitem__("n-train", 199))
    assert _check(counted, msg, site).rule == "keys"


def test_error_reasons_leave_only_in_the_sites_own_words(site, trained):
    msg, _ = trained
    real = Message(Error(4004, "refused by site privacy policy: privacy budget of dataset 'heart-disease' would "
                               "be exceeded: this round needs ε=0.52 (total 10.3) but only ε=0.2 of 10 remains "
                               "(δ=0.0001)"), reply_to=msg)
    assert _check(real, msg, site) == egress.ALLOWED
    canary = Message(Error(4001, "site error: cannot read /data/ZQXJ-canary-Doe/series_0001.dcm"), reply_to=msg)
    verdict = _check(canary, msg, site)
    assert verdict.rule == "reason" and not verdict.blocked
    assert verdict.reworded == egress.SITE_CODES[4001] and "ZQXJ" not in verdict.reason


def test_non_dp_evaluation_needs_the_sites_opt_in(site, trained):
    msg, _ = trained
    evaluate = _incoming(RecordDict({"arrays": msg.content["arrays"], "config": ConfigRecord({"model": "ehr-logreg"})}),
                         MessageType.EVALUATE)
    exact = Message(RecordDict({"metrics": MetricRecord({"eval-dp": 0.0, "noise-std": 0.0, "tp": 10.0, "fp": 2.0,
                                                         "tn": 3.0, "fn": 1.0})}), reply_to=evaluate)
    verdict = _check(exact, evaluate, site)
    assert verdict.rule == "ledger" and "opt-in" in verdict.reason
    uncharged = Message(RecordDict({"metrics": MetricRecord({"eval-dp": 1.0, "noise-std": 3.4, "tp": 10.2})}),
                        reply_to=evaluate)
    assert _check(uncharged, evaluate, site).rule == "ledger"
    arrays = Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=evaluate)
    assert _check(arrays, evaluate, site).rule == "record"


def test_a_non_dp_round_the_sites_policy_allows_leaves_stating_an_unbounded_epsilon(tmp_path, data_dir):
    """dp = false at a site with allow_non_dp: the ledger charged the round at σ = 0, the reply says ε = ∞."""
    toml = helpers.site_config(tmp_path, "hungarian", allow_non_dp=True)
    site = (toml, load_site_config(toml))
    torch.manual_seed(0)
    config = {"model": "ehr-logreg", "local-steps": 3, "local-epochs": 1, "batch-size": 8, "optimizer": "sgd",
              "lr": 0.05, "seed": 1, "server-round": 1, "dp": False, "noise-multiplier": 0.0, "clip-norm": 1.0,
              "target-epsilon": 0.0, "num-server-rounds": 1}
    msg = _incoming(RecordDict({"arrays": ArrayRecord(build_model("ehr-logreg", n_features=13).state_dict()),
                                "config": ConfigRecord(config)}), MessageType.TRAIN, group="1")
    context = Context(run_id=RUN, node_id=42, node_config={"site-config": str(toml)}, state=RecordDict(),
                      run_config={"task": "ehr"})
    reply = client_app.train(msg, context)
    assert not reply.has_error(), reply.error.reason
    assert reply.content["metrics"]["epsilon"] == float("inf") and _check(reply, msg, site) == egress.ALLOWED


def test_secure_aggregation_replies_leave_as_the_protocol_makes_them_and_nothing_else(site, data_dir, tmp_path):
    """Two sites of a secure sum through the real ClientApp handlers: their keys, their shares, and a masked
    update (uint32 words of the model's shapes) leave; a masked update answering a plain train message, a float
    update answering a secure one, and protocol replies holding other keys or other forms are blocked."""
    from client import secure_aggregation as secagg

    toml, _ = site
    other = helpers.site_config(tmp_path, "hungarian")
    contexts = {node: Context(run_id=RUN, node_id=node, node_config={"site-config": str(path)}, state=RecordDict(),
                              run_config={"task": "ehr"}) for node, path in ((42, toml), (43, other))}
    r = ROUND + 10  # a round this module's site has not trained yet
    config = ConfigRecord({"server-round": r})

    def ask(kind, node, record=None):
        content = RecordDict({"config": config, **({secagg.RECORD: ConfigRecord(record)} if record else {})})
        msg = _incoming(content, f"{MessageType.QUERY}.{kind}", group=str(r))
        return msg, getattr(client_app, kind)(msg, contexts[node])

    keys = {n: ask("secagg_keys", n) for n in contexts}
    msg, reply = keys[42]
    assert _check(reply, msg, site) == egress.ALLOWED
    assert _check(_variant(reply, lambda c: c[secagg.RECORD].__setitem__("note", b"x")), msg, site).rule == "keys"
    assert _check(_variant(reply, lambda c: c[secagg.RECORD].__setitem__("share-key", b"\x02" + b"P" * 100)), msg,
                  site).rule == "record"
    group = {"nodes": ["42", "43"], "share-keys": [keys[n][1].content[secagg.RECORD]["share-key"] for n in (42, 43)],
             "mask-keys": [keys[n][1].content[secagg.RECORD]["mask-key"] for n in (42, 43)]}
    shares = {n: ask("secagg_shares", n, group) for n in contexts}
    assert all(_check(r, m, site) == egress.ALLOWED for m, r in shares.values())

    model = build_model("ehr-logreg", n_features=13)
    train_config = {"model": "ehr-logreg", "local-steps": 2, "local-epochs": 1, "batch-size": 8, "optimizer": "sgd",
                    "lr": 0.05, "seed": 1, "server-round": r, "dp": True, "noise-multiplier": 1.0,
                    "clip-norm": 1.0, "target-epsilon": 0.0, "num-server-rounds": 5}
    secure = _incoming(RecordDict({
        "arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({**train_config, "secure-aggregation": True}),
        secagg.RECORD: ConfigRecord({"group": ["42", "43"], "from": ["43"], "weight": 0.5, "max-update-norm": 0.0,
                                     "shares": [shares[43][1].content[secagg.RECORD]["shares"][0]]})}),
        MessageType.TRAIN, group=str(r))
    masked = client_app.train(secure, contexts[42])
    assert not masked.has_error(), masked.error.reason
    assert {a.dtype for a in masked.content["arrays"].values()} == {"uint32"}
    assert _check(masked, secure, site) == egress.ALLOWED
    plain = _incoming(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(train_config)}),
                      MessageType.TRAIN, group=str(r))
    assert _check(masked, plain, site).rule == "arrays"  # masked words answering a plain train message
    floats = _variant(masked, lambda c: c.__setitem__("arrays", ArrayRecord(model.state_dict())))
    assert _check(floats, secure, site).rule == "arrays"  # a plain update answering a secure one
