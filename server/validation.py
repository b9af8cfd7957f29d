"""Checks on every site update before it can reach the aggregate.

A site with a bug, a flipped bit or bad intent must not poison the global model: an update must
have exactly the global model's arrays (names, shapes, dtypes), finite values, a plausible example
count, and a distance from the global model within bounds — an absolute L2 bound if the run sets
one, and by default at most ``max_ratio`` × the median distance of the round's other updates.
"""

from __future__ import annotations

import secrets
import statistics
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from server.flower_seam import as_ndarray, to_array  # noqa: F401 - Flower's raw array format, fenced there

WEIGHT_KEY = "num-examples"
CHUNK = 1 << 16  # elements per block of the one-pass loops: a few blocks stay in the core's cache
# The Gram matrix (server/consensus.py) of a model beyond this many blocks (2M parameters) comes from a sample of
# its blocks, drawn anew each round: the updates' cosines are estimated, their lengths stay exact.
GRAM_SAMPLE_BLOCKS = 32


def accumulate(out: np.ndarray, blocks: list[np.ndarray], factors: list[float], tmp: np.ndarray) -> None:
    """``out = x₀·w₀ + x₁·w₁ + …`` with Flower's operations in Flower's order (``aggregate_arrayrecords``:
    each product rounded to the arrays' dtype, then added in reply order), so the bits are Flower's."""
    np.multiply(blocks[0], factors[0], out=out)
    for x, w in zip(blocks[1:], factors[1:]):
        np.add(out, np.multiply(x, w, out=tmp), out=out)


def squared_distance(local: np.ndarray, base: np.ndarray) -> float:
    """Σ (local − base)², in one pass over both arrays (inf or NaN if either holds a non-finite value).

    Float32 arrays (every model we train): float32 differences, squared and summed per block by a
    BLAS dot, blocks summed in float64 — within ~1e-6 (relative) of the all-float64 sum, without four
    full-size float64 copies. Other dtypes: float64 throughout.
    """
    if not _fast(local, base):
        return _exact_squared_distance(local, base)
    x, b = local.reshape(-1), base.reshape(-1)
    total, buf = 0.0, np.empty(min(x.size, CHUNK), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, x.size, CHUNK):
            d = np.subtract(x[start:start + CHUNK], b[start:start + CHUNK], out=buf[:min(CHUNK, x.size - start)])
            total += float(np.dot(d, d))
    return total


def _fast(*arrays: np.ndarray) -> bool:
    return all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


def _exact_squared_distance(local: np.ndarray, base: np.ndarray) -> float:
    d = local.astype(np.float64) - base.astype(np.float64)
    return float(np.sum(d * d))


def _same_kind(got: str, expected: str) -> bool:
    """Floating arrays may change precision (FedAdam's numpy maths returns float64, sites send the
    model's float32); anything else must keep its exact dtype."""
    floating = ("float", "bfloat")
    if str(expected).startswith(floating):
        return str(got).startswith(floating)
    return got == expected


