"""ε from a history of DP-SGD steps, with Opacus's accountants (PRV by default, RDP).

A history is the accountant's whole state: a list of (noise multiplier σ, sample rate q, steps).
Equal (σ, q) entries are merged, so a history built round by round gives the same ε as one
accountant run over all the steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import numpy as np

# Opacus's accountants by name. Opacus is imported on first use, not with this module: importing it costs about
# a second of CPU (it brings torch.distributed), which every `carefl` command and app process would pay.
ACCOUNTANTS = ("prv", "rdp")


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"prv": PRVAccountant, "rdp": RDPAccountant}[name]()

Step = tuple[float, float, int]  # (sigma, sample rate, steps)


def merge(history: Iterable[Step]) -> list[Step]:
    """Sum the steps of entries with the same (σ, q), keeping first-seen order."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return [(s, q, n) for (s, q), n in merged.items() if n > 0]


def epsilon(history: Iterable[Step], delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` after all steps of ``history``; 0 for no steps, ∞ if any step had no noise."""
    steps = merge(history)
    if not steps:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in steps):
        return math.inf
    acc = _accountant(accountant)
    acc.history = steps
    with warnings.catch_warnings(), np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf at q = 1: harmless
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def sample_rate(n: int, batch_size: int) -> float:
    """Opacus's Poisson rate for a data set of ``n`` patients and expected batch ``batch_size``."""
    return 1.0 / math.ceil(n / batch_size)


def plan_noise(target_epsilon: float, delta: float, n: int, batch_size: int, total_steps: int,
               accountant: str = "prv", prior: Iterable[Step] = ()) -> float:
    """σ so that ``total_steps`` Poisson steps (all rounds × all local steps) stay within the target.

    ``prior`` holds the study's other releases (the feature statistics, each round's evaluation): the
    study's target then covers them too, so σ is found by bisection on the composed ε.
    """
    prior = list(prior)
    q = sample_rate(n, batch_size)
    if not prior:
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha": the bound stays valid
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=q, steps=total_steps,
                                              accountant=accountant, epsilon_tolerance=0.005))
    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise ValueError(f"the study's other releases (feature statistics, evaluations) already cost ε = {spent:.3f} "
                         f"at δ = {delta:g}, not below the target ε = {target_epsilon}")
    low, high = 0.1, 1.0
    while epsilon(prior + [(high, q, total_steps)], delta, accountant) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches ε = {target_epsilon} after the study's other releases")
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        if epsilon(prior + [(mid, q, total_steps)], delta, accountant) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
