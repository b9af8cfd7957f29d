"""Timing step functions: each call's seconds (``call_times``), and ratios of two step functions timed in one
run (``interleaved_medians``: interleaved blocks, medians, so load hits both alike)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def call_times(step: Callable[[], None], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step``, in order."""
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
        call_times(step, warmup)
    a, b = [], []
    for _ in range(max(1, repeats // block)):
        a += call_times(first, block)
        b += call_times(second, block)
    return statistics.median(a), statistics.median(b)
