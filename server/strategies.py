"""Flower's own strategies, chosen by name from the run configuration.

Each is Flower's class with its aggregation re-done on zero-copy views of the replies' bytes
(``validation.as_ndarray``) instead of ``Array.numpy()``, which copies every array twice per use;
FedAvg's average is accumulated block by block, in the validation pass when ``SiteGrid`` runs it. The
results are bit-identical to Flower's (tests/test_aggregation_path.py); benchmarks/aggregation.py
measures the gain.
"""

from __future__ import annotations

from typing import Iterable, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import Strategy

from server.flower_seam import aggregate_arrayrecords, check_and_log_replies, trim_mean
from server.metrics import pooled_evaluate_metrics
from server.settings import RunSettings
from server.validation import CHUNK, accumulate, as_ndarray, to_array


def weighted_average(records: list[RecordDict], weighted_by_key: str) -> ArrayRecord:
    """Flower's ``aggregate_arrayrecords`` (Σ_k x_k·w_k with w_k = n_k / Σn, accumulated in the replies'
    dtype in reply order), element for element the same operations, without its copies."""
    weights = [cast(float, next(iter(r.metric_records.values()))[weighted_by_key]) for r in records]
    total = sum(weights)
    factors = [w / total for w in weights]
    arrays = [next(iter(r.array_records.values())) for r in records]
    keys = list(arrays[0].keys())
    if any(len(r.array_records) != 1 or list(a.keys()) != keys for r, a in zip(records, arrays)):
        return aggregate_arrayrecords(records, weighted_by_key)  # unusual replies: Flower's own loop
    views = {k: [as_ndarray(a[k]) for a in arrays] for k in keys}
    if any(len({(v.dtype, v.shape) for v in vs}) != 1 or not all(v.flags.c_contiguous for v in vs)
           for vs in views.values()):
        return aggregate_arrayrecords(records, weighted_by_key)
    out = ArrayRecord()
    for key in keys:
        xs = [v.reshape(-1) for v in views[key]]
        dtype = np.result_type(xs[0].dtype, factors[0])  # what ``x * w`` gives (a Python float is "weak")
        acc = np.empty(xs[0].size, dtype=dtype)
        tmp = np.empty(min(acc.size, CHUNK), dtype=dtype)
        for start in range(0, acc.size, CHUNK):
            end = min(start + CHUNK, acc.size)
            accumulate(acc[start:end], [x[start:end] for x in xs], factors, tmp[:end - start])
        out[key] = to_array(acc.reshape(views[key][0].shape))
    return out


class _EvaluationReleases:
    """The sites' evaluate replies pooled by ``evaluate_metrics_aggr_fn`` (server/metrics.py) without FedAvg's
    consistency check: that check wants every reply to carry the weighting key and one key set, but an
    evaluation release carries no ``num-examples`` and a site in exact mode sends no ε (docs/PRIVACY.md)."""

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = [m for m in replies if not m.has_error()]
        return self.evaluate_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key) if valid else None


