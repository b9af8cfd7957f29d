"""Tamper-evident audit logs: the writer that site and coordinator code use (format and threat model:
docs/AUDIT.md). The auditor's verifier, ε recomputation and report live in privacy/auditor/."""

from __future__ import annotations

from privacy.audit.log import GENESIS, AuditLog, AuditLogError, canonical, record_hash

__all__ = ["GENESIS", "AuditLog", "AuditLogError", "canonical", "record_hash"]
