"""The chain verifier: read one audit log line by line and stop at the first record whose format,
seq, prev link, hash, signature, actor or time does not hold (format: docs/AUDIT.md).

Apart from the content checks (checks.py) because it needs nothing but the file and the writer's
public key, and everything else builds on what it found: only the records before the first
failure (``LogReport.entries``) are ever checked further.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from privacy.audit.log import GENESIS, LogFormatError, parse_line, record_hash
from privacy.auditor.keys import fingerprint, load_public_key, signature_ok
from privacy.auditor.results import Failure, LogReport


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
    data, unreadable = _read(path)
    if unreadable is not None:
        report.failure = Failure(None, None, unreadable)
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


def _read(path: Path) -> tuple[bytes, str | None]:
    """The log's bytes, or why there are none to check (missing, unreadable, empty)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return b"", f"log file {path} does not exist"
    except OSError as exc:
        return b"", f"log file {path} cannot be read: {exc.strerror}"
    return data, None if data else f"log file {path} is empty (no records)"


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
