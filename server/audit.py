"""The coordinator's signed audit log: runs, every update received (by hash), refusals, aggregates,
and the signed heads of the sites' own logs that arrive with their replies (format: docs/AUDIT.md).

With those heads an auditor can prove a site's log was not truncated after the fact, and with the
update hashes that every update aggregated here was sent, as logged, by that site. The other way
round, every message to a site carries this log's current signed head (``WitnessedGrid``), which the
site logs: the coordinator's log cannot lose its last records without the sites' logs showing it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid

from privacy.audit import AuditLog
from server.flower_seam import serialized_size

HEAD_RECORD = "audit-head"  # as written by client/audit.py
COORDINATOR_HEAD = "coordinator-head"  # the ConfigRecord of a message to a site: this log's signed head


def head_record(head: dict) -> ConfigRecord:
    """A log head ({"seq", "hash", "sig"}) as the ConfigRecord a message carries."""
    return ConfigRecord({"seq": int(head["seq"]), "hash": str(head["hash"]), "sig": str(head.get("sig") or "")})


class WitnessedGrid:
    """Flower's Grid, except that every message it sends carries the coordinator log's signed head at
    that moment (``COORDINATOR_HEAD``); each site logs the head it received (client/audit.py), so an
    auditor holds witnesses of the coordinator's log outside the coordinator (privacy/auditor/checks.py)."""

    def __init__(self, grid: Grid, log: AuditLog) -> None:
        self._grid = grid
        self._log = log

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def _witnessed(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        head = self._log.head()
        if head is not None:
            for message in messages:
                message.content[COORDINATOR_HEAD] = head_record(head)
        return messages

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(self._witnessed(messages), timeout=timeout)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._witnessed(messages))


class CoordinatorAudit:
    def __init__(self, path: Path, key: Path | None, run_id: int) -> None:
        self.log = AuditLog(path, "coordinator", key)
        self.run_id = str(run_id)

    def run_start(self, app_sha256: str, config: dict, sites: list[str], init_model: dict | None = None) -> None:
        """``init_model``: the public checkpoint the study starts from (its weights' hash and provenance)."""
        self.log.append("run-start", {"run_id": self.run_id, "app_sha256": app_sha256, "config": config,
                                      "sites": sites, **({"init_model": init_model} if init_model else {})})

    def on_replies(self, message_type: str, server_round: int, replies: list[tuple[str, Message]]) -> None:
        for site, reply in replies:
            if reply.has_error():
                self.log.append("rejection", {"run_id": self.run_id, "round": server_round, "site": site,
                                              "reason": f"{message_type}: {reply.error.reason}"})
                continue
            content = reply.content
            arrays = next(iter(content.array_records.values()), None)
            if message_type == MessageType.TRAIN and arrays is not None:
                metrics = {k: v for record in content.metric_records.values() for k, v in record.items()}
                self.log.append("update", {"run_id": self.run_id, "round": server_round, "site": site,
                                           "arrays_sha256": arrays.object_id,
                                           "arrays_bytes": serialized_size(arrays),
                                           "metrics": metrics})
            head = content.config_records.get(HEAD_RECORD)
            if head is not None:
                self.log.append("site-head", {"site": site, "seq": int(head["seq"]), "hash": str(head["hash"]),
                                              "sig": str(head["sig"])})

    def consensus(self, server_round: int, agreement: dict, radius: float) -> None:
        """Each site's agreement with the round's consensus, and the bound its update was held to."""
        self.log.append("consensus", {"run_id": self.run_id, "round": server_round, "bound": radius,
                                      "sites": {site: a.record() for site, a in agreement.items()}})

    def secure_sum(self, server_round: int, record: dict) -> None:
        """Under secure aggregation: the coordinator saw only masked updates and their sum; which sites are in it,
        which dropped before masking, and whose own mask was rebuilt from the others' shares."""
        self.log.append("secure-aggregation", {"run_id": self.run_id, "round": server_round, **record})

    def flagged(self, server_round: int, site: str, reason: str, excluded: bool) -> None:
        self.log.append("site-flagged", {"run_id": self.run_id, "round": server_round, "site": site,
                                         "reason": reason, "excluded": excluded})

    def aggregate(self, server_round: int, arrays: ArrayRecord) -> None:
        if server_round > 0:  # round 0 is the initial model, before any site contributed
            self.log.append("aggregate", {"run_id": self.run_id, "round": server_round,
                                          "arrays_sha256": arrays.object_id})

    def checkpoint(self, server_round: int, path: Path) -> None:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self.log.append("checkpoint", {"run_id": self.run_id, "round": server_round, "path": Path(path).name,
                                       "sha256": digest})

    def run_end(self, status: str) -> None:
        self.log.append("run-end", {"run_id": self.run_id, "status": status})
