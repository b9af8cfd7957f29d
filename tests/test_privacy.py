"""Site-enforced DP: the ledger composes ε across rounds and restarts, the policy refuses, nothing leaks.

Everything runs for real: Opacus DP-SGD, the SQLite ledger on disk, the ClientApp train handler,
and — for the restart — a separate Python process that trains round 1.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from client import client_app, training
from client.site import load_site_config
from privacy.accounting import epsilon, plan_noise, sample_rate
from privacy.dp_sgd import make_private
from privacy.ledger import BudgetExceeded, LedgerError, PrivacyLedger
from privacy.policy import DatasetPolicy, DPRequest, PolicyError, RequestRefused, check_request, default_delta
from shared_models.eval_release import EVAL_NOISE_MULTIPLIER
from shared_models.registry import build_model
from tests import helpers
from tests.helpers import dp_train_message, fresh_context

SIGMA, CLIP, BATCH, EPOCHS = helpers.DP_SIGMA, helpers.DP_CLIP, helpers.DP_BATCH, helpers.DP_EPOCHS
N_CLEVELAND = 199


RESTARTED_ROUND_1 = textwrap.dedent("""
    import sys
    from tests.helpers import dp_train_message, fresh_context
    from client import client_app
    reply = client_app.train(dp_train_message(1), fresh_context(sys.argv[1]))
    print("ERROR" if reply.has_error() else reply.content["metrics"]["epsilon"])
