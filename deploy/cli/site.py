"""``carefl site``: what a hospital's IT and data scientist run.

    carefl site keygen | approve | start          keys, the approval list, the gated SuperNode
    carefl site validate | ingest                 every problem of a dataset at once; the preprocessing cache
    carefl site budget                            ε spent and left per dataset, from the site's ledger
    carefl site report                            the site's own patient-level report (stays at the site)
    carefl site predict                           use a global model: DICOM SEG or risk scores, with a model card
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from client.errors import SiteError
from client.site import HEART_DISEASE, SiteConfig, load_site_config
from deploy.cli.common import Kit, console, fail
from deploy.coordinator.provision import write_keygen
from deploy.site import agent as site_agent
from deploy.site.approval import app_hash, approve
from privacy.ledger import PrivacyLedger
from server.run_dir import json_safe
from shared_models.schema import SchemaError, builtin_schema

site_app = typer.Typer(no_args_is_help=True, help="Commands for a hospital site.")


@site_app.command("keygen")
def site_keygen(out: Path = typer.Option(Path("."), "--out", help="Folder for the key files.")) -> None:
    """Make this site's keys here: send supernode.pub to the coordinator, audit-signing.pub to your auditors."""
    pub = write_keygen(out)
    out = out.resolve()
    console.print(f"keys in {out} (private keys 0600, never sent; existing ones kept).\n"
                  f"  - {out / 'audit-signing.pub'}: give it to whoever audits your logs (your privacy officer, "
                  f"the consortium's auditor); it is how they check that your audit log is yours and unedited\n"
                  f"  - {out / 'supernode.pub'}: send it to the coordinator (`carefl coordinator add-site`); "
                  f"it is the last line below", highlight=False)
    print(pub.decode().strip())


@site_app.command("approve")
def site_approve(
    target: str = typer.Argument(..., help="A sha256, a .fab file, or a folder holding the app."),
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
) -> None:
    """Allow an app version to run at this site (adds its sha256 to [approval] apps)."""
    digest = app_hash(target)
    added = approve(config, digest)
    console.print(f"{'approved' if added else 'already approved'}: sha256:{digest}")


def _check_data(site: SiteConfig) -> list[str]:
    """Every dataset must be readable and have cases to train on; exclusions are reported, not fatal. An EHR
    extract is read by its training loader, so it gets the verdict `carefl site validate` gives it."""
    from client.ingest.imaging.manifest import read_manifest, validate

    problems = []
    for name, ds in site.datasets.items():
        try:
            if ds.manifest is not None:
                report = validate(read_manifest(ds.manifest), set(ds.labels) or {0, 1}, ds.require_deidentified, ds.modality)
                if not report.valid:
                    problems.append(f"dataset {name}: no valid case ({report.summary()}); "
                                    f"see `carefl site validate --dataset {name}`")
                elif report.problems:
                    console.print(f"[yellow]dataset {name}: {report.summary()}[/] (excluded cases are not used)")
            elif name == HEART_DISEASE:
                data = site.load_heart_disease()
                _excluded(name, data.rows_incomplete, data.verdict)
            elif ds.path is not None and (schema := _study_schema(name)) is not None:  # e.g. ehr-seq's extract
                from client.ingest.ehr_extract import load_extract

                report = load_extract(ds.path, schema).report
                _excluded(name, report.rows_excluded, report.verdict())
            elif ds.path is not None and not ds.path.exists():
                problems.append(f"dataset {name}: {ds.path} does not exist")
        except SiteError as exc:  # a refused extract names every damaged line, one per line: indented under it
            problems.append(str(exc).replace("\n", "\n    "))
    return problems


def _study_schema(name: str):
    """The shipped study schema a tabular dataset is named after (its training loader reads it), or None."""
    try:
        return builtin_schema(name)
    except SchemaError:
        return None


def _excluded(name: str, excluded: int, verdict: str) -> None:
    """Rows the loader left out of a usable extract: count and line numbers, at the site's console only."""
    if excluded:
        console.print(f"[yellow]dataset {name}: {escape(verdict)}[/] (excluded rows are not used; "
                      f"`carefl site validate --dataset {name}` lists why)", highlight=False)


