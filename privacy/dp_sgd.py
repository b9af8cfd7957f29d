"""Patient-level DP-SGD with Opacus: Poisson sampling, per-patient clipping, Gaussian noise.

One dataset item is one patient, so the guarantee is per patient. The loss is summed over the
batch and the learning rate divided by the *requested* batch size (a public number), instead of
Opacus's default mean over ``len(data) * q``, which depends on the private data set size
(opacus #571/#819). Weights are trained in place on the caller's module, so the plain model —
never the per-sample gradients — is what leaves.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, Dataset

# Inputs never require grad; Opacus's hooks still see every layer's activations and backprops.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

GRAD_SAMPLE_MODE = "hooks"  # measured fastest for these models (see docs/BENCHMARKS.md)


@dataclass
class PrivateTraining:
    """A model, optimizer and Poisson loader made private; iterate ``logical_steps`` to train."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    sample_rate: float
    expected_batch: int
    max_physical_batch: int

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
        self.module.remove_hooks()


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS entropy pool, known to nobody outside this process.

    Noise and Poisson sampling must be unpredictable: a seed from the run config would let the
    coordinator regenerate the noise and subtract it. (torch's generator is not a CSPRNG; Opacus's
    secure mode needs torchcsprng, which has no torch-2 release — a documented residual risk.)
    """
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def make_private(model: torch.nn.Module, dataset: Dataset, batch_size: int, lr: float, optimizer: str,
                 noise_multiplier: float, clip_norm: float, device: torch.device | str = "cpu",
                 max_physical_batch: int = 256) -> PrivateTraining:
    """Wrap ``model`` for DP-SGD; for SGD the lr is divided by the public ``batch_size``."""
    params = list(model.parameters())
    if optimizer == "sgd":
        base = torch.optim.SGD(params, lr=lr / batch_size)  # summed loss / public B = the usual mean
    else:  # Adam is invariant to the gradient's scale: no division (it would shrink its steps B-fold)
        base = torch.optim.Adam(params, lr=lr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # known limitation, docs/PRIVACY.md
        engine = PrivacyEngine(accountant="prv")  # its own accountant is unused: the site's ledger counts
        module, dp_opt, loader = engine.make_private(
            module=model, optimizer=base, data_loader=DataLoader(dataset, batch_size=batch_size),
            noise_multiplier=noise_multiplier, max_grad_norm=clip_norm, loss_reduction="sum",
            poisson_sampling=True, grad_sample_mode=GRAD_SAMPLE_MODE, noise_generator=secret_generator(device),
        )
    loader.batch_sampler.generator = secret_generator()  # which patients are in a batch stays secret too
    return PrivateTraining(module, dp_opt, loader, float(loader.sample_rate), batch_size, max_physical_batch)
