"""The site's code gate: the SuperNode itself refuses messages of apps the site has not approved.

``python -m deploy.site.gate SITE_TOML [--audit-key KEY] [--warm] [--work-dir DIR] <flower-supernode
arguments>`` runs Flower's own SuperNode with one change: before a pulled message is stored (so before
any ClientApp process is launched or any FAB is installed), the gate looks up the run's FAB hash and
checks it against ``[approval] apps`` of the site config, re-read for every message so approvals and
revocations apply at once. An unapproved run gets an error reply naming the hash it saw; nothing else
is computed or sent. For approved runs it also checks that the FAB the SuperLink hands over really has
that hash.

The gate runs in the SuperNode process, not in the app it judges, so the app cannot skip it. It
hooks a private function of flwr 1.41 (``start_client_internal._pull_and_store_message``), the
same place where Flower checks its own Hub signatures; ``check_seam`` fails loudly if a Flower
upgrade moves it. Limits: docs/SECURITY.md.

Two things keep a site reconnecting after coordinator outages (docs/OPERATIONS.md): when Flower gives
up on a lost SuperLink, the gate exits (Flower alone would hang on its Runtime API thread) so the site
agent can start a new SuperNode once the coordinator answers; and a new SuperNode first ends the
site's own previous session if the SuperLink still holds it open (``end_stale_sessions``).

``--warm`` runs the SuperNode with ``--isolation process`` and starts, as its child, the site's warm
SuperExec (deploy/site/warm.py): ClientApps are forked from a process with the libraries already
imported instead of a new ``flwr-clientapp`` interpreter per message. The gate is the same in both
modes: a refused message never becomes a task, so no executor can ever pick it up. With
``--work-dir`` the gate appends per-message timestamps (pulled, stored, reply sent; ids only) to
``DIR/timing.jsonl``, and the warm executor's children add theirs.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from deploy.site.approval import ApprovalError, approved_apps

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

NOT_APPROVED = 4005  # error code in the reply, beside the ClientApp's 4001-4004
NODE_ID_FILE = "node-id"  # in the work directory: the node id of this site's last session
log = logging.getLogger("carefl.gate")
SEAM_PARAMS = ["state", "object_store", "node_config", "receive", "get_run", "get_fab", "pull_object",
               "confirm_message_received", "trusted_entities"]


class FabMismatch(RuntimeError):
    pass


def check_seam():
    """The Flower function the gate wraps, after checking it still has the expected shape."""
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.fleet_http_client import FleetHttpClient
    original = getattr(sci, "_pull_and_store_message", None)
    if original is None or list(inspect.signature(original).parameters) != SEAM_PARAMS \
            or not hasattr(sci, "_insert_message") \
            or not all(callable(getattr(FleetHttpClient, m, None)) for m in ("ActivateNode", "DeactivateNode")):
        raise RuntimeError("this flwr version has no _pull_and_store_message seam the carefl gate knows; "
                           "refusing to start a SuperNode without the site's code gate")
    return sci, original


def end_stale_sessions(node_id_file: Path) -> None:
    """Let a restarting site end its own previous session, which the SuperLink keeps "online" until the
    old session's heartbeat expires (2 × 30 s): Flower refuses to activate a node it thinks is online,
    so without this a site that restarts (after a crash, or after the coordinator came back from an
    outage) would be refused for up to a minute, while ``carefl coordinator status`` shows the dead
    session online. The node id of each activation is kept in ``node_id_file``; when an activation is
    refused, the gate deactivates that node id with a request signed by the site's own key (the
    SuperLink accepts it only for the node that key belongs to), then activates once more.
    """
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supernode.fleet_http_client import FleetHttpClient

    activate = FleetHttpClient.ActivateNode

    def activate_ending_stale_session(client, request):
        try:
            response = activate(client, request)
        except httpx.HTTPStatusError as exc:
            previous = _read_node_id(node_id_file)
            if exc.response.status_code != 412 or previous is None:
                raise
            log.info("the coordinator still holds this site's previous session (node %s) open; ending it", previous)
            try:
                client.DeactivateNode(DeactivateNodeRequest(node_id=previous))
            except httpx.HTTPError:
                raise exc from None  # not our node, or not online after all: the original refusal stands
            response = activate(client, request)
        _write_node_id(node_id_file, response.node_id)
        return response

    FleetHttpClient.ActivateNode = activate_ending_stale_session


def _read_node_id(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_node_id(path: Path, node_id: int) -> None:
    if _read_node_id(path) != node_id:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{node_id}\n")
        tmp.replace(path)


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


def install(site_config: Path, audit=None, timing_log: Path | None = None) -> None:
    """Wrap Flower's message intake in the approval check (in this process only).

    ``audit``: the site's AuditLog; every message is logged with the app hash and the decision.
    ``timing_log``: where to append when each message was pulled, stored and its reply sent.
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
        pulled = time.time()
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
            approved_at = time.time()

            def get_checked_fab(fab_hash: str, rid: int):
                fab = get_fab(fab_hash, rid)
                if hashlib.sha256(fab.content).hexdigest() != fab_hash:
                    raise FabMismatch(fab_hash)
                return fab
            try:
                result = original(state, object_store, node_config, lambda: received, get_run, get_checked_fab,
                                  pull_object, confirm_message_received, trusted_entities)
                _note(timing_log, message, pulled=pulled, approved=approved_at, stored=time.time())
                return result
            except FabMismatch:
                reason = f"the FAB served for app sha256:{run.fab_hash} does not have that hash"
        log.warning("refused %s message of run %s: %s", message.metadata.message_type, run_id, reason)
        log_refusal(audit, message, NOT_APPROVED, reason)
        sci._insert_message(Message(Error(NOT_APPROVED, reason), reply_to=message), state, object_store)
        _note(timing_log, message, pulled=pulled, refused=time.time())
        return run_id

    sci._pull_and_store_message = gated
    if timing_log is not None:
        _time_replies(sci, timing_log)