@site_app.command("start")
def site_start(
    kit: Path = Kit,
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
    coordinator: Optional[str] = typer.Option(None, help="host:port of the coordinator (else [site] coordinator)."),
    runtime_port: int = typer.Option(9094, help="Local port of the SuperNode's API for its ClientApps."),
    log_dir: Optional[Path] = typer.Option(None, help="Agent logs and Flower home (default: beside site.toml)."),
    refusal_patience: float = typer.Option(150.0, min=0, help="Seconds of refused activation before giving up "
                                           "(a restarted site is refused until the coordinator sees it offline)."),
    warm: bool = typer.Option(True, "--warm/--no-warm", help="Fork ClientApps from a process with the libraries "
                              "already imported (default), or start a new flwr-clientapp per message."),
) -> None:
    """Check config, keys and data, then run the authenticated SuperNode behind the code gate."""
    with console.status("checking the site config, kit and data …"):
        agent = site_agent.plan(kit, config, coordinator, runtime_port, check_data=_check_data,
                                refusal_patience=refusal_patience, warm=warm)
    if not agent.approved:
        console.print("[yellow]no app approved yet: every run will be refused until `carefl site approve`[/]")
    log_dir = (log_dir or agent.config_path.parent / "agent").resolve()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    site_agent.log.addHandler(handler)
    site_agent.log.setLevel(logging.INFO)
    site_agent.log.propagate = False
    console.print(f"site {agent.site.site_id}: connecting to {agent.coordinator} (TLS, key "
                  f"{agent.kit / 'supernode.key'}), {len(agent.approved)} approved app(s); log {log_dir / 'supernode.log'}")
    code = site_agent.run(agent, log_dir)
    raise typer.Exit(code or 1)


