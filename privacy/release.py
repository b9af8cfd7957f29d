"""A site's privacy steps for one release, in one call each: what DP the request means at this site
(σ planned from the study's target ε over all its rounds), the policy check, and the ledger charge made
before anything is computed — plus the ``dp-round`` audit record that shows it, built in one place.

The ClientApp's handlers call these and do nothing private themselves (docs/PRIVACY.md):
``check_secure`` and ``plan_study`` → ``check_study`` at the handshake; ``charge_round`` before a round
trains (one call: secure aggregation where the policy requires it, σ planning, the distributed-DP check of
the secure sum, then ``charge_training``: the policy check and the ledger charge); ``charge_statistics``
before the feature-statistics release (a Gaussian mechanism, round 0); ``charge_evaluation`` →
``release_evaluation`` for a round's test metrics (a Gaussian mechanism, or exact where the policy opts out),
and ``check_personalisation`` before the exact test counts of a fine-tuned model (a non-DP report).

Distributed DP (opt-in by the dataset's policy, under secure aggregation): the σ a study asks for is the
secure sum's, and this site adds σ/√t of it, t being the honest sites its policy assumes. Training rounds
only: statistics and evaluation releases are not in the sum and keep their own σ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privacy.accounting import plan_noise, sample_rate
from privacy.gaussian import MECHANISM_STEP_RATE, clipped_sum, noisy_sum
from privacy.ledger import BudgetExceeded, Charge, PrivacyLedger
from privacy.policy import (DatasetPolicy, DPRequest, RequestRefused, check_evaluation_request, check_request,
                            check_stats_request)
from shared_models.eval_release import EVAL_NOISE_MULTIPLIER, Layout

__all__ = ["ExactEvaluation", "Release", "SecureGroup", "SiteDataset", "StudyPlan", "charge_evaluation",
           "charge_round", "charge_statistics", "charge_training", "check_personalisation", "check_secure",
           "check_secure_group", "check_study", "distributed_honest_sites", "evaluation_sigma", "exact_sums",
           "plan_request", "plan_study", "release_evaluation"]

NON_DP = DPRequest(enabled=False, noise_multiplier=0.0, clip_norm=0.0)  # a release the policy must allow as non-DP


@dataclass(frozen=True)
class SiteDataset:
    """A dataset as this site's privacy steps see it (none of it is sent)."""

    site_id: str
    name: str
    n: int                    # patients of its training split
    policy: DatasetPolicy
    ledger_path: Path
    statistics: bool = False  # its studies open with a DP feature-statistics release (ehr-seq)


@dataclass(frozen=True)
class SecureGroup:
    """This site's place in a round's secure sum: the sites whose masked updates the sum may hold (this one
    included) and this site's weight in it."""

    sites: int
    weight: float


@dataclass(frozen=True)
class StudyPlan:
    """What a study's request means at this site, for one dataset of N patients."""

    request: DPRequest
    sample_rate: float
    steps_per_round: int       # optimizer steps of one round at this site
    statistics_sigma: float    # σ of the study's feature-statistics release (0: none)
    evaluation_sigma: float = 0.0  # σ of each round's evaluation release (0: released exactly, not charged)
    honest_sites: int = 1      # t of distributed DP: this site's training σ is the sum's σ / √t (1: off)
    sum_noise_multiplier: float | None = None  # σ the secure sum carries if t sites are honest (None: request's)

    def __post_init__(self) -> None:
        if self.sum_noise_multiplier is None:
            sigma = self.request.noise_multiplier * math.sqrt(self.honest_sites)
            object.__setattr__(self, "sum_noise_multiplier", sigma)

    @property
    def training_steps(self) -> tuple[float, float, int, int]:
        """One round's training as the ledger counts it: (σ of this site, q, steps, honest sites)."""
        return (self.request.noise_multiplier, self.sample_rate, self.steps_per_round, self.honest_sites)


def evaluation_sigma(config: Mapping, policy: DatasetPolicy) -> float:
    """σ of this site's evaluation releases in a study: the coordinator's ``eval-noise-multiplier``, or 0 where
    they leave exactly — the policy's ``evaluation = "exact"``, or a non-DP study the policy allows (its ε is
    unbounded from the first non-DP round, so a charge could state nothing)."""
    if policy.evaluation == "exact" or (not bool(config.get("dp", True)) and policy.allow_non_dp):
        return 0.0
    return float(config.get("eval-noise-multiplier", EVAL_NOISE_MULTIPLIER))


