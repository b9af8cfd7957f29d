"""A hospital's privacy policy per dataset, and the check of a coordinator's request against it.

The site owns its policy; the coordinator may only ask. A request outside the policy is refused
with every reason at once — nothing is clamped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from privacy.accounting import ACCOUNTANTS

EVALUATION_MODES = ("dp", "exact")  # how a dataset's test metrics leave: a charged Gaussian release, or exactly
# Which ε a dataset's lifetime budget is checked against under distributed DP: what its own noise alone
# guarantees, or what holds if the assumed honest sites of a secure sum added theirs (docs/PRIVACY.md).
DISTRIBUTED_DP_BUDGETS = ("own-noise", "assumed")


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
    require_secure_aggregation: bool = False  # refuse any run whose updates are not securely aggregated
    distributed_dp_honest_sites: int = 0      # 0: off; t >= 2: sites of a secure sum (this one included) assumed
                                              # honest, so this site adds σ/√t of the sum's σ (opt-in)
    distributed_dp_budget: str = "own-noise"  # DISTRIBUTED_DP_BUDGETS: the ε the budget is checked against

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
        problems += self._distributed_problems()
        if problems:
            raise PolicyError("; ".join(problems))

    def _distributed_problems(self) -> list[str]:
        """The secure-aggregation and distributed-DP settings: an explicit opt-in, so nothing is guessed from
        a near miss (a TOML string, 1 honest site, an unknown budget name)."""
        problems = []
        if not isinstance(self.require_secure_aggregation, bool):
            problems.append("require_secure_aggregation must be true or false")
        honest = self.distributed_dp_honest_sites
        if isinstance(honest, bool) or not isinstance(honest, int) or not (honest == 0 or honest >= 2):
            problems.append("distributed_dp_honest_sites must be 0 (off) or a whole number >= 2: the sites of a "
                            "secure sum, this one included, that the site assumes honest")
        if self.distributed_dp_budget not in DISTRIBUTED_DP_BUDGETS:
            problems.append(f"distributed_dp_budget must be one of {', '.join(DISTRIBUTED_DP_BUDGETS)}")
        elif self.distributed_dp_budget == "assumed" and not (isinstance(honest, int) and honest >= 2):
            problems.append('distributed_dp_budget = "assumed" needs distributed_dp_honest_sites >= 2 (there is '
                            'nothing assumed to check the budget against)')
        return problems

    @property
    def budget_assumed(self) -> bool:
        """The lifetime budget is checked against the ε that assumes the honest sites' noise."""
        return self.distributed_dp_budget == "assumed"

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


def check_request(policy: DatasetPolicy, request: DPRequest, sample_rate: float, honest_sites: int = 1) -> None:
    """Raise RequestRefused listing every way ``request`` breaks ``policy``.

    ``honest_sites`` t > 1: the site adds σ/√t of a secure sum's σ (distributed DP). The minimum noise then
    applies to the σ of the track the budget is checked by: the site's own σ, or σ·√t when it budgets by
    the assumption — the minimum bounds the noise the budgeted ε relies on."""
    if not request.enabled:
        if not policy.allow_non_dp:
            raise RequestRefused("site policy forbids training without differential privacy")
        return
    problems = []
    sigma = request.noise_multiplier * (math.sqrt(honest_sites) if policy.budget_assumed else 1.0)
    if sigma < policy.min_noise_multiplier:
        what = f"noise multiplier {sigma:g}"
        if sigma != request.noise_multiplier:
            what += f" (this site's {request.noise_multiplier:g} × √{honest_sites} assumed honest sites)"
        problems.append(f"{what} is below the site minimum {policy.min_noise_multiplier:g}")
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