@site_app.command("budget")
def site_budget(
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Spent and remaining ε per dataset, with δ, the releases that spent it, the split by kind of release
    (training, feature statistics, evaluation) from the site's ledger, and how test metrics leave (the policy's
    evaluation mode: DP, or exact — not DP)."""
    site = load_site_config(config)
    ledger = PrivacyLedger(site.ledger_path)
    report = {"site": site.site_id, "ledger": str(site.ledger_path), "datasets": {}}
    for name, ds in site.datasets.items():
        rounds = ledger.rounds(name)
        # δ as charged (the policy's, or its default from N at charge time); the policy's when nothing was
        delta = rounds[-1]["delta"] if rounds else ds.policy.delta
        spent = ledger.spent(name, delta, ds.policy.accountant) if rounds else 0.0
        by_kind = ledger.spent_by_kind(name, delta, ds.policy.accountant) if rounds else {}
        # distributed DP: the ε that assumes the honest sites' noise, beside the own-noise ε, where a release did
        honest = max((r["honest_sites"] or 1 for r in rounds), default=1)
        assumed = ({"epsilon_assumed": ledger.spent(name, delta, ds.policy.accountant, assumed=True),
                    "honest_sites": honest, "budget_by": ds.policy.distributed_dp_budget} if honest > 1 else {})
        budgeted = assumed["epsilon_assumed"] if assumed and ds.policy.budget_assumed else spent
        report["datasets"][name] = {
            "epsilon_spent": spent, **assumed, "epsilon_by_kind": by_kind, "epsilon_budget": ds.policy.epsilon_budget,
            "epsilon_remaining": max(ds.policy.epsilon_budget - budgeted, 0.0), "delta": delta,
            "accountant": ds.policy.accountant, "rounds": len(rounds),
            "runs": sorted({r["run_id"] for r in rounds}),
            "non_dp_rounds": sum(1 for r in rounds if r["noise_multiplier"] == 0),
            "evaluation": ds.policy.evaluation,
        }
    if as_json:
        print(json.dumps(json_safe(report), indent=2))
        return
    table = Table(title=f"privacy budget of site {site.site_id}", title_justify="left")
    for col in ("dataset", "ε spent", "of which, each alone", "ε budget", "ε remaining", "δ", "accountant",
                "releases", "runs", "evaluation"):
        table.add_column(col)
    for name, d in report["datasets"].items():
        spent_text = "∞ (non-DP rounds)" if d["non_dp_rounds"] else f"{d['epsilon_spent']:.4f}"
        if "epsilon_assumed" in d and not d["non_dp_rounds"]:
            spent_text += (f" own noise; {d['epsilon_assumed']:.4f} with {d['honest_sites']} honest sites"
                           f"{' (budgeted)' if d['budget_by'] == 'assumed' else ''}")
        kinds = ", ".join(f"{kind} {eps:.4f}" for kind, eps in d["epsilon_by_kind"].items()) or "–"
        table.add_row(name, spent_text, kinds, f"{d['epsilon_budget']:g}", f"{d['epsilon_remaining']:.4f}",
                      "–" if d["delta"] is None else f"{d['delta']:g}", d["accountant"], str(d["rounds"]),
                      str(len(d["runs"])), "DP (charged)" if d["evaluation"] == "dp" else "exact: not DP")
    console.print(table)
    if any("epsilon_assumed" in d for d in report["datasets"].values()):
        console.print("distributed DP: the own-noise ε is what this site's noise alone guarantees; the ε with honest "
                      "sites holds only if that many sites of each secure sum (this one included) were honest and "
                      "stayed in it", highlight=False)
    if any(len(d["epsilon_by_kind"]) > 1 for d in report["datasets"].values()):
        console.print("each kind's ε is its releases alone; together they compose to the ε spent (less than "
                      "their sum)", highlight=False)
    console.print(f"ledger: {site.ledger_path}")


def _imaging_dataset(config: Path, dataset: str):
    site = load_site_config(config)
    ds = site.dataset(dataset)
    if ds.manifest is None:
        raise SiteError(f"dataset '{dataset}' of site '{site.site_id}' has no manifest (it is not an imaging dataset)")
    return site, ds


def _validation(config: Path, dataset: str):
    from client.ingest.imaging.manifest import read_manifest, validate

    site, ds = _imaging_dataset(config, dataset)
    with console.status(f"validating {dataset} of site {site.site_id} …"):
        report = validate(read_manifest(ds.manifest), set(ds.labels) or {0, 1}, ds.require_deidentified, ds.modality)
    from rich.markup import escape  # paths and case ids are data, not markup

    for problem in report.problems:  # each names its manifest line, case, file and reason
        console.print(f"[red]excluded[/] {escape(str(problem))}", highlight=False)
    for warning in report.warnings:
        console.print(f"[yellow]warning[/]  {escape(str(warning))}", highlight=False)
    console.print(f"{dataset}: {report.summary()}, {len(report.warnings)} warning(s)")
    return site, ds, report


@site_app.command("validate")
def site_validate(
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
    dataset: str = typer.Option("hippocampus", help="Dataset of the site config: an imaging manifest, or an "
                                                     "EHR extract named after its study schema (e.g. diabetes-visits)."),
) -> None:
    """Check a dataset of the site and list every problem at once (exit 1 if any): every case of an
    imaging manifest, or every row of an EHR extract against its study schema."""
    site = load_site_config(config)
    if site.dataset(dataset).manifest is None:
        raise typer.Exit(validate_site_extract(site.dataset(dataset)))
    _, _, report = _validation(config, dataset)
    if report.problems:
        raise typer.Exit(1)


def validate_site_extract(dataset) -> int:
    """``carefl site validate`` for an EHR dataset of site.toml: its name is the study schema's; exit code."""
    from client.ingest.ehr_extract import read_extract

    try:
        schema = builtin_schema(dataset.name)
    except SchemaError as exc:
        console.print(f"[bold red]error:[/] dataset '{dataset.name}' has a path but no shipped study schema of that "
                      f"name ({exc})", highlight=False)
        return 2
    try:  # the reader of the training loaders (ehr: heart_disease.read_centre; ehr-seq: load_extract), one verdict
        report = read_extract(dataset.path, schema).report
    except SiteError as exc:  # the file is missing
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 1
    for line in report.lines():  # never wrapped: a line naming rows stays one line
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    return 1 if report.refusal or report.rows_excluded else 0


