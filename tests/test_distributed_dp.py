"""Opt-in distributed DP under secure aggregation: the policy's opt-in, the plan (this site adds σ/√t of the
sum's σ), both ε tracks in the ledger with the budget checked by the policy's, and the auditor recomputing
both — on a real ledger and real accountants (RDP for speed, one PRV case)."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest

from privacy import release
from privacy.accounting import epsilon
from privacy.auditor.checks import check_site
from privacy.auditor.epsilon import recompute
from privacy.ledger import BudgetExceeded, PrivacyLedger
from privacy.policy import DatasetPolicy, PolicyError, RequestRefused

DELTA = 1e-4
OPTED_IN = DatasetPolicy(epsilon_budget=10.0, delta=DELTA, accountant="rdp", distributed_dp_honest_sites=4)
RUN = {"dp": True, "noise-multiplier": 1.2, "clip-norm": 1.0, "num-server-rounds": 3, "local-steps": 1,
       "optimizer": "sgd", "secure-aggregation": True, "distributed-dp": True}


def _records(releases) -> list[dict]:
    """The dp-round audit records of ``releases`` as the site's log holds them."""
    return [{"seq": i, "time": f"2026-01-01T00:00:{i:02d}.000000Z", "event": "dp-round", "payload": r.audit_record()}
            for i, r in enumerate(releases)]


@pytest.mark.parametrize("settings, reason", [
    ({"distributed_dp_honest_sites": 1}, r"distributed_dp_honest_sites must be 0 \(off\) or a whole number >= 2"),
    ({"distributed_dp_honest_sites": 2.5}, "distributed_dp_honest_sites must be 0"),
    ({"distributed_dp_honest_sites": True}, "distributed_dp_honest_sites must be 0"),
    ({"distributed_dp_budget": "assumed"}, 'distributed_dp_budget = "assumed" needs distributed_dp_honest_sites'),
    ({"distributed_dp_honest_sites": 3, "distributed_dp_budget": "optimistic"}, "distributed_dp_budget must be one"),
    ({"require_secure_aggregation": "yes"}, "require_secure_aggregation must be true or false"),
])
def test_the_policy_refuses_an_unclear_opt_in(settings, reason):
    with pytest.raises(PolicyError, match=reason):
        DatasetPolicy.from_dict({"epsilon_budget": 5.0, **settings}, where="site.toml [datasets.heart]")
    ok = DatasetPolicy.from_dict({"epsilon_budget": 5.0, "require_secure_aggregation": True,
                                  "distributed_dp_honest_sites": 3, "distributed_dp_budget": "assumed"}, where="x")
    assert ok.budget_assumed and not DatasetPolicy(epsilon_budget=5.0).budget_assumed


def test_a_site_that_opted_in_adds_its_share_of_the_sums_noise_and_only_for_one_sgd_step():
    plan = release.plan_request(RUN, OPTED_IN, "heart", n=200, batch_size=20, steps_per_round=1)
    assert (plan.honest_sites, plan.sum_noise_multiplier) == (4, 1.2)
    assert plan.request.noise_multiplier == pytest.approx(0.6)  # σ/√4
    # no opt-in by the site, or none by the run: the site adds the whole σ itself
    not_opted_in = DatasetPolicy(epsilon_budget=10.0, delta=DELTA, accountant="rdp")
    for policy, config in ((not_opted_in, RUN), (OPTED_IN, {**RUN, "secure-aggregation": False}),
                           (OPTED_IN, {**RUN, "distributed-dp": False})):
        alone = release.plan_request(config, policy, "heart", n=200, batch_size=20, steps_per_round=1)
        assert (alone.honest_sites, alone.request.noise_multiplier, alone.sum_noise_multiplier) == (1, 1.2, 1.2)
    with pytest.raises(RequestRefused, match="local-steps is 2, not 1"):
        release.plan_request({**RUN, "local-steps": 2}, OPTED_IN, "heart", 200, 20, 2)
    with pytest.raises(RequestRefused, match="optimizer is 'adam', not 'sgd'"):
        release.plan_request({**RUN, "optimizer": "adam"}, OPTED_IN, "heart", 200, 20, 1)
    # a target ε plans the sum's σ on the assumed track (the evaluation releases keep their own σ)
    target = {**RUN, "noise-multiplier": 0.0, "target-epsilon": 4.0}
    planned = release.plan_request(target, OPTED_IN, "heart", 200, 20, 1)
    alone = release.plan_request({**target, "distributed-dp": False}, OPTED_IN, "heart", 200, 20, 1)
    assert planned.sum_noise_multiplier == alone.request.noise_multiplier
    assert planned.request.noise_multiplier == pytest.approx(alone.request.noise_multiplier / 2)


