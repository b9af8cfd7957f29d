"""What every command group shares: the console, the data-directory and run-directory options, the
``--tensorboard`` flag, and the one-line error a person can fix (exit code 2)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Optional

import typer

from client.errors import SiteError
from client.ingest import heart_disease
from deploy.coordinator.follow import console
from deploy.coordinator.superlink import DeploymentError
from deploy.datasets.data_dir import resolve_data_dir

__all__ = ["DataDir", "Kit", "StateDir", "TensorBoardFlag", "console", "fail", "heart_disease_files", "out_dir",
           "tensorboard_config"]

DataDir = typer.Option(None, "--data-dir", help="Data directory (else $CAREFL_DATA, else ~/.cache/carefl).")
Kit = typer.Option(..., "--kit", help="Your startup kit folder (from `carefl provision`).")
StateDir = typer.Option(Path("state"), "--state-dir", help="Coordinator state: SuperLink database, runs, logs.")
TensorBoardFlag = typer.Option(False, "--tensorboard", help="Also log every round's metrics to "
                               "<run dir>/tensorboard (view with `tensorboard --logdir <run dir>`).")


def tensorboard_config(wanted: bool) -> dict:
    """The run-config override for ``--tensorboard``; refused here when the package is missing."""
    if not wanted:
        return {}
    if importlib.util.find_spec("tensorboard") is None:
        raise DeploymentError("--tensorboard needs the tensorboard package where the coordinator runs "
                              "(pip install tensorboard; it is in requirements.lock.txt)")
    return {"tensorboard": True}


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def heart_disease_files(data_dir: Optional[Path]) -> dict[str, Path]:
    root, source = resolve_data_dir(data_dir)
    if not root.is_dir():
        raise SiteError(f"data directory {root} (from {source}) does not exist; "
                        f"run `carefl data fetch heart-disease` or set --data-dir / $CAREFL_DATA")
    files = {c: heart_disease.centre_file(root, c) for c in heart_disease.CENTRES}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SiteError(f"heart-disease files missing in {root} (from {source}): {', '.join(missing)}; "
                        f"run `carefl data fetch heart-disease --data-dir {root}`")
    return files


def out_dir(out: Optional[Path], kind: str) -> Path:
    return (out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}").resolve()
