"""``carefl data synth-ehr`` and ``carefl data validate-extract``: schema-driven EHR extracts at a site."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from deploy.runs import console
from shared_models.schema import Schema, SchemaError, builtin_schema, load_schema

SchemaOption = typer.Option("diabetes-visits", "--schema",
                            help="A schema file (.toml/.yaml) or the name of one shipped in shared_models/schemas/.")


def _schema(spec: str) -> Schema:
    path = Path(spec)
    return load_schema(path) if path.suffix or path.exists() else builtin_schema(spec)


def synth_ehr(
    out: Path = typer.Option(..., "--out", help="Folder for one CSV extract per site."),
    sites: int = typer.Option(3, min=1, help="Synthetic sites (metro, rural, coastal, then drawn ones)."),
    seed: int = typer.Option(0, help="Same seed, same extracts."),
    patients: int = typer.Option(0, min=0, help="Patients per site (0: each site's own default)."),
    violations: bool = typer.Option(False, help="Also write violations.csv: every kind of schema violation."),
) -> None:
    """Synthetic longitudinal diabetes visits per site (shared_models/schemas/diabetes-visits.toml); all identifiers fake."""
    from client.ehr_ingest import read_extract
    from client.synthetic_ehr import synthesize, write_violation_extract

    schema = builtin_schema("diabetes-visits")
    for site, path in synthesize(out, sites, seed, patients).items():
        report = read_extract(path, schema).report
        console.print(f"{site:10s} {path}: {report.rows_kept} visits", highlight=False)
    if violations:
        path = write_violation_extract(out / "violations.csv", seed)
        console.print(f"{'violations':10s} {path}: every kind of problem (`carefl data validate-extract {path}`)",
                      highlight=False)
    console.print(f"schema {schema.name} v{schema.version}, sha256 {schema.sha256}", highlight=False)


def validate_extract(
    extract: Path = typer.Argument(..., help="The site's extract (CSV)."),
    schema: str = SchemaOption,
    as_json: bool = typer.Option(False, "--json", help="Print only the counts (what may leave the site)."),
) -> None:
    """Check an extract against a study schema: every problem at once, row numbers, never a value (exit 1 if any)."""
    from client.ehr_ingest import read_extract

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


def validate_site_extract(dataset) -> int:
    """``carefl site validate`` for an EHR dataset of site.toml: its name is the study schema's; exit code."""
    from client.ehr_ingest import read_extract

    try:
        schema = builtin_schema(dataset.name)
    except SchemaError as exc:
        console.print(f"[bold red]error:[/] dataset '{dataset.name}' has a path but no shipped study schema of that "
                      f"name ({exc})", highlight=False)
        return 2
    report = read_extract(dataset.path, schema).report
    for line in report.lines():
        console.print(line, highlight=False, markup=False)
    return 1 if report.fatal or report.rows_excluded else 0