def test_the_minimum_noise_applies_to_the_budgeted_track(tmp_path):
    config = {**RUN, "noise-multiplier": 0.8}  # this site adds 0.4 of a sum of 0.8
    own = DatasetPolicy(epsilon_budget=10.0, delta=DELTA, accountant="rdp", distributed_dp_honest_sites=4)
    with pytest.raises(RequestRefused, match="noise multiplier 0.4 is below the site minimum 0.5"):
        release.check_study(release.plan_request(config, own, "h", 200, 20, 1), own, tmp_path / "l", "h", 200, 3, "a")
    assumed = DatasetPolicy(epsilon_budget=10.0, delta=DELTA, accountant="rdp", distributed_dp_honest_sites=4,
                            distributed_dp_budget="assumed")
    release.check_study(release.plan_request(config, assumed, "h", 200, 20, 1), assumed, tmp_path / "l", "h", 200, 3,
                        "a")
    assert PrivacyLedger(tmp_path / "l").rounds() == []


def test_the_ledger_records_both_epsilons_and_checks_the_budget_by_the_policys_only(tmp_path):
    path = tmp_path / "ledger.sqlite"
    plan = release.plan_request(RUN, OPTED_IN, "heart", n=200, batch_size=20, steps_per_round=1)
    trained = release.charge_training(plan, OPTED_IN, path, "heart", 200, "run-1", 1, trained_parameters=14)
    evaluated = release.charge_evaluation(RUN, OPTED_IN, path, "heart", 200, 50, "run-1", 1, l2_bound=1.0)
    ledger = PrivacyLedger(path)
    rows = ledger.rounds("heart")
    assert [r["honest_sites"] for r in rows] == [4, 1]
    own, assumed = [(0.6, 0.1, 1), (5.0, 1.0, 1)], [(1.2, 0.1, 1), (5.0, 1.0, 1)]
    assert ledger.history("heart") == own and ledger.history("heart", assumed=True) == assumed
    for charge, row, n in ((trained.charge, rows[0], 1), (evaluated.charge, rows[1], 2)):
        assert charge.epsilon_after == row["epsilon_after"] == pytest.approx(epsilon(own[:n], DELTA, "rdp"))
        assert charge.epsilon_assumed_after == row["epsilon_assumed_after"] == pytest.approx(
            epsilon(assumed[:n], DELTA, "rdp"))
        assert charge.epsilon_after > charge.epsilon_assumed_after and charge.budget_by == "own-noise"
    assert ledger.spent("heart", DELTA, "rdp", assumed=True) == pytest.approx(evaluated.charge.epsilon_assumed_after)
    # the record and the reply say it where a release assumed something, and only there
    record = trained.audit_record()
    assert record["honest_sites"] == 4 and record["epsilon_assumed_after"] == trained.charge.epsilon_assumed_after
    assert "honest_sites" not in evaluated.audit_record() and "epsilon_assumed_after" in evaluated.audit_record()
    assert trained.reply_metrics()["honest-sites"] == 4.0 and "epsilon-assumed" not in evaluated.reply_metrics()

    # a budget between the two ε: refused by the own-noise track only
    budget = (trained.charge.epsilon_after + trained.charge.epsilon_assumed_after) / 2
    steps = [(0.6, 0.1, 1, 4)]
    fresh = PrivacyLedger(tmp_path / "fresh.sqlite")
    with pytest.raises(BudgetExceeded, match="by the ε of this site's own noise"):
        fresh.charge("h", "r", 1, 0.6, 1.0, 0.1, 1, DELTA, budget, "rdp", honest_sites=4)
    with pytest.raises(BudgetExceeded, match="the study needs .* by the ε of this site's own noise"):
        fresh.check_room("h", steps, DELTA, budget, "rdp")
    assert fresh.check_room("h", steps, DELTA, budget, "rdp", assumed=True) < budget
    charged = fresh.charge("h", "r", 1, 0.6, 1.0, 0.1, 1, DELTA, budget, "rdp", honest_sites=4, budget_by="assumed")
    assert charged.budget_by == "assumed" and charged.epsilon_after > budget
    with pytest.raises(BudgetExceeded, match="assuming the honest sites' noise"):
        fresh.charge("h", "r", 2, 0.6, 1.0, 0.1, 1, DELTA, charged.epsilon_assumed_after, "rdp", honest_sites=4,
                     budget_by="assumed")
    with pytest.raises(ValueError, match="not part of a secure sum"):
        fresh.charge("h", "r", 2, 5.0, 1.0, 1.0, 1, DELTA, 10.0, "rdp", kind="evaluation", honest_sites=4)
    assert len(fresh.rounds("h")) == 1  # refusals record nothing


