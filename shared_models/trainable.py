"""Which of a model's parameters a study trains at the sites; the rest stay frozen.

Under DP the noise added to each step has norm ≈ σ·C·√d/B for d trained parameters, while the
clipped signal is at most C (docs/PRIVACY.md, "Fine-tuning few parameters"). Training a few
thousand parameters of a publicly pretrained model instead of half a million is what lets a site
of ~70 patients learn anything at a useful ε. Frozen parameters are not trained, not noised, not
sent back; the coordinator puts the global model's values back in their place.

Coordinator and sites call the same function on the same architecture, so they agree on the
names without sending them.
"""

from __future__ import annotations

from torch import nn

# all: every parameter. decoder: the up-sampling path of a U-Net and its output layer.
# norms-head: the scale and shift of every normalisation layer and the output layer (Karani et al.
# 2018 adapt a segmentation network to a new scanner through its normalisation parameters).
TRAINABLE = ("all", "decoder", "norms-head")

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _head(model: nn.Module) -> nn.Module | None:
    """The output layer: the last module, in registration order, that owns parameters."""
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    return owners[-1] if owners else None


def trained_names(model: nn.Module, which: str) -> list[str]:
    """Names of the parameters ``which`` trains, in the model's order (a subset of its state dict keys)."""
    if which not in TRAINABLE:
        raise ValueError(f"train-params must be one of {', '.join(TRAINABLE)}, not {which!r}")
    if which == "all":
        return [name for name, _ in model.named_parameters()]
    if which == "decoder" and not any(getattr(m, "carefl_decoder", False) for m in model.modules()):
        raise ValueError(f"train-params 'decoder' needs a U-Net; {type(model).__name__} has no decoder")
    head = _head(model)
    chosen: set[str] = set()
    for prefix, module in model.named_modules():
        take = module is head or (which == "norms-head" and isinstance(module, _NORMS)) or \
            (which == "decoder" and getattr(module, "carefl_decoder", False))
        if take:
            chosen.update(f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters())
    return [name for name, _ in model.named_parameters() if name in chosen]


def freeze_except(model: nn.Module, which: str) -> list[str]:
    """Set ``requires_grad`` so that only ``which`` trains; returns the trained names."""
    names = trained_names(model, which)
    keep = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return names


def trained_size(model: nn.Module, which: str) -> int:
    """d: how many numbers the site trains, noises and sends."""
    keep = set(trained_names(model, which))
    return sum(p.numel() for name, p in model.named_parameters() if name in keep)
