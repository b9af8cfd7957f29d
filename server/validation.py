"""Checks on every site update before it can reach the aggregate.

A site with a bug, a flipped bit or bad intent must not poison the global model: an update must
have exactly the global model's arrays (names, shapes, dtypes), finite values, a plausible example
count, and a distance from the global model within bounds — an absolute L2 bound if the run sets
one, and by default at most ``max_ratio`` × the median distance of the round's other updates.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

WEIGHT_KEY = "num-examples"


def _same_kind(got: str, expected: str) -> bool:
    """Floating arrays may change precision (FedAdam's numpy maths returns float64, sites send the
    model's float32); anything else must keep its exact dtype."""
    floating = ("float", "bfloat")
    if str(expected).startswith(floating):
        return str(got).startswith(floating)
    return got == expected


@dataclass(frozen=True)
class UpdateValidator:
    max_norm: float = 0.0     # > 0: absolute bound on ||update − global||₂
    max_ratio: float = 100.0  # > 0: bound relative to the median of the round's other updates (needs ≥ 3)

    def check(self, content: RecordDict, global_arrays: ArrayRecord, n_train: int) -> tuple[str | None, float]:
        """(reason for rejecting, or None; the update's L2 distance to the global model)."""
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "reply must hold exactly one array record and one metric record", 0.0
        arrays = next(iter(content.array_records.values()))
        if list(arrays.keys()) != list(global_arrays.keys()):
            return "arrays do not match the global model's parameter names", 0.0
        squared = 0.0
        for name, ref in global_arrays.items():
            got = arrays[name]
            if tuple(got.shape) != tuple(ref.shape) or not _same_kind(got.dtype, ref.dtype):
                return f"array '{name}' is {got.dtype}{list(got.shape)}, expected {ref.dtype}{list(ref.shape)}", 0.0
            local, base = got.numpy(), ref.numpy()
            if not np.all(np.isfinite(local)):
                return f"array '{name}' holds NaN or infinite values", 0.0
            squared += float(np.sum((local.astype(np.float64) - base.astype(np.float64)) ** 2))
        norm = squared ** 0.5
        if not np.isfinite(norm):
            return "update norm is not finite", 0.0
        if self.max_norm > 0 and norm > self.max_norm:
            return f"update norm {norm:.4g} exceeds max-update-norm {self.max_norm:g}", norm
        examples = next(iter(content.metric_records.values())).get(WEIGHT_KEY)
        if not isinstance(examples, (int, float)) or not 0 < examples <= max(n_train, 1):
            return f"{WEIGHT_KEY} = {examples!r} is not in (0, {n_train}] (the site's training count)", norm
        return None, norm

    def outliers(self, norms: dict[str, float]) -> dict[str, str]:
        """Sites whose update is far larger than the others' (relative bound; needs ≥ 3 updates)."""
        if self.max_ratio <= 0 or len(norms) < 3:
            return {}
        rejected = {}
        for site, norm in norms.items():
            others = [v for s, v in norms.items() if s != site]
            median = statistics.median(others)
            if median > 0 and norm > self.max_ratio * median:
                rejected[site] = (f"update norm {norm:.4g} is over {self.max_ratio:g}× the median of the other "
                                  f"sites' ({median:.4g})")
        return rejected
