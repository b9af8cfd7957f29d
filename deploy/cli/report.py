"""``carefl report RUN_DIR [--out FILE]``: write again the ``report.html`` every coordinator run leaves in
its run directory (docs/OPERATIONS.md, "Run reports"). The site's own report is ``carefl site report``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from deploy.cli.common import console, fail


def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (it holds summary.json, metrics.jsonl, rounds.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the report (default RUN_DIR/report.html)."),
) -> None:
    """Write the run report again: metric curves per site, training loss, ε per site, final table, baselines."""
    from server.report import ReportError, write_report

    try:
        path = write_report(run_dir, out)
    except ReportError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the report: {exc}")
    console.print(f"report written to {path}", highlight=False)


