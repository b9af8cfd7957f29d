"""Evaluation releases (privacy/release.py, shared_models/eval_release.py): per-patient vectors within their
bound, the noise at its stated scale, the exact mode, the ledger's rows per kind and its migration, the
study plan that covers every round's release, and the auditor recomputing the same spend as the ledger.
Real ledgers, real accountants (Opacus, dp-accounting), the site's own secret generator."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest

from privacy import release
from privacy.accounting import epsilon
from privacy.audit import AuditLog
from privacy.auditor.checks import check_site
from privacy.auditor.epsilon import recompute
from privacy.ledger import AlreadyCharged, PrivacyLedger
from privacy.policy import DatasetPolicy, RequestRefused
from shared_models.eval_release import LOSS_BOUND, binary_layout, binary_vectors, seg_layout, seg_vectors
from shared_models.metrics import confusion_counts, score_histograms

RDP = DatasetPolicy(epsilon_budget=50.0, delta=1e-4, accountant="rdp")  # rdp: fast to charge and plan
DP_EVAL = {"dp": True, "eval-noise-multiplier": 2.0}


def _test_split(n=104, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(float)
    scores = 1 / (1 + np.exp(-rng.normal(2.0 * (labels - 0.5), 1.0)))
    losses = -np.log(np.where(labels == 1, scores, 1 - scores))
    return scores, labels, losses


def test_per_patient_vectors_sum_to_the_counts_and_keep_their_bound():
    scores, labels, losses = _test_split()
    layout, vectors = binary_layout(), binary_vectors(scores, labels, losses)
    assert vectors.shape == (104, layout.size) and np.linalg.norm(vectors, axis=1).max() <= layout.l2_bound + 1e-12
    released = layout.unpack(vectors.sum(axis=0))
    assert {k: released[k] for k in ("tp", "fp", "tn", "fn")} == confusion_counts(scores, labels)
    assert (released["score-hist-pos"], released["score-hist-neg"]) == score_histograms(scores, labels)
    assert released["loss-sum"] == pytest.approx(np.clip(losses, 0, LOSS_BOUND).sum())
    assert released["loss-bound"] == LOSS_BOUND and np.allclose(layout.pack(released), vectors.sum(axis=0))
    dice = np.random.default_rng(1).random((7, 3))
    seg = seg_vectors(dice, dice ** 2)
    assert seg.shape == (7, seg_layout(3).size) and np.linalg.norm(seg, axis=1).max() <= math.sqrt(7) + 1e-12
    assert seg_layout(3).unpack(seg.sum(axis=0))["cases"] == 7.0


def test_a_dp_evaluation_release_has_the_stated_noise_scale(tmp_path):
    scores, labels, losses = _test_split()
    layout, vectors = binary_layout(), binary_vectors(scores, labels, losses)
    charged = release.charge_evaluation(DP_EVAL, RDP, tmp_path / "l.sqlite", "heart", 199, 104, "run", 1,
                                        layout.l2_bound)
    exact = vectors.sum(axis=0)
    noise = np.array([layout.pack(release.release_evaluation(charged, vectors, layout)) - exact for _ in range(800)])
    reply = release.release_evaluation(charged, vectors, layout)
    assert reply["noise-std"] == pytest.approx(2.0 * math.sqrt(3)) and reply["eval-dp"] == 1.0
    assert reply["noise-multiplier"] == 2.0 and reply["l2-bound"] == pytest.approx(math.sqrt(3))
    # 800 releases × 105 coordinates: the empirical std within 2 % of the stated one (its own error ≈ 0.2 %)
    assert noise.std() == pytest.approx(reply["noise-std"], rel=0.02) and abs(noise.mean()) < 0.05
    assert noise.std(axis=0).min() > 0.85 * reply["noise-std"]  # every coordinate is noised
    loss_noise = np.array([release.release_evaluation(charged, vectors, layout)["loss-sum"] for _ in range(800)])
    assert loss_noise.std() == pytest.approx(reply["noise-std"] * LOSS_BOUND, rel=0.1)  # released = coordinate × bound
    assert reply["epsilon"] == pytest.approx(epsilon([(2.0, 1.0, 1)], 1e-4, "rdp"))


def test_exact_mode_is_not_charged_and_says_so(tmp_path):
    scores, labels, losses = _test_split()
    layout, vectors = binary_layout(), binary_vectors(scores, labels, losses)
    ledger = tmp_path / "l.sqlite"
    exact_policy = DatasetPolicy(epsilon_budget=1.0, evaluation="exact")
    dev_policy = DatasetPolicy(epsilon_budget=1.0, allow_non_dp=True)
    for policy, config, why in ((exact_policy, DP_EVAL, "exact"), (dev_policy, {**DP_EVAL, "dp": False}, "non-DP")):
        charged = release.charge_evaluation(config, policy, ledger, "heart", 199, 104, "run", 1, layout.l2_bound)
        assert isinstance(charged, release.ExactEvaluation) and why in charged.reason
        record = charged.audit_record(dataset_fingerprint="f")
        assert charged.audit_event == "non-dp-release" and record["dp"] is False and record["charged"] is False
        reply = release.release_evaluation(charged, vectors, layout)
        assert reply["eval-dp"] == 0.0 and reply["noise-std"] == 0.0 and "epsilon" not in reply
        assert reply["tp"] + reply["fp"] + reply["tn"] + reply["fn"] == 104
    assert PrivacyLedger(ledger).rounds() == []
    # dp = false does not switch off the noise where the policy does not allow non-DP use
    strict = DatasetPolicy(epsilon_budget=10.0, delta=1e-4, accountant="rdp")
    charged = release.charge_evaluation({**DP_EVAL, "dp": False}, strict, ledger, "heart", 199, 104, "run", 1, 1.0)
    assert isinstance(charged, release.Release) and charged.noise_multiplier == 2.0
    with pytest.raises(ValueError, match="evaluation must be one of dp, exact"):
        DatasetPolicy(epsilon_budget=1.0, evaluation="rough")


def test_each_round_charges_training_and_evaluation_once_each_and_refuses_a_low_sigma(tmp_path):
    ledger_path = tmp_path / "l.sqlite"
    plan = release.plan_request({"dp": True, "noise-multiplier": 1.0, "clip-norm": 1.0, **DP_EVAL}, RDP, "heart",
                                200, 20, 10)
    release.charge_training(plan, RDP, ledger_path, "heart", 200, "run", 1, trained_parameters=14)
    release.charge_evaluation(DP_EVAL, RDP, ledger_path, "heart", 200, 100, "run", 1, 1.0)
    with pytest.raises(AlreadyCharged, match="evaluation release of round 1"):
        release.charge_evaluation(DP_EVAL, RDP, ledger_path, "heart", 200, 100, "run", 1, 1.0)
    strict = DatasetPolicy(epsilon_budget=50.0, delta=1e-4, accountant="rdp", min_noise_multiplier=3.0)
    with pytest.raises(RequestRefused, match="evaluation noise multiplier 2 is below the site minimum 3"):
        release.charge_evaluation(DP_EVAL, strict, ledger_path, "heart", 200, 100, "run", 2, 1.0)
    ledger = PrivacyLedger(ledger_path)
    assert [(r["round"], r["kind"]) for r in ledger.rounds()] == [(1, "training"), (1, "evaluation")]
    by_kind = ledger.spent_by_kind("heart", 1e-4, "rdp")
    assert set(by_kind) == {"training", "evaluation"}
    assert by_kind["evaluation"] == pytest.approx(epsilon([(2.0, 1.0, 1)], 1e-4, "rdp"))


def test_the_study_plan_covers_every_rounds_evaluation_release(tmp_path):
    study = {"dp": True, "target-epsilon": 4.0, "num-server-rounds": 5, "clip-norm": 1.0, "eval-noise-multiplier": 5.0}
    exact = DatasetPolicy(epsilon_budget=10.0, delta=1e-4, accountant="rdp", evaluation="exact")
    training_only = release.plan_request(study, exact, "heart", 200, 20, 10)
    plan = release.plan_request(study, RDP, "heart", 200, 20, 10)
    assert plan.evaluation_sigma == 5.0 and training_only.evaluation_sigma == 0.0
    assert plan.request.noise_multiplier > training_only.request.noise_multiplier  # the same target covers more
    whole = [(plan.request.noise_multiplier, plan.sample_rate, 5 * 10), (5.0, 1.0, 5)]
    assert 3.9 < epsilon(whole, 1e-4, "rdp") <= 4.0
    with pytest.raises(ValueError, match="other releases .* already cost"):
        release.plan_request({**study, "eval-noise-multiplier": 2.0}, RDP, "heart", 200, 20, 10)  # ε 4.8 alone
    # room for the training rounds alone, not with their evaluation releases: refused at the handshake
    asked = {**study, "target-epsilon": 0.0, "noise-multiplier": 2.0}
    plan = release.plan_request(asked, RDP, "heart", 200, 20, 10)
    alone = epsilon([(2.0, 0.1, 50)], 1e-4, "rdp")
    tight = DatasetPolicy(epsilon_budget=alone * 1.05, delta=1e-4, accountant="rdp")
    with pytest.raises(RequestRefused, match="cannot take this study's 5 round"):
        release.check_study(plan, tight, tmp_path / "l.sqlite", "heart", 200, rounds=5, site_id="a")
    release.check_study(release.plan_request(asked, exact, "heart", 200, 20, 10), tight, tmp_path / "l.sqlite",
                        "heart", 200, rounds=5, site_id="a")  # exact evaluation costs nothing


def test_the_ledger_and_the_auditor_agree_on_the_evaluation_spend(tmp_path):
    policy = DatasetPolicy(epsilon_budget=20.0, delta=1e-4)  # PRV at the site, PLD at the auditor
    ledger_path, log = tmp_path / "l.sqlite", AuditLog(tmp_path / "audit.jsonl", "site")
    plan = release.plan_request({"dp": True, "noise-multiplier": 1.5, "clip-norm": 1.0, **DP_EVAL}, policy, "heart",
                                200, 20, 10)
    for rnd in (1, 2):  # one training release and one evaluation release per round, as a study makes them
        for charged in (release.charge_training(plan, policy, ledger_path, "heart", 200, "run", rnd, 14),
                        release.charge_evaluation(DP_EVAL, policy, ledger_path, "heart", 200, 100, "run", rnd, 1.0)):
            log.append(charged.audit_event, charged.audit_record(dataset_fingerprint="f"))
    records = [json.loads(line) for line in log.path.read_text().splitlines()]
    table = recompute(records)["heart"]
    ledger = PrivacyLedger(ledger_path)
    assert [r.charged for r in table.rounds] == [True] * 4  # a round's training and evaluation: not a repeat
    assert table.rounds[-1].recomputed_after == pytest.approx(ledger.spent("heart", 1e-4, "prv"), rel=0.01)
    by_kind, audited = ledger.spent_by_kind("heart", 1e-4, "prv"), table.by_mechanism()
    assert audited["evaluation"] == pytest.approx(by_kind["evaluation"], rel=0.01)
    assert audited["training"] == pytest.approx(by_kind["training"], rel=0.01)
    assert not [f for f in check_site(records, actor="site") if f.level == "error"]


def test_an_older_ledger_keeps_every_row_and_id_and_gains_uniqueness_per_kind(tmp_path):
    path = tmp_path / "old.sqlite"
    columns = ("id, dataset, run_id, round, noise_multiplier, clip_norm, sample_rate, steps, accountant, delta, "
               "epsilon_before, epsilon_after, recorded_at, trained_parameters, kind")
    with sqlite3.connect(path) as db:  # the ledger as carefl wrote it when a round was unique per (run, round)
        db.execute("CREATE TABLE rounds (id INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL, run_id TEXT "
                   "NOT NULL, round INTEGER NOT NULL, noise_multiplier REAL NOT NULL, clip_norm REAL NOT NULL, "
                   "sample_rate REAL NOT NULL, steps INTEGER NOT NULL, accountant TEXT NOT NULL, delta REAL NOT NULL, "
                   "epsilon_before REAL NOT NULL, epsilon_after REAL NOT NULL, recorded_at TEXT NOT NULL, "
                   "trained_parameters INTEGER, kind TEXT NOT NULL DEFAULT 'training', "
                   "UNIQUE (dataset, run_id, round))")
        for i, rnd, kind in ((1, 0, "feature-statistics"), (2, 1, "training"), (5, 2, "training")):
            db.execute(f"INSERT INTO rounds ({columns}) VALUES (?, 'visits', 'r', ?, 1.0, 1.0, 0.1, 10, 'rdp', "
                       f"1e-4, 0, 0.5, 't', 14, ?)", (i, rnd, kind))
        db.execute("UPDATE sqlite_sequence SET seq = 9 WHERE name = 'rounds'")  # ids 6..9 were handed out once
        before = db.execute(f"SELECT {columns} FROM rounds ORDER BY id").fetchall()
    ledger = PrivacyLedger(path)
    with sqlite3.connect(path) as db:
        assert db.execute(f"SELECT {columns} FROM rounds ORDER BY id").fetchall() == before
    release.charge_evaluation(DP_EVAL, RDP, path, "visits", 200, 100, "r", 2, 1.0)  # round 2 again, another kind
    rows = ledger.rounds("visits")
    assert [(r["id"], r["round"], r["kind"]) for r in rows][-1] == (10, 2, "evaluation")
    with pytest.raises(sqlite3.IntegrityError):  # still one training row per round
        with sqlite3.connect(path) as db:
            db.execute(f"INSERT INTO rounds ({columns[4:]}) SELECT {columns[4:]} FROM rounds WHERE id = 5")
    assert len(PrivacyLedger(path).rounds()) == 4  # opening it again changes nothing
