"""Dice + cross-entropy for segmentation, with a per-patient form for DP-SGD.

``batch=False`` is what makes this loss usable under patient-level DP. MONAI's ``batch=True`` sums
intersections and volumes over the whole batch before taking the Dice ratio, so the loss — and the
gradient Opacus attributes to patient i — depends on every other patient in the batch. Per-patient
clipping then no longer bounds one patient's influence on the update (removing patient j changes
the clipped terms of all the others), and the stated ε does not hold. With ``batch=False`` each
patient's Dice is computed from that patient's voxels only, and the batch loss is a sum (or mean)
of independent per-patient terms, which is exactly what DP-SGD's sensitivity argument assumes.

Under DP carefl sums the per-patient losses and divides the learning rate by the public batch size
(``privacy/dp_sgd.py``), so training uses ``DiceCE.summed``; ``forward`` is MONAI's mean for
non-DP training and evaluation. Class weights are not offered: a weighted-mean cross-entropy
normalises by the classes present in the whole batch, which couples patients again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

__all__ = ["DiceCE", "per_sample_dice_ce"]


class DiceCE(nn.Module):
    """λ_dice·Dice + λ_ce·CE on logits ``[B, K, *spatial]`` and label maps ``[B, 1, *spatial]`` (or ``[B, *spatial]``).

    Softmax over the K classes, labels one-hot encoded, Dice per patient (``batch=False``) averaged
    over classes (background included unless ``include_background=False``), CE averaged over voxels.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, include_background: bool = True,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> None:
        super().__init__()
        common = {"include_background": include_background, "to_onehot_y": True, "softmax": True, "batch": False,
                  "smooth_nr": smooth_nr, "smooth_dr": smooth_dr}
        self.mean_loss = DiceCELoss(reduction="mean", lambda_dice=lambda_dice, lambda_ce=lambda_ce, **common)
        self._dice = DiceLoss(reduction="none", **common)  # same Dice, kept per patient and class
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    @staticmethod
    def _labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.dim() == logits.dim() - 1:
            labels = labels.unsqueeze(1)
        if labels.shape[0] != logits.shape[0] or labels.shape[1] != 1 or labels.shape[2:] != logits.shape[2:]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        return labels.long()

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of each patient, shape ``[B]``; entry i depends on ``logits[i]`` and ``labels[i]`` only.

        An empty batch (B = 0, an empty Poisson batch) gives an empty tensor that is still part of
        the graph, so ``.sum().backward()`` runs the noise-only DP step instead of failing.
        """
        labels = self._labels(logits, labels)
        if logits.shape[0] == 0:
            return logits.flatten(1).sum(1) * 0.0  # shape [0], attached to the graph
        dice = self._dice(logits, labels).flatten(1).mean(1)  # [B, K', 1, ...] → mean over classes
        ce = F.cross_entropy(logits, labels[:, 0], reduction="none").flatten(1).mean(1)  # mean over voxels
        return self.lambda_dice * dice + self.lambda_ce * ce

    def summed(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Σ over patients: the DP-SGD loss (the lr is divided by the public batch size instead)."""
        return self.per_sample(logits, labels).sum()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MONAI ``DiceCELoss(batch=False)`` mean over the batch; zero (with a graph) for B = 0."""
        labels = self._labels(logits, labels)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return self.mean_loss(logits, labels)


def per_sample_dice_ce(logits: torch.Tensor, labels: torch.Tensor, lambda_dice: float = 1.0,
                       lambda_ce: float = 1.0, include_background: bool = True) -> torch.Tensor:
    """Per-patient Dice+CE, shape ``[B]``; its mean equals ``DiceCELoss(batch=False)`` on the batch."""
    return DiceCE(lambda_dice, lambda_ce, include_background).per_sample(logits, labels)
