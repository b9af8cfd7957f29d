"""The gate's egress guard: every reply the SuperNode sends passes the site's egress rules first.

Kept apart from the rules (egress.py) because this is plumbing: at intake it records what each
message the site received carries (type, round, the model's array names, shapes and dtypes); before
the SuperNode pushes a reply it reads the reply whole from the SuperNode's own object store, asks
``egress.check_reply``, and sends it unchanged, or — blocked — puts an error reply with a fixed reason
in its place and writes the block to the site's signed audit log (``egress-blocked``: the rule and
which key or record, never a value). The run goes on without that reply. It runs in the SuperNode
process, like the approval check, so the app it judges cannot skip it. Limits: docs/PRIVACY.md.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from flwr.app import Error

from client.errors import SiteError
from client.site import load_site_config
from deploy.site import egress
from deploy.site import flower_seam as seam
from deploy.site.timing import append_timing

log = logging.getLogger("carefl.gate")
REPLY_WAIT = 600.0  # seconds to wait for a ClientApp to push its reply's objects before blocking it


def instruction_of(message, contents: dict[str, bytes]) -> egress.Instruction:
    """What the reply to ``message`` may return: its type, round, and the arrays it carried."""
    group = message.metadata.group_id or ""
    kind, server_round = str(message.metadata.message_type), int(group) if group.isdigit() else None
    arrays: dict = {}
    size = 0
    if message.metadata.message_id not in contents:  # nothing of it was stored (refused by the approval check)
        return egress.Instruction(kind, server_round)
    secure = False
    try:
        full = seam.inflate_message(message.metadata.message_id, contents)
        config = full.content.config_records.get("config")
        secure = bool(config.get("secure-aggregation", False)) if config is not None else False
        for record in full.content.array_records.values():
            for name, array in record.items():
                arrays[name] = (tuple(array.shape), str(array.dtype))
                size += len(array.data)
    except Exception:  # noqa: BLE001 - a message the guard cannot read returns nothing with arrays (fail closed)
        log.warning("egress guard: could not read the arrays of a %s message; its reply may carry none", kind)
        arrays, size, secure = {}, 0, False
    return egress.Instruction(kind, server_round, arrays, size, secure)


class Guard:
    """The guard's state in the SuperNode: instructions seen, the site config, the audit log."""

    def __init__(self, site_config: Path, audit=None, timing_log: Path | None = None) -> None:
        self.site_config, self.audit, self.timing_log = site_config, audit, timing_log
        self.instructions: dict[str, egress.Instruction] = {}
        self._lock = threading.Lock()

    def on_stored(self, message, contents: dict[str, bytes]) -> None:
        """At intake: remember what the reply to ``message`` may return (never raises: it runs in the
        SuperNode's main loop; a message it could not read gets replies without arrays only)."""
        instruction = instruction_of(message, contents)
        with self._lock:
            self.instructions[message.metadata.message_id] = instruction

    def checked(self, reply, state, object_store):
        """Before the push: ``reply`` if it may leave, else the error reply now in its place. Runs in the
        SuperNode's main loop, so nothing may escape it: an unexpected failure blocks the reply."""
        try:
            return self._checked(reply, state, object_store)
        except Exception:  # noqa: BLE001 - fail closed: the reply does not leave; the details stay in the site's log
            log.exception("egress guard failed on a %s reply; it is blocked", reply.metadata.message_type)
            return seam.replace_reply(reply, Error(egress.BLOCKED, f"{egress.SITE_CODES[egress.BLOCKED]} "
                                                                  "(rule: guard-error)"), state, object_store)

    def _checked(self, reply, state, object_store):
        started = time.perf_counter()
        with self._lock:
            instruction = self.instructions.pop(reply.metadata.reply_to_message_id, None)
        run_id = reply.metadata.run_id
        verdict = self._verdict(reply, instruction, state, object_store, run_id)
        if self.timing_log is not None:
            append_timing(self.timing_log, {"source": "gate", "message_id": reply.metadata.reply_to_message_id,
                                            "egress_s": time.perf_counter() - started,
                                            "egress_blocked": verdict.rule is not None})
        if verdict.rule is None:
            return reply
        code = reply.error.code if reply.has_error() else egress.BLOCKED
        reason = verdict.reworded or f"{egress.SITE_CODES[egress.BLOCKED]} (rule: {verdict.rule})"
        log.warning("egress guard %s a %s reply of run %s: %s", "reworded" if verdict.reworded else "blocked",
                    reply.metadata.message_type, run_id, verdict.reason)
        if self.audit is not None:
            group = reply.metadata.group_id or ""
            self.audit.append("egress-blocked", {
                "run_id": str(run_id), "round": int(group) if group.isdigit() else None,
                "message_type": str(reply.metadata.message_type), "rule": verdict.rule, "why": verdict.reason,
                "sent_instead": {"code": code, "reason": reason}})
        return seam.replace_reply(reply, Error(code, reason), state, object_store)

    def _verdict(self, reply, instruction, state, object_store, run_id: int) -> egress.Verdict:
        try:
            site = load_site_config(self.site_config)
        except SiteError:
            return egress.Verdict("site-config", "the site's config cannot be read; nothing with content leaves")
        if reply.has_error():
            return egress.check_reply(egress.Reply(reply, 0), instruction, site, {}, run_id)
        whole = seam.reply_with_content(reply, object_store, REPLY_WAIT)
        if whole is None:
            return egress.Verdict("incomplete", f"the reply's content did not arrive within {REPLY_WAIT:g} s")
        run_config = seam.run_config_of(state, run_id)
        if run_config is None:
            return egress.Verdict("run", "the run's config is not known at this site")
        return egress.check_reply(egress.Reply(*whole), instruction, site, run_config, run_id)


def install(site_config: Path, audit=None, timing_log: Path | None = None) -> Guard:
    """Wrap the SuperNode's message intake and reply push in the egress guard (this process only).
    Install after the approval hook: its intake then runs inside this one."""
    guard = Guard(site_config, audit, timing_log)
    seam.observe_intake(guard.on_stored)
    seam.check_replies_before_push(guard.checked)
    return guard
