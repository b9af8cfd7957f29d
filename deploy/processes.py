"""Start and stop the Flower processes we own, by process id, leaving nothing behind.

Each process leads its own process group; stopping it stops that group and every group its
descendants lead (Flower starts some children in new sessions), so nothing Flower spawned outlives it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NO_PHONE_HOME = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: "Managed | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}; see {proc.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process we start: own FLWR_HOME, no telemetry, our venv first."""
    env = dict(os.environ)
    env.update(NO_PHONE_HOME)
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def tool(name: str) -> str:
    """A Flower executable from the same environment as this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class Managed:
    name: str
    popen: subprocess.Popen
    log_path: Path
    own_group: bool = True

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """Stop the process with everything it started (see ``stop_tree``)."""
        if self.own_group:
            stop_tree(self.pid, grace)
        else:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and self.popen.poll() is None:
                    time.sleep(0.1)
                if self.popen.poll() is not None:
                    break
        self.popen.poll()


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group ``pid`` leads and every group its descendants lead, then SIGKILL the rest.

    Flower's SuperLink starts its SuperExec in a new session (``start_new_session``), and the SuperExec
    starts the ServerApp / simulation process, so stopping only the SuperLink's group would leave them
    running until they notice their parent is gone.
    """
    groups = {pid} | {_pgid_of(p) for p in _descendants(pid)}
    groups.discard(-1)
    groups.discard(os.getpgid(0))  # never our own group
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(group_alive(g) for g in groups):
            time.sleep(0.1)
        if not any(group_alive(g) for g in groups):
            return


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` in the parent tree (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for p in _pids():
        fields = _stat_fields(p)
        if fields:
            children.setdefault(int(fields[1]), []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # killpg(…, 0) also succeeds while only zombies remain; reap ours and check the group's members.
    try:
        os.waitpid(-pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    return any(_pgid_of(p) == pgid and not _is_zombie(p) for p in _pids())


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _stat_fields(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return raw[raw.rindex(")") + 2:].split()


def _pgid_of(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else -1


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return not fields or fields[0] == "Z"


def start(name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None,
          own_group: bool = True) -> Managed:
    """Start a process logging to ``log_path``; ``own_group``: it leads a new process group (stopped as one)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "ab")
    try:
        popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=own_group)
    finally:
        log_file.close()
    return Managed(name, popen, log_path, own_group)
