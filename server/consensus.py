"""How far one site may pull the model, and which site disagrees with the others.

Every round, from the Gram matrix of the accepted updates' deltas (d_i = x_i − g, g the global model
sent; ``server/validation.py`` computes it in the pass that checks the updates, so this costs no extra
pass over the updates):

- **bounded**: an update longer than ``factor`` × the round's median update length L is scaled so that
  the longer it was, the shorter it becomes: its new length is (factor·L)² / length. Up to factor·L an
  update counts as sent; a ×10 or ×10⁶ update counts for less than a typical one, whatever its sign.
  The rule needs nothing but the round's updates (``factor`` × the median is what an honest site's update
  can be: honest sites differ in local steps and data, but not by a factor of ``factor`` from the median
  site's update — measured in docs/BENCHMARKS.md, "Attacks");
- **agreement** per site: the cosine between d_i and the consensus m — the geometric median of the
  updates (Weiszfeld's iteration run on the Gram matrix: m = Σ α_j d_j), which no single site of three
  or more can drag far — and |d_i| over L. An update is an outlier if it was bounded ("far"), points
  away from the consensus ("opposed": cosine below ``min_cosine``) or barely moved ("idle": under
  ``min_norm_ratio`` × L, a site replaying the model; it has no say in the consensus). A site that is an
  outlier ``rounds_to_flag`` rounds in a row is flagged, and with the policy "exclude" sent no more work.
  Direction alone changes nothing in the average: under DP an honest site's update is mostly noise, and
  leaving out updates for pointing the wrong way left out honest ones (docs/BENCHMARKS.md, "Attacks").

With fewer than 3 updates there is no majority to agree with: nothing is bounded or flagged.
docs/OPERATIONS.md, "Bounded aggregation", states the rule for operators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MIN_UPDATES = 3
POLICIES = ("flag", "exclude")


@dataclass(frozen=True)
class ConsensusRule:
    factor: float = 3.0           # bound: beyond this × the median update length, an update counts less
    min_cosine: float = 0.0       # an update pointing away from the consensus is an outlier (flagged, not changed)
    min_norm_ratio: float = 0.1   # ... and one that barely moved the model
    rounds_to_flag: int = 3       # outlier this many rounds in a row: flagged
    policy: str = "flag"          # flag: report it; exclude: also send it no more work in this run


@dataclass(frozen=True)
class Agreement:
    """One site's update against the round's consensus."""
    cosine: float          # cos(d_i, m), m the round's consensus; 0 for a zero update
    norm_ratio: float      # |d_i| / median_j |d_j|
    scale: float           # 1: as sent; < 1: the factor its length was multiplied by (the bound)
    outlier: str           # "" or why: "far", "opposed", "idle" (comma-separated), or "rejected" (refused outright)

    def record(self) -> dict:
        return {"cosine": round(self.cosine, 4), "norm_ratio": round(self.norm_ratio, 4),
                "scale": round(self.scale, 4), "outlier": self.outlier}


@dataclass(frozen=True)
class Bounded:
    """A round's bounded updates: row i of ``coefficients`` writes d_i' = Σ_j coefficients[i, j]·d_j."""
    coefficients: np.ndarray
    agreement: list[Agreement]
    radius: float  # the bound on |d_i'| (0: no bound this round)

    @property
    def changed(self) -> list[int]:
        return [i for i, a in enumerate(self.agreement) if a.scale < 1.0]


def geometric_median(gram: np.ndarray, iterations: int = 500, tol: float = 1e-9) -> np.ndarray:
    """Weights α (Σα = 1) with m = Σ α_i d_i the geometric median of the vectors whose Gram matrix is given
    (Weiszfeld: α_i ∝ 1/|d_i − m|, iterated; distances from the Gram matrix alone)."""
    n = len(gram)
    alpha = np.full(n, 1.0 / n)
    scale = math.sqrt(max(float(np.mean(np.diag(gram))), 0.0)) or 1.0
    for _ in range(iterations):
        inverse = 1.0 / np.maximum(distances(gram, alpha), 1e-12 * scale)
        new = inverse / inverse.sum()
        if np.abs(new - alpha).sum() < tol:
            return new
        alpha = new
    return alpha


def distances(gram: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """|d_i − Σ α_j d_j| for every i, from the Gram matrix."""
    g_alpha = gram @ alpha
    return np.sqrt(np.maximum(np.diag(gram) - 2 * g_alpha + alpha @ g_alpha, 0.0))


def bound(gram: np.ndarray, rule: ConsensusRule) -> Bounded:
    """The round's bound, each update's agreement with the consensus, and the coefficients of the bounded updates."""
    n = len(gram)
    coefficients = np.eye(n)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    typical = float(np.median(norms))
    ratios = norms / typical if typical > 0 else np.ones(n)
    voters = [i for i in range(n) if ratios[i] >= rule.min_norm_ratio]  # a site replaying the model has no say
    if len(voters) < MIN_UPDATES:  # no majority to agree with: nothing bounded, only idleness on record
        return Bounded(coefficients, [Agreement(1.0 if i in voters else 0.0, float(r), 1.0,
                                                "" if i in voters else "idle") for i, r in enumerate(ratios)], 0.0)
    alpha = np.zeros(n)
    alpha[voters] = geometric_median(gram[np.ix_(voters, voters)])
    along = gram @ alpha  # d_i · m
    centre = math.sqrt(max(float(alpha @ along), 0.0))  # |m|
    radius = rule.factor * typical
    agreement = []
    for i in range(n):
        cosine = float(np.clip(along[i] / (norms[i] * centre), -1.0, 1.0)) if norms[i] > 0 and centre > 0 else 0.0
        far = norms[i] > radius > 0
        if far:  # the longer it is, the less it counts: its length becomes radius² / length
            coefficients[i, i] = (radius / float(norms[i])) ** 2
        why = [w for w, bad in (("far", far), ("opposed", i in voters and cosine < rule.min_cosine),
                                ("idle", i not in voters)) if bad]
        agreement.append(Agreement(cosine, float(ratios[i]), float(coefficients[i, i]), ",".join(why)))
    return Bounded(coefficients, agreement, radius)


@dataclass
class OutlierWatch:
    """Consecutive outlier rounds per site; a site reaching ``rule.rounds_to_flag`` is flagged once."""
    rule: ConsensusRule
    streak: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, str] = field(default_factory=dict)  # site → why

    def observe(self, server_round: int, agreement: dict[str, Agreement]) -> dict[str, str]:
        """This round's agreement; returns the sites flagged by it (site → reason)."""
        new = {}
        for site, a in agreement.items():
            self.streak[site] = self.streak.get(site, 0) + 1 if a.outlier else 0
            if self.streak[site] >= self.rule.rounds_to_flag and site not in self.flagged:
                self.flagged[site] = new[site] = (
                    f"an outlier against the consensus of the other sites' updates {self.streak[site]} rounds in a "
                    f"row (round {server_round}: {a.outlier}; cosine {a.cosine:.2f}, norm ratio {a.norm_ratio:.2f})")
        return new