@dataclass(frozen=True)
class UpdateValidator:
    max_norm: float = 0.0     # > 0: absolute bound on ||update − global||₂
    max_ratio: float = 100.0  # > 0: bound relative to the median of the round's other updates (needs ≥ 3)

    def check(self, content: RecordDict, global_arrays: ArrayRecord, weight: int) -> tuple[str | None, float]:
        """(reason for rejecting, or None; the update's L2 distance to the global model)."""
        return self.check_all([content], global_arrays, [weight]).results[0]

    def check_all(self, contents: list[RecordDict], global_arrays: ArrayRecord, weights: list[int],
                  average_by: str | None = None) -> RoundCheck:
        """``check`` for each update of a round, reading every update's arrays from memory once.

        With ``average_by`` (FedAvg's weight key) the same pass also accumulates Flower's FedAvg average
        of the updates (``accumulate``: the same bits as ``aggregate_arrayrecords``); it is returned only
        if every update passed, since a rejected update changes the weights. The same pass also gives the
        Gram matrix of the well-formed updates' deltas (for ``server/consensus.py``).
        """
        names = list(global_arrays.keys())
        bases = [as_ndarray(a) for a in global_arrays.values()]
        structure = [self._structure(c, global_arrays) for c in contents]
        good = [k for k, (reason, _) in enumerate(structure) if reason is None]
        views = [structure[k][1] for k in good]
        factors = _factors([contents[k] for k in good], average_by) if average_by and len(good) == len(contents) else None
        average = ArrayRecord() if factors else None
        parts = np.zeros((len(good), len(names)))  # Σ (update − global)² per update and array
        gram = np.zeros((len(good), len(good)))    # Σ (update_j − global)·(update_k − global), float32 arrays
        exact = np.zeros_like(gram)                 # ... other arrays
        per_key = [[v[i] for v in views] for i in range(len(names))]
        fast = [i for i, base in enumerate(bases) if _fast(base, *per_key[i])]
        blocks = sum(-(-max(bases[i].size, 1) // CHUNK) for i in fast)
        stride = max(1, -(-blocks // GRAM_SAMPLE_BLOCKS))
        accs = _one_pass([bases[i] for i in fast], [per_key[i] for i in fast], factors if average is not None else None,
                         stride, secrets.randbelow(stride))
        sampled = 0
        for i, (partials, acc, products, count) in zip(fast, accs):
            gram += products
            sampled += count
            for j in range(len(good)):  # blocks summed in order: the same float64 sum as squared_distance's
                total = 0.0
                for value in partials[:, j]:
                    total += float(value)
                parts[j, i] = total
            if average is not None:
                average[names[i]] = to_array(acc.reshape(bases[i].shape))
        for i in sorted(set(range(len(names))) - set(fast)):  # float64 global (FedAdam), integer buffers
            xs = per_key[i]
            parts[:, i] = [squared_distance(x, bases[i]) for x in xs]
            exact += exact_gram(xs, bases[i])
            if average is not None:
                if not all(x.dtype == xs[0].dtype and x.flags.c_contiguous for x in xs):
                    average = None  # replies of mixed dtypes: the strategy averages them itself
                    continue
                acc = np.empty(xs[0].shape, dtype=np.result_type(xs[0].dtype, factors[0]))
                accumulate(acc, xs, factors, np.empty_like(acc))
                average[names[i]] = to_array(acc)
        if average is not None:  # in the global model's order, as Flower's average has it
            average = ArrayRecord({name: average[name] for name in names})
        results: list[tuple[str | None, float]] = [(reason, 0.0) for reason, _ in structure]
        for j, k in enumerate(good):
            results[k] = self._verdict(contents[k], weights[k], names, views[j], bases, parts[j])
        if any(reason is not None for reason, _ in results):
            average = None
        if stride > 1 and sampled:  # the sampled blocks' products, scaled up to the whole of those arrays
            gram *= sum(bases[i].size for i in fast) / sampled
        gram += exact
        np.fill_diagonal(gram, parts.sum(axis=1))  # the norms' own sums (the products' diagonal agrees to ~1e-6)
        return RoundCheck(results, average, gram, good)

    def _structure(self, content: RecordDict, global_arrays: ArrayRecord) -> tuple[str | None, list[np.ndarray]]:
        """(reason, or None and the update's arrays as views): records, names, shapes and dtypes."""
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "reply must hold exactly one array record and one metric record", []
        arrays = next(iter(content.array_records.values()))
        if list(arrays.keys()) != list(global_arrays.keys()):
            return "arrays do not match the global model's parameter names", []
        views = []
        for name, ref in global_arrays.items():
            got = arrays[name]
            if tuple(got.shape) != tuple(ref.shape) or not _same_kind(got.dtype, ref.dtype):
                for before, view in zip(global_arrays.keys(), views):  # arrays are checked in order
                    if not np.all(np.isfinite(view)):
                        return f"array '{before}' holds NaN or infinite values", []
                return f"array '{name}' is {got.dtype}{list(got.shape)}, expected {ref.dtype}{list(ref.shape)}", []
            views.append(as_ndarray(got))
        return None, views

    def _verdict(self, content: RecordDict, weight: int, names: list[str], views: list[np.ndarray],
                 bases: list[np.ndarray], parts: np.ndarray) -> tuple[str | None, float]:
        squared = 0.0
        for name, local, base, part in zip(names, views, bases, parts):
            if not np.isfinite(part):  # rare: find out whether the update is to blame (one more pass)
                if not np.all(np.isfinite(local)):
                    return f"array '{name}' holds NaN or infinite values", 0.0
                part = _exact_squared_distance(local, base)  # float32 overflowed, or the global is bad
            squared += float(part)
        norm = squared ** 0.5
        if not np.isfinite(norm):
            return "update norm is not finite", 0.0
        if self.max_norm > 0 and norm > self.max_norm:
            return f"update norm {norm:.4g} exceeds max-update-norm {self.max_norm:g}", norm
        examples = next(iter(content.metric_records.values())).get(WEIGHT_KEY)
        if not isinstance(examples, (int, float)) or isinstance(examples, bool) or examples != weight:
            return f"{WEIGHT_KEY} = {examples!r} is not the weight {weight} the site declared at the handshake", norm
        return None, norm

    def outliers(self, norms: dict[str, float]) -> dict[str, str]:
        """Sites whose update is far larger than the others' (relative bound; needs ≥ 3 updates)."""
        if self.max_ratio <= 0 or len(norms) < 3:
            return {}
        rejected = {}
        for site, norm in norms.items():
            others = [v for s, v in norms.items() if s != site]
            median = statistics.median(others)
            if median > 0 and norm > self.max_ratio * median:
                rejected[site] = (f"update norm {norm:.4g} is over {self.max_ratio:g}× the median of the other "
                                  f"sites' ({median:.4g})")
        return rejected


@dataclass(frozen=True)
class RoundCheck:
    results: list[tuple[str | None, float]]  # per update: (reason for rejecting or None, L2 distance)
    average: ArrayRecord | None               # FedAvg's average of them all, if asked for and all passed
    gram: np.ndarray                          # Gram matrix of the deltas of the well-formed updates ...
    rows: list[int]                           # ... which are these (indices into the updates)


def exact_gram(xs: list[np.ndarray], base: np.ndarray) -> np.ndarray:
    """Σ (x_j − base)·(x_k − base) in float64, block by block (float64 globals, integer buffers)."""
    gram = np.zeros((len(xs), len(xs)))
    b = base.reshape(-1).astype(np.float64)
    flat = [x.reshape(-1) for x in xs]
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, b.size, CHUNK):
            block = np.stack([x[start:start + CHUNK].astype(np.float64) for x in flat]) - b[start:start + CHUNK]
            gram += block @ block.T
    return gram


def _factors(contents: list[RecordDict], key: str) -> list[float] | None:
    """FedAvg's weights w_k / Σw, as Flower computes them; None if a weight is missing or not positive."""
    weights = [next(iter(c.metric_records.values())).get(key) for c in contents]
    if not weights or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights):
        return None
    total = sum(weights)
    return [w / total for w in weights]


def _one_pass(bases: list[np.ndarray], xs: list[list[np.ndarray]], factors: list[float] | None, stride: int = 1,
              offset: int = 0) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray, int]]:
    """For each float32 array of the model, (every update's Σ(x − base)² per block, as ``squared_distance``
    computes it; with ``factors``, FedAvg's average by ``accumulate``'s operations in its order; the Gram
    matrix of the deltas over every ``stride``-th block of the model from ``offset`` on, float32 products
    within a block summed in float64; how many parameters those blocks hold) — interleaved block by block,
    so each block of an update is read from memory once and the temporaries stay in cache."""
    results = []
    counter = 0  # blocks of the model so far (all arrays)
    n = len(xs[0]) if xs else 0
    width = min(CHUNK, max((b.size for b in bases), default=1))
    diffs = np.empty((n, width), dtype=np.float32)
    tmp = np.empty(width, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN are looked into by the verdict
        for base, updates in zip(bases, xs):
            b, flat = base.reshape(-1), [x.reshape(-1) for x in updates]
            partials = np.zeros((max(1, -(-b.size // CHUNK)), len(flat)))
            acc = np.empty(b.size, dtype=np.float32) if factors else None
            products, count = np.zeros((n, n)), 0
            for block, start in enumerate(range(0, max(b.size, 1), CHUNK)):
                end = min(start + CHUNK, b.size)
                base_block, t = b[start:end], tmp[:end - start]
                for j, x in enumerate(flat):
                    values, d = x[start:end], diffs[j, :end - start]
                    np.subtract(values, base_block, out=d)
                    partials[block, j] = np.dot(d, d)
                    if acc is not None:
                        if j == 0:
                            np.multiply(values, factors[0], out=acc[start:end])
                        else:
                            np.add(acc[start:end], np.multiply(values, factors[j], out=t), out=acc[start:end])
                if n > 1 and (counter + offset) % stride == 0:
                    block_diffs = diffs[:, :end - start]
                    products += block_diffs @ block_diffs.T
                    count += end - start
                counter += 1
            results.append((partials, acc, products, count))
    return results
