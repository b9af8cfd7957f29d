"""Patient-level DP-SGD: Opacus's Poisson sampling and accountant, per-patient clipping, Gaussian noise.

One dataset item is one patient, so the guarantee is per patient. The loss is summed over the
batch and the learning rate divided by the *requested* batch size (a public number), instead of
Opacus's default mean over ``len(data) * q``, which depends on the private data set size
(opacus #571/#819). Weights are trained in place on the caller's module, so the plain model —
never the per-sample gradients — is what leaves.

Two engines compute the clipped, noised sum; the mechanism is the same (docs/PRIVACY.md):

- ``"fast"``: carefl's own per-sample engine (``privacy/per_sample.py``) — no summed gradient,
  ghost norms for Linear layers, per-sample convolution gradients with the backend's kernels, one
  flat noise draw. It covers Linear, Conv1/2/3d and affine LayerNorm/GroupNorm/InstanceNorm.
- ``"opacus"``: Opacus's ``GradSampleModule`` in hooks mode, as before.
- ``"auto"`` (default): ``"fast"`` when it supports every layer of the model, else ``"opacus"``.

``make_private(engine=...)`` chooses; without it the site's environment variable ``CAREFL_DP_ENGINE``
does, else ``DEFAULT_ENGINE``. ``"fast"`` refuses a model it cannot train, with every reason.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, Dataset

from privacy.per_sample import ClippedNoisyOptimizer, PerSampleClipper, unsupported_layers

# Inputs never require grad; Opacus's hooks still see every layer's activations and backprops.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

GRAD_SAMPLE_MODE = "hooks"  # Opacus's fastest mode for these models (see docs/BENCHMARKS.md)
ENGINES = ("auto", "fast", "opacus")
DEFAULT_ENGINE = "auto"  # measured faster and tested exact: docs/BENCHMARKS.md, tests/test_fast_clipping.py


@dataclass
class PrivateTraining:
    """A model, optimizer and Poisson loader made private; iterate ``logical_steps`` to train."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    sample_rate: float
    expected_batch: int
    max_physical_batch: int
    engine: str = "opacus"  # the engine actually used: "fast" or "opacus"
    accountant: object = None  # Opacus's accountant fed by the optimizer (the site's ledger is authoritative)
    _release: Callable[[], None] | None = None

    def batches(self, steps: int) -> Iterator[tuple]:
        """Yield batches until ``steps`` logical (noised) optimizer steps have been taken.

        The caller runs forward/backward/``optimizer.step()`` on each batch. Empty Poisson batches
        are yielded too: a noise-only step is part of the mechanism the accountant counts. Only a
        logical batch larger than ``max_physical_batch`` is split (BatchMemoryManager).
        """
        split = self.expected_batch > self.max_physical_batch
        done = 0
        while done < steps:
            context = (BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=self.max_physical_batch,
                                          optimizer=self.optimizer) if split else nullcontext(self.loader))
            with context as physical:
                for batch in physical:
                    yield batch
                    if not self.optimizer._is_last_step_skipped:
                        done += 1
                        if done == steps:
                            break

    def close(self) -> None:
        """Give the caller's model back unchanged (Opacus hooks or the fast engine's layers removed)."""
        if self._release is not None:
            self._release()
            self._release = None


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS entropy pool, known to nobody outside this process.

    Noise and Poisson sampling must be unpredictable: a seed from the run config would let the
    coordinator regenerate the noise and subtract it. (torch's generator is not a CSPRNG; Opacus's
    secure mode needs torchcsprng, which has no torch-2 release — a documented residual risk.)
    """
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def resolve_engine(model: torch.nn.Module, engine: str | None = None) -> str:
    """"fast" or "opacus" for this model: the request, else ``CAREFL_DP_ENGINE``, else ``DEFAULT_ENGINE``."""
    engine = engine or os.environ.get("CAREFL_DP_ENGINE") or DEFAULT_ENGINE
    if engine not in ENGINES:
        raise ValueError(f"DP engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "auto":
        return "opacus" if unsupported_layers(model) else "fast"
    return engine


def make_private(model: torch.nn.Module, dataset: Dataset, batch_size: int, lr: float, optimizer: str,
                 noise_multiplier: float, clip_norm: float, device: torch.device | str = "cpu",
                 max_physical_batch: int = 256, engine: str | None = None) -> PrivateTraining:
    """Wrap ``model`` for DP-SGD; for SGD the lr is divided by the public ``batch_size``."""
    params = list(model.parameters())
    if optimizer == "sgd":
        base = torch.optim.SGD(params, lr=lr / batch_size)  # summed loss / public B = the usual mean
    else:  # Adam is invariant to the gradient's scale: no division (it would shrink its steps B-fold)
        base = torch.optim.Adam(params, lr=lr)
    chosen = resolve_engine(model, engine)
    if chosen == "fast":
        ModuleValidator.validate(model, strict=True)  # Opacus's refusals (BatchNorm, running stats, ...)
        clipper = PerSampleClipper(model)  # refuses, with every reason, a layer it has no rule for
        loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=batch_size))  # Opacus's Poisson sampler
        dp_opt = ClippedNoisyOptimizer(clipper, base, noise_multiplier, clip_norm, secret_generator(device),
                                       batch_size)
        accountant = PRVAccountant()  # as Opacus's engine would attach it; the site's ledger counts
        dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=loader.sample_rate))
        loader.batch_sampler.generator = secret_generator()  # which patients are in a batch stays secret too
        return PrivateTraining(model, dp_opt, loader, float(loader.sample_rate), batch_size, max_physical_batch,
                               "fast", accountant, clipper.detach)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # known limitation, docs/PRIVACY.md
        engine_ = PrivacyEngine(accountant="prv")  # its accountant is not authoritative: the site's ledger counts
        module, dp_opt, loader = engine_.make_private(
            module=model, optimizer=base, data_loader=DataLoader(dataset, batch_size=batch_size),
            noise_multiplier=noise_multiplier, max_grad_norm=clip_norm, loss_reduction="sum",
            poisson_sampling=True, grad_sample_mode=GRAD_SAMPLE_MODE, noise_generator=secret_generator(device),
        )
    loader.batch_sampler.generator = secret_generator()  # which patients are in a batch stays secret too
    return PrivateTraining(module, dp_opt, loader, float(loader.sample_rate), batch_size, max_physical_batch,
                           "opacus", engine_.accountant, module.remove_hooks)
