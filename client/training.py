"""Local training and evaluation of a tabular model on one site's data.

Plain PyTorch here; the DP-SGD path (Opacus, site-enforced budget) plugs in at ``train``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from shared_models.ehr import binary_loss
from shared_models.train_request import TrainSettings
from shared_models.metrics import binary_report, score_histograms

def pick_device(requested: str = "auto") -> torch.device:
    """The site's own accelerator when it has one: ``auto`` → ``cuda`` if available, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, generator: torch.Generator) -> DataLoader:
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, settings: TrainSettings,
          device: torch.device) -> dict[str, float]:
    """Run one round of local training in place; return mean loss and the number of steps."""
    model.to(device).train()
    generator = torch.Generator().manual_seed(settings.seed)
    loader = _batches(x, y, settings.batch_size, generator)
    params = list(model.parameters())
    global_params = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else None
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=settings.lr)
    else:
        opt = torch.optim.Adam(params, lr=settings.lr)

    total_steps = settings.local_steps or settings.local_epochs * len(loader)
    losses = []
    steps = 0
    while steps < total_steps:
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = binary_loss(model(xb), yb)
            losses.append(loss.item())
            if global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(params, global_params))
                loss = loss + settings.proximal_mu / 2 * prox
            loss.backward()
            opt.step()
            steps += 1
            if steps == total_steps:
                break
    return {"train-loss": float(np.mean(losses)), "local-steps": float(steps)}


@torch.no_grad()
def _logits(model: torch.nn.Module, x: np.ndarray, device: torch.device) -> torch.Tensor:
    model.to(device).eval()
    return model(torch.from_numpy(x).to(device)).cpu()


def predict(model: torch.nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
    """Probabilities of the positive class."""
    return torch.sigmoid(_logits(model, x, device)).numpy().astype(np.float64)


def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> dict:
    """Site-level test metrics plus the counts that let the coordinator pool them."""
    logits = _logits(model, x, device)
    scores = torch.sigmoid(logits).numpy().astype(np.float64)
    report: dict = {"test-loss": binary_loss(logits, torch.from_numpy(y)).item(), **binary_report(scores, y)}
    report["score-hist-pos"], report["score-hist-neg"] = score_histograms(scores, y)
    return report
