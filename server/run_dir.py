"""The run directory: the contract between a coordinator run and everyone who reads its results.

``<out>/metrics.jsonl``  one JSON record per round and site (train and test metrics, or the error); a run
                       that stopped ends with ``{"event": "stopped", "round", "reason", "rounds_planned"}``
                       (round 0: it stopped before any round)
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

import fcntl
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
LOCK_FILE = ".lock"  # held (flock) by the ServerApp writing this run directory
STOPPED = "stopped"  # the event of metrics.jsonl's record of why a run stopped


def stop_record(records: list[dict]) -> dict | None:
    """The record of why the run stopped, if its last attempt stopped (a later completed round clears it)."""
    last = None
    for record in records:
        if record.get("event") == STOPPED:
            last = record
        elif last is not None and "site" in record and int(record.get("round", 0)) > int(last.get("round", 0)):
            last = None
    return last


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


class RunDirectoryBusy(RuntimeError):
    """Another live process (a ServerApp of an earlier attempt) holds the run directory."""


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self._lock_fd: int | None = None

    def claim(self, wait: float = 30.0) -> None:
        """Hold the run directory for this process until ``release`` or its exit, however it exits: a resumed
        run never writes beside a ServerApp of an earlier attempt that is still winding down."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise RunDirectoryBusy(f"run directory {self.path} is in use by another ServerApp (pid "
                                           f"{holder}); stop that run first (`flwr stop`)") from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the lock
            self._lock_fd = None

    def append(self, name: str, record: dict) -> None:
        line = json.dumps(json_safe(record), sort_keys=True) + "\n"
        with open(self.path / name, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def record_stop(self, reason: str, server_round: int | None, rounds_planned: int) -> None:
        """Why the run stopped, as the last record of metrics.jsonl (what `carefl` commands and the report show)."""
        self.append(METRICS_FILE, {"event": STOPPED, "round": int(server_round or 0), "reason": reason,
                                   "rounds_planned": rounds_planned,
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

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