def distributed_honest_sites(config: Mapping, policy: DatasetPolicy) -> int:
    """t of distributed DP for this site's training in this study, or 1 (it adds the full σ itself): both the
    run (``secure-aggregation`` and ``distributed-dp``) and the site's policy (``distributed_dp_honest_sites``)
    must ask for it — a site that did not opt in never relies on other sites' noise.

    RequestRefused where the additive argument would not hold: the sum carries σ only if every site's update
    is the same linear function of its noised gradient sum — one DP-SGD step (``local-steps`` = 1) of plain
    SGD (momentum-free, Adam rescales the noise per coordinate), with the run's common C, lr and B, summed with
    equal weights (the coordinator's part)."""
    if not (bool(config.get("dp", True)) and bool(config.get("secure-aggregation", False))
            and bool(config.get("distributed-dp", False)) and policy.distributed_dp_honest_sites >= 2):
        return 1
    problems = []
    if int(config.get("local-steps", 0)) != 1:
        problems.append(f"local-steps is {config.get('local-steps', 0)}, not 1 (several local steps make the update "
                        f"non-linear in each step's noise)")
    if str(config.get("optimizer", "")) != "sgd":
        problems.append(f"optimizer is {config.get('optimizer')!r}, not 'sgd' (only plain SGD keeps the update "
                        f"linear in the noised gradient sum)")
    if problems:
        raise RequestRefused(f"distributed DP refused: {'; '.join(problems)}")
    return policy.distributed_dp_honest_sites


def plan_request(config: Mapping, policy: DatasetPolicy, dataset: str, n: int, batch_size: int,
                 steps_per_round: int, statistics: bool = False, cache: MutableMapping | None = None) -> StudyPlan:
    """The DP request of a train config at this site: σ as asked, or — given the study's ``target-epsilon`` —
    the σ this site needs so that all ``num-server-rounds``, with their evaluation releases (and the statistics
    release), stay within it.

    Planning is the site's: it knows its own N. ``cache`` (the run's state) keeps the σ found, because the
    PRV search takes seconds. ``statistics``: the study also releases DP feature statistics, which its
    target covers too. Either way the policy check and the lifetime ledger decide what may run.

    Under distributed DP (``distributed_honest_sites``) the σ asked or planned is the secure sum's — the target
    is planned on the assumed track, where the study's other releases, outside the sum, keep their own σ —
    and this site's training σ is that σ / √t."""
    enabled = bool(config.get("dp", True))
    honest = distributed_honest_sites(config, policy)
    sigma = float(config.get("noise-multiplier", 0.0))
    stats_sigma = float(config.get("stats-noise-multiplier", 0.0)) if statistics else 0.0
    eval_sigma = evaluation_sigma(config, policy)
    if enabled and not sigma > 0:
        rounds = int(config["num-server-rounds"])
        total_steps = rounds * steps_per_round
        target = float(config["target-epsilon"])
        prior = [(stats_sigma, MECHANISM_STEP_RATE, 1)] if stats_sigma > 0 else []
        prior += [(eval_sigma, MECHANISM_STEP_RATE, rounds)] if eval_sigma > 0 else []  # one release per round
        key = f"{dataset}|{target}|{n}|{batch_size}|{total_steps}|{policy.accountant}|{stats_sigma}|{eval_sigma}"
        cache = {} if cache is None else cache
        if key not in cache:
            cache[key] = plan_noise(target, policy.delta_for(n), n, batch_size, total_steps, policy.accountant, prior)
        sigma = float(cache[key])
    request = DPRequest(enabled=enabled, noise_multiplier=sigma / math.sqrt(honest),
                        clip_norm=float(config.get("clip-norm", 0.0)))
    return StudyPlan(request, sample_rate(n, batch_size), steps_per_round, stats_sigma, eval_sigma, honest, sigma)


def plan_study(config: Mapping, data: SiteDataset, batch_size: int, steps_per_round: int,
               cache: MutableMapping | None = None) -> StudyPlan:
    """``plan_request`` for a dataset at this site."""
    return plan_request(config, data.policy, data.name, data.n, batch_size, steps_per_round,
                        statistics=data.statistics, cache=cache)


