"""The writer of a signed, hash-chained audit log (format: docs/AUDIT.md).

One JSON object per line, UTF-8. Each record holds ``seq``, ``time``, ``actor``, ``event``,
``payload``, ``prev`` (the previous record's hash), ``hash`` (SHA-256 of the canonical JSON of the
six fields before it) and ``sig`` (Ed25519 over the ASCII hex of ``hash``, base64; null without a
key). Several processes may append to one file: "find the head, write the line" runs under an
exclusive ``flock`` of ``<name>.lock``; each record is one ``os.write`` of a whole line on an
O_APPEND descriptor, then fsync. After a crash the chain continues from the last valid record; the
bytes cut to get there are kept beside the log and the cut is itself logged (``log-repair``).
"""

from __future__ import annotations

import base64
import datetime as dt
import errno
import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
HASHED = ("seq", "time", "actor", "event", "payload", "prev")
FIELDS = frozenset(HASHED + ("hash", "sig"))
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
HEX64 = re.compile(r"[0-9a-f]{64}\Z")
CHUNK = 1 << 16


class LogFormatError(ValueError):
    """A line that is not a valid record (the reason is the message)."""


class AuditLogError(RuntimeError):
    """The log cannot be appended to safely (the site should refuse rather than log nothing)."""


def canonical(obj: Any) -> bytes:
    """The one byte encoding of a JSON value used for hashing and for the lines themselves."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def clean(value: Any, where: str = "payload") -> Any:
    """A JSON value for ``value``: NaN/±inf → None, numpy scalars/arrays → Python, tuples → lists.

    Keys must be strings (ints are converted: JSON would do it anyway, after sorting differently).
    Anything else that JSON cannot hold raises TypeError naming where it was.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a string")
            out[str(key)] = clean(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [clean(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # numpy scalars and arrays
        return clean(value.tolist(), where)
    raise TypeError(f"{where}: {type(value).__name__} is not a JSON value")


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical({k: record[k] for k in HASHED})).hexdigest()


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime(TIME_FORMAT)


def parse_line(line: bytes, check_hash: bool = True) -> dict:
    """The record of one line (without its newline); LogFormatError says why it is not one.

    Checks everything a single line can show on its own: UTF-8, a JSON object with exactly the
    record's fields and types, the line being the canonical encoding of that object (so no second
    spelling of the same content passes), and the hash. Chain, signature and order need context.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise LogFormatError("not UTF-8") from None
    try:
        record = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise LogFormatError(f"not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise LogFormatError("not a JSON object")
    if set(record) != FIELDS:
        extra, missing = sorted(set(record) - FIELDS), sorted(FIELDS - set(record))
        raise LogFormatError("fields differ from the format" + (f"; unknown: {', '.join(extra)}" if extra else "")
                             + (f"; missing: {', '.join(missing)}" if missing else ""))
    if type(record["seq"]) is not int or record["seq"] < 0:
        raise LogFormatError("seq is not a non-negative integer")
    if not isinstance(record["time"], str) or not TIME_RE.match(record["time"]):
        raise LogFormatError("time is not UTC ISO-8601 with microseconds and Z")
    try:
        dt.datetime.strptime(record["time"], TIME_FORMAT)
    except ValueError:
        raise LogFormatError(f"time {record['time']} is not a valid date") from None
    for name in ("actor", "event"):
        if not isinstance(record[name], str) or not record[name]:
            raise LogFormatError(f"{name} is not a non-empty string")
    if not isinstance(record["payload"], dict):
        raise LogFormatError("payload is not a JSON object")
    for name in ("prev", "hash"):
        if not isinstance(record[name], str) or not HEX64.match(record[name]):
            raise LogFormatError(f"{name} is not 64 lowercase hex digits")
    if record["sig"] is not None and not isinstance(record["sig"], str):
        raise LogFormatError("sig is neither a string nor null")
    try:
        encoded = canonical(record)
    except (ValueError, RecursionError) as exc:  # e.g. 1e999 parses as inf, which JSON cannot hold
        raise LogFormatError(f"not canonical JSON ({exc})") from None
    if encoded != line:
        raise LogFormatError("the line is not the canonical JSON encoding of its record (edited?)")
    if check_hash and record_hash(record) != record["hash"]:
        raise LogFormatError("hash does not match the record's content (edited?)")
    return record


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def sign(key, digest: str) -> str:
    return base64.b64encode(key.sign(digest.encode("ascii"))).decode("ascii")


def load_signing_key(path: Path):
    """An Ed25519 private key from a PEM (PKCS8, no password) file, as ``carefl provision`` writes it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise AuditLogError(f"audit signing key {path} cannot be read: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise AuditLogError(f"audit signing key {path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AuditLogError(f"audit signing key {path} is not an Ed25519 key")
    return key


def segments_backwards(fd: int, size: int) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, bytes, terminated) of each line from the end of the file towards the start.

    Reads CHUNK bytes at a time from the end, so finding the head costs the length of the last
    lines, not of the file. A last line without "\\n" is yielded first with terminated=False.
    """
    if size == 0:
        return
    terminated = os.pread(fd, 1, size - 1) == b"\n"
    pos = size - 1 if terminated else size
    buf = b""
    while True:
        nl = buf.rfind(b"\n")
        if nl >= 0:
            yield pos + nl + 1, buf[nl + 1:], terminated
            terminated, buf = True, buf[:nl]
            continue
        if pos == 0:
            yield 0, buf, terminated
            return
        step = min(CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf


def find_head(fd: int) -> tuple[dict | None, int, int]:
    """(last valid record, end offset of its line, file size). A line counts when it ends with
    "\\n" and parses as a record; everything after it is what a crash (or worse) left behind."""
    size = os.fstat(fd).st_size
    for offset, data, terminated in segments_backwards(fd, size):
        if not terminated:
            continue
        try:
            return parse_line(data), offset + len(data) + 1, size
        except LogFormatError:
            continue
    return None, 0, size


class AuditLog:
    """Append records to one log file as ``actor``, signed with ``signing_key`` when given."""

    def __init__(self, path: Path, actor: str, signing_key: Path | None = None) -> None:
        if not isinstance(actor, str) or not actor:
            raise ValueError("actor must be a non-empty string")
        self.path = Path(path)
        self.actor = actor
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._key = load_signing_key(signing_key) if signing_key is not None else None
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _locked(self, mode: int) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def head(self) -> dict | None:
        """{"seq", "hash", "sig"} of the last valid record, None if there is none."""
        lock = self._locked(fcntl.LOCK_SH)
        try:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                record, _, _ = find_head(fd)
            finally:
                os.close(fd)
        finally:
            os.close(lock)
        return None if record is None else {"seq": record["seq"], "hash": record["hash"], "sig": record["sig"]}

    def append(self, event: str, payload: dict) -> dict:
        """Write one record and return it (fsynced when this returns)."""
        if not isinstance(event, str) or not event:
            raise ValueError("event must be a non-empty string")
        if not isinstance(payload, dict):
            raise TypeError("payload must be a dict")
        payload = clean(payload)
        canonical(payload)  # fail here, before the lock, on anything JSON cannot hold
        lock = self._locked(fcntl.LOCK_EX)
        try:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                if created:
                    _fsync_dir(self.path.parent)
                head = self._repair(fd)
                return self._write(fd, head, event, payload)
            finally:
                os.close(fd)
        finally:
            os.close(lock)

    def _repair(self, fd: int) -> dict | None:
        """The head; first cutting a torn or invalid tail back to the last valid line."""
        head, end, size = find_head(fd)
        if head is not None and head["actor"] != self.actor:
            raise AuditLogError(f"{self.path} is the audit log of '{head['actor']}', not of '{self.actor}'")
        if end == size:
            return head
        tail = os.pread(fd, size - end, end)
        if head is None and b"\n" in tail:
            raise AuditLogError(f"{self.path} holds no valid audit record; refusing to overwrite it "
                                f"(move it aside)")
        saved = self.path.with_name(f"{self.path.name}.cut-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}")
        with open(saved, "xb") as fh:  # the cut bytes are evidence: keep them
            fh.write(tail)
            fh.flush()
            os.fsync(fh.fileno())
        os.ftruncate(fd, end)
        os.fsync(fd)
        _fsync_dir(self.path.parent)
        return self._write(fd, head, "log-repair", {
            "cut_bytes": len(tail), "cut_sha256": hashlib.sha256(tail).hexdigest(), "saved_as": saved.name,
            "reason": "the log did not end with a complete valid record (interrupted write?)"})

    def _write(self, fd: int, head: dict | None, event: str, payload: dict) -> dict:
        now = utc_now()
        if head is not None and now < head["time"]:
            now = head["time"]  # a clock stepped back: keep the log's time order
        record = {"seq": 0 if head is None else head["seq"] + 1, "time": now, "actor": self.actor,
                  "event": event, "payload": payload, "prev": GENESIS if head is None else head["hash"]}
        record["hash"] = record_hash(record)
        record["sig"] = sign(self._key, record["hash"]) if self._key is not None else None
        line = canonical(record) + b"\n"
        start = os.fstat(fd).st_size
        written = os.write(fd, line)
        if written != len(line):  # disk full: leave no partial line behind
            os.ftruncate(fd, start)
            raise AuditLogError(f"{self.path}: short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
        return record


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
