"""The coordinator's fast aggregation path gives Flower's results, bit for bit (FedTrimmedAvg's mean and
Krum's distances: to the rounding of a sum taken in another order, and Krum then chooses as Flower does).

server/validation.py and server/strategies.py read updates as zero-copy views, validate and (for
FedAvg) average them in one blocked pass. Here every optimised result
is compared with Flower's own strategy on the same replies, and with a plain numpy reference.
Small blocks make a few hundred parameters span many blocks and thread work units.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from server import strategies, validation
from server.sites import SiteGrid, SiteInfo
from server.validation import UpdateValidator, as_ndarray, squared_distance, to_array
from tests.helpers import Replied

SHAPES = {"dense.weight": (37, 29), "dense.bias": (29,), "scale": (), "steps": (2,)}  # "steps": int64 buffer


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(validation, "CHUNK", 64)
    monkeypatch.setattr(strategies, "CHUNK", 64)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _arrays(rng, scale=1.0, base=None, buffers=True) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in SHAPES.items():
        if name == "steps":
            if not buffers:
                continue
            out[name] = np.array([3, 4], dtype=np.int64)
        else:
            noise = np.asarray(rng.standard_normal(shape), dtype=np.float32) * np.float32(scale)
            out[name] = np.asarray((base[name] + noise) if base is not None else noise, dtype=np.float32)
    return out


def _round(n=6, seed=0, buffers=True):
    """Global model, train messages to n nodes, and their replies (as Flower messages)."""
    rng = np.random.default_rng(seed)
    base = _arrays(rng, buffers=buffers)
    global_arrays = ArrayRecord({k: Array(v) for k, v in base.items()})
    nodes = list(range(10, 10 + n))
    sent = [Message(RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
    updates = [_arrays(rng, 0.05, base, buffers) for _ in nodes]
    replies = [_reply(m, u, 10 + 7 * k) for k, (m, u) in enumerate(zip(sent, updates))]
    sites = [SiteInfo(f"s{node}", node, weight=10 + 7 * k, n_features=0) for k, node in enumerate(nodes)]
    return global_arrays, sent, replies, sites, updates


def _reply(msg, arrays: dict, examples: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples, "local-steps": 5.0})})
    return Message(content, reply_to=msg)


def _same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a.keys():
        assert (a[key].dtype, tuple(a[key].shape), a[key].data) == (b[key].dtype, tuple(b[key].shape), b[key].data), key


def _through_sitegrid(strategy, replies, sites, global_arrays):
    grid = SiteGrid(Replied(replies), sites, lambda *a: None, UpdateValidator(), quorum=1)
    sent = list(strategy.configure_train(1, global_arrays, ConfigRecord(), grid))
    accepted = grid.send_and_receive(sent)
    return strategy.aggregate_train(1, accepted)[0], accepted


def test_views_and_array_images_match_flower_for_every_dtype_and_layout():
    for values in [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(2.5, np.float32), np.zeros((0, 3)),
                   np.array([True, False]), np.arange(5, dtype=np.float16), np.arange(6, dtype=">i4"),
                   np.asfortranarray(np.arange(12.0).reshape(3, 4))]:
        flower = Array(values)
        ours = to_array(values)
        assert (ours.dtype, ours.shape, ours.data) == (flower.dtype, flower.shape, flower.data)
        view = as_ndarray(flower)
        assert view.dtype == values.dtype and view.shape == values.shape and np.array_equal(view, values)
        assert not view.flags.writeable  # a view of the reply's bytes, never a copy
    odd = Array(dtype="float32", shape=(2,), stype="other", data=b"\0" * 8)
    with pytest.raises(TypeError):  # what Array.numpy() says
        as_ndarray(odd)


def test_fedavg_average_from_the_validation_pass_is_flowers():
    global_arrays, _, replies, sites, updates = _round()
    reference = flwr_strategy.FedAvg().aggregate_train(1, copy.deepcopy(replies))[0]
    ours, accepted = _through_sitegrid(strategies.FedAvg(), replies, sites, global_arrays)
    assert accepted.average is not None and accepted.average[0] == "num-examples"  # the fused pass was used
    _same(ours, reference)
    # and it is the weighted mean (float64 numpy reference)
    weights = np.array([10 + 7 * k for k in range(len(updates))], dtype=np.float64)
    for key in SHAPES:
        expected = np.tensordot(weights / weights.sum(), np.stack([u[key] for u in updates]).astype(np.float64), 1)
        np.testing.assert_allclose(ours[key].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_rejected_update_leaves_the_average_to_the_strategy_over_the_rest():
    global_arrays, sent, replies, sites, updates = _round()
    broken = dict(updates[2])
    broken["dense.weight"] = broken["dense.weight"].copy()
    broken["dense.weight"][3, 4] = np.nan
    replies[2] = _reply(sent[2], broken, 40)
    replies[4] = Message(Error(4001, "site error"), reply_to=sent[4])
    ours, accepted = _through_sitegrid(strategies.FedAvg(), replies, sites, global_arrays)
    assert accepted.average is None and len(accepted) == 4
    reference = flwr_strategy.FedAvg().aggregate_train(1, [r for i, r in enumerate(copy.deepcopy(replies))
                                                           if i not in (2, 4)])[0]
    _same(ours, reference)


@pytest.mark.parametrize("name, ours, flowers", [
    ("fedmedian", strategies.FedMedian, flwr_strategy.FedMedian),
    ("fedtrimmedavg", lambda: strategies.FedTrimmedAvg(beta=0.2), lambda: flwr_strategy.FedTrimmedAvg(beta=0.2)),
    ("krum", lambda: strategies.Krum(num_malicious_nodes=1), lambda: flwr_strategy.Krum(num_malicious_nodes=1)),
    ("multikrum", lambda: strategies.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
     lambda: flwr_strategy.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3)),
    ("fedprox", lambda: strategies.FedProx(proximal_mu=0.1), lambda: flwr_strategy.FedProx(proximal_mu=0.1)),
])
def test_every_strategy_aggregates_like_flowers(name, ours, flowers):
    global_arrays, _, replies, sites, updates = _round(n=7, seed=3)
    reference = flowers().aggregate_train(1, copy.deepcopy(replies))[0]  # Flower's median pops the arrays
    result, _ = _through_sitegrid(ours(), replies, sites, global_arrays)
    if name == "fedtrimmedavg":
        _trimmed_like_flowers(result, reference, updates, beta=0.2)
    else:
        _same(result, reference)
    if name == "fedmedian":
        stacked = np.stack([u["dense.weight"] for u in updates])
        np.testing.assert_array_equal(result["dense.weight"].numpy(), np.median(stacked, axis=0))


def _trimmed_like_flowers(ours: ArrayRecord, flowers: ArrayRecord, updates: list[dict], beta: float) -> None:
    """Flower's trimmed mean but for the rounding of its sum: the same values are kept, and summed in another
    order (Flower's: where its np.partition leaves them), so each result is within float rounding of the exact
    mean of the kept values, and bit-identical where the sum cannot round differently."""
    assert list(ours.keys()) == list(flowers.keys())
    for key in flowers.keys():
        mine, theirs = ours[key].numpy(), flowers[key].numpy()
        assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape), key
        stacked = np.stack([u[key] for u in updates])
        cut = int(beta * len(updates))
        kept = np.sort(stacked, axis=0)[cut:len(updates) - cut]
        if kept.shape[0] <= 2 or mine.dtype.kind != "f" or np.all(kept == np.round(kept)):
            assert mine.tobytes() == theirs.tobytes(), key  # one or two terms, or exact integer sums
            continue
        exact = kept.astype(np.float64).mean(axis=0)
        # each side: (m − 1) roundings of partial sums ≤ Σ|kept|, one of the division
        bound = (kept.shape[0] - 1) / 2 * np.finfo(mine.dtype).eps * np.abs(kept).sum(axis=0) / kept.shape[0]
        bound = bound + np.spacing(np.abs(theirs))
        assert np.all(np.abs(mine - exact) <= bound) and np.all(np.abs(theirs - exact) <= bound), key


def _distances(updates: list[dict]) -> np.ndarray:
    """Squared distances between the flattened updates, from their differences, in float64."""
    flat = np.stack([np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in u.values()]) for u in updates])
    return np.array([[np.sum((x - y) ** 2) for y in flat] for x in flat])


def _krum_order(updates: list[dict], f: int) -> tuple[list[int], bool]:
    """Every update ranked by Flower's Krum score on the exact distances, equal scores in reply order; and
    whether any scores are equal."""
    distances = _distances(updates)
    closest = max(1, len(updates) - f - 2)
    scores = [np.sum(np.sort(np.delete(d, i))[:closest]) for i, d in enumerate(distances)]
    return list(np.argsort(scores, kind="stable")), len(set(scores)) < len(scores)


def _chosen(selected: list[RecordDict], contents: list[RecordDict]) -> list[int]:
    return [next(i for i, c in enumerate(contents) if c is s) for s in selected]


@pytest.mark.parametrize("buffers", [True, False])  # with an int64 buffer Flower's maths is float64, else float32
def test_krum_distances_are_flowers_to_rounding_and_choose_alike(buffers):
    _, _, replies, _, updates = _round(n=5, seed=4, buffers=buffers)
    contents = [r.content for r in replies]
    flower = compute_distances([c["arrays"] for c in contents])
    ours = strategies.krum_distances(contents)
    assert flower.dtype == (np.float64 if buffers else np.float32) and ours.dtype == np.float64
    assert np.array_equal(ours, ours.T) and np.all(np.diag(ours) == 0)
    exact = _distances(updates)
    norms = np.array([sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in u.values()) for u in updates])
    size = sum(v.size for v in updates[0].values())
    # both round ‖x‖² + ‖y‖² − 2x·y: errors relative to the norms, not to the (much smaller) distances
    tolerance = 4 * math.sqrt(size) * np.finfo(flower.dtype).eps * (norms[:, None] + norms[None, :])
    assert np.all(np.abs(ours - exact) <= tolerance) and np.all(np.abs(flower - exact) <= tolerance)
    for f, k in [(0, 1), (1, 1), (1, 3), (0, 5)]:  # n − f − 2 ≥ 2 neighbours counted: no equal scores
        order, tied = _krum_order(updates, f)
        assert not tied
        assert _chosen(strategies.krum_select(contents, f, k), contents) == order[:k]
        assert _chosen(select_multikrum(contents, f, k), contents) == order[:k]


LAYERS = {  # blocks of 64 (small_blocks): a short block, whole blocks, a ragged end, one element, a scalar
    "odd": ((63,), np.float32), "whole": ((2, 64), np.float32), "ragged": ((5, 41), np.float32),
    "one": ((1,), np.float32), "scalar": ((), np.float32), "double": ((3, 67), np.float64),
    "ties": ((130,), np.float32), "zeros": ((130,), np.float32), "steps": ((3,), np.int64),
}


def _random_updates(n: int, seed: int, layers=LAYERS) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(shape) for k, (shape, _) in layers.items()}
    updates = []
    for _ in range(n):
        update = {}
        for key, (shape, dtype) in layers.items():
            if key == "ties":  # few distinct values: many equal ones around the middle
                update[key] = rng.integers(-2, 3, shape).astype(dtype)
            elif key == "zeros":  # zeros of both signs in the middle: the result's sign is the sorting's
                update[key] = rng.choice(np.array([-0.0, 0.0, 0.0, -1.0, 1.0], dtype), shape)
            elif np.issubdtype(dtype, np.integer):
                update[key] = rng.integers(0, 1000, shape).astype(dtype)
            else:
                update[key] = np.asarray(base[key] + 0.1 * rng.standard_normal(shape), dtype=dtype)
        updates.append(update)
    return updates


def _replies_for(updates: list[dict[str, np.ndarray]]) -> list[Message]:
    sent = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=10 + k,
                    message_type=MessageType.TRAIN) for k in range(len(updates))]
    return [_reply(m, u, 10 + 7 * k) for k, (m, u) in enumerate(zip(sent, updates))]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 20])
def test_fast_paths_equal_flowers_on_random_data(n):
    updates = _random_updates(n, seed=n)
    replies = _replies_for(updates)
    median = strategies.FedMedian().aggregate_train(1, replies)[0]
    _same(median, flwr_strategy.FedMedian().aggregate_train(1, copy.deepcopy(replies))[0])
    for beta in (0.0, 0.1, 0.2, 0.45):
        trimmed = strategies.FedTrimmedAvg(beta=beta).aggregate_train(1, replies)[0]
        reference = flwr_strategy.FedTrimmedAvg(beta=beta).aggregate_train(1, copy.deepcopy(replies))[0]
        _trimmed_like_flowers(trimmed, reference, updates, beta)
    contents = [r.content for r in replies]
    for f, k in [(0, 1), (1, 1), (0, n), (2, max(1, n - 2))]:
        order, tied = _krum_order(updates, f)
        chosen = strategies.krum_select(contents, f, k)
        assert _chosen(chosen, contents) == order[:k]  # the right choice; ties in reply order
        if not tied:
            assert _chosen(select_multikrum(contents, f, k), contents) == order[:k]
        result = strategies.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=k).aggregate_train(1, replies)[0]
        _same(result, aggregate_arrayrecords(chosen, "num-examples"))


def test_unusual_layers_take_flowers_own_path():
    """Mixed dtypes across updates, Fortran order: Flower's own maths (np.stack of the views), Flower's bits."""
    updates = _random_updates(6, seed=11, layers={"w": ((9, 70), np.float32), "b": ((70,), np.float32)})
    updates[2]["b"] = updates[2]["b"].astype(np.float64)
    for u in updates:
        u["w"] = np.asfortranarray(u["w"])
    replies = _replies_for(updates)
    assert not as_ndarray(replies[0].content["arrays"]["w"]).flags.c_contiguous
    _same(strategies.FedMedian().aggregate_train(1, replies)[0],
          flwr_strategy.FedMedian().aggregate_train(1, copy.deepcopy(replies))[0])
    _same(strategies.FedTrimmedAvg(beta=0.2).aggregate_train(1, replies)[0],
          flwr_strategy.FedTrimmedAvg(beta=0.2).aggregate_train(1, copy.deepcopy(replies))[0])
    contents = [r.content for r in replies]
    assert _chosen(strategies.krum_select(contents, 1, 3), contents) == _krum_order(updates, 1)[0][:3]


def test_non_finite_values_come_out_as_flowers():
    """A block holding NaN or infinity is Flower's maths: NaN for the median, trimmed away if cut."""
    updates = _random_updates(5, seed=12, layers={"w": ((300,), np.float32)})
    updates[0]["w"][5] = np.nan
    updates[1]["w"][70] = np.inf
    updates[1]["w"][140], updates[2]["w"][140] = np.inf, -np.inf
    for k in (2, 3, 4):  # a sum of kept values that overflows
        updates[k]["w"][200] = np.finfo(np.float32).max
    replies = _replies_for(updates)
    median = strategies.FedMedian().aggregate_train(1, replies)[0]
    _same(median, flwr_strategy.FedMedian().aggregate_train(1, copy.deepcopy(replies))[0])
    assert np.isnan(median["w"].numpy()[5])
    trimmed = strategies.FedTrimmedAvg(beta=0.2).aggregate_train(1, replies)[0]
    reference = flwr_strategy.FedTrimmedAvg(beta=0.2).aggregate_train(1, copy.deepcopy(replies))[0]
    values, expected = trimmed["w"].numpy(), reference["w"].numpy()
    for i in (5, 70, 140, 200):  # in those blocks Flower's own maths
        assert values[i].tobytes() == expected[i].tobytes()
    assert np.isfinite(values[[5, 70, 140]]).all() and values[200] == np.inf and values.dtype == expected.dtype


def test_a_too_large_beta_is_flowers_aggregation_error():
    replies = _replies_for(_random_updates(4, seed=13))
    for strategy in (strategies.FedTrimmedAvg(), flwr_strategy.FedTrimmedAvg()):
        strategy.beta = 0.5  # (the constructor refuses it)
        with pytest.raises(AggregationError, match="beta=0.5 is too large"):
            strategy.aggregate_train(1, copy.deepcopy(replies))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12, 20, 33, 64])
