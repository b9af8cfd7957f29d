"""The report commands (docs/OPERATIONS.md, "Run reports"):

    carefl report RUN_DIR [--out FILE]
    carefl site report --config site.toml --model final_model.pt --out DIR [--cases N]

``carefl report`` writes again the ``report.html`` every coordinator run leaves in its run
directory; ``carefl site report`` is the site's own, patient-level report, which stays at the site.
A problem a person can fix is one line and exit code 2. Registered on ``carefl`` by deploy/cli.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import typer

from client.errors import SiteError
from deploy.coordinator import DeploymentError
from deploy.runs import console


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


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (it holds summary.json, metrics.jsonl, rounds.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the report (default RUN_DIR/report.html)."),
) -> None:
    """Write the run report again: metric curves per site, training loss, ε per site, final table, baselines."""
    from server.report import ReportError, write_report

    try:
        path = write_report(run_dir, out)
    except ReportError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write the report: {exc}")
    console.print(f"report written to {path}", highlight=False)


def site_report_cmd(
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
    model: Path = typer.Option(..., "--model", help="The global model (a run's final_model.pt)."),
    out: Path = typer.Option(..., "--out", help="Folder for site-report.html and its PNGs (stays at the site)."),
    cases: int = typer.Option(4, "--cases", min=1, help="Imaging: test cases to draw predicted vs. true masks for."),
    seg_shape: Optional[str] = typer.Option(None, "--seg-shape", help="Imaging: z,y,x of preprocessing (default: "
                                            "the run's, from summary.json beside the model, else 48,64,48)."),
) -> None:
    """This site's own report on a global model: ROC and confusion matrix (EHR) or mask overlays (imaging)."""
    from client.site_report import write_site_report

    try:
        report = write_site_report(config, model, out, cases=cases, seg_shape=seg_shape)
    except SiteError as exc:
        _fail(str(exc))
    except ValueError as exc:  # e.g. a malformed --seg-shape
        _fail(str(exc))
    console.print(f"site report written to {report.html} with {len(report.images)} plot(s); it holds "
                  f"patient-level results: keep it at the site", highlight=False)
