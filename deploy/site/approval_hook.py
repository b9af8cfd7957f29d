"""The gate's approval hook: the SuperNode itself refuses messages of apps the site has not approved.

Kept apart from the gate's process plumbing (gate.py) because this is the security decision: before a
pulled message is stored (so before any FAB is installed or any ClientApp task exists), it looks up
the run's FAB hash and checks it against ``[approval] apps`` of the site config, re-read for every
message so approvals and revocations apply at once. An unapproved run gets an error reply naming the
hash it saw; nothing else is computed or sent. For approved runs it also checks that the FAB the
SuperLink hands over really has that hash. It hooks the SuperNode's message intake (the same place
where Flower checks its own Hub signatures) through deploy/site/flower_seam.py. Limits: docs/SECURITY.md.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from flwr.app import Error, Message

from client.errors import SiteError
from client.site import read_site_toml

from deploy.site import flower_seam as seam
from deploy.site.approval import ApprovalError, approved_apps
from deploy.site.timing import note_message, time_replies

NOT_APPROVED = 4005  # error code in the reply, beside the ClientApp's 4001-4004
log = logging.getLogger("carefl.gate")


class FabMismatch(RuntimeError):
    pass


def check_seam():
    """The Flower module holding the message intake the gate wraps, and that intake (checked at import
    by the seam: still where, and with the parameters, the gate expects)."""
    return seam.message_intake()


def refusal_reason(site_config: Path, fab_hash: str) -> str | None:
    """None when the app is approved; else the reason sent back (it names the hash, nothing else)."""
    try:
        approved = approved_apps(site_config)
    except ApprovalError as exc:
        log.error("%s", exc)
        return "the site's approval list cannot be read; it refuses every app until fixed"
    if fab_hash in approved:
        return None
    return (f"site {_site_id(site_config)}: app sha256:{fab_hash} is not approved "
            f"(the site approves it with `carefl site approve {fab_hash}`)")


def _site_id(site_config: Path) -> str:
    try:
        return str(read_site_toml(site_config)["site"]["id"])
    except (SiteError, KeyError, TypeError):
        return "?"


def install(site_config: Path, audit=None, timing_log: Path | None = None) -> None:
    """Wrap Flower's message intake in the approval check (in this process only).

    ``audit``: the site's AuditLog; every message is logged with the app hash and the decision.
    ``timing_log``: where to append when each message was pulled, stored and its reply sent.
    """
    from client.audit import log_refusal, message_fields

    def gate(original):
        def gated(state, object_store, node_config, receive, get_run, get_fab, pull_object,
                  confirm_message_received, trusted_entities):
            received = receive()
            if received is None:
                return None
            pulled = time.time()
            message = received[0]
            run_id = message.metadata.run_id
            try:
                run = state.get_run(run_id) or get_run(run_id)
            except seam.RunNotRunningException:  # the run ended meanwhile (e.g. coordinator restarted): as Flower
                log.info("ignoring a %s message of run %s, which is no longer running",
                         message.metadata.message_type, run_id)
                return None
            reason = refusal_reason(site_config, run.fab_hash)
            if audit is not None:
                audit.append("message", {**message_fields(message), "app_sha256": run.fab_hash,
                                         "approved": reason is None})
            if reason is None:
                approved_at = time.time()

                def get_checked_fab(fab_hash: str, rid: int):
                    fab = get_fab(fab_hash, rid)
                    if hashlib.sha256(fab.content).hexdigest() != fab_hash:
                        raise FabMismatch(fab_hash)
                    return fab
                try:
                    result = original(state, object_store, node_config, lambda: received, get_run,
                                      get_checked_fab, pull_object, confirm_message_received, trusted_entities)
                    note_message(timing_log, message, pulled=pulled, approved=approved_at, stored=time.time())
                    return result
                except FabMismatch:
                    reason = f"the FAB served for app sha256:{run.fab_hash} does not have that hash"
            log.warning("refused %s message of run %s: %s", message.metadata.message_type, run_id, reason)
            log_refusal(audit, message, NOT_APPROVED, reason)
            seam.insert_reply(Message(Error(NOT_APPROVED, reason), reply_to=message), state, object_store)
            note_message(timing_log, message, pulled=pulled, refused=time.time())
            return run_id
        return gated

    seam.wrap_message_intake(gate)
    if timing_log is not None:
        time_replies(timing_log)