def check_secure(data: SiteDataset, secure: bool) -> None:
    """A dataset whose policy requires secure aggregation takes no study without it."""
    if data.policy.require_secure_aggregation and not secure:
        raise RequestRefused(f"site {data.site_id} requires secure aggregation for dataset '{data.name}' and this "
                             f"study runs without it (run config secure-aggregation = true)")


def check_secure_group(plan: StudyPlan, group: SecureGroup | None) -> None:
    """Distributed DP counts on the noise of ``honest_sites`` sites of the sum: the sum must hold that many, each
    weighted equally (docs/PRIVACY.md, "Distributed DP"). Nothing to check without distributed DP."""
    if plan.honest_sites <= 1:
        return
    sites = group.sites if group is not None else 0
    if sites < plan.honest_sites:
        raise RequestRefused(f"distributed DP assumes {plan.honest_sites} honest sites in the sum, and this round's "
                             f"secure sum holds only {sites}")
    if abs(group.weight * sites - 1.0) > 1e-9:
        raise RequestRefused("distributed DP needs every site of the sum weighted equally")


def check_study(plan: StudyPlan, policy: DatasetPolicy, ledger_path: Path, dataset: str, n: int, rounds: int,
                site_id: str) -> None:
    """Before anyone trains: would the policy accept every release of the study, and does the remaining
    budget hold all ``rounds`` of them with their evaluation releases? RequestRefused names every problem, so
    the study stops at discovery and no site is charged for a round this site would refuse."""
    steps = [plan.training_steps] * rounds
    problems = []
    if plan.statistics_sigma > 0:  # the study starts with a DP statistics release (charged as round 0)
        steps.insert(0, (plan.statistics_sigma, MECHANISM_STEP_RATE, 1))
        try:
            check_stats_request(policy, plan.statistics_sigma)
        except RequestRefused as exc:
            problems.append(str(exc))
    if plan.evaluation_sigma > 0:  # every round's test metrics: one Gaussian release each
        steps += [(plan.evaluation_sigma, MECHANISM_STEP_RATE, 1)] * rounds
        try:
            check_evaluation_request(policy, plan.evaluation_sigma)
        except RequestRefused as exc:
            problems.append(str(exc))
    try:
        check_request(policy, plan.request, plan.sample_rate, plan.honest_sites)
    except RequestRefused as exc:
        problems.append(str(exc))
    if problems:
        raise RequestRefused(f"site {site_id} cannot take this study: {'; '.join(problems)}")
    if not plan.request.enabled:
        return
    try:
        PrivacyLedger(ledger_path).check_room(dataset, steps, policy.delta_for(n), policy.epsilon_budget,
                                              policy.accountant, assumed=policy.budget_assumed)
    except BudgetExceeded as exc:
        raise RequestRefused(f"site {site_id} cannot take this study's {rounds} round(s): {exc}") from None


@dataclass(frozen=True)
class Release:
    """One charged release: what was asked, what the ledger recorded, and the facts an auditor recomputes."""

    run_id: str
    server_round: int
    dataset: str
    request: DPRequest
    sample_rate: float
    steps: int
    n: int
    budget: float
    charge: Charge
    facts: dict = field(default_factory=dict)  # mechanism-specific fields of the audit record
    honest_sites: int = 1                      # t of distributed DP (training only; 1: own noise alone)
    audit_event = "dp-round"

    @property
    def noise_multiplier(self) -> float:
        return self.request.noise_multiplier if self.request.enabled else 0.0

    def audit_record(self, **facts) -> dict:
        """The site's ``dp-round`` audit record (docs/AUDIT.md), with the caller's facts added.

        Distributed DP adds its fields only where it plays a part, so other records stay as they were:
        ``honest_sites`` for a round that assumed t > 1; ``epsilon_assumed_after`` wherever it differs from
        ``epsilon_after`` (that round, and every later release of a dataset whose history assumed something);
        ``budget_by`` where the budget was checked by the assumed ε (``budget_left`` is then of that ε)."""
        assumed = self.charge.epsilon_assumed_after
        budgeted = assumed if self.charge.budget_by == "assumed" else self.charge.epsilon_after
        distributed = {
            **({"honest_sites": self.honest_sites} if self.honest_sites > 1 else {}),
            **({"epsilon_assumed_after": assumed}
               if self.honest_sites > 1 or assumed != self.charge.epsilon_after else {}),
            **({"budget_by": "assumed"} if self.charge.budget_by == "assumed" else {})}
        return {
            "run_id": self.run_id, "round": self.server_round, "dataset": self.dataset, **self.facts,
            "dp": self.request.enabled, "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.request.clip_norm, "sample_rate": self.sample_rate, "steps": self.steps,
            "accountant": self.charge.accountant, "delta": self.charge.delta,
            "epsilon_before": self.charge.epsilon_before, "epsilon_after": self.charge.epsilon_after,
            **distributed, "epsilon_budget": self.budget, "budget_left": self.budget - budgeted, "n": self.n,
            **facts}

    def reply_metrics(self) -> dict:
        """What the reply may say about the release: ε so far with its δ, and the mechanism's parameters (σ is
        this site's own; under distributed DP also the ε that assumes the honest sites, and their number)."""
        distributed = ({"epsilon-assumed": self.charge.epsilon_assumed_after, "honest-sites": float(self.honest_sites)}
                       if self.honest_sites > 1 else {})
        return {"dp": 1.0 if self.request.enabled else 0.0, "epsilon": self.charge.epsilon_after,
                "delta": self.charge.delta, "noise-multiplier": self.noise_multiplier,
                "clip-norm": self.request.clip_norm, "sample-rate": self.sample_rate, **distributed}


