"""The run directory: the contract between a coordinator run and everyone who reads its results.

``<out>/metrics.jsonl``  one JSON record per round and site (train and test metrics, or the error)
``<out>/rounds.jsonl``   one JSON record per round (pooled and mean-centre metrics)
``<out>/final_model.pt`` the global model (state dict plus what is needed to rebuild it)
``<out>/summary.json``   task, model, strategy, rounds, sites, per-site and federation metrics
``<out>/report.html``    the run report drawn from the files above (server/report.py)
``<out>/baselines.json`` optional, written by others: label → {metric: value} reference lines for the report
``<out>/tensorboard/``   with ``tensorboard = true``: the same per-round numbers as TensorBoard events

Every file is written atomically (temp file + rename) or appended whole lines, so a reader never
sees half a record.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"
ROUNDS_FILE = "rounds.jsonl"
MODEL_FILE = "final_model.pt"
SUMMARY_FILE = "summary.json"


def json_safe(value):
    """NaN/inf → None (JSON has no NaN); tuples → lists; recurse into containers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=2, sort_keys=True) + "\n").encode())


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.started = time.time()

    def append(self, name: str, record: dict) -> None:
        line = json.dumps(json_safe(record), sort_keys=True) + "\n"
        with open(self.path / name, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def save_model(self, state_dict: dict, model_name: str, model_kwargs: dict) -> Path:
        """Save the global model; load with ``torch.load(path, weights_only=True)``."""
        buffer = io.BytesIO()
        torch.save({"model": model_name, "model_kwargs": model_kwargs, "state_dict": state_dict}, buffer)
        target = self.path / MODEL_FILE
        atomic_write_bytes(target, buffer.getvalue())
        return target

    def write_summary(self, summary: dict) -> Path:
        target = self.path / SUMMARY_FILE
        atomic_write_json(target, summary)
        return target


def read_jsonl(path: Path) -> list[dict]:
    """Read whole records; a trailing partial line (writer mid-append) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