def test_an_older_ledger_gains_both_columns_and_keeps_its_spending(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the ledger as carefl wrote it before distributed DP
        db.execute("CREATE TABLE rounds (id INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL, run_id TEXT "
                   "NOT NULL, round INTEGER NOT NULL, noise_multiplier REAL NOT NULL, clip_norm REAL NOT NULL, "
                   "sample_rate REAL NOT NULL, steps INTEGER NOT NULL, accountant TEXT NOT NULL, delta REAL NOT NULL, "
                   "epsilon_before REAL NOT NULL, epsilon_after REAL NOT NULL, recorded_at TEXT NOT NULL, "
                   "trained_parameters INTEGER, kind TEXT NOT NULL DEFAULT 'training', "
                   "UNIQUE (dataset, run_id, round, kind))")
        db.execute("INSERT INTO rounds (dataset, run_id, round, noise_multiplier, clip_norm, sample_rate, steps, "
                   "accountant, delta, epsilon_before, epsilon_after, recorded_at) VALUES "
                   "('heart', 'r', 1, 1.0, 1.0, 0.1, 10, 'rdp', 1e-4, 0, 1.0, 't')")
    ledger = PrivacyLedger(path)
    (row,) = ledger.rounds("heart")
    assert row["id"] == 1 and row["honest_sites"] is None and row["epsilon_assumed_after"] is None
    assert ledger.spent("heart", DELTA, "rdp", assumed=True) == ledger.spent("heart", DELTA, "rdp") > 0
    charge = ledger.charge("heart", "r2", 1, 0.5, 1.0, 0.1, 1, DELTA, 10.0, "rdp", honest_sites=4)
    assert charge.epsilon_assumed_after < charge.epsilon_after
    assert [r["id"] for r in PrivacyLedger(path).rounds("heart")] == [1, 2]


def test_the_auditor_recomputes_both_tracks_and_flags_a_tampered_assumed_epsilon(tmp_path):
    path = tmp_path / "ledger.sqlite"
    plan = release.plan_request(RUN, OPTED_IN, "heart", n=200, batch_size=20, steps_per_round=1)
    releases = []
    for rnd in (1, 2):
        releases.append(release.charge_training(plan, OPTED_IN, path, "heart", 200, "run-1", rnd, 14))
        releases.append(release.charge_evaluation(RUN, OPTED_IN, path, "heart", 200, 50, "run-1", rnd, 1.0))
    records = _records(releases)
    table = recompute(records)["heart"]
    for row in table.rounds:
        assert row.status == "ok", row.message
        assert row.recomputed_assumed_after == pytest.approx(row.logged_assumed_after, rel=0.01)
        assert row.recomputed_after > row.recomputed_assumed_after
    summary = table.to_dict()
    assert summary["honest_sites"] == 4
    assert summary["logged_epsilon_assumed"] == releases[-1].charge.epsilon_assumed_after
    assert json.dumps(summary)  # the audit report's input
    assert not check_site(records, {"heart": table}, actor="a")

    records[2]["payload"]["epsilon_assumed_after"] *= 0.5  # claims less than the assumed noise gives
    row = recompute(records)["heart"].rounds[2]
    assert row.status == "error" and "logged assumed ε" in row.message and "below even the tight" in row.message
    records[2]["payload"]["epsilon_assumed_after"] = None
    assert "ε assuming 4 honest sites is missing" in recompute(records)["heart"].rounds[2].message

    # a log without distributed DP is judged and summarised as before
    plain = _records([release.charge_training(release.plan_request({**RUN, "distributed-dp": False}, OPTED_IN, "p",
                                                                    200, 20, 1), OPTED_IN, path, "p", 200, "r", 1, 14)])
    assert "honest_sites" not in plain[0]["payload"]
    plain_table = recompute(plain)["p"]
    assert "logged_epsilon_assumed" not in plain_table.to_dict()
    assert "honest_sites" not in plain_table.rounds[0].to_dict()


def test_a_budget_by_the_assumed_epsilon_is_what_the_audit_checks_with_prv(tmp_path):
    policy = DatasetPolicy(epsilon_budget=0.4, delta=DELTA, accountant="prv", distributed_dp_honest_sites=2,
                           distributed_dp_budget="assumed")
    config = {**RUN, "noise-multiplier": 2.0}
    plan = release.plan_request(config, policy, "heart", n=200, batch_size=20, steps_per_round=1)
    assert plan.request.noise_multiplier == pytest.approx(math.sqrt(2))
    charged = release.charge_training(plan, policy, tmp_path / "l.sqlite", "heart", 200, "run-1", 1, 14)
    record = charged.audit_record()
    assert record["budget_by"] == "assumed" and record["budget_left"] == pytest.approx(
        0.4 - charged.charge.epsilon_assumed_after)
    assert charged.charge.epsilon_assumed_after <= 0.4 < charged.charge.epsilon_after  # within by what it budgets
    records = _records([charged])
    table = recompute(records)["heart"]
    assert table.rounds[0].status == "ok", table.rounds[0].message
    assert not check_site(records, {"heart": table}, actor="a")
    records[0]["payload"]["epsilon_assumed_after"] = 0.6  # past the budget, and not what the parameters give
    findings = check_site(records, recompute(records), actor="a")
    assert {f.check for f in findings} >= {"budget"}
    assert any("assuming its honest sites" in f.message for f in findings)
