"""The auditor's own ε: recomputed from the logged (σ, q, steps) with Google's dp-accounting.

The site computes ε with Opacus (privacy/accounting.py); the auditor must not trust that code, so
ε is recomputed here with an independent implementation and compared with what the site logged:

- sites whose accountant is ``prv`` → dp-accounting's privacy-loss-distribution (PLD) accountant,
  which, like PRV, is numerically tight. Opacus's PRV reports an *upper* bound, the estimate at
  δ − δ/1000 plus its ε error of 0.01 (``PRVAccountant.get_epsilon`` defaults); the counterpart
  compared with it is therefore PLD ε at δ·(1 − 1/1000) + 0.01. Without that margin every ε below
  1 would differ by more than 1%.
- sites whose accountant is ``rdp`` → dp-accounting's RDP accountant over the orders Opacus's RDP
  accountant uses (1.1 … 10.9 and 12 … 63). At fractional orders dp-accounting 0.6 over-estimates
  the RDP of the subsampled Gaussian (it adds the absolute values of an alternating series) or
  drops the order, so its ε can be larger than Opacus's exact one; see docs/AUDIT.md.

A logged ε more than 1% away from its counterpart is flagged. It is an error when it is below the
tight PLD ε (the site claims less privacy loss than its own logged parameters give) or above the
counterpart (the ledger charged more than the logged rounds explain: rounds missing from the log?);
in between it is a warning: the logged ε is still a valid bound, and the gap comes from the
looseness of one of the two accountants, which the finding names.

Every kind of release is composed into its dataset's ε in log order: training rounds, the feature-statistics
release and each round's evaluation release (``mechanism``; a record without one is a training round, as
older logs wrote them). A round's training and its evaluation are two releases, never a repeat.

Distributed DP (docs/PRIVACY.md): a training round whose site added σ/√t of a secure sum logs t
(``honest_sites``). A dataset with such rounds has a second track, every release's σ counted as σ·√t (t = 1
where not logged), recomputed beside the first; a logged ``epsilon_assumed_after`` is judged against it
exactly as ``epsilon_after`` is against the own-noise track. Datasets without such rounds are unchanged.

(Over 400 lines on purpose: the auditor's independent ε — both accountants, the composition of every kind
of release and the judgement of each logged ε — is one computation an auditor should read in one place.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

TOLERANCE = 0.01                 # relative difference allowed between the logged and the recomputed ε
PLD_DISCRETIZATION = 1e-3        # value discretization interval of the PLDs (measured in docs/AUDIT.md),
                                 # coarsened in proportion for histories with ε far above 20 (discretization())
PRV_EPS_ERROR = 0.01             # Opacus PRVAccountant.get_epsilon(eps_error=0.01) adds this to its estimate
PRV_DELTA_ERROR = 1e-3           # … at δ − δ·1e-3 (its default delta_error = δ/1000)
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # the orders Opacus's RDP uses
BUDGET_SLACK = 1e-9              # relative slack of the budget check (float noise only)
EPSILON_CEILING = 1e4            # beyond this (RDP bound of a dataset's history) nothing is recomputed …
MAX_STEPS = 10**7                # … nor for more steps than this in one round: no privacy is left to
                                 # check, and a log must not be able to make the auditor's tool hang

Step = tuple[float, float, int]


@lru_cache(maxsize=512)
def _round_pld(sigma: float, q: float, steps: int, interval: float):
    """PLD of ``steps`` Poisson-sampled Gaussian steps (add-or-remove-one, pessimistic)."""
    return _step_pld(sigma, q, interval).self_compose(steps)


@lru_cache(maxsize=128)
def _step_pld(sigma: float, q: float, interval: float):
    # dp-accounting is imported where it is used: it costs a second of CPU, which every `carefl` command would pay
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    return pld_lib.from_gaussian_mechanism(standard_deviation=sigma, sampling_prob=q,
                                           value_discretization_interval=interval, pessimistic_estimate=True)


def rdp_bound(history: Iterable[Step], delta: float) -> float:
    """ε of ``history`` by RDP: cheap, an upper bound of the tight ε."""
    rdp = np.zeros(len(RDP_ORDERS))
    for sigma, q, steps in history:
        if sigma <= 0:
            return math.inf
        rdp = rdp + steps * _step_rdp(sigma, q)
    if not rdp.any():
        return 0.0
    return _rdp_epsilon(rdp, delta)


def discretization(history: Iterable[Step], delta: float) -> float:
    """PLD_DISCRETIZATION, coarsened for histories whose total ε is far beyond any budget.

    The PLD's size grows with ε / interval and its error is roughly a constant times the interval,
    so above ε = 20 (estimated by RDP, an upper bound) the interval grows in proportion to ε: the
    relative error stays as small, and time and memory stay bounded whatever a log claims.
    """
    eps = rdp_bound([h for h in history if h[0] > 0], delta)
    if not math.isfinite(eps):
        return PLD_DISCRETIZATION
    return float(max(PLD_DISCRETIZATION, PLD_DISCRETIZATION * eps / 20.0))


@contextmanager
def _quiet():
    """dp-accounting warns through absl about orders it drops ("failed to converge") and numerical
    noise at extreme parameters; both are expected here and documented (docs/AUDIT.md)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        logger.setLevel(level)