@site_app.command("ingest")
def site_ingest(
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
    dataset: str = typer.Option("hippocampus", help="Imaging dataset of the site config."),
) -> None:
    """Validate, then preprocess the valid cases into the site's cache (training uses only those)."""
    from rich.progress import track

    from client.ingest.imaging.preprocess import PreprocessCache, PreprocessSpec

    site, ds, report = _validation(config, dataset)
    cache = PreprocessCache(site.cache_dir / dataset, PreprocessSpec(), set(ds.labels) or {0, 1})
    for case in track(report.valid, description="preprocessing", console=console):
        cache.load(case)
    cache.save_memo()
    console.print(f"cache {cache.folder}: {cache.misses} case(s) preprocessed, {cache.hits} already cached; "
                  f"{report.excluded} case(s) excluded")


@site_app.command("report")
def site_report_cmd(
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
    model: Path = typer.Option(..., "--model", help="The global model (a run's final_model.pt)."),
    out: Path = typer.Option(..., "--out", help="Folder for site-report.html and its PNGs (stays at the site)."),
    cases: int = typer.Option(4, "--cases", min=1, help="Imaging: test cases to draw predicted vs. true masks for."),
    seg_shape: Optional[str] = typer.Option(None, "--seg-shape", help="Imaging: z,y,x of preprocessing (default: "
                                            "the run's, from summary.json beside the model, else 48,64,48)."),
) -> None:
    """This site's own report on a global model: ROC and confusion matrix (EHR) or mask overlays (imaging)."""
    from deploy.site.report import write_site_report

    try:
        report = write_site_report(config, model, out, cases=cases, seg_shape=seg_shape)
    except SiteError as exc:
        fail(str(exc))
    except ValueError as exc:  # e.g. a malformed --seg-shape
        fail(str(exc))
    console.print(f"site report written to {report.html} with {len(report.images)} plot(s); it holds "
                  f"patient-level results: keep it at the site", highlight=False)


@site_app.command("predict")
def site_predict_cmd(
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
    model: Path = typer.Option(..., "--model", help="The global model (a run's final_model.pt; its summary.json "
                               "beside it gives the model card)."),
    input_path: Optional[Path] = typer.Option(None, "--input", help="Imaging: a DICOM series folder, or a folder of "
                                              "series folders. EHR: an extract (default: the site's dataset file)."),
    out: Path = typer.Option(..., "--out", help="Folder for the outputs and the model card (stays at the site)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset of site.toml it belongs to (default: "
                                          "the model's task's, e.g. hippocampus or heart-disease)."),
    kit: Optional[Path] = typer.Option(None, "--kit", help="Folder with audit-signing.key (default: beside "
                                       "site.toml)."),
) -> None:
    """Use a global model at this site: a DICOM SEG per series (imaging) or risk scores as CSV (EHR), with a
    model card; logged in the site's audit log by counts and hashes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from deploy.site.predict import predict

    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                      transient=True) as progress:
            result = predict(config, model, input_path, out, dataset=dataset, kit=kit, progress=progress)
    except (SiteError, ValueError) as exc:  # ImagingError, DataFormatError, a bad seg-shape: one line, never wrapped
        console.print(f"[bold red]error:[/] {escape((str(exc) or type(exc).__name__).splitlines()[0])}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    what = "series" if result.task == "seg" else ("rows" if result.task == "ehr" else "patients")
    console.print(f"{result.model} (task {result.task}) on {result.device}: {result.inputs} {what} → "
                  f"{len(result.outputs)} output(s) in {Path(out).resolve()}, model card {result.card.name}; "
                  f"{'logged in the site audit log' if result.audited else 'no audit log configured'}. "
                  f"Keep the outputs at the site.", highlight=False)