def test_comparator_programs_bring_the_sorted_middle_together(n):
    network = strategies.merge_exchange(n)
    if n <= 12:  # the 0-1 principle: sorting every 0/1 input proves a network sorts
        for bits in range(2 ** n):
            wires = [(bits >> k) & 1 for k in range(n)]
            for i, j in network:
                wires[i], wires[j] = min(wires[i], wires[j]), max(wires[i], wires[j])
            assert wires == sorted(wires)
    rng = np.random.default_rng(n)
    for lo, hi in {((n - 1) // 2, n // 2 + 1), (0, n), (n // 5, n - n // 5), (n // 3, n - n // 3)}:
        ops, result, count = strategies.middle_program(n, lo, hi)
        values = rng.standard_normal((n, 50))
        slots = list(values) + [np.empty(50) for _ in range(count - n)]
        for ufunc, a, b, target in ops:
            assert target >= n  # the updates' own bytes are never written
            ufunc(slots[a], slots[b], out=slots[target])
        middle = np.sort(np.stack([slots[s] for s in result]), axis=0)
        np.testing.assert_array_equal(middle, np.sort(values, axis=0)[lo:hi])


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_adaptive_strategies_keep_flowers_moments_over_rounds(kind):
    cls = {"fedadam": (strategies.FedAdam, flwr_strategy.FedAdam),
           "fedyogi": (strategies.FedYogi, flwr_strategy.FedYogi)}[kind]
    ours, flower = cls[0](eta=0.1, eta_l=0.1), cls[1](eta=0.1, eta_l=0.1)
    global_arrays, _, replies, sites, _ = _round(seed=5, buffers=False)  # (FedAdam makes int buffers float64)
    theirs_arrays = global_arrays
    for server_round in (1, 2):
        grid = SiteGrid(Replied(replies), sites, lambda *a: None, UpdateValidator())
        mine = ours.aggregate_train(server_round, grid.send_and_receive(
            list(ours.configure_train(server_round, global_arrays, ConfigRecord(), grid))))[0]
        list(flower.configure_train(server_round, theirs_arrays, ConfigRecord(), Replied(replies)))
        theirs = flower.aggregate_train(server_round, copy.deepcopy(replies))[0]
        _same(mine, theirs)
        global_arrays, theirs_arrays = mine, theirs  # round 2: a float64 global model (FedAdam's maths)


def test_norms_agree_with_float64_and_do_not_depend_on_the_average():
    global_arrays, _, replies, _, updates = _round(n=5, seed=6)
    base = {k: v.numpy() for k, v in global_arrays.items()}
    contents = [r.content for r in replies]
    weights = [10 + 7 * k for k in range(5)]
    fused = UpdateValidator().check_all(contents, global_arrays, weights, average_by="num-examples")
    alone = UpdateValidator().check_all(contents, global_arrays, weights)
    assert fused.results == alone.results and alone.average is None and fused.average is not None
    assert [UpdateValidator().check(c, global_arrays, w) for c, w in zip(contents, weights)] == fused.results
    for (reason, norm), update in zip(fused.results, updates):
        exact = math.sqrt(sum(float(np.sum((update[k].astype(np.float64) - base[k].astype(np.float64)) ** 2))
                              for k in SHAPES))
        assert reason is None and norm == pytest.approx(exact, rel=1e-6)
    x, b = updates[0]["dense.weight"], base["dense.weight"]
    assert squared_distance(x, b) == pytest.approx(float(np.sum((x.astype(np.float64) - b) ** 2)), rel=1e-6)


def test_each_broken_update_gets_the_reason_the_array_by_array_check_gives():
    global_arrays, sent, replies, sites, updates = _round(n=6, seed=7)

    def broken(k, change):
        arrays = {name: value.copy() for name, value in updates[k].items()}
        change(arrays)
        replies[k] = _reply(sent[k], arrays, 20)

    broken(0, lambda a: a["dense.weight"].__setitem__((0, 0), np.inf))
    # a NaN in the first array is reported before a wrong shape in the second, as the checks go in order
    broken(1, lambda a: (a["dense.weight"].__setitem__((1, 1), np.nan), a.__setitem__("dense.bias", np.zeros(3, np.float32))))
    broken(2, lambda a: a.__setitem__("dense.bias", np.zeros(3, np.float32)))
    broken(3, lambda a: a["dense.bias"].__setitem__(0, 3e30))  # finite, but its square overflows float32
    validator = UpdateValidator(max_norm=1e6)
    checked = validator.check_all([r.content for r in replies], global_arrays, [20] * 4 + [38, 45],
                                  average_by="num-examples")
    results, average = checked.results, checked.average
    reasons = [reason for reason, _ in results]
    assert reasons[0] == "array 'dense.weight' holds NaN or infinite values"
    assert reasons[1] == "array 'dense.weight' holds NaN or infinite values"
    assert reasons[2] == "array 'dense.bias' is float32[3], expected float32[29]"
    assert reasons[3].startswith("update norm 3e+30 exceeds max-update-norm 1e+06")
    assert reasons[4] is None and reasons[5] is None and average is None
    assert results[3][1] == pytest.approx(3e30, rel=1e-6)
    other_weight = validator.check(replies[4].content, global_arrays, weight=10)
    assert other_weight[0] == "num-examples = 38 is not the weight 10 the site declared at the handshake"