def _rdp_epsilon(rdp, delta: float) -> float:
    from dp_accounting.rdp import compute_epsilon as rdp_to_epsilon

    with _quiet():
        return float(rdp_to_epsilon(list(RDP_ORDERS), list(rdp), delta)[0])


@lru_cache(maxsize=128)
def _step_rdp(sigma: float, q: float) -> np.ndarray:
    """RDP at RDP_ORDERS of one step, by dp-accounting's RdpAccountant (composition is a sum)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(list(RDP_ORDERS))
    with _quiet():
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    rdp = getattr(acc, "_rdp", None)
    if rdp is None:  # pragma: no cover - dp-accounting moved its state; pinned <0.7 in pyproject
        raise RuntimeError("dp_accounting.rdp.RdpAccountant has no _rdp; pin dp-accounting 0.6")
    out = np.array(rdp, dtype=np.float64)
    out.setflags(write=False)
    return out


def _valid(sigma: float, q: float, steps: int) -> bool:
    return sigma > 0 and 0 < q <= 1 and steps >= 0


class Composition:
    """One dataset's history, composed incrementally by both dp-accounting accountants (lazily)."""

    def __init__(self, interval: float = PLD_DISCRETIZATION) -> None:
        self.interval = interval
        self.history: list[Step] = []
        self.unbounded = False          # a step without noise: ε = ∞ from then on (as the ledger)
        self._pld = None
        self._pld_len = 0
        self._rdp = np.zeros(len(RDP_ORDERS))
        self._rdp_len = 0
        self._memo: dict[tuple, float] = {}
        self.beyond: float | None = None  # set by recompute(): the RDP bound when above EPSILON_CEILING

    def add(self, sigma: float, q: float, steps: int) -> None:
        if sigma <= 0:
            self.unbounded = True
        elif steps > 0:
            self.history.append((float(sigma), float(q), int(steps)))

    @property
    def empty(self) -> bool:
        return not self.history and not self.unbounded

    def pld_epsilon(self, delta: float) -> float:
        """Tight ε at ``delta`` (PLD, pessimistic discretisation)."""
        if self.unbounded:
            return math.inf
        if not self.history:
            return 0.0
        key = ("pld", len(self.history), delta)
        if key in self._memo:
            return self._memo[key]
        for sigma, q, steps in self.history[self._pld_len:]:
            step = _round_pld(sigma, q, steps, self.interval)
            self._pld = step if self._pld is None else self._pld.compose(step)
        self._pld_len = len(self.history)
        self._memo[key] = max(float(self._pld.get_epsilon_for_delta(delta)), 0.0)
        return self._memo[key]

    def rdp_epsilon(self, delta: float) -> float:
        if self.unbounded:
            return math.inf
        if not self.history:
            return 0.0
        for sigma, q, steps in self.history[self._rdp_len:]:
            self._rdp = self._rdp + steps * _step_rdp(sigma, q)
        self._rdp_len = len(self.history)
        return _rdp_epsilon(self._rdp, delta)

    def counterpart(self, accountant: str, delta: float) -> float:
        """The number the site's Opacus accountant should have reported, computed by dp-accounting."""
        if self.unbounded:
            return math.inf
        if not self.history:
            return 0.0
        if accountant == "prv":
            return self.pld_epsilon(delta * (1 - PRV_DELTA_ERROR)) + PRV_EPS_ERROR
        if accountant == "rdp":
            return self.rdp_epsilon(delta)
        raise ValueError(f"unknown accountant {accountant!r} (prv or rdp)")


