"""Flower's own strategies, chosen by name from the run configuration."""

from __future__ import annotations

from flwr.serverapp.strategy import (FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum,
                                     Strategy)

from server.metrics import pooled_evaluate_metrics
from server.settings import RunSettings


def build_strategy(settings: RunSettings, n_sites: int) -> Strategy:
    """Every selected site that is online trains and evaluates every round (cross-silo: few, known
    sites); a round needs ``min-sites`` of them, so one site down does not stall the study."""
    quorum = max(1, min(settings.min_sites, n_sites))
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=quorum,
        min_evaluate_nodes=quorum,
        min_available_nodes=quorum,
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
    # Robust aggregation (Flower's): the coordinate-wise median / trimmed mean, or (Multi-)Krum's choice of the
    # update(s) closest to the others, so one broken or hostile site cannot drag the model on its own.
    if settings.strategy == "fedmedian":
        return FedMedian(**common)
    if settings.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=settings.trim_beta, **common)
    if settings.strategy == "krum":
        return Krum(num_malicious_nodes=settings.byzantine_sites, **common)
    if settings.strategy == "multikrum":
        keep = max(1, n_sites - settings.byzantine_sites)
        return MultiKrum(num_malicious_nodes=settings.byzantine_sites, num_nodes_to_select=keep, **common)
    raise ValueError(f"unknown strategy '{settings.strategy}'")
