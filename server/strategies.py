"""Flower's own strategies, chosen by name from the run configuration."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from server.metrics import pooled_evaluate_metrics
from server.settings import RunSettings


def build_strategy(settings: RunSettings, n_sites: int) -> Strategy:
    """Every selected site trains and evaluates every round (cross-silo: few, known sites)."""
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=n_sites,
        min_evaluate_nodes=n_sites,
        min_available_nodes=n_sites,
        evaluate_metrics_aggr_fn=pooled_evaluate_metrics,
    )
    if settings.strategy == "fedavg":
        return FedAvg(**common)
    if settings.strategy == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    adaptive = dict(eta=settings.server_lr, eta_l=settings.lr, tau=settings.server_tau)
    if settings.strategy == "fedadam":
        return FedAdam(**adaptive, **common)
    if settings.strategy == "fedyogi":
        return FedYogi(**adaptive, **common)
    raise ValueError(f"unknown strategy '{settings.strategy}'")
