"""The auditor's side of the audit logs, offline: verify signatures and chains, check the logs against each
other, recompute every ε from the logged rounds, write the audit report (docs/AUDIT.md).
Not part of the app bundle: the apps only write logs (privacy/audit/)."""
