"""Warm ClientApps at a site: Flower's own SuperExec loop, each ClientApp forked from a process that
has already imported the site's libraries.

Flower 1.41's SuperNode, by default (``--isolation subprocess``), has ``flower-superexec`` start one
``flwr-clientapp`` process per message; each imports flwr, torch, numpy, scipy, opacus, … afresh,
which on a busy 2-core machine takes longer than a heart-disease round's training. With
``--isolation process`` the SuperNode starts nothing and an external SuperExec acquires its tasks
from the SuperNode's Runtime API (127.0.0.1, HMAC-authenticated with a secret only the site agent's
processes read). ``python -m deploy.site.warm`` is that SuperExec, started by the gate (deploy/site/gate.py)
as the SuperNode's child: Flower's ``run_superexec`` loop, with one change: a ClientApp task is
launched by ``os.fork()`` of this process instead of a new interpreter. The child runs Flower's own
``run_clientapp`` with the task's token, exactly as ``flwr-clientapp`` would: it pulls the message,
context and FAB from the SuperNode, installs the FAB, imports the app from the installed FAB and
calls it, pushes the reply and exits.

What is warm, and what is not:
- warm: third-party library packages only (``PRELOAD``: numpy, scipy, torch, sklearn, opacus,
  monai, flwr's app runtime), imported once here. No module of carefl's apps (only this runtime's
  own: this file, flower_seam.py, timing.py) and nothing from any FAB is ever imported in this
  process, and it runs no computation (so no OpenMP/BLAS worker pool
  is in use when it forks, the same condition PyTorch's fork-based DataLoader workers rely on).
- not warm, per message as before: the app's code (every module of the FAB's top-level packages is
  imported from the FAB's install directory in the child, and ``verify_app_modules`` refuses to run
  the app if any came from elsewhere), the data, the model, the privacy ledger (charged from its
  SQLite file) and the audit log. A child shares no Python objects with any other message.
- The child draws fresh RNG seeds from the OS (torch, numpy, random), so two children never share a
  random stream (DP noise and Poisson sampling use their own OS-seeded generators anyway).

The approval check is untouched: the gate runs in the SuperNode and refuses a message before a task
exists, so this process can only ever acquire tasks of approved apps.

Each child appends one line of timings (wall-clock seconds; ids, no data) to the site's timing log
when one is given (deploy/site/timing.py; docs/BENCHMARKS.md, "Framework overhead"). Nothing of it
leaves the site. Every Flower internal this executor replaces or wraps comes through
deploy/site/flower_seam.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import sysconfig
import time
import traceback
from pathlib import Path

from deploy.site import flower_seam as seam
from deploy.site.timing import Timings, append_timing, message_ids

# Library packages imported once by the executor (never a carefl package or anything from a FAB).
# Importing these roots also loads most of what the ClientApp imports below them (measured: the
# ClientApp's own import then takes ≈ 0.2 s in the child instead of ≈ 4-9 s in a new interpreter).
PRELOAD = ("numpy", "scipy", "torch", "sklearn", "opacus", "monai", "flwr.app", "flwr.clientapp",
           "flwr.supernode.runtime.run_clientapp")
POLL_INTERVAL = "0.25"  # seconds between the executor's AcquireTask calls (Flower's SuperExec: 1 s)
PR_SET_PDEATHSIG = 1


def log(text: str) -> None:
    print(f"carefl-warm[{os.getpid()}]: {text}", file=sys.stderr, flush=True)


def library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(sorted({os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")}))


def _is_library(module, dirs: tuple[str, ...]) -> bool:
    path = getattr(module, "__file__", None)
    return path is None or os.path.realpath(path).startswith(dirs)


def preload(names=PRELOAD) -> list[str]:
    """Import library packages by name; the ones that imported."""
    import importlib
    loaded = []
    for name in names:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception:  # noqa: BLE001 - a library this site does not have (e.g. monai): not preloaded
            pass
    return loaded


# -- per-message child ------------------------------------------------------------------------------
def app_top_levels(app_dir: Path) -> set[str]:
    """Top-level module names an installed FAB provides (packages and modules at its root)."""
    names = set()
    for entry in app_dir.iterdir():
        if entry.name.startswith((".", "__")):
            continue
        if entry.is_dir() and ((entry / "__init__.py").is_file() or any(entry.glob("*.py"))):
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def forget_modules(top_levels: set[str]) -> list[str]:
    """Drop these top-level names (and their submodules) from sys.modules, so they import afresh."""
    gone = [n for n in list(sys.modules) if n.split(".")[0] in top_levels]
    for name in gone:
        del sys.modules[name]
    return gone


def verify_app_modules(app_dir: Path, top_levels: set[str]) -> None:
    """Every loaded module of the app's packages must come from the installed FAB; else refuse."""
    root = os.path.realpath(app_dir) + os.sep
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.split(".")[0] in top_levels and path and not os.path.realpath(path).startswith(root):
            raise RuntimeError(f"module {name} was not loaded from the approved app's files ({path})")


