"""The Gaussian mechanism on a sum of per-patient vectors (a site's feature-statistics and evaluation releases).

Each patient's vector is clipped to L2 norm ``l2_bound`` (its add/remove sensitivity), the vectors
are summed and N(0, (σ·l2_bound)²) noise is added to every coordinate. For the accountant this is
one step at sample rate 1 with noise multiplier σ — the same (σ, q, steps) entry a DP-SGD step makes,
so the ledger composes it with the site's training rounds (Mironov 2017; Opacus's accountants).
Noise comes from the site's secret generator, like DP-SGD's.
"""

from __future__ import annotations

import numpy as np
import torch

from privacy.dp_sgd import secret_generator

MECHANISM_STEP_RATE = 1.0  # no subsampling: every patient's vector is in the sum


def clipped_sum(vectors: np.ndarray, l2_bound: float) -> np.ndarray:
    """Σ clip(v_i, l2_bound), float64: the sum before noise (alone, it is an exact release: no DP)."""
    if not l2_bound > 0:
        raise ValueError("the Gaussian mechanism needs l2_bound > 0")
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True) if len(v) else np.zeros((0, 1))
    clipped = v * np.minimum(1.0, l2_bound / np.maximum(norms, 1e-12))
    return clipped.sum(axis=0) if len(v) else np.zeros(v.shape[1])


def noisy_sum(vectors: np.ndarray, l2_bound: float, noise_multiplier: float) -> np.ndarray:
    """Σ clip(v_i, l2_bound) + N(0, (noise_multiplier·l2_bound)² I), float64."""
    if not noise_multiplier > 0 or not l2_bound > 0:
        raise ValueError("the Gaussian mechanism needs noise_multiplier > 0 and l2_bound > 0")
    total = clipped_sum(vectors, l2_bound)
    noise = torch.normal(0.0, noise_multiplier * l2_bound, size=(len(total),), generator=secret_generator(),
                         dtype=torch.float64)
    return total + noise.numpy()
