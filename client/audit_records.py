"""The records a ClientApp handler adds to the site's audit log, built in one place (format: docs/AUDIT.md).

A release's record (``dp-round``, or ``non-dp-release``) is its ``audit_record`` (privacy/release.py) with the
dataset's fingerprint and the handler's facts: ``log_release``. Every other record a handler writes is built by
``record`` from the fields its event has (``EVENTS``): ``log``. The records of every message (``reply``,
``refusal``) are client/audit.py's. Nothing is written where the site keeps no log (simulation).
"""

from __future__ import annotations

from typing import Callable

from privacy.audit import AuditLog

# event → its fields after ``run_id`` (docs/AUDIT.md); only counts, names and fixed words, never a data value
EVENTS = {
    "data-exclusions": ("dataset", "excluded", "reasons"),           # the handshake: rows or cases left out
    "secure-aggregation": ("round", "group", "clipped_coordinates"),  # a masked update sent
    "finetune": ("dataset", "round", "steps", "dp", "sent"),          # a personalised model trained, kept
}


def record(event: str, run_id: str, **fields) -> dict:
    """The payload of a handler's ``event`` record: its run, then exactly the event's fields."""
    expected = EVENTS[event]
    if set(fields) != set(expected):
        raise TypeError(f"audit record '{event}' has the fields {', '.join(expected)}, not {', '.join(fields)}")
    return {"run_id": run_id, **{name: fields[name] for name in expected}}


def log(audit: AuditLog | None, event: str, run_id: str, **fields) -> None:
    """Append a handler's ``event`` record (``record``)."""
    if audit is not None:
        audit.append(event, record(event, run_id, **fields))


def log_release(audit: AuditLog | None, released, task, facts: Callable[[], dict] | None = None) -> None:
    """Append a charged (or exact) release's record: its ``audit_record`` with the dataset's fingerprint and
    ``facts()`` (computed only where a log is kept: hashing a model or a file takes time)."""
    if audit is not None:
        audit.append(released.audit_event, released.audit_record(dataset_fingerprint=task.fingerprint(),
                                                                  **(facts() if facts is not None else {})))
