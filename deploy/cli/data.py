"""``carefl data``: get, check and make the public data sets and demo sites.

    carefl data fetch heart-disease|hippocampus     checksum-verified downloads
    carefl data check heart-disease                 every centre file: checksum, format, split sizes
    carefl data dicomize --out DIR                  MSD hippocampus → DICOM MR + SEG sites
    carefl data synth-ehr --out DIR                 synthetic diabetes visit extracts
    carefl data validate-extract FILE               an extract against its study schema
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from client.errors import SiteError
from client.ingest import heart_disease
from deploy.cli.common import DataDir, console, heart_disease_files
from deploy.datasets import fetch as fetch_mod
from deploy.datasets.data_dir import resolve_data_dir
from shared_models.schema import Schema, SchemaError, builtin_schema, load_schema

data_app = typer.Typer(no_args_is_help=True, help="Get and check the public data sets.")

SchemaOption = typer.Option("diabetes-visits", "--schema",
                            help="A schema file (.toml/.yaml) or the name of one shipped in shared_models/schemas/.")


@data_app.command("fetch")
def data_fetch(dataset: str = typer.Argument(..., help="heart-disease | hippocampus"),
               data_dir: Optional[Path] = DataDir) -> None:
    """Download a public data set into the data directory, checksum-verified."""
    root, source = resolve_data_dir(data_dir)
    for path in fetch_mod.fetch(dataset, root):
        console.print(f"ok  {path}")
    console.print(f"{dataset} is in {root} ({source})")


@data_app.command("check")
def data_check(dataset: str = typer.Argument("heart-disease"), data_dir: Optional[Path] = DataDir) -> None:
    """Check every centre file: checksum, format, split sizes (counts only, no values)."""
    if dataset != "heart-disease":
        raise SiteError(f"unknown data set '{dataset}'; available: heart-disease")
    problems = 0
    for centre, path in heart_disease_files(data_dir).items():
        try:
            checksum = "md5 ok" if fetch_mod.md5_of(path) == heart_disease.MD5[centre] else "md5 differs from UCI"
            d = heart_disease.load_centre(path)
            console.print(f"{centre:12s} {checksum}; {d.rows_read} rows, {d.rows_incomplete} incomplete "
                          f"excluded, train {len(d.y_train)} / test {len(d.y_test)}")
        except SiteError as exc:
            problems += 1
            console.print(f"[red]{centre:12s} {exc}[/]")
    if problems:
        raise typer.Exit(2)


@data_app.command("dicomize")
def datadicomize_sites(
    out: Path = typer.Option(..., "--out", help="Folder for the sites' DICOM data, manifests and site configs."),
    sites: int = typer.Option(3, min=1, help="Synthetic sites to split the cases into."),
    cases_per_site: int = typer.Option(0, min=0, help="Limit per site (0: all)."),
    epsilon_budget: float = typer.Option(10.0, help="Lifetime ε written into each site's policy."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """MSD hippocampus NIfTI → DICOM MR series + DICOM SEG per case (synthetic, clearly fake identifiers)."""
    for site_id, config in dicomize_sites(out, sites, cases_per_site, epsilon_budget, data_dir).items():
        console.print(f"{site_id}: {config.parent} (site.toml, hippocampus.csv, dicom/)")


def dicomize_sites(out: Path, sites: int, cases_per_site: int, epsilon_budget: float, data_dir) -> dict[str, Path]:
    from rich.progress import Progress

    from deploy.datasets import hippocampus

    root, _ = resolve_data_dir(data_dir)
    total = sites * cases_per_site if cases_per_site else len(hippocampus.cases(root))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("DICOM from NIfTI", total=total)
        return hippocampus.dicomize_sites(root, out, sites, cases_per_site, epsilon_budget,
                                          on_case=lambda *_: progress.advance(task))


def _schema(spec: str) -> Schema:
    path = Path(spec)
    return load_schema(path) if path.suffix or path.exists() else builtin_schema(spec)


@data_app.command("synth-ehr")
def synth_ehr(
    out: Path = typer.Option(..., "--out", help="Folder for one CSV extract per site."),
    sites: int = typer.Option(3, min=1, help="Synthetic sites (metro, rural, coastal, then drawn ones)."),
    seed: int = typer.Option(0, help="Same seed, same extracts."),
    patients: int = typer.Option(0, min=0, help="Patients per site (0: each site's own default)."),
    violations: bool = typer.Option(False, help="Also write violations.csv: every kind of schema violation."),
) -> None:
    """Synthetic longitudinal diabetes visits per site (shared_models/schemas/diabetes-visits.toml); all identifiers fake."""
    from client.ingest.ehr_extract import read_extract
    from deploy.datasets.synthetic_ehr import synthesize, write_violation_extract

    schema = builtin_schema("diabetes-visits")
    for site, path in synthesize(out, sites, seed, patients).items():
        report = read_extract(path, schema).report
        console.print(f"{site:10s} {path}: {report.rows_kept} visits", highlight=False)
    if violations:
        path = write_violation_extract(out / "violations.csv", seed)
        console.print(f"{'violations':10s} {path}: every kind of problem (`carefl data validate-extract {path}`)",
                      highlight=False)
    console.print(f"schema {schema.name} v{schema.version}, sha256 {schema.sha256}", highlight=False)


@data_app.command("validate-extract")
def validate_extract(
    extract: Path = typer.Argument(..., help="The site's extract (CSV)."),
    schema: str = SchemaOption,
    as_json: bool = typer.Option(False, "--json", help="Print only the counts (what may leave the site)."),
) -> None:
    """Check an extract against a study schema: every problem at once, row numbers, never a value (exit 1 if any)."""
    from client.ingest.ehr_extract import read_extract

    try:
        report = read_extract(extract, _schema(schema)).report
    except SchemaError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(report.counts(), indent=2))
    else:
        for line in report.lines():
            console.print(line, highlight=False, markup=False)
    if report.fatal or report.rows_excluded:
        raise typer.Exit(1)
