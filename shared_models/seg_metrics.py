"""Segmentation metrics on label maps, and the figures a coordinator derives from the sites' released sums.

Inputs are integer label maps of shape ``[B, 1, *spatial]`` (or ``[B, *spatial]``), one case per
item; predictions are ``argmax`` of the logits. Dice and IoU come from MONAI (``DiceMetric``,
``MeanIoU``) per case and class, then averaged over cases; every result is a plain float.

**A class absent from a case** — we use MONAI's ``ignore_empty=False``:
- absent in both prediction and truth → Dice = IoU = 1.0 (perfect agreement);
- absent in truth but predicted → 0.0 (a false positive is penalised).
With ``ignore_empty=True`` (MONAI's default, selectable here) both cases would be NaN and skipped,
so false positives on cases without the class would go unseen, and a class absent from every case
would report NaN. We default to ``False`` so that every reported number is defined and errors count.

**Pooling across sites without per-patient values**: per class a site releases Σ Dice and Σ IoU over its
test cases and the number of cases (``per_case`` → ``shared_models/eval_release.py``), as a Gaussian
mechanism charged to its ledger unless its policy opts out (docs/PRIVACY.md, "Evaluation releases"). The
coordinator sums them over sites: pooled Dice is the mean over all sites' test cases (``seg_figures``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from shared_models.metrics import ratio

__all__ = ["dice_per_class", "iou_per_class", "mean_foreground_dice", "per_case", "seg_figures", "seg_report"]


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
    from monai.metrics import DiceMetric  # here, not at import: MONAI costs a second to import (every process)

    metric = DiceMetric(include_background=True, reduction="none", num_classes=num_classes, ignore_empty=ignore_empty)
    return _mean_over_cases(metric(pred, truth))


def iou_per_class(pred, truth, num_classes: int = 3, ignore_empty: bool = False) -> list[float]:
    """IoU (Jaccard) of each class (background first), averaged over cases."""
    from monai.metrics import MeanIoU
    from monai.networks.utils import one_hot

    pred, truth = _label_maps(pred, truth)
    metric = MeanIoU(include_background=True, reduction="none", ignore_empty=ignore_empty)
    return _mean_over_cases(metric(one_hot(pred, num_classes, dim=1), one_hot(truth, num_classes, dim=1)))


def mean_foreground_dice(pred, truth, num_classes: int = 3, ignore_empty: bool = False) -> float:
    """Mean over the foreground classes (1..K-1) of the per-class Dice."""
    fg = [d for d in dice_per_class(pred, truth, num_classes, ignore_empty)[1:] if not math.isnan(d)]
    return float(np.mean(fg)) if fg else math.nan


def per_case(pred, truth, num_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU of every case and class ([cases, K] each, in [0, 1]; ignore_empty=False, so all defined)."""
    from monai.metrics import DiceMetric, MeanIoU
    from monai.networks.utils import one_hot

    pred, truth = _label_maps(pred, truth)
    dice = DiceMetric(include_background=True, reduction="none", num_classes=num_classes, ignore_empty=False)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    return (dice(pred, truth).double().numpy(),
            iou(one_hot(pred, num_classes, dim=1), one_hot(truth, num_classes, dim=1)).double().numpy())


def seg_figures(release: Mapping) -> dict:
    """Every figure of one (or a pooled) segmentation release — Σ Dice, Σ IoU per class and the case count
    (``eval_release.seg_layout``) — under the run directory's names: per-class case-mean Dice and IoU (clipped
    to [0, 1]; NaN without cases), mean foreground Dice, test cases. Numbers, or arrays over draws."""
    classes = sorted(int(k.rsplit("-", 1)[1]) for k in release if k.startswith("dice-sum-"))
    cases = np.maximum(np.asarray(release["cases"], dtype=np.float64), 0.0)
    out = {}
    for c in classes:
        for name in ("dice", "iou"):
            out[f"{name}_{c}"] = np.clip(ratio(release[f"{name}-sum-{c}"], cases), 0.0, 1.0)
    foreground = [out[f"dice_{c}"] for c in classes if c]
    out["dice"] = np.mean(foreground, axis=0) if foreground else np.full(np.shape(cases), math.nan)
    out["num_test"] = cases
    return {k: float(v) if np.ndim(v) == 0 else v for k, v in out.items()}


def seg_report(pred, truth, num_classes: int = 3, ignore_empty: bool = False) -> dict[str, float]:
    """A site's own exact figures of one segmentation evaluation (its local tools), as plain floats; what
    leaves the site is the release."""
    dice = dice_per_class(pred, truth, num_classes, ignore_empty)
    iou = iou_per_class(pred, truth, num_classes, ignore_empty)
    fg = [d for d in dice[1:] if not math.isnan(d)]
    report = {"mean-dice": float(np.mean(fg)) if fg else math.nan, "cases": float(_label_maps(pred, truth)[0].shape[0])}
    for c in range(num_classes):
        report.update({f"dice-{c}": dice[c], f"iou-{c}": iou[c]})
    return report
