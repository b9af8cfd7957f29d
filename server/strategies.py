"""Flower's own strategies, chosen by name from the run configuration.

Each is Flower's class with its aggregation re-done on zero-copy views of the replies' bytes
(``validation.as_ndarray``) instead of ``Array.numpy()``, which copies every array twice per use;
FedAvg's average is accumulated block by block, in the validation pass when ``SiteGrid`` runs it; the
robust strategies work block by block too (a comparator network, a blocked Gram matrix). The results are
bit-identical to Flower's, except the rounding of FedTrimmedAvg's sum and of (Multi-)Krum's distances (see
there) (tests/test_aggregation_path.py); benchmarks/aggregation.py measures the gain.

(Over 400 lines on purpose: every strategy the run config names sits beside the zero-copy kernels they share,
so each can be read against its Flower original in one place.)
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from server.flower_seam import AggregationError, aggregate_arrayrecords, check_and_log_replies, trim_mean
from server.iterate_average import IterateAverage
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

    average: IterateAverage | None = None  # run config ``weight-average`` > 0: the sites evaluate the average

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Flower calls this once per round with the round's new global model: the moving average takes it in
        here, and the sites evaluate the average (server/iterate_average.py)."""
        if self.average is not None:
            arrays = self.average.add(arrays)
        return super().configure_evaluate(server_round, arrays, config, grid)

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


# -- coordinate-wise order statistics: a comparator network run on cache-sized blocks ---------------------
# Flower sorts the n values of every coordinate apart (np.partition along the stacked axis: seconds for 10M
# coordinates). Here one comparator of a sorting network is two whole-block ufunc calls (np.minimum and
# np.maximum of two updates' blocks), so each of the ~150 steps the network needs for n = 20 runs at vector
# speed on data that stays in the cache.

NETWORK_MAX = 256  # n·log²n comparators against the partition's ~n steps: 10× faster at 20 updates, 3× at 256


def merge_exchange(n: int) -> list[tuple[int, int]]:
    """Batcher's merge-exchange sorting network for n wires (Knuth, TAOCP vol. 3, 5.2.2, Algorithm M):
    comparators (i, j), i < j, each leaving the smaller value on i and the larger on j."""
    if n < 2:
        return []
    top = 1 << ((n - 1).bit_length() - 1)
    network, p = [], top
    while p > 0:
        q, r, d = top, 0, p
        while True:
            network += [(i, i + d) for i in range(n - d) if i & p == r]
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return network


def needed_comparators(network: list[tuple[int, int]], wires: set[int]) -> list[tuple[int, int, bool, bool]]:
    """The comparators the multiset of final values on ``wires`` depends on, as (i, j, min needed, max
    needed): a sum needs only which values end there, so a comparator between two wires whose outputs
    only feed one such multiset is a mere permutation and is dropped, like every one that feeds nothing."""
    group = dict.fromkeys(wires, 0)
    kept = []
    for i, j in reversed(network):
        gi, gj = group.get(i), group.get(j)
        if (gi is None and gj is None) or gi == gj:
            continue
        kept.append((i, j, gi is not None, gj is not None))
        group[i] = group[j] = len(kept)  # min(x, y), max(x, y) need only the multiset {x, y}
    return kept[::-1]


Program = tuple[tuple[tuple[np.ufunc, int, int, int], ...], tuple[int, ...], int]  # ops, result slots, slots


@functools.lru_cache(maxsize=256)
def middle_program(n: int, lo: int, hi: int) -> Program:
    """The comparators that bring sorted positions lo..hi−1 of n values together, compiled once per (n, lo,
    hi) to ufunc calls on slots: (ufunc, in, in, out), slots 0..n−1 being the updates' blocks (read-only
    views) and n.. scratch rows reused as soon as free; also the slots holding the result and the slot count."""
    slot, free, count, ops = list(range(n)), [], n, []

    def scratch(*candidates: int) -> int:
        nonlocal count
        for s in candidates:
            if s >= n:
                return s
        if free:
            return free.pop()
        count += 1
        return count - 1

    for i, j, low, high in needed_comparators(merge_exchange(n), set(range(lo, hi))):
        a, b = slot[i], slot[j]
        if low and high:
            slot[i] = scratch()
            ops.append((np.minimum, a, b, slot[i]))
            slot[j] = scratch(b)
            ops.append((np.maximum, a, b, slot[j]))
            free += [a] if a >= n else []
        else:  # one output feeds nothing: compute the other in place, free the dead wire's row
            keep, dead = (i, b) if low else (j, a)
            slot[keep] = scratch(a if low else b, dead)
            ops.append((np.minimum if low else np.maximum, a, b, slot[keep]))
            free += [dead] if dead >= n and dead != slot[keep] else []
    return tuple(ops), tuple(slot[w] for w in range(lo, hi)), count


