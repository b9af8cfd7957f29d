"""Checkpoint after every round, and resume a run from its last complete round.

Flower 1.41 has no checkpoint/resume: after a ServerApp or SuperLink crash a run is gone. Here the
run directory gets ``checkpoint.pt`` after every complete round (written atomically after the
round's metrics): the global weights, the server optimiser's state (FedAdam/FedYogi moments), the moving
average of global models (``weight-average``), the round number and the run config. ``carefl coordinator run --resume RUN_DIR`` submits a new Flower
run with ``resume-from = RUN_DIR``; it starts from the checkpoint, numbers rounds on from it, and
appends to the same run directory (metric lines of a round the crash interrupted are dropped).
What that takes from inside Flower's strategies (the moments, the round numbering) is in
server/flower_seam.py.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from server import flower_seam
from server.run_dir import METRICS_FILE, ROUNDS_FILE, atomic_write_bytes, read_jsonl

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """The run directory has no usable checkpoint; the message says why."""


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    run_config: dict
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    weight_average: dict = field(default_factory=dict)  # the moving average of global models (weight-average)

    def array_record(self) -> ArrayRecord:
        return ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in self.arrays.items()})


def save(run_dir: Path, server_round: int, arrays: ArrayRecord, strategy, run_config: dict) -> Path:
    buffer = io.BytesIO()
    torch.save({"round": server_round, "arrays": {k: a.numpy() for k, a in arrays.items()},
                "strategy_state": flower_seam.strategy_state(strategy),
                "weight_average": strategy.average.state() if getattr(strategy, "average", None) else {},
                "run_config": json.loads(json.dumps(run_config))}, buffer)
    target = Path(run_dir) / CHECKPOINT_FILE
    atomic_write_bytes(target, buffer.getvalue())
    return target


def load(run_dir: Path) -> Checkpoint:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT_FILE}: no round of that run completed")
    try:
        raw = torch.load(path, weights_only=False, map_location="cpu")  # our own file, in our run directory
        return Checkpoint(int(raw["round"]), dict(raw["arrays"]), dict(raw["run_config"]),
                          dict(raw.get("strategy_state", {})), dict(raw.get("weight_average", {})))
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is one clear error
        raise CheckpointError(f"{path} cannot be read: {type(exc).__name__}: {exc}") from None


def restore_strategy(strategy, checkpoint: Checkpoint) -> None:
    """The server optimiser's state (FedAdam/FedYogi's moments) and the moving average of global models, as the
    checkpoint saved them."""
    flower_seam.restore_strategy_state(strategy, checkpoint.strategy_state)
    if getattr(strategy, "average", None) is not None and checkpoint.weight_average:
        strategy.average.restore(checkpoint.weight_average)


def number_rounds_from(strategy, done: int) -> None:
    """Flower's ``Strategy.start`` counts rounds from 1; a resumed run's strategy sees absolute rounds
    (sites seed and label their work with them, FedAdam/FedYogi use them for bias correction)."""
    flower_seam.number_rounds_from(strategy, done)


def drop_rounds_after(run_dir: Path, last_round: int) -> None:
    """Remove metric records of rounds after the checkpoint (a round the crash interrupted)."""
    for name in (METRICS_FILE, ROUNDS_FILE):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        kept = [r for r in read_jsonl(path) if int(r.get("round", 0)) <= last_round]
        atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