def epsilon(history: Iterable[Step], delta: float, accountant: str = "pld") -> float:
    """ε of a (σ, q, steps) history at ``delta``: "pld" (tight), "rdp", or the counterpart of the
    site's "prv"/"rdp" as compared by the verifier ("prv" = PLD at δ(1−1e-3) + 0.01)."""
    history = list(history)
    for sigma, q, steps in history:
        if not _valid(sigma, q, steps) and sigma > 0:
            raise ValueError(f"invalid step (σ={sigma}, q={q}, steps={steps})")
    comp = Composition(discretization(history, delta))
    for sigma, q, steps in history:
        comp.add(sigma, q, steps)
    if accountant == "pld":
        return comp.pld_epsilon(delta)
    return comp.counterpart(accountant, delta)


@dataclass
class RoundEpsilon:
    """One ``dp-round`` record, what it logged and what the auditor recomputes."""
    seq: int
    time: str
    run_id: str
    round: int | None
    dataset: str
    dp: bool
    accountant: str
    delta: float | None
    sigma: float | None
    sample_rate: float | None
    steps: int | None
    budget: float | None
    logged_before: float | None
    logged_after: float | None
    recomputed_before: float | None = None
    recomputed_after: float | None = None   # the dp-accounting counterpart (see module doc)
    tight_after: float | None = None        # PLD ε, when it was needed to judge a difference
    rel_diff: float | None = None           # (logged − recomputed) / recomputed
    charged: bool = True                    # False: a repeat of a (run, round, mechanism) already charged
    mechanism: str = "training"             # training | feature-statistics | evaluation
    status: str = "ok"                      # ok | warning | error | n/a (non-DP round)
    message: str = ""
    honest_sites: int = 1                   # t of distributed DP (the logged σ is the site's share of the sum's)
    logged_assumed_after: float | None = None      # the logged ε assuming t honest sites (σ·√t per release)
    recomputed_assumed_after: float | None = None  # its counterpart, on the dataset's assumed track
    assumed_rel_diff: float | None = None

    @property
    def distributed(self) -> bool:
        """The record says something about distributed DP (older and other records do not)."""
        return self.honest_sites > 1 or self.logged_assumed_after is not None

    def to_dict(self) -> dict:
        out = {k: _num(v) for k, v in asdict(self).items()}
        if not self.distributed and self.recomputed_assumed_after is None:  # as before distributed DP
            for key in ("honest_sites", "logged_assumed_after", "recomputed_assumed_after", "assumed_rel_diff"):
                del out[key]
        return out