class _ViewsFedAvg(_EvaluationReleases, flwr_strategy.FedAvg):
    """FedAvg's ``aggregate_train`` without Flower's copies. Under ``SiteGrid`` the average comes from
    the validation pass (``fuse_average``: every update is then read from memory once per round);
    otherwise ``weighted_average``. Placed after a Flower subclass in the bases (``class FedAdam(flwr
    FedAdam, _ViewsFedAvg)``), it sits just above Flower's FedAvg, so the subclass's own maths
    (FedAdam's moments, ...) runs on its result."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        fuse = getattr(grid, "fuse_average", None)
        if callable(fuse):
            fuse(self.weighted_by_key)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        fused = getattr(replies, "average", None)  # server.sites.ValidatedReplies
        valid, _ = check_and_log_replies(self, replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        if (fused is not None and fused[0] == self.weighted_by_key and len(valid) == len(replies)
                and all(a is b for a, b in zip(valid, replies))):
            arrays = fused[1]
        else:
            arrays = weighted_average(contents, self.weighted_by_key)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class FedAvg(_ViewsFedAvg):
    pass


class FedProx(flwr_strategy.FedProx, _ViewsFedAvg):
    pass


class FedAdam(flwr_strategy.FedAdam, _ViewsFedAvg):
    pass


class FedYogi(flwr_strategy.FedYogi, _ViewsFedAvg):
    pass


def _stacked_layers(valid: list[Message]) -> tuple[list[str], list[list[np.ndarray]]]:
    arrays = [next(iter(m.content.array_records.values())) for m in valid]
    keys = list(arrays[0].keys())
    return keys, [[as_ndarray(a[k]) for a in arrays] for k in keys]


class _CoordinateWise(_EvaluationReleases):
    """Flower's coordinate-wise robust aggregation over views (Flower's copies each array first);
    ``combine`` reduces the stacked updates of one layer along the first axis."""

    def combine(self, stacked: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = check_and_log_replies(self, replies, is_train=True)
        if not valid:
            return None, None
        arrays = ArrayRecord()
        for key, layers in zip(*_stacked_layers(valid)):
            arrays[key] = to_array(np.asarray(self.combine(np.stack(layers))))
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


class FedMedian(_CoordinateWise, flwr_strategy.FedMedian):
    """Flower's coordinate-wise median."""

    def combine(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)


class FedTrimmedAvg(_CoordinateWise, flwr_strategy.FedTrimmedAvg):
    """Flower's coordinate-wise trimmed mean."""

    def combine(self, stacked: np.ndarray) -> np.ndarray:
        try:
            return trim_mean(stacked, self.beta)
        except ValueError as exc:
            raise AggregationError(f"Trimmed mean could not be computed. Likely cause: beta={self.beta} "
                                   f"is too large.") from exc


def krum_distances(contents: list[RecordDict]) -> np.ndarray:
    """Flower's ``compute_distances`` (squared L2 distances between the updates, same bits), from one
    flat copy of the updates plus Flower's ``2·W`` (Flower also holds the per-update concatenations
    and ``W²``); squared norms row by row."""
    views = [[as_ndarray(a) for a in next(iter(c.array_records.values())).values()] for c in contents]
    flat = np.empty((len(views), sum(v.size for v in views[0])), dtype=np.result_type(*sum(views, [])))
    for row, arrays in zip(flat, views):
        np.concatenate([v.reshape(-1) for v in arrays], out=row)
    norms = np.array([np.square(row).sum() for row in flat], dtype=flat.dtype)  # Flower: np.square(flat).sum(axis=1)
    return norms[:, None] + norms[None, :] - (2 * flat) @ flat.T  # not 2·(W·Wᵀ): numpy would use syrk, other bits


def krum_select(contents: list[RecordDict], num_malicious_nodes: int, num_nodes_to_select: int) -> list[RecordDict]:
    """Flower's ``select_multikrum`` on ``krum_distances``."""
    distances = krum_distances(contents)
    num_closest = max(1, len(contents) - num_malicious_nodes - 2)
    scores = [np.sum(d[np.argsort(d)[1:num_closest + 1].tolist()]) for d in distances]
    return [contents[i] for i in np.argsort(scores)[:num_nodes_to_select]]


class _ViewsMultiKrum(_EvaluationReleases, flwr_strategy.MultiKrum):
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = check_and_log_replies(self, replies, is_train=True)
        if not valid:
            return None, None
        chosen = krum_select([m.content for m in valid], self.num_malicious_nodes, self.num_nodes_to_select)
        return weighted_average(chosen, self.weighted_by_key), self.train_metrics_aggr_fn(chosen,
                                                                                          self.weighted_by_key)


class MultiKrum(_ViewsMultiKrum):
    pass


class Krum(flwr_strategy.Krum, _ViewsMultiKrum):
    pass


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
