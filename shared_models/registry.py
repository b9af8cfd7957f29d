"""Name → model builder, so a run config can say ``model = "ehr-logreg"``.

Coordinator and sites build the same architecture from the same name; only weights travel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from shared_models.ehr import MLP, LogisticRegression


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    build: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("ehr-logreg", "ehr", LogisticRegression, "logistic regression (one linear layer)"),
        ModelSpec("ehr-mlp", "ehr", MLP, "MLP, 2 hidden layers of 64 with LayerNorm"),
    )
}


class UnknownModelError(ValueError):
    """The run config names a model that is not registered."""


def model_names(task: str | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if task is None or s.task == task)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model '{name}'; available: {', '.join(model_names())}"
        ) from None


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``build_model("ehr-mlp", n_features=13)``."""
    return get_spec(name).build(**kwargs)
