"""The auditor's verifier: chain, signatures and order of a log; what a site's log must show; and
the cross-check of a site's log against the coordinator's (format and threat model: docs/AUDIT.md).

It trusts nothing but the public keys it is given. Every check stops at, or names, the first
record that fails, by line (1-based) and seq.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from privacy.auditor.epsilon import BUDGET_SLACK, DatasetEpsilon, recompute
from privacy.audit.log import GENESIS, LogFormatError, parse_line, record_hash

COORDINATOR = "coordinator"
LOG_NAME = "audit.jsonl"
KEY_NAME = "audit-signing.pub"


class AuditError(ValueError):
    """A problem with what the auditor asked for (unreadable key, not a run directory): no verdict."""


def load_public_key(key) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key: the key itself, or a file with its OpenSSH line (``ssh-ed25519 …``, what
    ``carefl provision`` writes as audit-signing.pub) or a PEM public key."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    path = Path(key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"public key {path} cannot be read: {exc.strerror}") from None
    try:
        loaded = (serialization.load_pem_public_key(data) if data.lstrip().startswith(b"-----")
                  else serialization.load_ssh_public_key(data.strip()))
    except (ValueError, TypeError, IndexError, binascii.Error):
        raise AuditError(f"{path} is not an OpenSSH or PEM public key") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise AuditError(f"{path} is not an Ed25519 key (the audit-signing.pub of a kit is)")
    return loaded


def fingerprint(key: ed25519.Ed25519PublicKey) -> str:
    """SHA256:… of the raw key, as ``ssh-keygen -l`` prints it."""
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def signature_ok(key: ed25519.Ed25519PublicKey, digest: str, sig) -> bool:
    if not isinstance(sig, str) or not sig:
        return False
    try:
        raw = base64.b64decode(sig, validate=True)
        if base64.b64encode(raw).decode("ascii") != sig:  # one spelling only (unused bits must be zero)
            return False
        key.verify(raw, digest.encode("ascii"))
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return True


@dataclass
class Failure:
    """The first record of a log that does not verify."""
    line: int | None
    seq: int | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        return where + (f" (seq {self.seq})" if self.seq is not None else "") + f": {self.reason}"

    def to_dict(self) -> dict:
        return {"line": self.line, "seq": self.seq, "reason": self.reason}


@dataclass
class Finding:
    """A semantic or cross-log problem. ``level`` error fails the audit; warning is reported only."""
    level: str
    check: str
    log: str          # the actor whose log the line is in
    line: int | None
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.log} log" + (f" line {self.line} (seq {self.seq})" if self.line is not None else "")
        return f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"level": self.level, "check": self.check, "log": self.log, "line": self.line, "seq": self.seq,
                "message": self.message}


@dataclass
class LogReport:
    """What ``verify_log`` found in one file. ``entries`` are the records up to the first failure."""
    path: str
    ok: bool
    actor: str | None = None
    records: int = 0
    failure: Failure | None = None
    signatures_checked: bool = False
    key_fingerprint: str | None = None
    first_time: str | None = None
    last_time: str | None = None
    events: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    entries: list[dict] = field(default_factory=list, repr=False)
    public_key: ed25519.Ed25519PublicKey | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "actor": self.actor, "records": self.records,
                "failure": self.failure.to_dict() if self.failure else None,
                "signatures_checked": self.signatures_checked, "key_fingerprint": self.key_fingerprint,
                "first_time": self.first_time, "last_time": self.last_time, "events": self.events,
                "seconds": round(self.seconds, 4)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def verify_log(path: Path, public_key) -> LogReport:
    """Check a log line by line and stop at the first failure.

    Per line, in this order: a JSON object with exactly the record's fields (and the line its
    canonical encoding); seq = line − 1; prev = the previous record's hash; hash recomputes; sig
    present and valid under ``public_key``; the same actor as line 1; time not before the previous
    line's. ``public_key=None`` skips the signatures (``signatures_checked`` stays False).
    """
    start = time.perf_counter()
    key = load_public_key(public_key) if public_key is not None else None
    report = LogReport(path=str(path), ok=False, signatures_checked=key is not None, public_key=key,
                       key_fingerprint=fingerprint(key) if key is not None else None)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        report.failure = Failure(None, None, f"log file {path} does not exist")
        return report
    except OSError as exc:
        report.failure = Failure(None, None, f"log file {path} cannot be read: {exc.strerror}")
        return report
    if not data:
        report.failure = Failure(None, None, f"log file {path} is empty (no records)")
        return report
    lines = data.split(b"\n")
    torn = data[-1:] != b"\n"
    if not torn:
        lines.pop()  # the empty piece after the final newline
    events: Counter = Counter()
    prev_hash, prev_time = GENESIS, None
    for number, line in enumerate(lines, start=1):
        failure, record = _check_line(line, number, prev_hash, prev_time, key, report.actor)
        if torn and number == len(lines):
            failure = "the last line does not end with a newline (torn write, or the file was cut)" + (
                f"; {failure}" if failure else "")
        if failure is not None:
            report.failure = Failure(number, _seq_of(line), failure)
            break
        report.entries.append(record)
        report.actor = report.actor or record["actor"]
        prev_hash, prev_time = record["hash"], record["time"]
        events[record["event"]] += 1
    if report.entries:
        report.actor = report.entries[0]["actor"]
        report.first_time, report.last_time = report.entries[0]["time"], report.entries[-1]["time"]
    report.records = len(report.entries)
    report.events = dict(events)
    report.ok = report.failure is None
    report.seconds = time.perf_counter() - start
    return report


def _check_line(line: bytes, number: int, prev_hash: str, prev_time, key, actor) -> tuple[str | None, dict | None]:
    try:
        record = parse_line(line, check_hash=False)
    except LogFormatError as exc:
        return f"not a valid record: {exc}", None
    if record["seq"] != number - 1:
        return (f"seq {record['seq']} where {number - 1} was expected (a record was deleted, duplicated or "
                f"moved)"), None
    if record["prev"] != prev_hash:
        return "prev is not the hash of the previous record (the chain is broken here)", None
    if record_hash(record) != record["hash"]:
        return "hash does not match the record's content (the record was edited)", None
    if key is not None:
        if record["sig"] is None:
            return "the record is not signed", None
        if not signature_ok(key, record["hash"], record["sig"]):
            return "signature is not valid under the given public key", None
    if actor is not None and record["actor"] != actor:
        return f"actor '{record['actor']}' differs from '{actor}' of line 1", None
    if prev_time is not None and record["time"] < prev_time:
        return f"time {record['time']} is before the previous record's {prev_time}", None
    return None, record


def _seq_of(line: bytes) -> int | None:
    """The seq of a line that failed, when it still shows one."""
    try:
        value = json.loads(line.decode("utf-8")).get("seq")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    return value if type(value) is int else None


def _key(payload: dict) -> tuple[str, object]:
    return str(payload.get("run_id")), payload.get("round")


def check_site(records: Iterable[dict], epsilon: dict[str, DatasetEpsilon] | None = None,
               actor: str | None = None) -> list[Finding]:
    """What a site's log must show: weights leave only after an approved train message and a DP
    round, every DP round within budget, and each logged ε recomputable within 1%."""
    records = list(records)
    actor = actor or (records[0]["actor"] if records else "site")
    findings: list[Finding] = []

    def add(level: str, check: str, rec: dict, message: str) -> None:
        findings.append(Finding(level, check, actor, rec["seq"] + 1, rec["seq"], message))

    approved: set = set()
    dp_rounds: dict[tuple, list[bool]] = {}
    by_seq = {}
    for rec in records:
        by_seq[rec["seq"]] = rec
        p, event = rec["payload"], rec["event"]
        if event == "message" and p.get("approved") is True and p.get("message_type") == "train":
            approved.add(_key(p))
        elif event == "dp-round":
            dp_rounds.setdefault(_key(p), []).append(p.get("dp") is True)
            if p.get("dp") is True:
                after, budget = p.get("epsilon_after"), p.get("epsilon_budget")
                if not _number(budget):
                    add("error", "budget", rec, f"dataset '{p.get('dataset')}': no epsilon_budget logged")
                elif not _number(after):
                    add("error", "budget", rec, f"dataset '{p.get('dataset')}': ε after the round is not a "
                                                f"finite number ({after}), budget {budget:g}")
                elif after > budget * (1 + BUDGET_SLACK) + 1e-12:
                    add("error", "budget", rec, f"dataset '{p.get('dataset')}': ε={after:.6g} after the round "
                                                f"exceeds its budget {budget:g} (δ={p.get('delta')})")
        elif event == "reply" and p.get("arrays_sha256") is not None:
            run, rnd = _key(p)
            what = f"reply with weights (run {run}, round {rnd}, sha256 {str(p.get('arrays_sha256'))[:16]}…)"
            if p.get("message_type") != "train":
                add("error", "weights", rec, f"{what} answers a '{p.get('message_type')}' message: weights "
                                             f"may only leave with a train reply")
            if (run, rnd) not in approved:
                add("error", "weights", rec, f"{what} without an approved train message for that run and "
                                             f"round before it")
            flags = dp_rounds.get((run, rnd))
            if not flags:
                add("error", "weights", rec, f"{what} without a dp-round for that run and round before it "
                                             f"(weights left without DP accounting)")
            elif not all(flags):
                add("error", "weights", rec, f"{what}: weights left from a non-DP round (dp = false)")
    if epsilon is None:
        epsilon = recompute(records)
    for table in epsilon.values():
        for row in table.rounds:
            if row.status in ("error", "warning"):
                findings.append(Finding(row.status, "epsilon", actor, row.seq + 1, row.seq,
                                        f"dataset '{row.dataset}', run {row.run_id} round {row.round}: {row.message}"))
    findings.sort(key=lambda f: (f.seq if f.seq is not None else -1))
    return findings


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_against(site_report: LogReport, coordinator_report: LogReport, site_id: str) -> list[Finding]:
    """The site's log against the coordinator's: every update the coordinator logged for ``site_id``
    was sent, as logged, by the site; every signed head of the site the coordinator holds verifies
    under the site's key and is a record of the site's log (a shorter log was truncated)."""
    findings: list[Finding] = []
    if not coordinator_report.ok:
        findings.append(Finding("error", "against", COORDINATOR, None, None,
                                f"the coordinator's log does not verify ({coordinator_report.failure}); only "
                                f"its first {coordinator_report.records} records were compared"))
    if not site_report.ok:
        findings.append(Finding("error", "against", site_id, None, None,
                                f"the site's log does not verify ({site_report.failure}); only its first "
                                f"{site_report.records} records were compared"))
    replies: dict[tuple, dict] = {}
    for rec in site_report.entries:
        p = rec["payload"]
        if rec["event"] == "reply" and p.get("arrays_sha256") is not None:
            replies.setdefault((*_key(p), p["arrays_sha256"]), rec)
    site_entries = site_report.entries
    for rec in coordinator_report.entries:
        p = rec["payload"]
        if p.get("site") != site_id:
            continue

        def add(message: str, rec: dict = rec) -> None:
            findings.append(Finding("error", "against", COORDINATOR, rec["seq"] + 1, rec["seq"], message))

        if rec["event"] == "update":
            run, rnd = _key(p)
            sent = replies.get((run, rnd, p.get("arrays_sha256")))
            if sent is None:
                add(f"update from {site_id} (run {run}, round {rnd}, sha256 {p.get('arrays_sha256')}) has no "
                    f"reply with that hash in the site's log: the site never sent it")
                continue
            sp = sent["payload"]
            if sp.get("arrays_bytes") != p.get("arrays_bytes"):
                add(f"update from {site_id} (run {run}, round {rnd}) has {p.get('arrays_bytes')} bytes, the "
                    f"site's reply (line {sent['seq'] + 1}) {sp.get('arrays_bytes')}")
            if sp.get("metrics") != p.get("metrics"):
                add(f"update from {site_id} (run {run}, round {rnd}) carries other metrics than the site's "
                    f"reply (line {sent['seq'] + 1})")
        elif rec["event"] == "site-head":
            seq, digest, sig = p.get("seq"), p.get("hash"), p.get("sig")
            name = f"{site_id}'s signed head seq {seq} (hash {str(digest)[:16]}…)"
            if site_report.public_key is None:
                add(f"{name} cannot be checked: no public key for {site_id}")
            elif not isinstance(digest, str) or not signature_ok(site_report.public_key, digest, sig):
                add(f"{name} is not signed by {site_id}'s key")
                continue
            if type(seq) is not int or seq < 0:
                add(f"{name}: seq is not a record number")
            elif seq >= len(site_entries):
                cut = ("ends at seq " + str(len(site_entries) - 1)) if site_entries else "has no records"
                why = (" beyond its first failure" if not site_report.ok else "")
                add(f"the coordinator holds {name}, but the site's log {cut}{why}: the site's log was "
                    f"truncated after it sent that head")
            elif site_entries[seq]["hash"] != digest:
                add(f"the coordinator holds {name}, but the site's record seq {seq} has hash "
                    f"{site_entries[seq]['hash'][:16]}…: the site's log was rewritten after it sent that head")
    return findings


@dataclass
class ActorAudit:
    """One participant's log: its verification, and for sites the semantic and cross-log checks."""
    actor: str
    role: str                                   # site | coordinator
    log: LogReport
    findings: list[Finding] = field(default_factory=list)
    epsilon: dict[str, DatasetEpsilon] = field(default_factory=dict)
    against: bool | None = None                 # None: not compared with a coordinator log

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return self.log.ok and self.log.signatures_checked and not self.errors

    @property
    def max_rel_diff(self) -> float | None:
        diffs = [t.max_rel_diff for t in self.epsilon.values() if t.max_rel_diff is not None]
        return max(diffs) if diffs else None

    def first_problem(self) -> str | None:
        if not self.log.ok:
            return f"{self.log.path} {self.log.failure}"
        if not self.log.signatures_checked:
            return f"{self.log.path}: signatures were not checked (no public key)"
        return str(self.errors[0]) if self.errors else None

    def to_dict(self) -> dict:
        return {"actor": self.actor, "role": self.role, "ok": self.ok, "log": self.log.to_dict(),
                "findings": [f.to_dict() for f in self.findings],
                "epsilon": {d: t.to_dict() for d, t in self.epsilon.items()},
                "max_rel_diff": self.max_rel_diff, "against_coordinator": self.against}