def networkable(layers: list[np.ndarray]) -> bool:
    """One float32/float64 dtype, one shape, C order, at most ``NETWORK_MAX`` updates: what ``mean_of_middle``
    reads. Anything else (an integer buffer, mixed dtypes, ...) takes Flower's own maths."""
    first = layers[0]
    return (len(layers) <= NETWORK_MAX and first.dtype in (np.float32, np.float64)
            and all(x.dtype == first.dtype and x.shape == first.shape and x.flags.c_contiguous for x in layers))


def mean_of_middle(layers: list[np.ndarray], lo: int, hi: int,
                   exact: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """For each coordinate, the mean of its values at sorted positions lo..hi−1 across the updates, as
    ``np.mean`` takes it (a running sum in the arrays' dtype, then one division), block by block.

    A block whose result is not finite (a NaN or infinity among the inputs, or an overflowing sum) is
    recomputed by ``exact`` (Flower's maths on the stacked block), so such values come out as Flower's, and
    so is a zero result whose sign Flower's sorting decides (``redo_signed_zeros``).
    """
    ops, result, count = middle_program(len(layers), lo, hi)
    flats = [x.reshape(-1) for x in layers]
    out = np.empty(flats[0].size, dtype=flats[0].dtype)
    scratch = np.empty((count - len(flats), min(CHUNK, out.size)), dtype=out.dtype)
    for start in range(0, out.size, CHUNK):
        end = min(start + CHUNK, out.size)
        slots = [x[start:end] for x in flats] + [row[:end - start] for row in scratch]
        for ufunc, a, b, target in ops:
            ufunc(slots[a], slots[b], out=slots[target])
        block, inputs = out[start:end], slots[:len(flats)]
        mean_into(block, [slots[s] for s in result])
        if not np.isfinite(block).all():
            block[...] = exact(np.stack(inputs))
        else:
            redo_signed_zeros(block, inputs, exact)
    return out.reshape(layers[0].shape)


def redo_signed_zeros(block: np.ndarray, inputs: list[np.ndarray], exact: Callable[[np.ndarray], np.ndarray]) -> None:
    """Where the result is 0 and an update holds −0 there, which zero ends in the middle (so the result's
    sign) is up to the sorting: those coordinates get ``exact``. Every other zero result is +0 either way."""
    zeros = np.flatnonzero(block == 0)
    if zeros.size:
        columns = np.stack([x[zeros] for x in inputs])
        signed = ((columns == 0) & np.signbit(columns)).any(axis=0)
        if signed.any():
            block[zeros[signed]] = exact(columns[:, signed])


def mean_into(out: np.ndarray, terms: list[np.ndarray]) -> None:
    """``np.mean`` of the stacked terms along the stack, as numpy does it: added in order, then divided."""
    if len(terms) == 1:
        np.copyto(out, terms[0])
    else:
        np.add(terms[0], terms[1], out=out)
    for term in terms[2:]:
        np.add(out, term, out=out)
    np.divide(out, len(terms), out=out)


class _CoordinateWise(_EvaluationReleases):
    """Flower's coordinate-wise robust aggregation over views (Flower's copies each array first): the mean
    of each coordinate's sorted values lo..hi−1 (``middle``), by ``mean_of_middle``; ``combine`` is
    Flower's own maths on the stacked updates, for the layers ``mean_of_middle`` does not take."""

    def middle(self, n: int) -> tuple[int, int]:
        raise NotImplementedError

    def combine(self, stacked: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = check_and_log_replies(self, replies, is_train=True)
        if not valid:
            return None, None
        arrays = ArrayRecord()
        for key, layers in zip(*_stacked_layers(valid)):
            if networkable(layers):
                values = mean_of_middle(layers, *self.middle(len(layers)), self.combine)
            else:
                values = np.asarray(self.combine(np.stack(layers)))
            arrays[key] = to_array(values)
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


class FedMedian(_CoordinateWise, flwr_strategy.FedMedian):
    """Flower's coordinate-wise median, bit for bit: ``np.median`` is the mean of the one or two middle
    values, and a sum of two does not depend on their order (the sign of a zero may: ``redo_signed_zeros``)."""

    def middle(self, n: int) -> tuple[int, int]:
        return (n - 1) // 2, n // 2 + 1

    def combine(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)


class FedTrimmedAvg(_CoordinateWise, flwr_strategy.FedTrimmedAvg):
    """Flower's coordinate-wise trimmed mean. The kept values are Flower's and summed as ``np.mean`` does,
    but Flower adds them in the order its ``np.partition`` happens to leave them (data-dependent, and
    costing seconds to reproduce), this path in the network's order; so where more than two are kept the
    sum may round differently. Both stay within the rounding bound of a float sum of the kept values
    (tests/test_aggregation_path.py): on 20 × 10M float32 (benchmarks/aggregation.py) 69% of the values
    are Flower's bits, the rest differ by 1–6 units in the last place of the largest kept value, and each
    side is at most 4 such units from the exact mean."""

    def middle(self, n: int) -> tuple[int, int]:
        if not 0.0 <= self.beta < 0.5:  # Flower's trim_mean refuses it so
            raise self.too_large()
        cut = int(self.beta * n)
        return cut, n - cut

    def combine(self, stacked: np.ndarray) -> np.ndarray:
        try:
            return trim_mean(stacked, self.beta)
        except ValueError as exc:
            raise self.too_large() from exc

    def too_large(self) -> AggregationError:
        return AggregationError(f"Trimmed mean could not be computed. Likely cause: beta={self.beta} "
                                f"is too large.")


# -- (Multi-)Krum: pairwise distances from a blocked Gram matrix --------------------------------------

def krum_distances(contents: list[RecordDict]) -> np.ndarray:
    """Flower's ``compute_distances``: squared L2 distances ‖x‖² + ‖y‖² − 2x·y between the flattened
    updates, in float64.

    Flower computes it on one flat copy of all updates (20 × 10M: 1.5 GB more) in their common dtype; here
    the Gram matrix X·Xᵀ is summed block by block (``gram``), in that dtype within a block and in float64
    across blocks, so only one block is held. The last bits differ from Flower's (another summation
    order; the matrix is exactly symmetric, its diagonal exactly 0). In float32 both lose digits to
    ‖x‖² ≫ ‖x − y‖², Flower's more: on benchmarks/aggregation.py's 20 × 10M updates, 1% apart, its
    distances are up to 5.6% off the exact ones (these: 0.05%), enough that Flower's Krum picks another
    update than the exact distances do (these pick the exact one). Unusual replies (other dtypes, array
    sizes that differ between updates) take Flower's flat computation (``flat_distances``).
    """
    views = [[as_ndarray(a) for a in next(iter(c.array_records.values())).values()] for c in contents]
    dtype = np.result_type(*sum(views, []))  # Flower's: the dtype np.concatenate and np.stack give
    layers = list(zip(*views))
    if (dtype not in (np.float32, np.float64) or not layers or any(len(v) != len(layers) for v in views)
            or any(len({x.size for x in layer}) != 1 for layer in layers)):
        return flat_distances(views, dtype)
    products = gram(layers, dtype)
    norms = np.diag(products)
    return norms[:, None] + norms[None, :] - 2 * products


def gram(layers: list[tuple[np.ndarray, ...]], dtype: np.dtype) -> np.ndarray:
    """Σ x_i·x_j over all coordinates, for every pair of updates (rows of each layer), in float64: per
    block a BLAS X·Xᵀ in ``dtype`` on the updates' values copied into one cache-sized buffer."""
    n = len(layers[0])
    total = np.zeros((n, n))
    buffer = np.empty((n, min(CHUNK, max(layer[0].size for layer in layers))), dtype=dtype)
    for layer in layers:
        flats = [x.reshape(-1) for x in layer]
        for start in range(0, flats[0].size, CHUNK):
            end = min(start + CHUNK, flats[0].size)
            block = buffer[:, :end - start]
            for row, x in zip(block, flats):
                np.copyto(row, x[start:end])
            total += block @ block.T
    return total


def flat_distances(views: list[list[np.ndarray]], dtype: np.dtype) -> np.ndarray:
    """Flower's ``compute_distances`` with its bits, from one flat copy of the updates plus Flower's ``2·W``."""
    flat = np.empty((len(views), sum(v.size for v in views[0])), dtype=dtype)
    for row, arrays in zip(flat, views):
        np.concatenate([v.reshape(-1) for v in arrays], out=row)
    norms = np.array([np.square(row).sum() for row in flat], dtype=flat.dtype)  # Flower: np.square(flat).sum(axis=1)
    return norms[:, None] + norms[None, :] - (2 * flat) @ flat.T  # not 2·(W·Wᵀ): numpy would use syrk, other bits


def krum_select(contents: list[RecordDict], num_malicious_nodes: int, num_nodes_to_select: int) -> list[RecordDict]:
    """Flower's ``select_multikrum`` on ``krum_distances``. Equal scores (two updates each other's only
    counted neighbour: d(x, y) = d(y, x) here exactly) go in reply order; Flower's order them by the
    rounding of its own distances, so there, and only there, the choice or its order may differ."""
    distances = krum_distances(contents)
    num_closest = max(1, len(contents) - num_malicious_nodes - 2)
    scores = [np.sum(d[np.argsort(d)[1:num_closest + 1].tolist()]) for d in distances]
    return [contents[i] for i in np.argsort(scores, kind="stable")[:num_nodes_to_select]]


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
    """The run config's strategy; with ``weight-average`` > 0 it also keeps the moving average of the global
    models that the sites evaluate and the run publishes."""
    strategy = _named_strategy(settings, n_sites)
    if settings.weight_average > 0:
        strategy.average = IterateAverage(settings.weight_average)
    return strategy


def _named_strategy(settings: RunSettings, n_sites: int) -> Strategy:
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
