"""A site's privacy steps for one release (privacy/release.py), on a real ledger and real accountants."""

from __future__ import annotations

import pytest

from privacy import release
from privacy.ledger import AlreadyCharged, PrivacyLedger
from privacy.policy import DatasetPolicy, RequestRefused

POLICY = DatasetPolicy(epsilon_budget=10.0, delta=1e-4, max_sample_rate=0.25, accountant="rdp")  # rdp: fast to plan
STUDY = {"dp": True, "target-epsilon": 4.0, "num-server-rounds": 5, "clip-norm": 1.0, "stats-noise-multiplier": 10.0}


def test_a_target_epsilon_is_planned_for_the_whole_study_and_only_counts_statistics_when_released():
    cache: dict = {}
    plan = release.plan_request(STUDY, POLICY, "heart", n=200, batch_size=20, steps_per_round=10, cache=cache)
    assert plan.request.noise_multiplier > 0 and plan.sample_rate == pytest.approx(0.1) and len(cache) == 1
    # the same request at the handshake and at a round: the same σ (the run config carries the statistics'
    # σ for every task; only a task that releases statistics composes them into the plan)
    again = release.plan_request(STUDY, POLICY, "heart", n=200, batch_size=20, steps_per_round=10, cache=cache)
    assert again.request == plan.request and len(cache) == 1
    with_stats = release.plan_request(STUDY, POLICY, "heart", n=200, batch_size=20, steps_per_round=10,
                                      statistics=True)
    assert with_stats.request.noise_multiplier > plan.request.noise_multiplier  # the same target covers more
    asked = release.plan_request({**STUDY, "noise-multiplier": 1.3}, POLICY, "heart", 200, 20, 10)
    assert asked.request.noise_multiplier == 1.3


def test_a_round_is_checked_then_charged_once_and_its_audit_record_matches_the_ledger(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    plan = release.plan_request(STUDY, POLICY, "heart", n=200, batch_size=20, steps_per_round=10)
    charged = release.charge_training(plan, POLICY, ledger, "heart", 200, "run-1", 1, trained_parameters=14)
    rows = PrivacyLedger(ledger).rounds("heart")
    assert len(rows) == 1 and rows[0]["epsilon_after"] == charged.charge.epsilon_after
    record = charged.audit_record(train_params="all")
    assert record["round"] == 1 and record["delta"] == 1e-4 and record["train_params"] == "all"
    assert record["budget_left"] == pytest.approx(10.0 - rows[0]["epsilon_after"])
    assert charged.reply_metrics()["epsilon"] == rows[0]["epsilon_after"]
    with pytest.raises(AlreadyCharged):
        release.charge_training(plan, POLICY, ledger, "heart", 200, "run-1", 1, trained_parameters=14)


def test_a_study_the_site_would_refuse_is_refused_with_every_reason_before_anyone_trains(tmp_path):
    strict = DatasetPolicy(epsilon_budget=10.0, delta=1e-4, min_noise_multiplier=5.0, max_clip_norm=0.5, accountant="rdp")
    plan = release.plan_request(STUDY, strict, "heart", n=200, batch_size=20, steps_per_round=10)
    with pytest.raises(RequestRefused, match="below the site minimum.*clip norm 1 is above"):
        release.check_study(plan, strict, tmp_path / "l.sqlite", "heart", 200, rounds=5, site_id="a")
    small = DatasetPolicy(epsilon_budget=1.0, delta=1e-4, accountant="rdp")
    plan = release.plan_request(STUDY, small, "heart", n=200, batch_size=20, steps_per_round=10)
    with pytest.raises(RequestRefused, match="cannot take this study's 5 round"):
        release.check_study(plan, small, tmp_path / "l.sqlite", "heart", 200, rounds=5, site_id="a")
    assert PrivacyLedger(tmp_path / "l.sqlite").rounds() == []  # nothing charged


def test_the_ledger_splits_spend_by_kind_and_composes_the_total(tmp_path):
    ledger_path = tmp_path / "ledger.sqlite"
    release.charge_statistics(POLICY, ledger_path, "visits", 200, "run-1", noise_multiplier=10.0, l2_bound=1.0)
    plan = release.plan_request({**STUDY, "noise-multiplier": 1.0}, POLICY, "visits", 200, 20, 10)
    release.charge_training(plan, POLICY, ledger_path, "visits", 200, "run-1", 1, trained_parameters=14)
    ledger = PrivacyLedger(ledger_path)
    assert [r["kind"] for r in ledger.rounds("visits")] == ["feature-statistics", "training"]
    by_kind = ledger.spent_by_kind("visits", 1e-4, "rdp")
    total = ledger.spent("visits", 1e-4, "rdp")
    assert set(by_kind) == {"feature-statistics", "training"}
    assert max(by_kind.values()) < total < sum(by_kind.values())  # composition: more than either, less than both


def test_an_older_ledger_gains_the_kind_of_each_release(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the ledger as carefl wrote it before releases had a kind
        db.execute("CREATE TABLE rounds (id INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL, run_id TEXT "
                   "NOT NULL, round INTEGER NOT NULL, noise_multiplier REAL NOT NULL, clip_norm REAL NOT NULL, "
                   "sample_rate REAL NOT NULL, steps INTEGER NOT NULL, accountant TEXT NOT NULL, delta REAL NOT NULL, "
                   "epsilon_before REAL NOT NULL, epsilon_after REAL NOT NULL, recorded_at TEXT NOT NULL, "
                   "UNIQUE (dataset, run_id, round))")
        for rnd, q in ((0, 1.0), (1, 0.1)):
            db.execute("INSERT INTO rounds (dataset, run_id, round, noise_multiplier, clip_norm, sample_rate, steps, "
                       "accountant, delta, epsilon_before, epsilon_after, recorded_at) VALUES "
                       "('visits', 'r', ?, 5.0, 1.0, ?, 1, 'rdp', 1e-4, 0, 0.1, 't')", (rnd, q))
    rows = PrivacyLedger(path).rounds("visits")
    assert [r["kind"] for r in rows] == ["feature-statistics", "training"]
    assert [r["trained_parameters"] for r in rows] == [None, None]
