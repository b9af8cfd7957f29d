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


# The U-Net builders are imported on use: MONAI takes ~1.6 s to import, which EHR-only ClientApp
# processes should not pay. ``n_features`` is dropped: callers written for the EHR models pass it to
# every model (server_app's model_kwargs, tests iterating all names); a U-Net has no use for it.
def _seg_unet2d(n_features: int | None = None, **kwargs) -> nn.Module:
    from shared_models.unet import unet2d
    return unet2d(**kwargs)


def _seg_unet3d(n_features: int | None = None, **kwargs) -> nn.Module:
    from shared_models.unet import unet3d
    return unet3d(**kwargs)


# The sequence model needs Opacus (DPGRU), a ~2.5 s import the registry itself does not pay.
def _ehr_gru_attn(n_features: int, **kwargs) -> nn.Module:
    from shared_models.sequence import VisitAttentionGRU
    return VisitAttentionGRU(n_features, **kwargs)


_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("ehr-logreg", "ehr", LogisticRegression, "logistic regression (one linear layer)"),
        ModelSpec("ehr-mlp", "ehr", MLP, "MLP, 2 hidden layers of 64 with LayerNorm"),
        ModelSpec("ehr-gru-attn", "ehr-seq", _ehr_gru_attn,
                  "GRU (Opacus DPGRU, 32) over a patient's visits + attention pooling; forward(x, lengths)"),
        ModelSpec("seg-unet2d", "seg", _seg_unet2d,
                  "MONAI 2-D U-Net (16,32,64,128), affine instance norm, ReLU, 1×1-conv + pixel-shuffle up-sampling; DP-ready"),
        ModelSpec("seg-unet3d", "seg", _seg_unet3d,
                  "MONAI 3-D U-Net (16,32,64,128), affine instance norm, ReLU, 1×1-conv + pixel-shuffle up-sampling; DP-ready"),
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