def charge_training(plan: StudyPlan, policy: DatasetPolicy, ledger_path: Path, dataset: str, n: int, run_id: str,
                    server_round: int, trained_parameters: int) -> Release:
    """Check the round's request against the policy, then charge it to the ledger — in that order and before
    any training: a refused round trains nothing and sends nothing; a crash after the charge over-counts."""
    check_request(policy, plan.request, plan.sample_rate, plan.honest_sites)
    budget = policy.epsilon_budget if plan.request.enabled else math.inf
    sigma = plan.request.noise_multiplier if plan.request.enabled else 0.0
    charge = PrivacyLedger(ledger_path).charge(
        dataset, run_id=run_id, server_round=server_round, noise_multiplier=sigma, clip_norm=plan.request.clip_norm,
        sample_rate=plan.sample_rate, steps=plan.steps_per_round, delta=policy.delta_for(n), budget=budget,
        accountant=policy.accountant, trained_parameters=trained_parameters, honest_sites=plan.honest_sites,
        budget_by=policy.distributed_dp_budget)
    return Release(run_id, server_round, dataset, plan.request, plan.sample_rate, plan.steps_per_round, n, budget,
                   charge, facts={"mechanism": "training"}, honest_sites=plan.honest_sites)


def charge_round(config: Mapping, data: SiteDataset, run_id: str, batch_size: int, steps_per_round: int,
                 trained_parameters: int, group: SecureGroup | None = None,
                 cache: MutableMapping | None = None) -> Release:
    """A training round's privacy steps in one call, before anything trains, in this order: secure aggregation
    where the dataset's policy requires it (``check_secure``); σ as asked or planned for the whole study
    (``plan_study``; ``cache``: the run's state); under distributed DP, a secure sum of at least t equally weighted
    sites (``check_secure_group``; ``group``: None when the round is not securely aggregated); then the policy
    check and the ledger charge (``charge_training``). The first refusal raises, and nothing is charged before
    the last step. Its ``audit_record`` is the round's ``dp-round`` record."""
    check_secure(data, bool(config.get("secure-aggregation", False)))
    plan = plan_study(config, data, batch_size, steps_per_round, cache)
    check_secure_group(plan, group)
    return charge_training(plan, data.policy, data.ledger_path, data.name, data.n, run_id,
                           int(config["server-round"]), trained_parameters)


def charge_statistics(policy: DatasetPolicy, ledger_path: Path, dataset: str, n: int, run_id: str,
                      noise_multiplier: float, l2_bound: float) -> Release:
    """The feature-statistics release: one Gaussian mechanism on a sum of bounded per-patient vectors,
    checked and charged as round 0 of the run (one step at sample rate 1, composed by the same accountant)."""
    check_stats_request(policy, noise_multiplier)
    request = DPRequest(enabled=True, noise_multiplier=noise_multiplier, clip_norm=l2_bound)
    charge = PrivacyLedger(ledger_path).charge(
        dataset, run_id=run_id, server_round=0, noise_multiplier=noise_multiplier, clip_norm=l2_bound,
        sample_rate=MECHANISM_STEP_RATE, steps=1, delta=policy.delta_for(n), budget=policy.epsilon_budget,
        accountant=policy.accountant, kind="feature-statistics", budget_by=policy.distributed_dp_budget)
    return Release(run_id, 0, dataset, request, MECHANISM_STEP_RATE, 1, n, policy.epsilon_budget, charge,
                   facts={"mechanism": "feature-statistics"})


