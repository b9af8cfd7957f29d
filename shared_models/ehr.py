"""Tabular (EHR) risk models: one logit per patient.

No BatchNorm anywhere: it mixes patients within a batch, which breaks per-sample DP-SGD
(Opacus) and, once replaced by GroupNorm on few features, zeroes the data. The MLP uses
LayerNorm, which normalises each patient on its own.
"""

from __future__ import annotations

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """Linear risk score, as FLamby's Fed-Heart-Disease baseline (Linear(13, 1))."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class MLP(nn.Module):
    """Two hidden layers with LayerNorm and ReLU."""

    def __init__(self, n_features: int, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def binary_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy on logits (numerically stable form of FLamby's BCE)."""
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
