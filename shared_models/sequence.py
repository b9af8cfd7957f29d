"""Sequence risk model over a patient's visits: GRU encoder, attention pooling, one logit per patient.

Patient-level DP: one dataset item is one patient's whole (padded) history, so Opacus clips each
patient's gradient over all of their visits together — never per visit (docs/PRIVACY.md).

- The GRU is Opacus's ``DPGRU``: built from Linear layers that Opacus computes per-sample gradients
  for; ``nn.GRU`` (one fused kernel) has none. ``privacy/per_sample.py`` clips its per-patient
  gradients (ghost norms over the time steps), so ``privacy/dp_sgd.py``'s engine "auto" uses it.
- Variable-length histories are right-padded; ``lengths`` says how many visits are real. Padded
  inputs are replaced by zeros before the GRU (a unidirectional GRU's states at real visits never
  see what follows), and padded steps get attention weight exactly 0, so neither the padding's
  length nor its values change a patient's output or gradient. Packed sequences are not used:
  their per-step batch sizes shrink, which per-sample gradient bookkeeping does not follow.
- Batches come from ``HistoryDataset`` (fixed-length items, so Opacus's Poisson loader and its empty
  batches work with the default collate) or ``collate_histories`` (pads to the batch's longest).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from opacus.layers import DPGRU
from torch import nn
from torch.utils.data import Dataset


class VisitAttentionGRU(nn.Module):
    """``forward(x [B, T, F], lengths [B]) → logits [B]``: GRU states, additive attention over the
    real visits, a linear head on the attention-weighted state."""

    def __init__(self, n_features: int, hidden: int = 32, attention: int = 16) -> None:
        super().__init__()
        self.gru = DPGRU(n_features, hidden, batch_first=True)
        self.attn_proj = nn.Linear(hidden, attention)
        self.attn_score = nn.Linear(attention, 1, bias=False)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        weights, states, mask = self._attend(x, lengths)
        pooled = (weights.unsqueeze(-1) * states.masked_fill(~mask[..., None], 0.0)).sum(1)  # [B, H]
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def attention(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The attention weights [B, T'] over visits (T' = the longest real history), for inspection."""
        return self._attend(x, lengths)[0]

    def _attend(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[0] and int(lengths.min()) < 1:
            raise ValueError("every history needs at least one visit (a length of 0 was given)")
        steps = max(1, int(lengths.max())) if x.shape[0] else 1
        x = x[:, :steps]  # padding beyond the longest real history is never computed
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]  # [B, T]
        x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        states, _ = self.gru(x)                                                   # [B, T, H]
        scores = self.attn_score(torch.tanh(self.attn_proj(states))).squeeze(-1)  # [B, T]
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        return weights, states, mask


class HistoryDataset(Dataset):
    """One item per patient: (visits [T_max, F] zero-padded, length, label). Fixed-length items let
    Opacus's Poisson loader batch them (and build its empty batches) with the default collate."""

    def __init__(self, histories: Sequence[np.ndarray], labels: np.ndarray, max_len: int | None = None) -> None:
        if len(histories) != len(labels):
            raise ValueError(f"{len(histories)} histories but {len(labels)} labels")
        lengths = [len(h) for h in histories]
        if any(n < 1 for n in lengths):
            raise ValueError("every history needs at least one visit")
        if not histories:
            raise ValueError("no histories: a dataset needs at least one patient")
        n_features = histories[0].shape[1]
        width = max(lengths) if max_len is None else max_len
        if max(lengths) > width:
            raise ValueError(f"a history has {max(lengths)} visits, more than max_len = {width}")
        self.x = torch.zeros(len(histories), width, n_features)
        for i, h in enumerate(histories):
            self.x[i, : len(h)] = torch.as_tensor(h, dtype=torch.float32)
        self.lengths = torch.as_tensor(lengths, dtype=torch.int64)
        self.y = torch.as_tensor(np.asarray(labels), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[i], self.lengths[i], self.y[i]


def collate_histories(batch: Sequence[tuple], n_features: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad variable-length items ``(visits [T_i, F], label)`` to the batch's longest: (x [B, T, F],
    lengths [B], y [B]). An empty (Poisson) batch gives x [0, 1, F] — pass ``n_features`` for it."""
    if not batch:
        if n_features is None:
            raise ValueError("an empty batch needs n_features to have the right shape")
        return torch.zeros(0, 1, n_features), torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    seqs = [torch.as_tensor(np.asarray(x), dtype=torch.float32) for x, _ in batch]
    lengths = torch.as_tensor([len(s) for s in seqs], dtype=torch.int64)
    x = torch.zeros(len(seqs), max(1, int(lengths.max())), seqs[0].shape[1])
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s
    y = torch.as_tensor([float(label) for _, label in batch], dtype=torch.float32)
    return x, lengths, y