@dataclass(frozen=True)
class ExactEvaluation:
    """An evaluation released without noise and without a charge: not differentially private. Its audit
    record says so (event ``non-dp-release``) and the reply says ``eval-dp`` = 0, so the report marks it."""

    run_id: str
    server_round: int
    dataset: str
    n: int
    reason: str
    noise_multiplier = 0.0
    audit_event = "non-dp-release"

    def audit_record(self, **facts) -> dict:
        return {"run_id": self.run_id, "round": self.server_round, "dataset": self.dataset, "mechanism": "evaluation",
                "dp": False, "charged": False, "reason": self.reason, "n": self.n, **facts}


def charge_evaluation(config: Mapping, policy: DatasetPolicy, ledger_path: Path, dataset: str, n_train: int,
                      n_test: int, run_id: str, server_round: int, l2_bound: float) -> Release | ExactEvaluation:
    """A round's evaluation release: one Gaussian mechanism on the test split's bounded per-patient vectors,
    checked against the policy and charged (kind ``evaluation``, one step at sample rate 1, the dataset's δ)
    before anything is computed — or, where ``evaluation_sigma`` is 0, an exact release, not charged."""
    sigma = evaluation_sigma(config, policy)
    if sigma == 0:
        reason = ('site policy evaluation = "exact"' if policy.evaluation == "exact"
                  else "non-DP study (dp = false, which the site's allow_non_dp permits)")
        return ExactEvaluation(run_id, server_round, dataset, n_test, reason)
    check_evaluation_request(policy, sigma)
    charge = PrivacyLedger(ledger_path).charge(
        dataset, run_id=run_id, server_round=server_round, noise_multiplier=sigma, clip_norm=l2_bound,
        sample_rate=MECHANISM_STEP_RATE, steps=1, delta=policy.delta_for(n_train), budget=policy.epsilon_budget,
        accountant=policy.accountant, kind="evaluation", budget_by=policy.distributed_dp_budget)
    request = DPRequest(enabled=True, noise_multiplier=sigma, clip_norm=l2_bound)
    return Release(run_id, server_round, dataset, request, MECHANISM_STEP_RATE, 1, n_test, policy.epsilon_budget,
                   charge, facts={"mechanism": "evaluation"})


def release_evaluation(released: Release | ExactEvaluation, vectors: np.ndarray, layout: Layout) -> dict:
    """The evaluate reply's metrics: Σ of the clipped per-patient vectors plus N(0, (σ·bound)²) per coordinate
    (no noise when exact) under the layout's keys, with what the coordinator needs to judge them."""
    sigma = released.noise_multiplier
    total = noisy_sum(vectors, layout.l2_bound, sigma) if sigma > 0 else clipped_sum(vectors, layout.l2_bound)
    metrics = {**layout.unpack(total), "eval-dp": 1.0 if sigma > 0 else 0.0, "noise-std": sigma * layout.l2_bound}
    if isinstance(released, Release):
        metrics.update({"epsilon": released.charge.epsilon_after, "delta": released.charge.delta,
                        "noise-multiplier": sigma, "l2-bound": layout.l2_bound})
    return metrics


def check_personalisation(policy: DatasetPolicy) -> DPRequest:
    """The exact test counts of a model fine-tuned on the training split are a non-private function of the
    training data: the site treats them like a non-DP round, which its policy must allow (``allow_non_dp``).
    Returns the request to fine-tune with (no DP)."""
    check_request(policy, NON_DP, 0.0)
    return NON_DP


def exact_sums(vectors: np.ndarray, layout: Layout, prefix: str) -> dict:
    """The layout's sums without noise under ``prefix``ed keys (a non-DP report the policy allowed)."""
    return layout.unpack(clipped_sum(vectors, layout.l2_bound), prefix=prefix)