@dataclass
class AuditSummary:
    actors: list[ActorAudit] = field(default_factory=list)
    problems: list[Finding] = field(default_factory=list)   # not tied to one log (missing logs, keys)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.actors) and all(a.ok for a in self.actors)

    def first_problem(self) -> str | None:
        if self.problems:
            return str(self.problems[0].message)
        for actor in self.actors:
            problem = actor.first_problem()
            if problem:
                return f"{actor.actor}: {problem}"
        return None if self.actors else "no logs were checked"

    def to_dict(self) -> dict:
        return {"ok": self.ok, "first_problem": self.first_problem(),
                "problems": [f.to_dict() for f in self.problems], "actors": [a.to_dict() for a in self.actors]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def audit_actor(log: LogReport, expected_actor: str | None = None) -> ActorAudit:
    """Verification plus, for a site, the semantic checks and the ε recomputation."""
    actor = expected_actor or log.actor or Path(log.path).parent.name
    role = COORDINATOR if actor == COORDINATOR else "site"
    audit = ActorAudit(actor, role, log)
    if expected_actor is not None and log.actor is not None and log.actor != expected_actor:
        audit.findings.append(Finding("error", "actor", actor, 1, 0,
                                      f"the log at {log.path} is written by '{log.actor}', not '{expected_actor}'"))
    if role == "site":
        audit.epsilon = recompute(log.entries)
        audit.findings += check_site(log.entries, audit.epsilon, actor)
    return audit


def compare_with_coordinator(site: ActorAudit, coordinator: LogReport) -> None:
    found = check_against(site.log, coordinator, site.actor)
    site.findings += found
    site.against = not any(f.level == "error" for f in found)


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


def discover(run_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Public keys (kit → audit-signing.pub) and logs (actor → audit.jsonl) of a demo run directory."""
    run_dir = Path(run_dir)
    deployment = run_dir / "deployment"
    kits = deployment / "kits"
    if not kits.is_dir():
        raise AuditError(f"{run_dir} has no deployment/kits folder: not the run directory of `carefl demo` (a real "
                         f"coordinator's log: `carefl audit verify --state-dir STATE --kit COORDINATOR_KIT`)")
    keys = {d.name: d / KEY_NAME for d in sorted(kits.iterdir()) if d.is_dir() and d.name != "ca"}
    logs = {COORDINATOR: deployment / COORDINATOR / LOG_NAME}
    sites = deployment / "sites"
    names = set(keys) - {COORDINATOR}
    if sites.is_dir():
        names |= {d.name for d in sites.iterdir() if (d / LOG_NAME).exists()}
    for name in sorted(names):
        logs[name] = sites / name / LOG_NAME
    return keys, logs


def discover_coordinator(state_dir: Path, kit: Path, site_kits: list[Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    """Keys and logs of a real consortium: the coordinator's one audit log for all its runs
    (``<state dir>/audit.jsonl``) with its kit's key, and, for each site kit folder given, that site's log
    and key. A site kit is a folder holding ``audit-signing.pub`` and ``audit.jsonl`` (as a site's kit
    does, or as a site sends them to the auditor); its name is the site id."""
    state_dir, kit = Path(state_dir), Path(kit)
    if not (state_dir / LOG_NAME).is_file():
        raise AuditError(f"{state_dir} holds no {LOG_NAME}: not the --state-dir of a coordinator that ran a study")
    keys, logs = {COORDINATOR: kit / KEY_NAME}, {COORDINATOR: state_dir / LOG_NAME}
    for site in site_kits:
        site = Path(site)
        if not site.is_dir():
            raise AuditError(f"--site {site}: not a folder (give a site's kit folder, with {KEY_NAME} and {LOG_NAME})")
        keys[site.name], logs[site.name] = site / KEY_NAME, site / LOG_NAME
    return keys, logs


def audit_run_dir(run_dir: Path) -> AuditSummary:
    """Every log of a demo run directory, with the public keys of its kits: each log verified,
    each site's checked and compared with the coordinator's."""
    return audit_consortium(*discover(run_dir))


def audit_consortium(keys: dict[str, Path], logs: dict[str, Path]) -> AuditSummary:
    """Every log (actor → audit.jsonl) with its actor's public key (actor → audit-signing.pub): each log
    verified, each site's checked and compared with the coordinator's."""
    summary = AuditSummary()
    for actor, path in logs.items():
        if actor not in keys:
            summary.problems.append(Finding("error", "keys", actor, None, None,
                                            f"{path}: no kit with an audit key for '{actor}'"))
        elif not keys[actor].is_file():
            summary.problems.append(Finding("error", "keys", actor, None, None,
                                            f"kit '{actor}' has no {KEY_NAME} ({keys[actor]})"))
    audits: dict[str, ActorAudit] = {}
    for actor, path in logs.items():
        key = keys.get(actor)
        report = verify_log(path, key if key is not None and key.is_file() else None)
        audits[actor] = audit_actor(report, actor)
    coordinator = audits[COORDINATOR]
    known = set(audits)
    for rec in coordinator.log.entries:
        site = rec["payload"].get("site")
        if rec["event"] in ("update", "site-head") and site not in known:
            coordinator.findings.append(Finding("error", "against", COORDINATOR, rec["seq"] + 1, rec["seq"],
                                                f"{rec['event']} from '{site}', whose log and key were not "
                                                f"given (no kit for it here)"))
    for actor, audit in audits.items():
        if actor != COORDINATOR:
            compare_with_coordinator(audit, coordinator.log)
    summary.actors = [coordinator] + [a for name, a in audits.items() if name != COORDINATOR]
    return summary