def _note(timing_log: Path | None, message, **times) -> None:
    if timing_log is None:
        return
    from deploy.site.warm import append_timing
    group = message.metadata.group_id or ""
    append_timing(timing_log, {"source": "gate", "message_id": message.metadata.message_id,
                               "run_id": message.metadata.run_id, "type": str(message.metadata.message_type),
                               "round": int(group) if group.isdigit() else None, **times})


def _time_replies(sci, timing_log: Path) -> None:
    """Note when a reply was found ready (Flower polls every 0.5 s) and when it was sent."""
    from deploy.site.warm import append_timing
    push = sci._push_messages

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

    sci._push_messages = timed_push


def start_warm_executor(argv: list[str], work_dir: Path) -> list[str]:
    """Start the warm SuperExec (deploy/site/warm.py) for this SuperNode; return the SuperNode's arguments.

    The SuperNode then runs with ``--isolation process`` (it launches nothing itself) and an HMAC
    secret (new at every start, 0600, in the work directory) that the executor must present to acquire
    tasks. The executor runs in this process group and stops when this process ends.
    """
    port = argv[argv.index("--port") + 1] if "--port" in argv else "9094"
    secret = work_dir / "superexec-auth.secret"
    secret.unlink(missing_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    subprocess.Popen([sys.executable, "-m", "deploy.site.warm", "--runtime-api-address", f"127.0.0.1:{port}",
                      "--superexec-auth-secret-file", str(secret), "--parent-pid", str(os.getpid()),
                      "--timing-log", str(work_dir / "timing.jsonl")], stdin=subprocess.DEVNULL)
    return [*argv, "--isolation", "process", "--superexec-auth-secret-file", str(secret)]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.exit("usage: python -m deploy.site.gate SITE_TOML [--audit-key KEY] [--warm] [--work-dir DIR] "
                 "[flower-supernode arguments]")
    site_config = Path(argv.pop(0)).resolve()
    audit_key, warm, work_dir = None, False, None
    while argv[:1] in (["--audit-key"], ["--warm"], ["--work-dir"]):
        if argv[0] == "--warm":
            warm = True
            del argv[:1]
            continue
        if argv[0] == "--audit-key":
            audit_key = Path(argv[1])
        else:
            work_dir = Path(argv[1]).resolve()
        del argv[:2]
    timing_log = None
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        timing_log = work_dir / "timing.jsonl"
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s carefl-gate: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if warm:  # first: its library imports then overlap with the gate's own
        from deploy.site import warm as warm_executor
        try:
            warm_executor.check_seam()
            argv = start_warm_executor(argv, work_dir or Path.cwd())
        except RuntimeError as exc:  # a Flower upgrade moved what the executor hooks: stay with Flower's own
            log.warning("%s; starting a new flwr-clientapp per message instead", exc)
    from client.site import load_site_config
    from privacy.audit import AuditLog
    site = load_site_config(site_config)
    # opacus (imported with the site's privacy code) calls logging.basicConfig at import; without this,
    # every Flower DEBUG record (one per Runtime API call) would be copied to the SuperNode's log.
    logging.getLogger("flwr").propagate = False
    install(site_config, AuditLog(site.audit_log, site.site_id, audit_key) if site.audit_log else None, timing_log)
    if work_dir is not None:
        end_stale_sessions(work_dir / NODE_ID_FILE)
    from flwr.supercore.exit import ExitCode, flwr_exit
    from flwr.supernode.cli import flower_supernode

    from deploy.site.warm import exit_without_teardown
    exit_without_teardown()  # after Flower's own exit handlers (audit records are already on disk)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    # Flower returns here when it gave up on a lost SuperLink (its retries ran out mid-session). Left to
    # itself the process would never end: its Runtime API thread is stopped only by flwr_exit's handlers.
    # Exit through them, so the site agent sees the exit and reconnects once the coordinator is back.
    flwr_exit(ExitCode.SUPERNODE_CONNECTION_ERROR, "carefl-gate: the connection to the SuperLink was lost "
              "and Flower stopped retrying; the site agent reconnects when the coordinator answers again")


if __name__ == "__main__":
    main()
