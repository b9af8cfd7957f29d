"""What the site writes to its signed audit log while handling a message (format: docs/AUDIT.md).

Only identifiers of the work (run, round, message type, app hash), DP parameters, ε, counts and
hashes are logged; never a data value, a path or a case id. The log file and the signing key are
the site's: ``[site] audit_log`` in site.toml, the key from the site agent's node config.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message

from client.site import SiteConfig
from privacy.audit import AuditLog
from server.flower_seam import serialized_size

log = logging.getLogger("carefl.site")
HEAD_RECORD = "audit-head"  # the ConfigRecord of a reply that carries the site's signed log head
COORDINATOR_HEAD = "coordinator-head"  # the ConfigRecord of a message that carries the coordinator's (server/audit.py)


def open_log(site: SiteConfig, node_config: dict) -> AuditLog | None:
    if site.audit_log is None:
        return None
    key = str(node_config.get("audit-key", "")) or None
    return AuditLog(site.audit_log, site.site_id, Path(key) if key else None)


def message_fields(msg: Message) -> dict:
    group = msg.metadata.group_id or ""
    return {"run_id": str(msg.metadata.run_id), "round": int(group) if group.isdigit() else None,
            "message_type": str(msg.metadata.message_type)}


def coordinator_head(msg: Message) -> dict:
    """The coordinator log's signed head the message carried, as the site logs it: the site's witness that
    the coordinator's log had reached that record (an auditor finds it there, or a truncated log)."""
    head = msg.content.config_records.get(COORDINATOR_HEAD) if msg.has_content() else None
    if head is None:
        return {}
    try:
        return {"coordinator_head": {"seq": int(head["seq"]), "hash": str(head["hash"]), "sig": str(head["sig"])}}
    except (KeyError, TypeError, ValueError):
        return {"coordinator_head": None}  # malformed: logged as such, the auditor reports it


def arrays_digest(arrays: ArrayRecord) -> tuple[str, int]:
    """Flower's own content id of the arrays (sha256 of their serialisation: the coordinator sees the
    same value for what it receives) and their size in bytes."""
    return arrays.object_id, serialized_size(arrays)


def combined_hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def log_reply(audit: AuditLog | None, msg: Message, reply: Message) -> Message:
    """Log what leaves the site, then attach the log's signed head (that very record) to the reply."""
    if audit is None or reply.has_error():
        return reply
    content = reply.content
    arrays = next(iter(content.array_records.values()), None)
    digest, size = arrays_digest(arrays) if arrays is not None else (None, 0)
    metrics = {k: v for record in content.metric_records.values() for k, v in record.items()}
    head = audit.append("reply", {**message_fields(msg), **coordinator_head(msg), "arrays_sha256": digest,
                                  "arrays_bytes": size, "metrics": metrics})  # this very record (another process may append next)
    content[HEAD_RECORD] = ConfigRecord({"seq": int(head["seq"]), "hash": str(head["hash"]),
                                         "sig": str(head.get("sig") or "")})
    return reply


def log_refusal(audit: AuditLog | None, msg: Message, code: int, reason: str) -> None:
    if audit is not None:
        audit.append("refusal", {**message_fields(msg), **coordinator_head(msg), "code": code, "reason": reason})
