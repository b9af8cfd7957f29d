"""Tamper-evident audit logs: the writer (imported by site and coordinator code) and the auditor's
verifier, ε recomputation and report (format, threat model, walkthrough: docs/AUDIT.md).

Only the writer is imported eagerly: Flower starts a process per message, and the verifier's
dependencies (dp-accounting, matplotlib) have no business in those processes.
"""

from __future__ import annotations

from importlib import import_module

from privacy.audit.log import GENESIS, AuditLog, AuditLogError, canonical, record_hash

_LAZY = {
    "AuditError": "verify", "ActorAudit": "verify", "AuditSummary": "verify", "Failure": "verify",
    "Finding": "verify", "LogReport": "verify", "audit_logs": "verify", "audit_run_dir": "verify",
    "check_against": "verify", "check_site": "verify", "load_public_key": "verify", "verify_log": "verify",
    "DatasetEpsilon": "epsilon", "RoundEpsilon": "epsilon", "recompute": "epsilon",
    "write_report": "report",
}

__all__ = [  # the writer, then (lazily) the auditor's side
    "GENESIS", "AuditLog", "AuditLogError", "canonical", "record_hash",
    "AuditError", "ActorAudit", "AuditSummary", "Failure", "Finding", "LogReport", "audit_logs", "audit_run_dir",
    "check_against", "check_site", "load_public_key", "verify_log", "DatasetEpsilon", "RoundEpsilon", "recompute",
    "write_report",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"privacy.audit.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'privacy.audit' has no attribute {name!r}")
