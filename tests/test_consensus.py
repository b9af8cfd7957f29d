"""Bounded, consensus-checked aggregation (server/consensus.py) and the checks on evaluation releases,
on the real SiteGrid path: what one dishonest site's update becomes before any strategy sees it, what is
recorded about it, and which evaluation replies the coordinator refuses to believe."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from deploy.site.flower_seam import set_task_identity
from server.consensus import ConsensusRule, OutlierWatch, bound, geometric_median
from server.metrics import release_problem
from server.settings import RunConfigError, RunSettings
from server.sites import SiteGrid, SiteInfo
from server.validation import UpdateValidator
from shared_models.eval_release import binary_layout, binary_vectors
from tests.helpers import Replied, default_run_config

DIM = 400


def _honest(rng, n: int, signal: float = 1.0, noise: float = 0.6) -> list[np.ndarray]:
    """Deltas sharing one direction plus independent noise, like DP updates of sites of one population."""
    direction = rng.standard_normal(DIM)
    direction /= np.linalg.norm(direction)
    return [signal * direction + noise * rng.standard_normal(DIM) / np.sqrt(DIM) for _ in range(n)]


def _gram(deltas: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack(deltas)
    return stacked @ stacked.T


def test_geometric_median_from_the_gram_matrix_is_the_minimiser_of_summed_distances():
    rng = np.random.default_rng(1)
    points = [rng.standard_normal(5) for _ in range(6)] + [np.full(5, 1e3)]
    alpha = geometric_median(_gram(points))
    median = alpha @ np.stack(points)

    def cost(z):
        return sum(np.linalg.norm(p - z) for p in points)
    assert alpha.sum() == pytest.approx(1.0)
    for _ in range(50):  # no nearby point does better
        assert cost(median) <= cost(median + 0.01 * rng.standard_normal(5)) + 1e-9
    assert np.linalg.norm(median) < 3  # the far point did not drag it


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_a_reversed_update_is_an_outlier_and_a_long_one_counts_less_than_a_typical_one(scale):
    rng = np.random.default_rng(2)
    deltas = _honest(rng, 4)
    deltas[0] = -scale * deltas[0]
    bounded = bound(_gram(deltas), ConsensusRule())
    first = bounded.agreement[0]
    assert "opposed" in first.outlier and first.cosine < 0
    assert all(a.outlier == "" and a.scale == 1.0 for a in bounded.agreement[1:])
    assert np.array_equal(bounded.coefficients[1:], np.eye(4)[1:])  # the honest ones as sent
    typical = np.median([np.linalg.norm(d) for d in deltas])
    length = np.linalg.norm(bounded.coefficients[0] @ np.stack(deltas))
    if scale == 1.0:  # direction alone changes nothing (under DP, honest updates point every way)
        assert first.scale == 1.0 and bounded.changed == []
    else:
        assert "far" in first.outlier and bounded.changed == [0] and length < typical


def test_a_long_update_counts_less_the_longer_it_is():
    rng = np.random.default_rng(3)
    deltas = _honest(rng, 5)
    deltas[2] = 50 * deltas[2]  # same direction, 50 times as long: never left out, but bounded
    bounded = bound(_gram(deltas), ConsensusRule(factor=3.0))
    norms = [np.linalg.norm(d) for d in deltas]
    assert bounded.agreement[2].outlier == "far" and bounded.agreement[2].cosine > 0.5
    new_length = np.linalg.norm(bounded.coefficients[2] @ np.stack(deltas))
    radius = 3.0 * np.median(norms)
    assert bounded.radius == pytest.approx(radius)
    assert new_length == pytest.approx(radius ** 2 / norms[2]) and new_length < radius
    assert bounded.changed == [2]


def test_an_idle_site_has_no_vote_and_fewer_than_three_updates_bound_nothing():
    rng = np.random.default_rng(4)
    deltas = _honest(rng, 4)
    deltas[1] = np.zeros(DIM)  # replays the global model
    bounded = bound(_gram(deltas), ConsensusRule())
    assert bounded.agreement[1].outlier == "idle" and bounded.changed == []
    assert [a.outlier for i, a in enumerate(bounded.agreement) if i != 1] == ["", "", ""]
    few = bound(_gram(deltas[:2] + [-deltas[0]]), ConsensusRule())
    assert few.changed == [] and few.radius == 0.0  # two voters: no majority to agree with


def test_a_site_is_flagged_after_the_rule_s_rounds_in_a_row_and_only_once():
    rng = np.random.default_rng(5)
    watch = OutlierWatch(ConsensusRule(rounds_to_flag=3))
    flagged = []
    for server_round, outlier in enumerate([True, True, False, True, True, True, True], start=1):
        deltas = _honest(rng, 4)
        if outlier:
            deltas[3] = -deltas[3]
        agreement = bound(_gram(deltas), ConsensusRule()).agreement
        flagged.append(watch.observe(server_round, dict(zip("abcd", agreement))))
    assert [sorted(f) for f in flagged] == [[], [], [], [], [], ["d"], []]
    assert "3 rounds in a row" in watch.flagged["d"] and "opposed" in watch.flagged["d"]


# ---- the same on SiteGrid's path: real Flower replies, the validation pass's Gram matrix ----

def _train_round(deltas: list[np.ndarray], weights: list[int]):
    set_task_identity(task_id=1, run_id=1, node_id=0)  # Flower stamps new messages with the process's task
    base = np.linspace(-1, 1, DIM).astype(np.float32)
    sites = [SiteInfo(f"site-{k}", 100 + k, weight=w, n_features=0) for k, w in enumerate(weights)]
    messages = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(base)}),
                                    "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=s.node_id, message_type=MessageType.TRAIN) for s in sites]
    replies = []
    for m, d, w in zip(messages, deltas, weights):
        content = RecordDict({"arrays": ArrayRecord({"w": Array((base + d).astype(np.float32))}),
                              "metrics": MetricRecord({"num-examples": w})})
        replies.append(Message(content, reply_to=m))
    return base, sites, messages, replies


def test_site_grid_bounds_a_long_reversed_update_after_the_audit_saw_what_was_sent():
    rng = np.random.default_rng(6)
    deltas = _honest(rng, 4)
    deltas[0] = -10 * deltas[0]
    base, sites, messages, replies = _train_round(deltas, [199, 172, 30, 85])
    sent_ids = [r.content["arrays"].object_id for r in replies]
    seen, agreement = [], {}

    def on_replies(kind, server_round, batch):
        seen.extend(reply.content["arrays"].object_id for _, reply in batch)

    grid = SiteGrid(Replied(replies), sites, on_replies, UpdateValidator(), quorum=3,
                    on_consensus=lambda r, a, radius: agreement.update(a))
    grid.fuse_average("num-examples")
    accepted = grid.send_and_receive(messages)
    assert seen == sent_ids  # the audit log hashes what each site sent, before anything is bounded
    assert agreement["site-0"].outlier == "far,opposed" and list(agreement) == [s.site_id for s in sites]
    assert accepted.average is None  # bounded: the strategy averages the bounded updates itself
    radius = 3.0 * np.median([np.linalg.norm(d) for d in deltas])
    bounded = accepted[0].content["arrays"]["w"].numpy().astype(np.float64) - base
    expected = (radius / np.linalg.norm(deltas[0])) ** 2 * deltas[0]
    assert bounded == pytest.approx(expected, abs=1e-5)
    for reply, d in zip(accepted[1:], deltas[1:]):  # the honest ones untouched
        assert np.array_equal(reply.content["arrays"]["w"].numpy(), (base + d).astype(np.float32))


def test_site_grid_gram_matrix_is_the_deltas_gram_matrix():
    rng = np.random.default_rng(7)
    deltas = _honest(rng, 5)
    base, sites, messages, replies = _train_round(deltas, [10] * 5)
    checked = UpdateValidator().check_all([r.content for r in replies], ArrayRecord({"w": Array(base)}), [10] * 5)
    exact = _gram([(base + d).astype(np.float32).astype(np.float64) - base for d in deltas])
    assert checked.rows == list(range(5))
    assert checked.gram == pytest.approx(exact, rel=1e-5, abs=1e-9)


# ---- evaluation releases ----

def _release(noise: float = 0.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vectors = binary_vectors(rng.random(60), rng.random(60) > 0.4, rng.random(60) * 2)
    layout = binary_layout()
    total = vectors.sum(axis=0) + rng.normal(0, noise * layout.l2_bound, layout.size) * (noise > 0)
    record = {**layout.unpack(total), "eval-dp": float(noise > 0), "noise-std": noise * layout.l2_bound}
    if noise:
        record.update({"noise-multiplier": noise, "l2-bound": layout.l2_bound, "epsilon": 1.2, "delta": 1e-5})
    return record


@pytest.mark.parametrize("noise", [0.0, 5.0])
def test_honest_releases_pass_and_lies_are_named(noise):
    """Under noise a lie is caught only where it contradicts the release beyond what the noise explains: a
    consistent, modest lie (every patient a true positive) is noise-sized at σ = 5 and passes."""
    for seed in range(20):
        assert release_problem(_release(noise, seed), 5.0) is None
    lies = {
        "accuracy 1.0 beside the sums": ({"accuracy": 1.0, "num-examples": 1e9}, "keys no release has"),
        "a billion true positives": ({"tp": 1e9}, "different numbers of patients"),
        **({"every patient a true positive": ({"tp": 60.0, "fp": 0.0, "tn": 0.0, "fn": 0.0},
                                              "different numbers of positives")} if not noise else {}),
        "negative counts": ({"fn": -500.0}, "negative counts"),
        "a loss over its bound": ({"loss-sum": 1e6}, "loss sum"),
        "another noise scale": ({"noise-std": 50.0}, "not the study's"),
    }
    for what, (change, reason) in lies.items():
        problem = release_problem({**_release(noise), **change}, 5.0)
        assert problem is not None and reason in problem, what


def test_site_grid_rejects_a_lying_evaluation_reply_and_reports_it():
    set_task_identity(task_id=1, run_id=1, node_id=0)
    sites = [SiteInfo(f"site-{k}", 100 + k, weight=1, n_features=0) for k in range(3)]
    messages = [Message(RecordDict({"config": ConfigRecord({"server-round": 2, "eval-noise-multiplier": 5.0})}),
                        dst_node_id=s.node_id, message_type=MessageType.EVALUATE) for s in sites]
    replies = []
    for k, m in enumerate(messages):
        record = _release(5.0, k)
        if k == 1:
            record.update({"tp": record["tp"] + 400.0})  # claims 400 more correct positives than it has patients
        replies.append(Message(RecordDict({"metrics": MetricRecord(record)}), reply_to=m))
    seen = []
    grid = SiteGrid(Replied(replies), sites, lambda kind, r, batch: seen.extend(batch), UpdateValidator(), quorum=1)
    out = grid.send_and_receive(messages)
    assert [r.has_error() for r in out] == [False, True, False]
    assert "evaluation rejected by the coordinator" in out[1].error.reason
    assert [site for site, reply in seen if reply.has_error()] == ["site-1"]


def test_run_config_names_bad_consensus_settings():
    with pytest.raises(RunConfigError) as info:
        RunSettings.from_run_config(default_run_config(**{"bound-factor": 0.5, "min-cosine": 2.0,
                                                          "outlier-rounds": 0, "outlier-policy": "ban"}))
    for key in ("bound-factor", "min-cosine", "outlier-rounds", "outlier-policy"):
        assert f"'{key}'" in str(info.value)
    rule = RunSettings.from_run_config(default_run_config(**{"outlier-policy": "exclude"})).consensus
    assert rule.policy == "exclude" and rule.factor == 3.0 and rule.rounds_to_flag == 3