def reset_after_fork() -> None:
    """Undo what the child must not inherit: the parent's exit handlers, signal handlers, RNG state,
    and every non-library module (this launcher's own)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    seam.clear_exit_handlers()  # the parent's HTTP client and executor are not ours
    seed = int.from_bytes(os.urandom(8), "little")
    import random
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)
    dirs = library_dirs()
    for name, module in list(sys.modules.items()):
        if name != "__main__" and not _is_library(module, dirs):
            del sys.modules[name]


def _instrument(timings: Timings) -> None:
    """Wrap Flower's ClientApp loading (provenance check) and note when each step ends."""
    checked: dict = {}

    def checking(make_loader):
        def get_load_client_app_fn(*args, **kwargs):
            load = make_loader(*args, **kwargs)

            def checked_load(fab_id: str, fab_version: str, fab_hash: str):
                timings.mark("installed")
                app_dir = seam.installed_app_dir(fab_id, fab_version, fab_hash)
                top_levels = app_top_levels(app_dir)
                forget_modules(top_levels)
                app = load(fab_id, fab_version, fab_hash)
                try:
                    verify_app_modules(app_dir, top_levels)
                except RuntimeError as exc:
                    raise seam.LoadClientAppError(str(exc)) from None
                checked.update(app_dir=app_dir, top_levels=top_levels)
                timings.update(fab_sha256=fab_hash, app_dir=str(app_dir))
                timings.mark("app_loaded")
                return app

            return checked_load
        return get_load_client_app_fn

    def timed(call):
        def timed_call(self, message, context):
            timings.update(message_ids(message))
            timings.mark("handler_start")
            try:
                reply = call(self, message, context)
            finally:
                timings.mark("handler_end")
            if checked:  # modules the handler imported lazily must come from the FAB too, or nothing is sent
                verify_app_modules(checked["app_dir"], checked["top_levels"])
            return reply
        return timed_call

    def noting_push(push):
        def timed_push(*args, **kwargs):
            try:
                return push(*args, **kwargs)
            finally:
                timings.mark("pushed")
        return timed_push

    seam.wrap_client_app_loader(checking)
    seam.wrap_client_app_call(timed)
    seam.wrap_clientapp_reply_push(noting_push)


def run_child(spec, acquired: float, timing_log: Path | None) -> None:
    """In the forked child: run one ClientApp task with Flower's own code, then exit (never returns)."""
    code = 1
    timings = Timings(source="clientapp", mode="warm", executor_pid=os.getppid(), pid=os.getpid(),
                      acquired=acquired, started=time.time())
    try:
        reset_after_fork()
        _instrument(timings)
        seam.run_clientapp_task(spec)
        code = 0
    except SystemExit as exc:  # run_clientapp ends with flwr_exit → sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - never return into the parent's loop
        traceback.print_exc()
    finally:
        try:
            timings.update(exit_code=code, ended=time.time())
            if timing_log is not None:
                append_timing(timing_log, timings)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class ForkExecutor:
    """Flower's Executor interface: ClientApp tasks forked from here, anything else as Flower does."""

    def __init__(self, parent_pid: int | None, timing_log: Path | None) -> None:
        self.cold = seam.SubprocessExecutor()
        self.parent_pid = parent_pid
        self.timing_log = timing_log
        self.owner = os.getpid()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, **kwargs):
        return self.cold.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, *args, **kwargs) -> None:
        return None

    def launch(self, spec):
        if spec.task_type != seam.TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return self.cold.launch(spec)
        acquired = time.time()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            return seam.LaunchResult.failed(f"fork failed: {exc}")
        if pid == 0:
            run_child(spec, acquired, self.timing_log)
        self.children.add(pid)
        return seam.LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log("the SuperNode is gone; stopping")
            os.kill(os.getpid(), signal.SIGTERM)

    def close(self) -> None:
        if os.getpid() != self.owner:
            return
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _die_with_parent(parent_pid: int | None) -> None:
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        sys.exit("carefl-warm: the SuperNode that started this executor is gone")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.site.warm", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--superexec-auth-secret-file", required=True)
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the SuperNode) ends")
    parser.add_argument("--timing-log", type=Path, default=None)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    seam.require_warm_executor_seam()
    seam.disable_process_dumping(strict=False)  # as flower-superexec: task tokens stay out of other processes' reach

    started = time.monotonic()
    loaded = preload()
    import logging
    logging.getLogger("flwr").propagate = False  # opacus's logging.basicConfig would copy Flower's DEBUG lines
    import threading
    log(f"preloaded {', '.join(loaded)} in {time.monotonic() - started:.1f} s "
        f"({len(sys.modules)} modules, python threads: {threading.active_count()}); ClientApps are forked from here")

    secret = seam.load_superexec_auth_secret(args.superexec_auth_secret_file)
    executor = ForkExecutor(args.parent_pid, args.timing_log)
    seam.exit_without_teardown()
    seam.run_superexec_with(executor, args.runtime_api_address, secret, POLL_INTERVAL)


if __name__ == "__main__":
    main()