@dataclass
class DatasetEpsilon:
    dataset: str
    rounds: list[RoundEpsilon] = field(default_factory=list)

    @property
    def dp_rounds(self) -> list[RoundEpsilon]:
        return [r for r in self.rounds if r.dp]

    @property
    def non_dp_rounds(self) -> int:
        return sum(1 for r in self.rounds if not r.dp)

    @property
    def max_rel_diff(self) -> float | None:
        diffs = [abs(r.rel_diff) for r in self.rounds if r.rel_diff is not None and math.isfinite(r.rel_diff)]
        return max(diffs) if diffs else None

    @property
    def last(self) -> RoundEpsilon | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def runs(self) -> list[str]:
        return list(dict.fromkeys(r.run_id for r in self.rounds))

    def by_mechanism(self) -> dict[str, float]:
        """Each kind of release's ε alone (the dp-accounting counterpart of the site's accountant, as the
        ledger's ``spent_by_kind``), over the releases this log charged, at the last δ logged."""
        last = next((r for r in reversed(self.rounds) if r.dp and r.delta is not None), None)
        if last is None:
            return {}
        out = {}
        for mechanism in dict.fromkeys(r.mechanism for r in self.rounds):
            rows = [r for r in self.rounds if r.mechanism == mechanism and r.charged and r.dp and r.status != "error"]
            history = [(r.sigma, r.sample_rate, r.steps) for r in rows]
            if history:
                out[mechanism] = epsilon(history, last.delta, last.accountant)
        return out

    def to_dict(self) -> dict:
        last = self.last
        return {"dataset": self.dataset, "rounds": len(self.rounds), "dp_rounds": len(self.dp_rounds),
                "non_dp_rounds": self.non_dp_rounds, "runs": self.runs,
                "accountant": last.accountant if last else None, "delta": _num(last.delta) if last else None,
                "budget": _num(last.budget) if last else None,
                "logged_epsilon": _num(last.logged_after) if last else None,
                "recomputed_epsilon": _num(last.recomputed_after) if last else None,
                "max_rel_diff": _num(self.max_rel_diff),
                "epsilon_by_mechanism": {k: _num(v) for k, v in self.by_mechanism().items()},
                **self._assumed(), "per_round": [r.to_dict() for r in self.rounds]}

    def _assumed(self) -> dict:
        """The ε that assumes the honest sites of distributed DP, logged and recomputed, where any release did."""
        if not any(r.distributed for r in self.rounds):
            return {}
        last = self.last
        return {"logged_epsilon_assumed": _num(last.logged_assumed_after),
                "recomputed_epsilon_assumed": _num(last.recomputed_assumed_after),
                "honest_sites": max(r.honest_sites for r in self.rounds)}


