"""Aggregation throughput: the coordinator's path for 20 updates of 10M float32 parameters.

    python -m benchmarks --only aggregation [--full]

20 train replies, each 10 arrays of 1M float32 (40 MB), built as Flower ArrayRecords and put through
Flower's own deflate → inflate, so they are the objects a ServerApp holds after pulling replies.
carefl's path is what the ServerApp runs on them: ``SiteGrid.send_and_receive`` (every update
checked by ``server/validation.py``: arrays, finiteness, L2 distance to the global model, outliers)
then the strategy's ``aggregate_train``. The baseline is a plain numpy sum of the same 20 arrays
(zero-copy views of the same bytes): whichever of a loop of ``+=`` and ``np.sum`` over a stacked copy
is faster. Throughput fraction = numpy time / carefl time, medians of interleaved runs.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
import tracemalloc

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from benchmarks.figures import Figure, markdown_table
from benchmarks.timing import call_times, interleaved_medians
from deploy.site.flower_seam import as_transported, set_task_identity
from server import strategies
from server.flower_seam import array_bytes
from server.sites import SiteGrid, SiteInfo
from server.validation import UpdateValidator, as_ndarray

UPDATES, ARRAYS, SIZE = 20, 10, 1_000_000  # 20 updates × 10 arrays × 1M float32 = 10M parameters each


def received(record: RecordDict) -> RecordDict:
    """The record as a ServerApp holds it after a pull: deflated to Flower's objects and inflated back."""
    return as_transported(record)


class PreparedGrid:
    """A Flower Grid whose nodes have already replied: ``send_and_receive`` hands back the replies."""

    def __init__(self, replies: list[Message]) -> None:
        self.replies = replies

    def get_node_ids(self):
        return [r.metadata.src_node_id for r in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.replies)


def build_round(seed: int = 0):
    set_task_identity(task_id=1, run_id=1, node_id=0)
    rng = np.random.default_rng(seed)
    base = [rng.standard_normal(SIZE, dtype=np.float32) for _ in range(ARRAYS)]
    global_arrays = received(RecordDict({"arrays": ArrayRecord(base)}))["arrays"]
    nodes = list(range(100, 100 + UPDATES))
    messages = [Message(RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
    replies = []
    for k, msg in enumerate(messages):
        update = [b + np.float32(0.01) * rng.standard_normal(SIZE, dtype=np.float32) for b in base]
        content = RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord({"num-examples": 50 + k})})
        replies.append(Message(received(content), reply_to=msg))
        del update, content
    sites = [SiteInfo(f"site-{n}", n, weight=50 + k, n_features=0) for k, n in enumerate(nodes)]
    return messages, replies, sites


def peak_extra_mb(step) -> float:
    """Peak memory one call allocates on top of what is already held (tracemalloc sees numpy's buffers)."""
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key)) / 1024


