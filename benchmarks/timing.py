"""Ratios of two step functions timed in one run: interleaved blocks, medians (load hits both alike)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def _time(step: Callable[[], None], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def interleaved_medians(first: Callable[[], None], second: Callable[[], None], repeats: int, block: int = 10,
                        warmup: int = 5) -> tuple[float, float]:
    """Median seconds per call of ``first`` and ``second``, run alternately in blocks of ``block``."""
    for step in (first, second):
        _time(step, warmup)
    a, b = [], []
    for _ in range(max(1, repeats // block)):
        a += _time(first, block)
        b += _time(second, block)
    return statistics.median(a), statistics.median(b)