def _num(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _float(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _honest_sites(payload: dict) -> int | None:
    """The logged t of distributed DP: 1 when absent, None when not a whole number >= 1."""
    value = payload.get("honest_sites", 1)
    return value if type(value) is int and value >= 1 else None


def recompute(records: Iterable[dict]) -> dict[str, DatasetEpsilon]:
    """Per dataset, every ``dp-round`` with the logged and the recomputed cumulative ε (and, for a dataset with
    distributed-DP releases, the ε that assumes their honest sites)."""
    rounds = [rec for rec in records if rec.get("event") == "dp-round"]
    distributed = {str(rec["payload"].get("dataset")) for rec in rounds
                   if rec["payload"].get("honest_sites", 1) != 1 or "epsilon_assumed_after" in rec["payload"]}
    plans: dict[str, tuple[list[Step], float]] = {}
    for rec in rounds:  # first pass: each dataset's PLD interval, from an RDP estimate of its total ε
        p = rec["payload"]
        sigma, q, steps, delta = (_float(p.get("noise_multiplier")), _float(p.get("sample_rate")),
                                  p.get("steps"), _float(p.get("delta")))
        if p.get("dp") is True and sigma is not None and q is not None and type(steps) is int \
                and _valid(sigma, q, steps) and delta is not None and 0 < delta < 1:
            history, smallest = plans.setdefault(str(p.get("dataset")), ([], delta))
            history.append((sigma, q, steps))
            plans[str(p.get("dataset"))] = (history, min(smallest, delta))
    tables: dict[str, DatasetEpsilon] = {}
    state: dict[str, Composition] = {}
    assumed: dict[str, Composition] = {}  # the σ·√t track of datasets in ``distributed``
    charged: dict[str, set] = {}
    for rec in rounds:
        p = rec["payload"]
        dataset = str(p.get("dataset"))
        table = tables.setdefault(dataset, DatasetEpsilon(dataset))
        if dataset not in state:
            try:
                interval = discretization(*plans[dataset]) if dataset in plans else PLD_DISCRETIZATION
            except (ArithmeticError, ValueError):
                interval = PLD_DISCRETIZATION
            state[dataset] = Composition(interval)
            try:
                bound = rdp_bound(*plans[dataset]) if dataset in plans else 0.0
            except (ArithmeticError, ValueError):
                bound = math.inf
            state[dataset].beyond = bound if bound > EPSILON_CEILING else None
            if dataset in distributed:  # larger σ: its ε is below the own track's, so the interval suffices
                assumed[dataset] = Composition(interval)
        comp, comp_assumed = state[dataset], assumed.get(dataset)
        row = RoundEpsilon(
            seq=rec["seq"], time=rec["time"], run_id=str(p.get("run_id")), round=p.get("round"), dataset=dataset,
            dp=p.get("dp") is True, accountant=str(p.get("accountant")), delta=_float(p.get("delta")),
            sigma=_float(p.get("noise_multiplier")), sample_rate=_float(p.get("sample_rate")),
            steps=p.get("steps") if type(p.get("steps")) is int else None, budget=_float(p.get("epsilon_budget")),
            logged_before=_float(p.get("epsilon_before")), logged_after=_float(p.get("epsilon_after")),
            mechanism=str(p.get("mechanism") or "training"), honest_sites=_honest_sites(p) or 1,
            logged_assumed_after=_float(p.get("epsilon_assumed_after")))
        table.rounds.append(row)
        if not row.dp:
            for track in (comp, comp_assumed):  # the ledger records a non-DP round with σ = 0: ε is unbounded
                if track is not None:
                    track.unbounded = True
            row.status, row.message = "n/a", "non-DP round (dp = false): the dataset's ε is unbounded from here"
            continue
        problem = _check_parameters(row) or _check_distributed(p, row)
        if not problem and comp.beyond is not None:
            problem = (f"the logged parameters of this dataset are out of the verifier's range (their RDP bound "
                       f"is ε={comp.beyond:.3g}, above {EPSILON_CEILING:g}): ε is not recomputed")
        if problem:
            row.status, row.message = "error", problem
            continue
        row.recomputed_before = comp.counterpart(row.accountant, row.delta)
        key = (row.run_id, row.round, row.mechanism)  # a round's training and its evaluation: two releases
        if key in charged.setdefault(dataset, set()):
            row.charged = False  # the ledger never charges a (run, round, kind) twice; neither do we
        else:
            charged[dataset].add(key)
            comp.add(row.sigma, row.sample_rate, row.steps)
            if comp_assumed is not None:
                comp_assumed.add(row.sigma * math.sqrt(row.honest_sites), row.sample_rate, row.steps)
        try:
            _judge(row, comp, comp_assumed)
        except (ArithmeticError, MemoryError, ValueError) as exc:  # numerically out of reach
            row.status, row.message = "error", f"ε cannot be recomputed for these parameters ({exc!r})"
    return tables


def _check_parameters(row: RoundEpsilon) -> str:
    if row.accountant not in ("prv", "rdp"):
        return f"unknown accountant {row.accountant!r}: ε cannot be recomputed"
    if row.delta is None or not 0 < row.delta < 1:
        return f"δ={row.delta} is not in (0, 1): ε cannot be recomputed"
    if row.sigma is None or row.sample_rate is None or row.steps is None:
        return "noise_multiplier, sample_rate or steps missing: ε cannot be recomputed"
    if not _valid(row.sigma, row.sample_rate, row.steps):
        return (f"invalid DP parameters for a DP round (σ={row.sigma:g}, q={row.sample_rate:g}, "
                f"steps={row.steps})")
    if row.steps > MAX_STEPS:
        return f"{row.steps} steps in one round is beyond what the verifier recomputes ({MAX_STEPS:g})"
    return ""


def _check_distributed(payload: dict, row: RoundEpsilon) -> str:
    """The distributed-DP fields of a record: a whole t >= 1, and t > 1 on training rounds only (statistics and
    evaluation releases are not in the secure sum)."""
    if _honest_sites(payload) is None:
        return f"honest_sites={payload.get('honest_sites')!r} is not a whole number >= 1"
    if row.honest_sites > 1 and row.mechanism != "training":
        return f"a {row.mechanism} release assumed {row.honest_sites} honest sites, but it is not in a secure sum"
    return ""


_SEVERITY = {"ok": 0, "warning": 1, "error": 2}


def _judge(row: RoundEpsilon, comp: Composition, assumed: Composition | None = None) -> None:
    """Judge the logged ε against the own-noise track and, where the record logs one, the assumed ε against the
    assumed track (or the own one, where the dataset assumed nothing); the row keeps the worse finding."""
    before = None
    if row.logged_before is not None and row.recomputed_before is not None \
            and row.logged_before > row.recomputed_before * (1 + TOLERANCE) + 1e-12:
        before = (row.logged_before, row.recomputed_before)
    row.recomputed_after, row.rel_diff, row.tight_after, row.status, row.message = _verdict(
        row.logged_after, comp, row.accountant, row.delta, "ε", "ε after the round", before)
    if assumed is not None:
        row.recomputed_assumed_after = assumed.counterpart(row.accountant, row.delta)
    if row.distributed:
        expected, row.assumed_rel_diff, _, status, message = _verdict(
            row.logged_assumed_after, assumed or comp, row.accountant, row.delta, "assumed ε",
            f"ε assuming {row.honest_sites} honest sites")
        row.recomputed_assumed_after = expected
        if message:
            row.message = "; ".join(m for m in (row.message, message) if m)
        if _SEVERITY[status] > _SEVERITY[row.status]:
            row.status = status


def _verdict(logged: float | None, comp: Composition, accountant: str, delta: float, label: str, missing: str,
             before: tuple[float, float] | None = None) -> tuple:
    """(recomputed, relative difference, tight ε or None, status, message) of one logged cumulative ε."""
    expected = comp.counterpart(accountant, delta)
    name = {"prv": "PLD (+ PRV's 0.01 margin)", "rdp": "RDP"}[accountant]
    at = f"at δ={delta:g}"
    if math.isinf(expected):
        if logged is None or math.isinf(logged):
            return expected, None, None, "ok", ""
        return expected, None, None, "error", (f"logged {label}={logged:.6g} {at} but an earlier round of this "
                                               f"dataset had no noise: its ε is unbounded")
    if logged is None:
        return expected, None, None, "error", f"{missing} is missing (recomputed {expected:.6g} {at})"
    rel_diff = (logged - expected) / expected if expected > 0 else (0.0 if abs(logged) < 1e-12 else math.inf)
    if abs(rel_diff) <= TOLERANCE:
        return expected, rel_diff, None, "ok", ""
    tight = comp.pld_epsilon(delta)
    diff = (f"logged {label}={logged:.6g} {at} differs by {100 * rel_diff:+.2f}% from dp-accounting's {name} "
            f"{expected:.6g}")
    if logged < tight * (1 - TOLERANCE):
        return expected, rel_diff, tight, "error", (
            f"{diff}; it is below even the tight PLD ε {tight:.6g}: the logged {label} does not bound the privacy "
            f"loss of the logged σ, q and steps")
    if logged > expected * (1 + TOLERANCE):
        earlier = (f" (already before this round it logged ε={before[0]:.6g} where the earlier rounds in this log "
                   f"add up to {before[1]:.6g})") if before else ""
        return expected, rel_diff, tight, "error", (
            f"{diff}; it is more than the logged rounds of this dataset add up to{earlier}: the ledger charged "
            f"rounds (or parameters) that are not in this log")
    loose = ("dp-accounting 0.6's RDP is looser than Opacus's at fractional orders (it sums the absolute "
             "values of an alternating series)" if accountant == "rdp" else
             "the site's PRV number is below its own reporting margin")
    return expected, rel_diff, tight, "warning", (
        f"{diff}, but it is above the tight PLD ε {tight:.6g}, so it is still a valid bound: {loose}")
