"""Segmentation metrics on label maps, plus counts a coordinator can pool across sites.

Inputs are integer label maps of shape ``[B, 1, *spatial]`` (or ``[B, *spatial]``), one case per
item; predictions are ``argmax`` of the logits. Dice and IoU come from MONAI (``DiceMetric``,
``MeanIoU``) per case and class, then averaged over cases; every result is a plain float.

**A class absent from a case** — we use MONAI's ``ignore_empty=False``:
- absent in both prediction and truth → Dice = IoU = 1.0 (perfect agreement);
- absent in truth but predicted → 0.0 (a false positive is penalised).
With ``ignore_empty=True`` (MONAI's default, selectable here) both cases would be NaN and skipped,
so false positives on cases without the class would go unseen, and a class absent from every case
would report NaN. We default to ``False`` so that every reported number is defined and errors count.

**Pooling across sites without per-patient values**: per class a site reports Σ 2|P∩T| and
Σ (|P|+|T|) over its test cases (``dice_counts``); the coordinator sums them over sites and takes the
ratio (``pooled_dice``). That equals the Dice of all test cases concatenated into one volume. These
counts, like the EHR confusion counts, are not DP-protected (see docs/PRIVACY.md, known limitations).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot

__all__ = ["dice_counts", "dice_per_class", "iou_per_class", "mean_foreground_dice", "pooled_dice", "seg_report"]


def _label_maps(pred, truth) -> tuple[torch.Tensor, torch.Tensor]:
    pred, truth = torch.as_tensor(np.asarray(pred)).long(), torch.as_tensor(np.asarray(truth)).long()
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    if pred.dim() == 3 or (pred.dim() == 4 and pred.shape[1] != 1):
        pred, truth = pred.unsqueeze(1), truth.unsqueeze(1)  # [B, H, W] or [B, D, H, W] → [B, 1, ...]
    elif not (pred.dim() in (4, 5) and pred.shape[1] == 1):
        raise ValueError(f"expected label maps [B, 1, *spatial] or [B, *spatial] (2-D/3-D), got {tuple(pred.shape)}")
    return pred, truth


def _mean_over_cases(per_case: torch.Tensor) -> list[float]:
    """Per-class mean over cases, skipping NaN (only produced with ignore_empty=True)."""
    out = []
    for column in per_case.double().T:
        kept = column[~torch.isnan(column)]
        out.append(float(kept.mean()) if len(kept) else math.nan)
    return out


def dice_per_class(pred, truth, num_classes: int = 3, ignore_empty: bool = False) -> list[float]:
    """Dice of each class (background first), averaged over cases."""
    pred, truth = _label_maps(pred, truth)
    metric = DiceMetric(include_background=True, reduction="none", num_classes=num_classes, ignore_empty=ignore_empty)
    return _mean_over_cases(metric(pred, truth))


def iou_per_class(pred, truth, num_classes: int = 3, ignore_empty: bool = False) -> list[float]:
    """IoU (Jaccard) of each class (background first), averaged over cases."""
    pred, truth = _label_maps(pred, truth)
    metric = MeanIoU(include_background=True, reduction="none", ignore_empty=ignore_empty)
    return _mean_over_cases(metric(one_hot(pred, num_classes, dim=1), one_hot(truth, num_classes, dim=1)))


def mean_foreground_dice(pred, truth, num_classes: int = 3, ignore_empty: bool = False) -> float:
    """Mean over the foreground classes (1..K-1) of the per-class Dice."""
    fg = [d for d in dice_per_class(pred, truth, num_classes, ignore_empty)[1:] if not math.isnan(d)]
    return float(np.mean(fg)) if fg else math.nan


def dice_counts(pred, truth, num_classes: int = 3) -> dict[str, list[int]]:
    """Per class, Σ over cases of 2|P∩T| (``"num"``) and of |P|+|T| (``"den"``): poolable, no per-case values."""
    pred, truth = _label_maps(pred, truth)
    num, den = [], []
    for c in range(num_classes):
        p, t = pred == c, truth == c
        num.append(int(2 * (p & t).sum()))
        den.append(int(p.sum() + t.sum()))
    return {"num": num, "den": den}


def pooled_dice(site_counts: Iterable[Mapping[str, list[int]]]) -> list[float]:
    """Per-class Dice of all sites' cases together: ΣΣ 2|P∩T| / ΣΣ (|P|+|T|); 1.0 where the class never occurs."""
    site_counts = list(site_counts)
    num = np.sum([c["num"] for c in site_counts], axis=0)
    den = np.sum([c["den"] for c in site_counts], axis=0)
    return [float(n / d) if d else 1.0 for n, d in zip(num, den)]  # 1.0: as ignore_empty=False


def seg_report(pred, truth, num_classes: int = 3, ignore_empty: bool = False) -> dict[str, float]:
    """Everything a site reports about one segmentation evaluation, under fixed keys, as plain floats."""
    dice = dice_per_class(pred, truth, num_classes, ignore_empty)
    iou = iou_per_class(pred, truth, num_classes, ignore_empty)
    counts = dice_counts(pred, truth, num_classes)
    fg = [d for d in dice[1:] if not math.isnan(d)]
    report = {"mean-dice": float(np.mean(fg)) if fg else math.nan, "cases": float(_label_maps(pred, truth)[0].shape[0])}
    for c in range(num_classes):
        report.update({f"dice-{c}": dice[c], f"iou-{c}": iou[c],
                       f"dice-num-{c}": float(counts["num"][c]), f"dice-den-{c}": float(counts["den"][c])})
    return report
