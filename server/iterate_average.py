"""A moving average of the global models, the model a study evaluates and publishes.

Each DP round moves the global model by the sites' clipped signal plus fresh Gaussian noise; averaging the
last rounds' models keeps the signal and averages the noise down. The average is computed at the
coordinator from models it already holds, so it is post-processing: it costs no site any ε. Training goes on
from the plain aggregate (as in DP-SGD with parameter averaging); the sites evaluate the average, and the
run's final model is the average.

An exponential average with decay β, bias-corrected like Adam's moments so that round 1 is not pulled
towards the initial model: after t rounds it is Σᵢ β^(t-i)·wᵢ / Σᵢ β^(t-i). β = 0 is the plain aggregate.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord


class IterateAverage:
    """Σᵢ β^(t-i)·wᵢ and Σᵢ β^(t-i) over the rounds so far (float64), and their ratio as an ArrayRecord."""

    def __init__(self, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"'weight-average' must be in [0, 1), got {decay}")
        self.decay = decay
        self.total: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.weight = 0.0

    def add(self, arrays: ArrayRecord) -> ArrayRecord:
        """Take one round's global model in; return the average including it (same names, dtypes, order)."""
        current = {name: array.numpy() for name, array in arrays.items()}
        if self.total.keys() != current.keys():
            self.total = {name: np.zeros(v.shape, np.float64) for name, v in current.items()}
            self.weight = 0.0
        for name, value in current.items():
            self.total[name] *= self.decay
            self.total[name] += value
        self.weight = self.decay * self.weight + 1.0
        self.dtypes = {name: value.dtype for name, value in current.items()}
        return self.current()

    def current(self) -> ArrayRecord:
        """The average so far, in the models' own dtypes."""
        return ArrayRecord({name: torch.from_numpy((total / self.weight).astype(self.dtypes.get(name, np.float32)))
                            for name, total in self.total.items()})

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed study averages on as if it never stopped."""
        return {"decay": self.decay, "weight": self.weight, "total": self.total,
                "dtypes": {name: str(dtype) for name, dtype in self.dtypes.items()}}

    def restore(self, state: dict) -> None:
        self.weight = float(state.get("weight", 0.0))
        self.total = {name: np.asarray(v, np.float64) for name, v in state.get("total", {}).items()}
        self.dtypes = {name: np.dtype(d) for name, d in state.get("dtypes", {}).items()}
