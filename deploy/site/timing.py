"""Per-message timestamps at a site, ``<work dir>/timing.jsonl``: one place for the record format
that the gate (pulled, approved, stored or refused, reply ready, sent) and the warm executor's
children (acquired, app loaded, handler start/end, pushed) write, and that benchmarks and tests merge
by message id (docs/BENCHMARKS.md, "Framework overhead"). Ids and wall-clock seconds only; nothing of
it leaves the site.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from deploy.site import flower_seam as seam

TIMING_FILE = "timing.jsonl"  # in the gate's work directory


def append_timing(path: Path, record: dict) -> None:
    """One JSON line (timestamps, ids; no data) appended with a single write."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def message_ids(message) -> dict:
    """What a timing record says about its message: ids, type and round (Flower's group id)."""
    group = message.metadata.group_id or ""
    return {"message_id": message.metadata.message_id, "run_id": message.metadata.run_id,
            "type": str(message.metadata.message_type), "round": int(group) if group.isdigit() else None}


class Timings(dict):
    """A record filled in step by step (the warm executor's child writes it once, at its end)."""

    def mark(self, key: str) -> None:
        self[key] = time.time()


def note_message(timing_log: Path | None, message, **times) -> None:
    """The gate's line for one pulled message (``times``: pulled, approved, stored or refused)."""
    if timing_log is not None:
        append_timing(timing_log, {"source": "gate", **message_ids(message), **times})


def time_replies(timing_log: Path) -> None:
    """Note when the SuperNode found a reply ready (Flower polls every 0.5 s) and when it was sent."""

    def timed(push):
        def timed_push(state, object_store, send, push_object):
            found = []

            def timed_send(message, object_tree, runtime):
                found.append((message.metadata.reply_to_message_id, time.time()))
                return send(message, object_tree, runtime)

            try:
                return push(state, object_store, timed_send, push_object)
            finally:
                sent = time.time()
                for message_id, ready in found:
                    append_timing(timing_log, {"source": "gate", "message_id": message_id, "reply_ready": ready,
                                               "sent": sent})
        return timed_push

    seam.wrap_reply_push(timed)
