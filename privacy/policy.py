"""A hospital's privacy policy per dataset, and the check of a coordinator's request against it.

The site owns its policy; the coordinator may only ask. A request outside the policy is refused
with every reason at once — nothing is clamped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from privacy.accounting import ACCOUNTANTS

EVALUATION_MODES = ("dp", "exact")  # how a dataset's test metrics leave: a charged Gaussian release, or exactly


class PolicyError(ValueError):
    """The policy itself is invalid (a site configuration problem)."""


class RequestRefused(Exception):
    """The coordinator asked for something the site's policy does not allow."""


def default_delta(n: int) -> float:
    """A power of ten at least ten times below 1/N: N=199 → 1e-4, N=30 → 1e-3."""
    return 10.0 ** (math.floor(math.log10(1.0 / max(n, 1))) - 1)


@dataclass(frozen=True)
class DatasetPolicy:
    epsilon_budget: float               # lifetime, across all runs and studies
    delta: float | None = None          # None: default_delta(N)
    min_noise_multiplier: float = 0.5
    max_clip_norm: float = 10.0
    max_sample_rate: float = 0.25
    accountant: str = "prv"
    allow_non_dp: bool = False          # development switch; such rounds make ε unbounded
    evaluation: str = "dp"              # "exact": test metrics leave without noise or charge (opt-in, not DP)

    def __post_init__(self) -> None:
        problems = []
        if not (self.epsilon_budget > 0 and math.isfinite(self.epsilon_budget)):
            problems.append("epsilon_budget must be a positive number")
        if self.delta is not None and not 0 < self.delta < 1:
            problems.append("delta must be in (0, 1)")
        if self.min_noise_multiplier < 0:
            problems.append("min_noise_multiplier must be >= 0")
        if not self.max_clip_norm > 0:
            problems.append("max_clip_norm must be > 0")
        if not 0 < self.max_sample_rate <= 1:
            problems.append("max_sample_rate must be in (0, 1]")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {', '.join(ACCOUNTANTS)}")
        if self.evaluation not in EVALUATION_MODES:
            problems.append(f"evaluation must be one of {', '.join(EVALUATION_MODES)} (\"exact\" releases test "
                            f"metrics without differential privacy)")
        if problems:
            raise PolicyError("; ".join(problems))

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "DatasetPolicy":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PolicyError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "epsilon_budget" not in raw:
            raise PolicyError(f"{where}: epsilon_budget is required (the dataset's lifetime ε)")
        try:
            return cls(**raw)
        except (PolicyError, TypeError) as exc:
            raise PolicyError(f"{where}: {exc}") from None

    def delta_for(self, n: int) -> float:
        return self.delta if self.delta is not None else default_delta(n)


@dataclass(frozen=True)
class DPRequest:
    """The DP part of a coordinator's train request."""

    enabled: bool
    noise_multiplier: float
    clip_norm: float


def check_request(policy: DatasetPolicy, request: DPRequest, sample_rate: float) -> None:
    """Raise RequestRefused listing every way ``request`` breaks ``policy``."""
    if not request.enabled:
        if not policy.allow_non_dp:
            raise RequestRefused("site policy forbids training without differential privacy")
        return
    problems = []
    if request.noise_multiplier < policy.min_noise_multiplier:
        problems.append(f"noise multiplier {request.noise_multiplier:g} is below the site minimum "
                        f"{policy.min_noise_multiplier:g}")
    if not request.clip_norm > 0:
        problems.append("clip norm must be > 0")
    elif request.clip_norm > policy.max_clip_norm:
        problems.append(f"clip norm {request.clip_norm:g} is above the site maximum {policy.max_clip_norm:g}")
    if sample_rate > policy.max_sample_rate:
        problems.append(f"sample rate {sample_rate:.4g} (batch / patients) is above the site maximum "
                        f"{policy.max_sample_rate:g}")
    if problems:
        raise RequestRefused("; ".join(problems))


def check_stats_request(policy: DatasetPolicy, noise_multiplier: float) -> None:
    """A one-shot statistics release (Gaussian mechanism, no subsampling): σ must meet the site's
    minimum; the sample-rate and clip limits are DP-SGD's and do not apply (the bound is the schema's)."""
    if not noise_multiplier >= max(policy.min_noise_multiplier, 1e-9):
        raise RequestRefused(f"statistics noise multiplier {noise_multiplier:g} is below the site minimum "
                             f"{policy.min_noise_multiplier:g}")


def check_evaluation_request(policy: DatasetPolicy, noise_multiplier: float) -> None:
    """An evaluation release (Gaussian mechanism on the test split, no subsampling): σ must meet the site's
    minimum, as for the statistics release; the bound is the release's own (shared_models/eval_release.py)."""
    if not noise_multiplier >= max(policy.min_noise_multiplier, 1e-9):
        raise RequestRefused(f"evaluation noise multiplier {noise_multiplier:g} is below the site minimum "
                             f"{policy.min_noise_multiplier:g}")
