"""Local training and evaluation of a binary model on one site's data (tables, or visit histories).

One loop for both modes: plain SGD/Adam on shuffled mini-batches, or patient-level DP-SGD
(``privacy.dp_sgd``: Poisson batches, per-patient clipping, noise). The FedProx proximal term is
applied as its own data-independent step after each optimizer step, so it works unchanged under DP.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from privacy.dp_sgd import make_private
from privacy.policy import DPRequest
from shared_models.ehr import binary_loss
from shared_models.eval_release import binary_vectors
from shared_models.metrics import binary_report, score_histograms
from shared_models.train_request import TrainSettings

__all__ = ["TrainSettings", "pick_device", "planned_steps", "train", "train_dataset", "predict", "evaluate",
           "evaluate_dataset", "evaluation_vectors", "evaluation_vectors_dataset"]


def pick_device(requested: str = "auto") -> torch.device:
    """The site's own accelerator when it has one: ``auto`` → ``cuda`` if available, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def planned_steps(settings: TrainSettings, n: int) -> int:
    """Optimizer steps of one round: fixed local steps, or epochs × ceil(N / batch)."""
    return settings.local_steps or settings.local_epochs * math.ceil(n / settings.batch_size)


def _cycle(loader: DataLoader, steps: int) -> Iterator[tuple]:
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def binary_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-patient binary cross-entropy, shape [B] (empty for an empty batch)."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, settings: TrainSettings,
          device: torch.device, dp: DPRequest | None = None, max_physical_batch: int = 256) -> dict[str, float]:
    """One round on a tabular split (one row = one patient)."""
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return train_dataset(model, data, settings, device, binary_per_sample, dp, max_physical_batch)


def train_dataset(model: torch.nn.Module, data: Dataset, settings: TrainSettings, device: torch.device,
                  per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  dp: DPRequest | None = None, max_physical_batch: int = 256) -> dict[str, float]:
    """Run one round of local training on ``model`` in place; one dataset item is one patient.

    ``per_sample_loss`` returns one loss per patient ([B]); its mean is minimised without DP, its
    sum under DP (where the learning rate is divided by the public batch size instead).
    Returns the mean loss, the number of steps and, under DP, the sample rate Opacus used.
    """
    model.to(device).train()
    steps = planned_steps(settings, len(data))
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None
    private = None
    if dp is not None and dp.enabled:
        private = make_private(model, data, settings.batch_size, settings.lr, settings.optimizer,
                               dp.noise_multiplier, dp.clip_norm, device, max_physical_batch)
        forward, optimizer, batches = private.module, private.optimizer, private.batches(steps)
    else:
        generator = torch.Generator().manual_seed(settings.seed)
        loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True, generator=generator)
        opt_cls = torch.optim.SGD if settings.optimizer == "sgd" else torch.optim.Adam
        forward, optimizer, batches = model, opt_cls(model.parameters(), lr=settings.lr), _cycle(loader, steps)

    losses = []
    try:
        for batch in batches:  # (inputs..., labels): (x, y) tables and images, (x, lengths, y) histories
            *inputs, yb = (t.to(device) for t in batch)
            optimizer.zero_grad()
            per_patient = per_sample_loss(forward(*inputs), yb)
            loss = per_patient.sum() if private is not None else per_patient.mean()
            loss.backward()
            optimizer.step()
            if anchor is not None:  # FedProx: w ← w − lr·μ·(w − w_global), touches no data
                with torch.no_grad():
                    for p, g in zip(model.parameters(), anchor):
                        p.sub_(settings.lr * settings.proximal_mu * (p - g))
            if len(yb):
                losses.append(per_patient.mean().item())
    finally:
        if private is not None:
            private.close()
    result = {"train-loss": float(np.mean(losses)) if losses else math.nan, "local-steps": float(steps)}
    if private is not None:
        result["sample-rate"] = private.sample_rate
    return result


@torch.no_grad()
def _logits(model: torch.nn.Module, x: np.ndarray, device: torch.device) -> torch.Tensor:
    model.to(device).eval()
    return model(torch.from_numpy(x).to(device)).cpu()


def predict(model: torch.nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
    """Probabilities of the positive class."""
    return torch.sigmoid(_logits(model, x, device)).numpy().astype(np.float64)


def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> dict:
    """The site's own exact test metrics (its local tools and benchmarks); what leaves is ``evaluation_vectors``'s
    release."""
    return binary_test_report(_logits(model, x, device), y)


@torch.no_grad()
def _dataset_logits(model: torch.nn.Module, data: Dataset, device: torch.device,
                    batch_size: int = 256) -> tuple[torch.Tensor, np.ndarray]:
    """Logits and labels of every item of ``data``, whose items are (inputs..., label), e.g. visit histories."""
    model.to(device).eval()
    logits, labels = [], []
    for batch in DataLoader(data, batch_size=batch_size):
        *inputs, yb = batch
        logits.append(model(*(t.to(device) for t in inputs)).cpu())
        labels.append(yb)
    return torch.cat(logits), torch.cat(labels).numpy().astype(np.float32)


def evaluate_dataset(model: torch.nn.Module, data: Dataset, device: torch.device, batch_size: int = 256) -> dict:
    """``evaluate`` for datasets whose items are (inputs..., label), e.g. visit histories."""
    return binary_test_report(*_dataset_logits(model, data, device, batch_size))


def binary_test_report(logits: torch.Tensor, y: np.ndarray) -> dict:
    scores = torch.sigmoid(logits).numpy().astype(np.float64)
    report: dict = {"test-loss": binary_loss(logits, torch.from_numpy(y)).item(), **binary_report(scores, y)}
    report["score-hist-pos"], report["score-hist-neg"] = score_histograms(scores, y)
    return report


def patient_vectors(logits: torch.Tensor, y: np.ndarray) -> np.ndarray:
    """One bounded vector per test patient (shared_models/eval_release.py): confusion cell, score bin, loss."""
    scores = torch.sigmoid(logits).numpy().astype(np.float64)
    losses = binary_per_sample(logits, torch.from_numpy(np.asarray(y, dtype=np.float32))).numpy()
    return binary_vectors(scores, y, losses)


def evaluation_vectors(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> np.ndarray:
    """The per-patient vectors of a tabular test split, for the site's evaluation release."""
    return patient_vectors(_logits(model, x, device), y)


def evaluation_vectors_dataset(model: torch.nn.Module, data: Dataset, device: torch.device) -> np.ndarray:
    """``evaluation_vectors`` for datasets whose items are (inputs..., label), e.g. visit histories."""
    return patient_vectors(*_dataset_logits(model, data, device))
