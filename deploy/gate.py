"""The site's code gate: the SuperNode itself refuses messages of apps the site has not approved.

``python -m deploy.gate SITE_TOML <flower-supernode arguments>`` runs Flower's own SuperNode with
one change: before a pulled message is stored (so before any ClientApp process is launched or any
FAB is installed), the gate looks up the run's FAB hash and checks it against ``[approval] apps`` of
the site config, re-read for every message so approvals and revocations apply at once. An
unapproved run gets an error reply naming the hash it saw; nothing else is computed or sent. For
approved runs it also checks that the FAB the SuperLink hands over really has that hash.

The gate runs in the SuperNode process, not in the app it judges, so the app cannot skip it. It
hooks a private function of flwr 1.41 (``start_client_internal._pull_and_store_message``), the
same place where Flower checks its own Hub signatures; ``check_seam`` fails loudly if a Flower
upgrade moves it. Limits: docs/SECURITY.md.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from pathlib import Path

from deploy.approval import ApprovalError, approved_apps

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

NOT_APPROVED = 4005  # error code in the reply, beside the ClientApp's 4001-4004
log = logging.getLogger("carefl.gate")
SEAM_PARAMS = ["state", "object_store", "node_config", "receive", "get_run", "get_fab", "pull_object",
               "confirm_message_received", "trusted_entities"]


class FabMismatch(RuntimeError):
    pass


def check_seam():
    """The Flower function the gate wraps, after checking it still has the expected shape."""
    from flwr.supernode import start_client_internal as sci
    original = getattr(sci, "_pull_and_store_message", None)
    if original is None or list(inspect.signature(original).parameters) != SEAM_PARAMS \
            or not hasattr(sci, "_insert_message"):
        raise RuntimeError("this flwr version has no _pull_and_store_message seam the carefl gate knows; "
                           "refusing to start a SuperNode without the site's code gate")
    return sci, original


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
        return str(tomllib.loads(site_config.read_text(encoding="utf-8"))["site"]["id"])
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return "?"


def install(site_config: Path, audit=None) -> None:
    """Wrap Flower's message intake in the approval check (in this process only).

    ``audit``: the site's AuditLog; every message is logged with the app hash and the decision.
    """
    sci, original = check_seam()
    from flwr.app import Error, Message
    from flwr.supercore.run import RunNotRunningException

    from client.audit import log_refusal, message_fields

    def gated(state, object_store, node_config, receive, get_run, get_fab, pull_object,
              confirm_message_received, trusted_entities):
        received = receive()
        if received is None:
            return None
        message = received[0]
        run_id = message.metadata.run_id
        try:
            run = state.get_run(run_id) or get_run(run_id)
        except RunNotRunningException:  # the run ended meanwhile (e.g. coordinator restarted): as Flower does
            log.info("ignoring a %s message of run %s, which is no longer running",
                     message.metadata.message_type, run_id)
            return None
        reason = refusal_reason(site_config, run.fab_hash)
        if audit is not None:
            audit.append("message", {**message_fields(message), "app_sha256": run.fab_hash,
                                     "approved": reason is None})
        if reason is None:
            def get_checked_fab(fab_hash: str, rid: int):
                fab = get_fab(fab_hash, rid)
                if hashlib.sha256(fab.content).hexdigest() != fab_hash:
                    raise FabMismatch(fab_hash)
                return fab
            try:
                return original(state, object_store, node_config, lambda: received, get_run, get_checked_fab,
                                pull_object, confirm_message_received, trusted_entities)
            except FabMismatch:
                reason = f"the FAB served for app sha256:{run.fab_hash} does not have that hash"
        log.warning("refused %s message of run %s: %s", message.metadata.message_type, run_id, reason)
        log_refusal(audit, message, NOT_APPROVED, reason)
        sci._insert_message(Message(Error(NOT_APPROVED, reason), reply_to=message), state, object_store)
        return run_id

    sci._pull_and_store_message = gated


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.exit("usage: python -m deploy.gate SITE_TOML [--audit-key KEY] [flower-supernode arguments]")
    site_config = Path(argv.pop(0)).resolve()
    audit_key = None
    if argv[:1] == ["--audit-key"]:
        audit_key = Path(argv[1])
        del argv[:2]
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s carefl-gate: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    from client.site import load_site_config
    from privacy.audit import AuditLog
    site = load_site_config(site_config)
    install(site_config, AuditLog(site.audit_log, site.site_id, audit_key) if site.audit_log else None)
    from flwr.supernode.cli import flower_supernode
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