def run(full: bool) -> list[Figure]:
    messages, replies, sites = build_round()
    views = [[as_ndarray(a) for a in r.content["arrays"].values()] for r in replies]

    def numpy_loop():
        for i in range(ARRAYS):
            acc = views[0][i].copy()
            for u in views[1:]:
                acc += u[i]

    stacked = [np.stack([u[i] for u in views]) for i in range(ARRAYS)]

    def numpy_stacked():
        for block in stacked:
            np.sum(block, axis=0)

    loop_s, stacked_s = interleaved_medians(numpy_loop, numpy_stacked, repeats=6 if not full else 30, block=3,
                                            warmup=1)
    baseline, baseline_name = ((numpy_loop, "loop of `+=`") if loop_s <= stacked_s else
                               (numpy_stacked, "`np.sum(axis=0)` over a stacked copy"))
    if baseline is numpy_loop:
        del stacked
    else:
        del views

    global_arrays = messages[0].content["arrays"]

    def carefl(strategy):
        """One round's server side as Strategy.start runs it: configure_train (untimed), then the timed
        SiteGrid.send_and_receive (validation) and aggregate_train."""
        grid = SiteGrid(PreparedGrid(replies), sites, lambda *a: None, UpdateValidator(), quorum=UPDATES)
        sent = list(strategy.configure_train(1, global_arrays, ConfigRecord(), grid))

        def step():
            arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(sent))
            assert arrays is not None
            return arrays
        return step

    def aggregate_alone(strategy):
        """The strategy's aggregate_train alone, on replies SiteGrid has already validated (untimed)."""
        grid = SiteGrid(PreparedGrid(replies), sites, lambda *a: None, UpdateValidator(), quorum=UPDATES)
        validated = grid.send_and_receive(list(strategy.configure_train(1, global_arrays, ConfigRecord(), grid)))

        def step():
            arrays, _ = strategy.aggregate_train(1, validated)
            assert arrays is not None
            return arrays
        return step

    def validation_only():
        SiteGrid(PreparedGrid(replies), sites, lambda *a: None, UpdateValidator(),
                 quorum=UPDATES).send_and_receive(messages)

    flower = FlowerFedAvg()

    def flower_fedavg():
        return flower.aggregate_train(1, replies)[0]

    def previous_path():
        """carefl before issue 8: array-by-array validation on Array.numpy() copies in float64, then
        Flower's own FedAvg (kept here as the reference the speed-up is measured against)."""
        for r in replies:
            for name, ref in global_arrays.items():
                local, base = r.content["arrays"][name].numpy(), ref.numpy()
                assert np.all(np.isfinite(local))
                float(np.sum((local.astype(np.float64) - base.astype(np.float64)) ** 2))
        return flower_fedavg()

    def audit_hashes():
        for r in replies:
            for a in r.content["arrays"].values():
                hashlib.sha256(array_bytes(a)).hexdigest()

    default = carefl(strategies.FedAvg())
    ours, theirs = default(), flower_fedavg()
    assert all(array_bytes(ours[k]) == array_bytes(theirs[k]) for k in theirs.keys()), \
        "carefl's FedAvg differs from Flower's"
    del ours, theirs

    f = UPDATES // 10  # robust strategies assume f Byzantine sites
    robust = []
    for name, make in [
        ("FedMedian", strategies.FedMedian),
        ("FedTrimmedAvg (β = 0.2)", lambda: strategies.FedTrimmedAvg(beta=0.2)),
        (f"Krum (f = {f})", lambda: strategies.Krum(num_malicious_nodes=f)),
        (f"MultiKrum (f = {f}, keep {UPDATES - f})",
         lambda: strategies.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=UPDATES - f)),
    ]:
        robust += [(f"{name} (validation + aggregate_train)", carefl(make())),
                   (f"{name}: aggregate_train alone", aggregate_alone(make()))]
    paths = [
        ("**FedAvg** (validation + aggregate_train)", default),
        *(robust if full else []),  # full pass only
        ("validation alone (SiteGrid)", validation_only),
        ("context: Flower's FedAvg.aggregate_train alone", flower_fedavg),
        ("context: carefl before issue 8 (float64 validation + Flower's FedAvg)", previous_path),
        ("context: sha256 of every update (the audit log's update hashes)", audit_hashes),
    ]
    # FedAvg: interleaved with the baseline. The rest: a few runs each against the baseline's median.
    repeats = 40 if full else 16
    base_s, ours_s = interleaved_medians(baseline, default, repeats=repeats, block=4, warmup=1)
    measured = {default: (base_s, ours_s)}
    rows, extras = [], {}
    for name, step in paths:
        start = time.perf_counter()
        extras[name] = peak_extra_mb(step)  # (also a warm-up)
        first = time.perf_counter() - start
        if step in measured:
            baseline_s, seconds = measured[step]
        else:
            baseline_s = base_s
            n = 5 if full else (3 if first < 1.5 else 0)
            seconds = statistics.median(call_times(step, n)) if n else first
        rows.append([name, f"{seconds:.3f}", f"{baseline_s / seconds:.2f}", f"{extras[name]:.0f}"])
        print(f"{name}: {seconds:.3f} s vs numpy {baseline_s:.3f} s → {baseline_s / seconds:.2f}; "
              f"peak {extras[name]:.0f} MB", flush=True)
    fraction, extra = base_s / ours_s, extras[paths[0][0]]
    hwm = status_mb("VmHWM:")
    load = os.getloadavg()[0]
    data_mb = UPDATES * ARRAYS * SIZE * 4 / 2**20
    return [Figure(
        key="aggregation",
        title="Aggregation throughput",
        command="python -m benchmarks --only aggregation" + (" --full" if full else ""),
        goal="carefl's server-side aggregation of 20 updates × 10M float32 at ≥ 0.5 of a plain numpy sum's throughput",
        anchor=f"plain numpy sum of the same 20 arrays ({baseline_name}; loop {loop_s:.3f} s, stacked "
               f"{stacked_s:.3f} s); both sides on one thread",
        ours=f"FedAvg path (validation + aggregate) {ours_s:.3f} s vs numpy {base_s:.3f} s: "
             f"**{fraction:.2f}** of numpy's throughput; peak {extra:.0f} MB allocated on top of the {data_mb:.0f} MB "
             f"of replies",
        met=fraction >= 0.5,
        table=markdown_table(["path (20 updates × 10M float32)", "seconds", "fraction of numpy's throughput",
                              "peak allocated (MB)"], rows),
        notes=(f"FedAvg: medians of {repeats} runs interleaved with the numpy sum; other rows: "
               f"{'median of 5 runs' if full else 'median of 3 runs (1 if a run takes over 1.5 s)'}, against "
               f"the numpy median {base_s:.3f} s. Peak allocated: the most "
               f"memory one call holds at once beyond the {data_mb:.0f} MB of replies and the global model "
               f"(tracemalloc, which counts numpy's buffers); the benchmark process peaked at {hwm:.0f} MB RSS. "
               f"FedAvg's average is bit-identical to Flower's (checked here). "
               + ("Robust rows: \"validation + aggregate_train\" includes the same validation pass, \"aggregate_train "
                  "alone\" is the strategy on replies already validated. " if full else
                  "Robust strategies (FedMedian, FedTrimmedAvg, Krum, MultiKrum): `--full` only. ")
               + f"Rows marked context are not carefl's path. Machine load average at the end: {load:.1f}."),
    )]


if __name__ == "__main__":
    for fig in run(full=False):
        print(fig.markdown())