""")


def test_epsilon_composes_across_rounds_and_restarts_like_one_accountant_run(tmp_path):
    site_toml = helpers.site_config(tmp_path, "cleveland")
    # round 1 in another process: everything round 2 and 3 know must come from the site's disk
    done = subprocess.run([sys.executable, "-c", RESTARTED_ROUND_1, str(site_toml)], capture_output=True, text=True,
                          cwd=helpers.REPO, timeout=300)
    assert done.returncode == 0 and "ERROR" not in done.stdout, done.stdout + done.stderr
    eps_round_1 = float(done.stdout.strip().splitlines()[-1])
    replies = [client_app.train(dp_train_message(r), fresh_context(site_toml)) for r in (2, 3)]
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]

    q = 1 / math.ceil(N_CLEVELAND / BATCH)
    steps_per_round = EPOCHS * math.ceil(N_CLEVELAND / BATCH)
    reference = PRVAccountant()  # one accountant over all the steps, computed independently of the ledger
    reference.history = [(SIGMA, q, 3 * steps_per_round)]
    expected = reference.get_epsilon(delta=1e-4)

    ledger_eps = PrivacyLedger(load_site_config(site_toml).ledger_path).spent("heart-disease", 1e-4, "prv")
    assert ledger_eps == pytest.approx(expected, rel=1e-6)
    assert replies[-1].content["metrics"]["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert eps_round_1 < replies[0].content["metrics"]["epsilon"] < replies[1].content["metrics"]["epsilon"]
    assert replies[-1].content["metrics"]["delta"] == 1e-4


def test_rdp_ledger_matches_one_rdp_run(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    for r in range(1, 5):
        ledger.charge("d", "run", r, 1.3, 1.0, 0.05, 40, 1e-5, 100.0, "rdp")
    ref = RDPAccountant()
    ref.history = [(1.3, 0.05, 160)]
    assert ledger.spent("d", 1e-5, "rdp") == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)


def test_overspending_round_is_refused_before_training_and_sends_nothing(tmp_path):
    one_round = epsilon([(SIGMA, sample_rate(N_CLEVELAND, BATCH), math.ceil(N_CLEVELAND / BATCH))], 1e-4)
    site_toml = helpers.site_config(tmp_path, "cleveland", epsilon_budget=round(one_round * 1.2, 4))
    first = client_app.train(dp_train_message(1), fresh_context(site_toml))
    assert not first.has_error()
    msg = dp_train_message(2)
    second = client_app.train(msg, fresh_context(site_toml))
    assert second.has_error() and not second.has_content()  # no weights leave
    assert second.error.code == client_app.CODE_PRIVACY
    reason = second.error.reason
    assert "needs ε=" in reason and "remains" in reason and "δ=0.0001" in reason
    ledger = PrivacyLedger(load_site_config(site_toml).ledger_path)
    assert [r["round"] for r in ledger.rounds()] == [1]  # the refused round was not charged


def test_requests_outside_policy_are_refused_with_every_reason(tmp_path):
    site_toml = helpers.site_config(tmp_path, "cleveland", min_noise_multiplier=0.8, max_clip_norm=2.0,
                                    max_sample_rate=0.05)
    reply = client_app.train(dp_train_message(1, **{"noise-multiplier": 0.5, "clip-norm": 3.0, "batch-size": 16}),
                             fresh_context(site_toml))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == client_app.CODE_PRIVACY
    for part in ("noise multiplier 0.5 is below the site minimum 0.8", "clip norm 3 is above the site maximum 2",
                 "sample rate 0.07692 (batch / patients) is above the site maximum 0.05"):
        assert part in reply.error.reason
    assert PrivacyLedger(load_site_config(site_toml).ledger_path).rounds() == []


def test_non_dp_request_is_refused_unless_the_site_allows_it(tmp_path):
    strict = helpers.site_config(tmp_path / "strict", "cleveland")
    reply = client_app.train(dp_train_message(1, dp=False), fresh_context(strict))
    assert reply.has_error() and "forbids training without differential privacy" in reply.error.reason

    lenient = helpers.site_config(tmp_path / "dev", "cleveland", allow_non_dp=True)
    reply = client_app.train(dp_train_message(1, dp=False), fresh_context(lenient))
    assert not reply.has_error()
    assert reply.content["metrics"]["dp"] == 0.0 and math.isinf(reply.content["metrics"]["epsilon"])
    # honest accounting: after an undefended release the dataset's ε is unbounded, so DP rounds are refused
    after = client_app.train(dp_train_message(2), fresh_context(lenient))
    assert after.has_error() and after.error.code == client_app.CODE_PRIVACY


def test_the_same_round_is_never_trained_twice(tmp_path):
    site_toml = helpers.site_config(tmp_path, "cleveland")
    assert not client_app.train(dp_train_message(1), fresh_context(site_toml)).has_error()
    again = client_app.train(dp_train_message(1), fresh_context(site_toml))
    assert again.has_error() and "already trained" in again.error.reason


def test_an_unusable_ledger_fails_closed(tmp_path):
    site_toml = helpers.site_config(tmp_path, "cleveland")
    ledger_path = load_site_config(site_toml).ledger_path
    ledger_path.mkdir(parents=True)  # a directory where the database should be
    reply = client_app.train(dp_train_message(1), fresh_context(site_toml))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == client_app.CODE_PRIVACY and "ledger" in reply.error.reason


def test_ledger_that_cannot_be_created_raises_ledger_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LedgerError, match="cannot be opened"):
        PrivacyLedger(tmp_path / "a-file" / "ledger.sqlite")


def test_budget_message_gives_remaining_and_needed():
    message = str(BudgetExceeded("d", 0.4, 1.3, 1.0, 1e-5))
    assert "needs ε=0.9 (total 1.3)" in message and "only ε=0.6 of 1 remains (δ=1e-05)" in message


def test_study_target_makes_each_site_size_its_own_noise(tmp_path):
    """With target-epsilon, each site plans σ for all rounds of the study from its own N."""
    spent = {}
    for centre in ("cleveland", "switzerland"):
        site_toml = helpers.site_config(tmp_path, centre)
        ctx = fresh_context(site_toml)
        for r in (1, 2, 3):  # all rounds of a 3-round study
            reply = client_app.train(dp_train_message(r, **{"noise-multiplier": 0.0, "target-epsilon": 2.0,
                                                             "batch-size": 4}), ctx)
            assert not reply.has_error(), reply.error.reason
        sigma = reply.content["metrics"]["noise-multiplier"]
        assert sigma > 0
        # the target covers the study's three evaluation releases too (not made here): planned in, charged later
        history = PrivacyLedger(load_site_config(site_toml).ledger_path).history("heart-disease")
        assert reply.content["metrics"]["epsilon"] == pytest.approx(epsilon(history, 1e-4, "prv"))
        spent[centre] = epsilon(history + [(EVAL_NOISE_MULTIPLIER, 1.0, 3)], 1e-4, "prv")
    assert all(1.95 <= e <= 2.0 for e in spent.values()), spent


def test_plan_noise_reaches_the_target_for_the_whole_study():
    n, b, rounds = 1000, 32, 50
    steps = rounds * math.ceil(n / b)
    sigma = plan_noise(3.0, 1e-5, n, b, steps, "prv")
    eps = epsilon([(sigma, sample_rate(n, b), steps)], 1e-5, "prv")
    assert 2.95 <= eps <= 3.0
    # sized for one round only, the same study would overspend by far (opacus-dp notes: ε≈14.6 vs 3)
    sigma_one_round = plan_noise(3.0, 1e-5, n, b, math.ceil(n / b), "prv")
    assert epsilon([(sigma_one_round, sample_rate(n, b), steps)], 1e-5, "prv") > 10


def test_clipped_noise_free_step_equals_per_patient_reference():
    """σ = 0 isolates clipping: one DP-SGD step must equal −lr/B · Σ clip(∇ℓ_i, C)."""
    torch.manual_seed(3)
    x, y = torch.randn(16, 13), (torch.rand(16) > 0.5).float()
    model = build_model("ehr-mlp", n_features=13)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    for i in range(16):  # reference: one patient at a time
        model.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    grads = torch.stack(grads)
    clip = float(grads.norm(dim=1).median())  # half the patients get clipped
    factors = (clip / (grads.norm(dim=1) + 1e-6)).clamp(max=1.0)
    expected = -(1.0 / 16) * (factors[:, None] * grads).sum(0)

    data = torch.utils.data.TensorDataset(x, y)
    private = make_private(model, data, batch_size=16, lr=1.0, optimizer="sgd", noise_multiplier=0.0,
                           clip_norm=clip)
    private.optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(private.module(x), y, reduction="sum").backward()
    private.optimizer.step()
    private.close()
    delta = torch.cat([(model.state_dict()[k] - start[k]).flatten() for k in start])
    assert torch.linalg.norm(delta - expected) / torch.linalg.norm(expected) < 1e-5


def test_empty_poisson_batches_do_not_crash_and_steps_are_exact():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 13)).astype(np.float32), (rng.random(12) > 0.5).astype(np.float32)
    settings = training.TrainSettings(local_steps=120, local_epochs=1, batch_size=1, optimizer="sgd", lr=0.05)
    # q = 1/12: about (11/12)^12 ≈ 35% of the 120 batches are empty
    for name in ("ehr-logreg", "ehr-mlp"):
        model = build_model(name, n_features=13)
        result = training.train(model, x, y, settings, torch.device("cpu"), dp=DPRequest(True, 1.0, 1.0))
        assert result["local-steps"] == 120
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_large_logical_batch_is_split_in_memory_with_the_same_step_count():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 13)).astype(np.float32), (rng.random(400) > 0.5).astype(np.float32)
    settings = training.TrainSettings(local_steps=6, local_epochs=1, batch_size=100, optimizer="sgd", lr=0.05)
    model = build_model("ehr-mlp", n_features=13)
    result = training.train(model, x, y, settings, torch.device("cpu"), dp=DPRequest(True, 1.0, 1.0),
                            max_physical_batch=16)
    assert result["local-steps"] == 6 and result["sample-rate"] == 0.25


def test_policy_and_defaults():
    assert default_delta(199) == pytest.approx(1e-4) and default_delta(30) == pytest.approx(1e-3)
    with pytest.raises(PolicyError, match="unknown setting"):
        DatasetPolicy.from_dict({"epsilon_budget": 1.0, "epsilon_bugdet": 2.0}, where="site.toml")
    with pytest.raises(PolicyError, match="accountant must be one of"):
        DatasetPolicy(epsilon_budget=1.0, accountant="gdp")  # GDP can underestimate: not offered
    with pytest.raises(RequestRefused, match="below the site minimum"):
        check_request(DatasetPolicy(epsilon_budget=1.0), DPRequest(True, 0.1, 1.0), 0.01)


def test_cli_plan_and_budget(tmp_path):
    env_python = [sys.executable, "-m", "deploy.cli"]
    plan = subprocess.run(env_python + ["privacy", "plan", "--rounds", "15", "--epochs", "1", "--n", "199",
                                        "--batch", "4", "--target-epsilon", "1", "--delta", "1e-4"],
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    sigma = float(plan.stdout.split("σ =")[1].split()[0])
    assert sigma == pytest.approx(plan_noise(1.0, 1e-4, 199, 4, 15 * 50), rel=1e-3)

    site_toml = helpers.site_config(tmp_path, "cleveland")
    for r in (1, 2):
        assert not client_app.train(dp_train_message(r), fresh_context(site_toml)).has_error()
    evaluate = dp_train_message(2, **{"eval-noise-multiplier": 5.0})  # the same content, as an evaluate message
    evaluate.metadata.message_type = "evaluate"
    assert not client_app.evaluate(evaluate, fresh_context(site_toml)).has_error()
    budget = subprocess.run(env_python + ["site", "budget", "--config", str(site_toml), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert budget.returncode == 0, budget.stderr
    report = json.loads(budget.stdout)["datasets"]["heart-disease"]
    assert report["rounds"] == 3 and report["delta"] == 1e-4 and report["epsilon_budget"] == 10.0
    assert report["epsilon_spent"] + report["epsilon_remaining"] == pytest.approx(10.0)
    assert set(report["epsilon_by_kind"]) == {"training", "evaluation"} and report["evaluation"] == "dp"
    exact_toml = helpers.site_config(tmp_path / "exact", "cleveland", evaluation="exact")
    table = subprocess.run(env_python + ["site", "budget", "--config", str(exact_toml)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert table.returncode == 0 and "exact: not DP" in table.stdout, table.stdout + table.stderr
