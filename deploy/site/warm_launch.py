"""The gate's side of warm sites: start the warm executor (deploy/site/warm.py) beside the SuperNode.

Kept apart from warm.py, which is the executor process itself: this runs in the gate, decides whether
warm mode is possible with the installed Flower (otherwise the SuperNode keeps Flower's own
per-message ``flwr-clientapp`` processes), and wires the two together with a fresh secret.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

from deploy.site import flower_seam as seam
from deploy.site.timing import TIMING_FILE

SECRET_FILE = "superexec-auth.secret"  # in the work directory
log = logging.getLogger("carefl.gate")


def start_warm_executor(argv: list[str], work_dir: Path) -> list[str]:
    """Start the warm SuperExec (deploy/site/warm.py) for this SuperNode; return the SuperNode's arguments.

    The SuperNode then runs with ``--isolation process`` (it launches nothing itself) and an HMAC
    secret (new at every start, 0600, in the work directory) that the executor must present to acquire
    tasks. The executor runs in this process group and stops when this process ends.
    """
    port = argv[argv.index("--port") + 1] if "--port" in argv else "9094"
    secret = work_dir / SECRET_FILE
    secret.unlink(missing_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    subprocess.Popen([sys.executable, "-m", "deploy.site.warm", "--runtime-api-address", f"127.0.0.1:{port}",
                      "--superexec-auth-secret-file", str(secret), "--parent-pid", str(os.getpid()),
                      "--timing-log", str(work_dir / TIMING_FILE)], stdin=subprocess.DEVNULL)
    return [*argv, "--isolation", "process", "--superexec-auth-secret-file", str(secret)]


def start_warm_or_stay_cold(argv: list[str], work_dir: Path) -> list[str]:
    """``start_warm_executor``, unless a Flower upgrade moved what the executor hooks: then a warning,
    and the SuperNode's arguments unchanged (Flower's own executor)."""
    try:
        seam.require_warm_executor_seam()
        return start_warm_executor(argv, work_dir)
    except RuntimeError as exc:
        log.warning("%s; starting a new flwr-clientapp per message instead", exc)
        return argv
