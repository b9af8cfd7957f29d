"""What an evaluation release is made of: each test patient's bounded vector and the named keys its sum is
released under — one layout that the site (building and unpacking the sum) and the coordinator (reading it
back, re-adding noise to state each figure's noise scale) share. docs/PRIVACY.md, "Evaluation releases".

- Binary tasks: the one-hot of the patient's confusion cell (tp, fp, tn, fn), the one-hot of its score bin
  in its own class's histogram, and its BCE loss clipped to [0, LOSS_BOUND] divided by LOSS_BOUND:
  L2 norm ≤ √3.
- Segmentation: the case's Dice and IoU of each class 0..K-1 (each in [0, 1]) and a 1 for the case count:
  L2 norm ≤ √(2K+1).

A released value is its coordinate times its field's scale (the loss sum: × LOSS_BOUND), so the noise on
it has std ``noise-std`` × scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shared_models.metrics import SCORE_BINS, score_bins
from shared_models.tasks import BINARY, SEGMENTATION

# Default σ of an evaluation release (run config ``eval-noise-multiplier``); measured in docs/BENCHMARKS.md.
EVAL_NOISE_MULTIPLIER = 5.0
LOSS_BOUND = 2.0  # per-patient BCE is clipped to [0, LOSS_BOUND] (a loss of 2: p = 0.135 for the true class)
COUNT_KEYS = ("tp", "fp", "tn", "fn")
HIST_KEYS = ("score-hist-pos", "score-hist-neg")


@dataclass(frozen=True)
class Field:
    key: str
    length: int = 0       # 0: one number; n: a list of n numbers
    scale: float = 1.0    # released value = coordinate × scale

    @property
    def size(self) -> int:
        return self.length or 1


@dataclass(frozen=True)
class Layout:
    """The coordinates of one family's per-patient vector, their L2 bound and the keys they are released under."""

    fields: tuple[Field, ...]
    l2_bound: float
    constants: tuple[tuple[str, float], ...] = ()  # public numbers sent beside the sums (the loss bound)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.fields)

    @property
    def family(self) -> str:
        """The metric family (shared_models/tasks.py) whose figures these sums give."""
        return BINARY if self.fields[0].key == "tp" else SEGMENTATION

    def unpack(self, total: np.ndarray, prefix: str = "") -> dict:
        """The released sum (one coordinate per vector entry) under its keys, scaled; lists for histograms."""
        total = np.asarray(total, dtype=np.float64)
        if total.shape != (self.size,):
            raise ValueError(f"an evaluation sum of {total.shape} values does not fit the layout's {self.size}")
        out, at = {}, 0
        for f in self.fields:
            part = total[at:at + f.size] * f.scale
            out[prefix + f.key] = [float(v) for v in part] if f.length else float(part[0])
            at += f.size
        out.update({prefix + k: float(v) for k, v in self.constants})
        return out

    def columns(self, coords: np.ndarray) -> dict:
        """``unpack`` of many sums at once ([draws, size] → each key's [draws] or [draws, length] array)."""
        coords = np.asarray(coords, dtype=np.float64)
        out, at = {}, 0
        for f in self.fields:
            part = coords[:, at:at + f.size] * f.scale
            out[f.key] = part if f.length else part[:, 0]
            at += f.size
        out.update({k: float(v) for k, v in self.constants})
        return out

    def pack(self, record: Mapping, prefix: str = "") -> np.ndarray:
        """The coordinates of a released record (the inverse of ``unpack``)."""
        parts = []
        for f in self.fields:
            value = record[prefix + f.key]
            part = np.asarray(value if f.length else [value], dtype=np.float64)
            if part.shape != (f.size,):
                raise ValueError(f"'{prefix + f.key}' has {part.size} value(s), the layout {f.size}")
            parts.append(part / f.scale)
        return np.concatenate(parts)

    def scales(self) -> np.ndarray:
        """Per coordinate: the factor from coordinate to released value (noise std of a value = noise-std × it)."""
        return np.concatenate([np.full(f.size, f.scale) for f in self.fields])


def binary_layout(bins: int = SCORE_BINS) -> Layout:
    fields = (*(Field(k) for k in COUNT_KEYS), *(Field(k, bins) for k in HIST_KEYS), Field("loss-sum", 0, LOSS_BOUND))
    return Layout(fields, math.sqrt(3.0), (("loss-bound", LOSS_BOUND),))


def seg_layout(num_classes: int) -> Layout:
    fields = (*(Field(f"dice-sum-{c}") for c in range(num_classes)),
              *(Field(f"iou-sum-{c}") for c in range(num_classes)), Field("cases"))
    return Layout(fields, math.sqrt(2.0 * num_classes + 1.0))


def layout_of(record: Mapping, prefix: str = "") -> Layout:
    """The layout a released record was made with, from its keys (binary, or segmentation with K classes)."""
    if prefix + "tp" in record:
        bins = len(record[prefix + "score-hist-pos"])
        if float(record.get(prefix + "loss-bound", LOSS_BOUND)) != LOSS_BOUND:
            raise ValueError(f"'{prefix}loss-bound' differs from this layout's {LOSS_BOUND:g}")
        return binary_layout(bins)
    if prefix + "cases" in record:
        return seg_layout(sum(1 for k in record if k.startswith(prefix + "dice-sum-")))
    raise ValueError("the record holds no evaluation release (neither confusion counts nor case sums)")


def binary_vectors(scores: np.ndarray, labels: np.ndarray, losses: np.ndarray, threshold: float = 0.5,
                   bins: int = SCORE_BINS) -> np.ndarray:
    """One row per test patient in ``binary_layout(bins)``'s order."""
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pred = scores > threshold
    n = len(scores)
    out = np.zeros((n, 4 + 2 * bins + 1))
    cell = np.where(pred & truth, 0, np.where(pred & ~truth, 1, np.where(~pred & ~truth, 2, 3)))
    out[np.arange(n), cell] = 1.0
    out[np.arange(n), 4 + np.where(truth, 0, bins) + score_bins(scores, bins)] = 1.0
    losses = np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=LOSS_BOUND)  # a NaN would void the bound
    out[:, -1] = np.clip(losses, 0.0, LOSS_BOUND) / LOSS_BOUND
    return out


def seg_vectors(dice: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """One row per test case in ``seg_layout(K)``'s order, from its per-class Dice and IoU ([cases, K])."""
    dice, iou = np.asarray(dice, dtype=np.float64), np.asarray(iou, dtype=np.float64)
    if dice.shape != iou.shape or dice.ndim != 2:
        raise ValueError(f"per-case Dice {dice.shape} and IoU {iou.shape} must both be [cases, classes]")
    dice, iou = np.clip(np.nan_to_num(dice), 0, 1), np.clip(np.nan_to_num(iou), 0, 1)  # a NaN would void the bound
    return np.concatenate([dice, iou, np.ones((len(dice), 1))], axis=1)
