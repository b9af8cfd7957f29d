"""What an audit hands back, as plain data: the verdict on one log's chain (``LogReport``, its first
``Failure``), the problems the content checks find (``Finding``), one participant's audit
(``ActorAudit``) and the whole audit (``AuditSummary``), with their text and JSON forms.

They sit apart from the code that fills them so that the chain verifier, the content checks, the
entry point (verify.py), the HTML report and the command line share one vocabulary without
importing each other's logic. ``AuditError`` is the other outcome: no verdict at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from privacy.auditor.epsilon import DatasetEpsilon

COORDINATOR = "coordinator"   # the coordinator's actor name in its log, and its role


class AuditError(ValueError):
    """A problem with what the auditor asked for (unreadable key, not a run directory): no verdict."""


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


@dataclass
class Finding:
    """A semantic or cross-log problem. ``level`` error fails the audit; warning is reported only."""
    level: str
    check: str
    log: str          # the actor whose log the line is in
    line: int | None
    seq: int | None
    message: str

    @classmethod
    def at(cls, level: str, check: str, log: str, seq: int | None, message: str) -> Finding:
        """A finding about record ``seq`` of a verified log (on line seq + 1), or, with None, the whole log."""
        return cls(level, check, log, None if seq is None else seq + 1, seq, message)

    def __str__(self) -> str:
        where = f"{self.log} log" + (f" line {self.line} (seq {self.seq})" if self.line is not None else "")
        return f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"level": self.level, "check": self.check, "log": self.log, "line": self.line, "seq": self.seq,
                "message": self.message}


def failing(findings: list[Finding]) -> list[Finding]:
    """The findings that fail the audit."""
    return [f for f in findings if f.level == "error"]


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
        return failing(self.findings)

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
