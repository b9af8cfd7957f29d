"""A model trained on public data, with its provenance: the round-0 global model of a study.

The coordinator writes it (``carefl coordinator pretrain``); a study names it with the run-config
key ``init-checkpoint``. Public data costs no privacy budget, but whoever relies on the model must
be able to tell what it was trained on, so the file carries its provenance (data set, licence, the
case ids, training settings, seed) and the content hash of its weights. That hash is Flower's
content id of the weights as an ``ArrayRecord``: the value every site logs for the model it receives
in round 1 (``model_in_sha256``), so an auditor can match the two.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord

FORMAT = "carefl-public-checkpoint/1"


class PublicCheckpointError(ValueError):
    """The file is not a usable public checkpoint; the message says which file and why."""


@dataclass(frozen=True)
class PublicCheckpoint:
    model: str
    model_kwargs: dict
    state_dict: dict[str, torch.Tensor]
    provenance: dict
    sha256: str  # content id of the weights (``weights_sha256``)

    def array_record(self) -> ArrayRecord:
        return ArrayRecord(self.state_dict)


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Flower's content id of these weights as an ArrayRecord (what sites log when they receive them)."""
    return ArrayRecord(state_dict).object_id


def cases_sha256(case_ids: list[str]) -> str:
    """One hash for a set of case ids (sorted, newline-joined)."""
    return hashlib.sha256("\n".join(sorted(case_ids)).encode()).hexdigest()


def save(path: Path, model: str, model_kwargs: dict, state_dict: dict[str, torch.Tensor], provenance: dict) -> str:
    """Write the checkpoint (atomically) and a readable copy of its provenance beside it; returns the hash."""
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    digest = weights_sha256(state)
    payload = {"format": FORMAT, "model": model, "model_kwargs": dict(model_kwargs), "state_dict": state,
               "provenance": {**provenance, "weights_sha256": digest}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    path.with_suffix(".json").write_text(json.dumps({"model": model, "model_kwargs": model_kwargs,
                                                     **payload["provenance"]}, indent=2) + "\n")
    return digest


def load(path: Path) -> PublicCheckpoint:
    """Read and verify a checkpoint: its format, its fields and that its weights match their hash."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PublicCheckpointError(f"init checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise PublicCheckpointError(f"init checkpoint {path} cannot be read ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PublicCheckpointError(f"{path} is not a carefl public checkpoint (format {FORMAT} expected)")
    state, provenance = payload.get("state_dict"), payload.get("provenance")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PublicCheckpointError(f"init checkpoint {path} holds no weights")
    if not isinstance(provenance, dict):
        raise PublicCheckpointError(f"init checkpoint {path} has no provenance")
    digest = weights_sha256(state)
    if provenance.get("weights_sha256") != digest:
        raise PublicCheckpointError(f"init checkpoint {path}: its weights do not match the hash it records "
                                    "(changed after it was written)")
    return PublicCheckpoint(str(payload.get("model", "")), dict(payload.get("model_kwargs") or {}), state,
                            provenance, digest)
