"""The auditor's verifier, as the commands call it: verify each log's chain and signatures (chain.py),
run the content checks on each site's records (checks.py), compare each site's log with the
coordinator's, and gather it all in an ``AuditSummary`` (results.py). Format and threat model:
docs/AUDIT.md.

Only composition lives here, so that `carefl audit verify` (one log, a demo run directory, or a
coordinator's state directory with site kits) and the HTML report build one participant's audit the
same way. It trusts nothing but the public keys it is given (keys.py). Every check stops at, or
names, the first record that fails, by line (1-based) and seq.
"""

from __future__ import annotations

from pathlib import Path

from privacy.auditor.chain import verify_log
from privacy.auditor.checks import check_against, check_site
from privacy.auditor.discover import KEY_NAME, discover
from privacy.auditor.epsilon import recompute
from privacy.auditor.results import COORDINATOR, ActorAudit, AuditError, AuditSummary, Finding, LogReport, failing


def audit_actor(log: LogReport, expected_actor: str | None = None) -> ActorAudit:
    """Verification plus, for a site, the semantic checks and the ε recomputation."""
    actor = expected_actor or log.actor or Path(log.path).parent.name
    role = COORDINATOR if actor == COORDINATOR else "site"
    audit = ActorAudit(actor, role, log)
    if expected_actor is not None and log.actor is not None and log.actor != expected_actor:
        audit.findings.append(Finding.at("error", "actor", actor, 0,
                                         f"the log at {log.path} is written by '{log.actor}', not '{expected_actor}'"))
    if role == "site":
        audit.epsilon = recompute(log.entries)
        audit.findings += check_site(log.entries, audit.epsilon, actor)
    return audit


def compare_with_coordinator(site: ActorAudit, coordinator: LogReport) -> None:
    """Add the cross-check of ``site``'s log against the coordinator's to its findings."""
    found = check_against(site.log, coordinator, site.actor)
    site.findings += found
    site.against = not failing(found)


def audit_logs(log: Path, key, coordinator_log: Path | None = None, coordinator_key=None) -> AuditSummary:
    """``carefl audit verify LOG --key PUB [--against COORD --coordinator-key PUB]``."""
    summary = AuditSummary()
    report = verify_log(log, key)
    actor = audit_actor(report)
    summary.actors.append(actor)
    if coordinator_log is not None:
        if coordinator_key is None:
            raise AuditError("--against needs --coordinator-key (the coordinator kit's audit-signing.pub)")
        coordinator = audit_actor(verify_log(coordinator_log, coordinator_key), COORDINATOR)
        summary.actors.append(coordinator)
        if actor.role == COORDINATOR:
            raise AuditError(f"{log} is the coordinator's own log; --against compares a site's log with it")
        compare_with_coordinator(actor, coordinator.log)
    return summary


def audit_run_dir(run_dir: Path) -> AuditSummary:
    """Every log of a demo run directory, with the public keys of its kits: each log verified,
    each site's checked and compared with the coordinator's."""
    return audit_consortium(*discover(run_dir))


def audit_consortium(keys: dict[str, Path], logs: dict[str, Path]) -> AuditSummary:
    """Every log (actor → audit.jsonl) with its actor's public key (actor → audit-signing.pub): each log
    verified, each site's checked and compared with the coordinator's."""
    summary = AuditSummary()
    audits: dict[str, ActorAudit] = {}
    for actor, path in logs.items():
        key = keys.get(actor)
        if key is None:
            summary.problems.append(Finding.at("error", "keys", actor, None,
                                               f"{path}: no kit with an audit key for '{actor}'"))
        elif not key.is_file():
            summary.problems.append(Finding.at("error", "keys", actor, None,
                                               f"kit '{actor}' has no {KEY_NAME} ({key})"))
            key = None
        audits[actor] = audit_actor(verify_log(path, key), actor)
    coordinator = audits[COORDINATOR]
    known = set(audits)
    for rec in coordinator.log.entries:
        site = rec["payload"].get("site")
        if rec["event"] in ("update", "site-head") and site not in known:
            coordinator.findings.append(Finding.at("error", "against", COORDINATOR, rec["seq"],
                                                   f"{rec['event']} from '{site}', whose log and key were not "
                                                   f"given (no kit for it here)"))
    for actor, audit in audits.items():
        if actor != COORDINATOR:
            compare_with_coordinator(audit, coordinator.log)
    summary.actors = [coordinator] + [a for name, a in audits.items() if name != COORDINATOR]
    return summary
