"""Stopping a process we started stops everything below it, also children that left its group
(Flower's SuperLink starts its SuperExec with ``start_new_session``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from deploy import processes

# A parent that starts a child in a new session (as the SuperLink does), writes the child's pid, and waits.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_stop_ends_children_in_other_sessions(tmp_path):
    pid_file = tmp_path / "child.pid"
    proc = processes.start("parent", [sys.executable, "-c", PARENT, str(pid_file)], dict(os.environ),
                           tmp_path / "parent.log")
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.alive(), (tmp_path / "parent.log").read_text()
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert os.getpgid(child) != proc.pid  # really outside the parent's group
    try:
        proc.stop(grace=5)
        assert not proc.alive() and not _running(child)
    finally:
        for pid in (child, proc.pid):
            if _running(pid):
                os.kill(pid, 9)
