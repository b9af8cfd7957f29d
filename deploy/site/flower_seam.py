"""Everything carefl's site runtime takes from Flower beyond its public app API, in one place.

(Over 400 lines on purpose: it is the one file a Flower upgrade reviews for the site runtime, and its
import-time probes sit beside every hook they guard; split, the two could drift apart unnoticed.)

The code gate (approval_hook.py, stale_session.py, timing.py, gate.py), the warm executor (warm.py)
and the approval list (approval.py) hook into Flower's SuperNode and SuperExec, and the tools that run
Flower's machinery without a SuperLink (deploy/demo/inprocess.py, benchmarks/aggregation.py) set its
task identity and transport format. None of that is Flower API (``flwr.app``, ``flwr.clientapp``,
``flwr.serverapp``): private functions, internal classes, patched methods, a local variable of
``flwr_exit``. They are imported, probed and patched here and nowhere else, so a Flower upgrade means
reviewing this file (and server/flower_seam.py, its counterpart inside the app bundle).

At import this module checks that the installed flwr is the series it was written against
(``FlowerVersionError``) and that every internal it uses exists with the shape used
(``FlowerSeamError``); both are ImportErrors, so the gate refuses to start a SuperNode rather than run
one without the site's code gate. What the warm executor relies on inside Flower's functions is
probed at import too, but a mismatch there only rules out warm mode: ``WARM_PROBLEMS`` lists it, the
gate logs it and falls back to Flower's own per-message processes, and the executor refuses to run
(``require_warm_executor_seam``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
import os
import sys
from pathlib import Path
from typing import Callable

import flwr

from server.flower_seam import FLOWER_LOCKED, FLOWER_SERIES, FlowerSeamError, FlowerVersionError
from server.flower_seam import check_flower_version as _check_version
from server.flower_seam import seam_error

SEAM_FILE = "deploy/site/flower_seam.py"


def check_flower_version(installed: str) -> None:
    """Raise ``FlowerVersionError`` unless ``installed`` is the Flower series both seams were written against."""
    _check_version(installed, "carefl's site runtime uses", SEAM_FILE)


def _seam_error(problems: list[str]) -> FlowerSeamError:
    return seam_error(problems, SEAM_FILE, "the site refuses to start a SuperNode without its code gate")


check_flower_version(flwr.__version__)

try:
    from flwr.cli.build import build_fab_from_disk  # Flower's own FAB builder: the bytes whose hash `flwr run` sends
    from flwr.clientapp.client_app import ClientApp, LoadClientAppError
    from flwr.common.config import get_project_dir
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.constant import TaskType
    from flwr.supercore.exit import ExitCode, add_exit_handler, exit_handler, flwr_exit
    from flwr.app.message.message import make_message
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, iterate_object_tree
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.object_store import ObjectStore
    from flwr.supercore.run import RunNotRunningException
    from flwr.supercore.superexec import run_superexec as _superexec
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, Executor, LaunchResult
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supercore.utils import disable_process_dumping
    from flwr.supernode import start_client_internal as _supernode
    from flwr.supernode.cli import flower_supernode
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.nodestate.nodestate import NodeState
    from flwr.supernode.runtime import run_clientapp as _clientapp_runtime
except ImportError as _exc:
    raise _seam_error([f"cannot import {_exc.name or _exc}"]) from _exc

__all__ = [
    "FLOWER_SERIES", "FLOWER_LOCKED", "FlowerVersionError", "FlowerSeamError", "check_flower_version",
    # gate
    "INTAKE_PARAMS", "RunNotRunningException", "message_intake", "wrap_message_intake", "insert_reply",
    "wrap_reply_push", "observe_intake", "check_replies_before_push", "reply_with_content", "replace_reply",
    "inflate_message", "run_config_of", "wrap_node_activation", "deactivate_node", "run_supernode", "exit_connection_lost",
    "exit_without_teardown",
    # warm executor
    "WARM_PROBLEMS", "require_warm_executor_seam", "clear_exit_handlers", "wrap_client_app_loader",
    "wrap_client_app_call", "wrap_clientapp_reply_push", "installed_app_dir", "LoadClientAppError",
    "run_clientapp_task", "SubprocessExecutor", "LaunchResult", "TaskType", "run_superexec_with",
    "disable_process_dumping", "load_superexec_auth_secret",
    # approval list, demo, benchmarks
    "build_fab_from_disk", "set_task_identity", "as_transported",
]


# -- probes: fail loudly at import, not later ---------------------------------------------------------
INTAKE_PARAMS = ["state", "object_store", "node_config", "receive", "get_run", "get_fab", "pull_object",
                 "confirm_message_received", "trusted_entities"]
_PUSH_PARAMS = ["state", "object_store", "send", "push_object"]
_SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def _params(fn) -> list[str] | None:
    return list(inspect.signature(fn).parameters) if callable(fn) else None


def _required_problems() -> list[str]:
    """What the gate (a SuperNode with the site's code gate) and the other users cannot do without."""
    problems = []
    if _params(getattr(_supernode, "_pull_and_store_message", None)) != INTAKE_PARAMS:
        problems.append("start_client_internal._pull_and_store_message (the message intake the gate wraps) "
                        "is missing or has other parameters")
    if not callable(getattr(_supernode, "_insert_message", None)):
        problems.append("start_client_internal._insert_message (stores the gate's refusal reply) is missing")
    if _params(getattr(_supernode, "_push_messages", None)) != _PUSH_PARAMS:
        problems.append("start_client_internal._push_messages (reply push, timed) is missing or changed")
    if not all(callable(getattr(NodeState, m, None)) for m in ("get_messages_legacy", "delete_messages", "get_run",
                                                                "get_run_series_context")):
        problems.append("NodeState lost a method the egress guard uses (get_messages_legacy, delete_messages, "
                        "get_run, get_run_series_context)")
    if not all(callable(getattr(ObjectStore, m, None)) for m in ("get_object_tree", "get", "delete")):
        problems.append("ObjectStore lost get_object_tree, get or delete (the egress guard reads replies there)")
    if not all(callable(getattr(FleetHttpClient, m, None)) for m in ("ActivateNode", "DeactivateNode")):
        problems.append("FleetHttpClient.ActivateNode/DeactivateNode (ending a stale session) are missing")
    if not hasattr(ExitCode, "SUPERNODE_CONNECTION_ERROR"):
        problems.append("ExitCode.SUPERNODE_CONNECTION_ERROR is missing")
    if "sys_exit_code" not in flwr_exit.__code__.co_varnames + flwr_exit.__code__.co_cellvars:
        problems.append("flwr_exit no longer holds its exit code in `sys_exit_code` (exit_without_teardown)")
    if not isinstance(getattr(exit_handler, "registered_exit_handlers", None), list):
        problems.append("the exit-handler registry (exit_handler.registered_exit_handlers) moved")
    for name in ("task_id", "run_id", "node_id"):
        prop = getattr(type(TaskIdentity), name, None)
        if not (isinstance(prop, property) and prop.fset is not None):
            problems.append(f"TaskIdentity.{name} is no longer a settable class-level property")
    return problems


def _warm_problems() -> list[str]:
    """What only the warm executor relies on: Flower's SuperExec loop and ClientApp runner as in 1.41."""
    problems = []
    if "get_executor(" not in inspect.getsource(_superexec.run_superexec):
        problems.append("run_superexec no longer picks its executor with get_executor")
    if getattr(_superexec, "_TASK_POLL_INTERVAL_ENV", None) != _SUPEREXEC_POLL_ENV:
        problems.append(f"run_superexec no longer reads its poll interval from {_SUPEREXEC_POLL_ENV}")
    body = inspect.getsource(_clientapp_runtime.run_clientapp)
    for name in ("get_load_client_app_fn(", "push_message(", "client_app(message=message, context=context)"):
        if name not in body:
            problems.append(f"run_clientapp no longer calls {name.rstrip('(')}")
    if "__call__" not in vars(ClientApp) or not isinstance(getattr(exit_handler, "registered_exit_handlers", None),
                                                           list):
        problems.append("ClientApp.__call__ or the exit-handler registry moved")
    protocol = {n for n in vars(Executor) if not n.startswith("_")}
    if protocol != {"get_eligible_capacity", "wait_for_capacity", "launch", "reconcile", "close"}:
        problems.append(f"the SuperExec Executor interface changed ({', '.join(sorted(protocol))})")
    fields = {f.name for f in dataclasses.fields(ExecutionSpec)}
    missing = {"task_type", "runtime_api_address", "token", "insecure", "root_certificates_path",
               "runtime_dependency_install", "parent_pid"} - fields
    if missing:
        problems.append(f"ExecutionSpec lost {', '.join(sorted(missing))}")
    if not all(callable(getattr(LaunchResult, m, None)) for m in ("accepted", "failed")):
        problems.append("LaunchResult.accepted/failed are missing")
    return problems


_problems = _required_problems()
if _problems:
    raise _seam_error(_problems)
WARM_PROBLEMS: tuple[str, ...] = tuple(_warm_problems())


def _wrap(owner, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` by ``wrap(owner.name)``: the one way this runtime patches Flower."""
    setattr(owner, name, wrap(getattr(owner, name)))


# -- the gate: SuperNode message intake, reply push, session activation, exit ------------------------
def message_intake() -> tuple[object, Callable]:
    """The module holding the SuperNode's message intake, and the intake function now in place there."""
    return _supernode, _supernode._pull_and_store_message


def wrap_message_intake(wrap: Callable[[Callable], Callable]) -> None:
    """``wrap(intake)`` replaces the SuperNode's message intake (``_pull_and_store_message``, parameters
    ``INTAKE_PARAMS``): called for every pulled message before it is stored, so before any FAB is
    installed or any ClientApp task exists."""
    _wrap(_supernode, "_pull_and_store_message", wrap)


def insert_reply(reply, state, object_store) -> None:
    """Store a reply in the SuperNode's state as if a ClientApp had produced it (it is then pushed)."""
    _supernode._insert_message(reply, state, object_store)


def wrap_reply_push(wrap: Callable[[Callable], Callable]) -> None:
    """``wrap(push)`` replaces the SuperNode's reply push (``_push_messages(state, object_store, send,
    push_object)``, polled every 0.5 s)."""
    _wrap(_supernode, "_push_messages", wrap)


def observe_intake(on_stored: Callable[[object, dict[str, bytes]], None]) -> None:
    """After each pulled message is stored for a ClientApp, call ``on_stored(message, contents)``: the
    message as pulled (metadata) and the serialised contents of all its objects (those the SuperNode
    already held from earlier messages included). A message refused or dropped at intake stores nothing.
    ``on_stored`` must not raise: it runs in the SuperNode's main loop."""

    class RecordingStore:
        """The object store as the intake sees it, keeping a copy of every object of the message it stores:
        read while the intake stores them, because a warm ClientApp may take the message (and Flower then
        delete its objects) as soon as they are in."""

        def __init__(self, store) -> None:
            self._store, self.contents = store, {}

        def __getattr__(self, name):
            return getattr(self._store, name)

        def preregister(self, run_id, object_tree):
            missing = self._store.preregister(run_id, object_tree)
            for node in iterate_object_tree(object_tree):
                if node.object_id not in missing:  # held from an earlier message with the same content
                    self.contents[node.object_id] = self._store.get(node.object_id) or b""
            return missing

        def put(self, object_id, content):
            self.contents[object_id] = content
            return self._store.put(object_id, content)

    def observing(intake):
        def observed(state, object_store, node_config, receive, get_run, get_fab, pull_object,
                     confirm_message_received, trusted_entities):
            seen, store = [], RecordingStore(object_store)

            def recording_receive():
                received = receive()
                if received is not None:
                    seen.append(received[0])
                return received

            result = intake(state, store, node_config, recording_receive, get_run, get_fab, pull_object,
                            confirm_message_received, trusted_entities)
            if seen and store.contents:  # stored for a ClientApp (a refused message stores nothing)
                on_stored(seen[0], store.contents)
            return result
        return observed

    wrap_message_intake(observing)


def check_replies_before_push(check: Callable[[object, object, object], object]) -> None:
    """Every reply the SuperNode is about to push passes ``check(reply, state, object_store)`` first, which
    returns the reply to send: the same one, or one it put in its place (``replace_reply``)."""

    class CheckedState:
        def __init__(self, state, object_store) -> None:
            self._state, self._store = state, object_store

        def __getattr__(self, name):
            return getattr(self._state, name)

        def get_messages_legacy(self, **kwargs):
            messages = self._state.get_messages_legacy(**kwargs)
            if not kwargs.get("is_reply"):
                return messages
            return [check(m, self._state, self._store) for m in messages]

    def checking(push):
        def checked_push(state, object_store, send, push_object):
            return push(CheckedState(state, object_store), object_store, send, push_object)
        return checked_push

    wrap_reply_push(checking)


def run_config_of(state, run_id: int) -> dict | None:
    """The run config the SuperNode fused for ``run_id`` (the FAB's defaults with the run's overrides)."""
    run = state.get_run(run_id)
    context = state.get_run_series_context(run.series_id) if run is not None else None
    return dict(context.run_config) if context is not None else None


def inflate_message(root_id: str, contents: dict[str, bytes]):
    """The message whose object id is ``root_id``, inflated from its objects' serialised contents (which
    Flower's inflation removes from ``contents`` as it goes)."""
    return inflate_object_from_contents(root_id, contents)


def reply_with_content(reply, object_store, timeout: float, poll: float = 0.02):
    """(the reply with its content, its size in bytes) from the SuperNode's object store, once the ClientApp
    has pushed every object of it (as Flower's own push waits for them); None if that takes over ``timeout``."""
    tree = object_store.get_object_tree(reply.metadata.message_id)
    contents, deadline = {}, time.monotonic() + timeout
    for node in iterate_object_tree(tree):
        while not (content := object_store.get(node.object_id)):
            if content is None or time.monotonic() > deadline:  # None: not even registered; b"": still coming
                return None
            time.sleep(poll)
        contents[node.object_id] = content
    size = sum(len(c) for c in contents.values())  # before inflating, which consumes the contents
    return inflate_object_from_contents(tree.object_id, contents), size


def replace_reply(reply, error, state, object_store):
    """Put an error reply (``error``: flwr Error) in place of ``reply`` in the SuperNode's state: same
    run, round, type and addressee, the content and its objects gone. Returns the new reply."""
    metadata = copy.copy(reply.metadata)
    metadata.__dict__["_message_id"] = ""  # set from the new content's object id when stored
    substitute = make_message(metadata=metadata, error=error)
    state.delete_messages(message_ids=[reply.metadata.message_id])
    object_store.delete(reply.metadata.message_id)
    _supernode._insert_message(substitute, state, object_store)
    return substitute


def wrap_node_activation(wrap: Callable[[Callable], Callable]) -> None:
    """``wrap(activate)`` replaces ``FleetHttpClient.ActivateNode(client, request)`` (raises
    ``httpx.HTTPStatusError``, 412 while the SuperLink holds the node online)."""
    _wrap(FleetHttpClient, "ActivateNode", wrap)


def deactivate_node(client, node_id: int) -> None:
    """Ask the SuperLink, with the site's signed Fleet client, to end the session of ``node_id``."""
    client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))


def run_supernode(argv: list[str]) -> None:
    """Flower's ``flower-supernode`` in this process, with these arguments; returns when Flower gives up."""
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def exit_connection_lost(message: str):
    """Exit through Flower's exit handlers (they stop its Runtime API thread) with the SuperNode's
    connection-error code, as Flower does when it cannot reach the SuperLink."""
    flwr_exit(ExitCode.SUPERNODE_CONNECTION_ERROR, message)


def exit_without_teardown() -> None:
    """Register, as the exit handler Flower runs last, an immediate exit: once Flower's own handlers
    have run, unloading thousands of modules (torch, scipy, …) only delays a stop by seconds."""

    def now() -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "flwr_exit":
            frame = frame.f_back
        code = frame.f_locals.get("sys_exit_code") if frame is not None else None
        if isinstance(code, int):  # the exit code flwr_exit was about to use; else exit the slow way
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    add_exit_handler(now)  # handlers run last-in first-out: registered before Flower's, it runs after them


# -- the warm executor: SuperExec loop, ClientApp runner ----------------------------------------------
def require_warm_executor_seam() -> None:
    """Raise RuntimeError if what the warm executor replaces or wraps is not where flwr 1.41 has it."""
    if WARM_PROBLEMS:
        raise RuntimeError("warm ClientApps need flwr 1.41's SuperExec seams: " + "; ".join(WARM_PROBLEMS))


def clear_exit_handlers() -> None:
    """Forget every registered Flower exit handler (a forked child must not run its parent's)."""
    exit_handler.registered_exit_handlers.clear()


def wrap_client_app_loader(wrap: Callable[[Callable], Callable]) -> None:
    """``wrap(get_load_client_app_fn)`` replaces the loader factory ``run_clientapp`` uses; the loader
    it makes is ``load(fab_id, fab_version, fab_hash) -> ClientApp``."""
    _wrap(_clientapp_runtime, "get_load_client_app_fn", wrap)


def wrap_client_app_call(wrap: Callable[[Callable], Callable]) -> None:
    """``wrap(ClientApp.__call__)`` replaces ``ClientApp.__call__(self, message, context)`` in this process."""
    _wrap(ClientApp, "__call__", wrap)


def wrap_clientapp_reply_push(wrap: Callable[[Callable], Callable]) -> None:
    """``wrap(push_message)`` replaces how ``run_clientapp`` pushes its reply to the SuperNode."""
    _wrap(_clientapp_runtime, "push_message", wrap)


def installed_app_dir(fab_id: str, fab_version: str, fab_hash: str) -> Path:
    """Where Flower installs (and imports the app from) this FAB."""
    return Path(get_project_dir(fab_id, fab_version, fab_hash))


def run_clientapp_task(spec) -> None:
    """Flower's own ``flwr-clientapp`` for one task (``spec``: an ExecutionSpec), in this process; ends
    with ``flwr_exit`` (SystemExit)."""
    _clientapp_runtime.run_clientapp(
        runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid, runtime_dependency_install=False)


def run_superexec_with(executor, runtime_api_address: str, superexec_auth_secret: bytes,
                       poll_interval: str) -> None:
    """Flower's SuperExec loop (acquire a task, launch it) with ``executor`` instead of the one
    ``--executor`` would pick, polling every ``poll_interval`` seconds unless the environment says otherwise."""
    _superexec.get_executor = lambda *a, **k: executor
    os.environ.setdefault(_SUPEREXEC_POLL_ENV, poll_interval)
    _superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=True,
                             superexec_auth_secret=superexec_auth_secret, parent_pid=None)


# -- outside the site: the in-process demo and the benchmarks ----------------------------------------
def set_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    """The identity Flower stamps on new messages (a ServerApp task's, in a process that runs none)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id


def as_transported(record):
    """``record`` as the receiving process holds it: deflated to Flower's objects and inflated back."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    return inflate_object_from_contents(record.object_id, contents)
