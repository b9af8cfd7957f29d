"""``carefl`` command line: demo, simulation and data commands for sites and coordinators.

Errors a person can fix are printed as one clear line (exit code 2); no tracebacks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from client import fetch as fetch_mod
from client import heart_disease
from client.data_dir import resolve_data_dir
from client.errors import SiteError
from client.site import load_site_config, write_site_config
from privacy.accounting import ACCOUNTANTS, epsilon, plan_noise, sample_rate
from privacy.audit.verify import AuditError
from privacy.ledger import LedgerError, PrivacyLedger
from privacy.policy import PolicyError, default_delta
from rich.table import Table
from server.run_dir import json_safe
from deploy import cli_audit, cli_deploy, cli_ehr, cli_report
from deploy.approval import ApprovalError
from deploy.coordinator import DeploymentError
from deploy.provision import ProvisionError
from deploy.local import LocalFederation
from deploy.runs import check_run_config, console, follow
from server.settings import SEG_DP_FINETUNE, STRATEGIES, RunConfigError
from server.sites import SiteSelectionError
from shared_models.public_checkpoint import PublicCheckpointError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="carefl: federated learning for hospitals.")
data_app = typer.Typer(no_args_is_help=True, help="Get and check the public data sets.")
app.add_typer(data_app, name="data")
privacy_app = typer.Typer(no_args_is_help=True, help="Plan differential privacy for a study.")
app.add_typer(privacy_app, name="privacy")
site_app = typer.Typer(no_args_is_help=True, help="Commands for a hospital site.")
app.add_typer(site_app, name="site")
app.add_typer(cli_deploy.coordinator_app, name="coordinator")
app.add_typer(cli_audit.audit_app, name="audit")
app.command("provision")(cli_deploy.provision_cmd)
site_app.command("keygen")(cli_deploy.site_keygen)
site_app.command("approve")(cli_deploy.site_approve)
site_app.command("start")(cli_deploy.site_start)
site_app.command("report")(cli_report.site_report_cmd)
app.command("report")(cli_report.report_cmd)
data_app.command("synth-ehr")(cli_ehr.synth_ehr)
data_app.command("validate-extract")(cli_ehr.validate_extract)

USER_ERRORS = (SiteError, DeploymentError, RunConfigError, SiteSelectionError, LedgerError, PolicyError,
               ProvisionError, ApprovalError, AuditError, PublicCheckpointError)

DataDir = typer.Option(None, "--data-dir", help="Data directory (else $CAREFL_DATA, else ~/.cache/carefl).")


def _heart_disease_files(data_dir: Optional[Path]) -> dict[str, Path]:
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


def _out_dir(out: Optional[Path], kind: str) -> Path:
    return (out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}").resolve()


@app.command()
def demo(
    task: str = typer.Option("ehr", help="ehr: UCI heart disease, 4 hospitals; seg: hippocampus MRI, 3 sites; "
                                         "ehr-seq: synthetic diabetes visit histories, 3 sites, sequence model."),
    rounds: int = typer.Option(5, min=1, help="Federated rounds."),
    strategy: Optional[str] = typer.Option(None, help=" | ".join(STRATEGIES)),
    model: Optional[str] = typer.Option(None, help="ehr-logreg | ehr-mlp"),
    lr: Optional[float] = typer.Option(None, help="Local learning rate."),
    local_steps: Optional[int] = typer.Option(None, help="Optimizer steps per site and round."),
    data_dir: Optional[Path] = DataDir,
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<time>-demo)."),
    target_epsilon: Optional[float] = typer.Option(None, help="Study ε each site sizes its noise for (default 4)."),
    epsilon_budget: float = typer.Option(10.0, help="Lifetime ε budget written into each demo site's policy."),
    seg_cases: int = typer.Option(30, min=4, help="seg: hippocampus cases per site (DICOM written per run)."),
    pretrain_epochs: int = typer.Option(60, min=1, help="seg: epochs of the public model (built once, then cached)."),
    tensorboard: bool = cli_report.TensorBoardFlag,
) -> None:
    """A real consortium on 127.0.0.1: kits, TLS, authenticated sites that approved the app, then one run."""
    if task not in ("ehr", "seg", "ehr-seq"):
        raise SiteError(f"unknown task '{task}'; available: ehr, seg, ehr-seq")
    out = _out_dir(out, "demo")
    if task == "ehr":
        files = _heart_disease_files(data_dir)
        # Each hospital's own config file: its data, its privacy policy, its ledger (kept per demo run).
        sites = {c: write_site_config(out / "deployment" / "sites" / c / "site.toml", c, p,
                                      epsilon_budget=epsilon_budget, delta=1e-4) for c, p in files.items()}
        extra = {}
    elif task == "ehr-seq":
        sites = _synthetic_ehr_sites(out / "deployment", epsilon_budget)
        # Visit histories, sequence model, DP; sites first pool DP feature statistics (round 0).
        extra = {"task": "ehr-seq", "model": model or "ehr-gru-attn", "schema": "diabetes-visits", "batch-size": 40,
                 "optimizer": "adam", "lr": lr or 0.01, "local-steps": 0, "local-epochs": 2}
    else:
        public = _public_hippocampus_model(data_dir, pretrain_epochs)
        console.print(f"writing synthetic DICOM (MR series + SEG) for 3 sites, {seg_cases} cases each, "
                      f"each through its own scanner's shift …")
        configs = _dicomize(out / "deployment" / "sites", 3, seg_cases, epsilon_budget, data_dir)
        sites = dict(configs)
        # DP fine-tuning of the public model: norms + head, full-batch SGD steps (server/settings.py)
        extra = {"task": "seg", "model": model or "seg-unet3d", **SEG_DP_FINETUNE, "init-checkpoint": str(public),
                 **({"lr": lr} if lr else {}), **({"local-steps": local_steps} if local_steps else {})}
    extra.update({"sites": ",".join(sites), "out-dir": str(out), **cli_report.tensorboard_config(tensorboard)})
    if target_epsilon is not None:
        extra["target-epsilon"] = target_epsilon
    run_config = check_run_config(rounds, strategy, model, lr, local_steps, extra)
    console.print(f"provisioning kits, starting the coordinator (TLS, SuperNode authentication) and "
                  f"{len(sites)} site agents on 127.0.0.1; logs in {out / 'deployment'}")
    with LocalFederation(out / "deployment", sites) as fed:
        follow(fed, run_config, out)


def _public_hippocampus_model(data_dir: Optional[Path], epochs: int) -> Path:
    """The coordinator's public model (public MSD cases, no DP), built on first use and cached by the hash of
    everything it depends on ($CAREFL_CACHE, default ~/.cache/carefl)."""
    from rich.progress import Progress

    from deploy.pretrain import PretrainSettings, cached_hippocampus_model

    root, _ = resolve_data_dir(data_dir)
    cache = Path(os.environ.get("CAREFL_CACHE") or Path.home() / ".cache" / "carefl").expanduser()
    started = time.monotonic()
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("pretraining the public model (first use only)", total=epochs)
        path, built = cached_hippocampus_model(root, cache, PretrainSettings(epochs=epochs),
                                               on_epoch=lambda *_: progress.advance(bar))
    from shared_models.public_checkpoint import load

    provenance = load(path).provenance
    console.print(f"public model {path.name}: {provenance['train_cases']} public cases, no DP, held-out Dice "
                  f"{provenance['held_out_mean_dice']}; " + (f"built in {time.monotonic() - started:.0f} s"
                                                             if built else "from the cache"))
    return path


def _synthetic_ehr_sites(deployment: Path, epsilon_budget: float) -> dict[str, Path]:
    """Three synthetic hospitals' visit extracts (``carefl data synth-ehr``) and their site configs."""
    from client.synthetic_ehr import synthesize

    extracts = synthesize(deployment / "extracts", sites=3, seed=0)
    console.print(f"wrote synthetic visit extracts for {', '.join(extracts)} (schema diabetes-visits)")
    return {name: write_site_config(deployment / "sites" / name / "site.toml", name, path, dataset="diabetes-visits",
                                    epsilon_budget=epsilon_budget, delta=1e-4) for name, path in extracts.items()}


@app.command()
def simulate(
    sites: int = typer.Option(4, "--sites", min=2, help="Virtual sites (partition i → centre i mod 4)."),
    rounds: int = typer.Option(5, min=1),
    strategy: Optional[str] = typer.Option(None),
    model: Optional[str] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    local_steps: Optional[int] = typer.Option(None),
    data_dir: Optional[Path] = DataDir,
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<time>-sim)."),
    tensorboard: bool = cli_report.TensorBoardFlag,
) -> None:
    """The same apps on Flower's simulation engine (Ray), for studies with many sites."""
    _heart_disease_files(data_dir)
    root, _ = resolve_data_dir(data_dir)
    out = _out_dir(out, "sim")
    run_config = check_run_config(rounds, strategy, model, lr, local_steps,
                             {"sim-data-dir": str(root), "out-dir": str(out), "min-sites": sites,
                              **cli_report.tensorboard_config(tensorboard)})
    with LocalFederation(out / "deployment", {}, simulated_sites=sites) as fed:
        follow(fed, run_config, out)


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
    for centre, path in _heart_disease_files(data_dir).items():
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


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(143)  # unwinds the `with LocalFederation` blocks, which stop their processes


@privacy_app.command("plan")
def privacy_plan(
    rounds: int = typer.Option(..., min=1, help="Federated rounds of the study."),
    epochs: int = typer.Option(1, min=1, help="Local epochs per round."),
    n: int = typer.Option(..., min=1, help="Patients in the site's dataset."),
    batch: int = typer.Option(..., min=1, help="Expected (Poisson) batch size."),
    target_epsilon: float = typer.Option(..., min=0.01, help="ε the whole study may cost."),
    delta: Optional[float] = typer.Option(None, help="δ (default: a power of ten ≥ 10× below 1/N)."),
    accountant: str = typer.Option("prv", help="prv | rdp"),
) -> None:
    """The noise multiplier σ for a whole study: sized for rounds × epochs, not for one round."""
    if accountant not in ACCOUNTANTS:
        raise PolicyError(f"accountant must be one of {', '.join(ACCOUNTANTS)}")
    delta = delta if delta is not None else default_delta(n)
    q = sample_rate(n, batch)
    steps = rounds * epochs * round(1 / q)
    sigma = plan_noise(target_epsilon, delta, n, batch, steps, accountant)
    reached = epsilon([(sigma, q, steps)], delta, accountant)
    console.print(f"noise multiplier σ = {sigma:.4f}")
    console.print(f"  {rounds} rounds × {epochs} epochs = {steps} steps at sample rate q = {q:.4g} "
                  f"(N={n}, batch {batch}) → ε = {reached:.3f} at δ = {delta:g} ({accountant})")


@site_app.command("budget")
def site_budget(
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Spent and remaining ε per dataset, with δ and the rounds that spent it (from the site's ledger)."""
    site = load_site_config(config)
    ledger = PrivacyLedger(site.ledger_path)
    report = {"site": site.site_id, "ledger": str(site.ledger_path), "datasets": {}}
    for name, ds in site.datasets.items():
        rounds = ledger.rounds(name)
        # δ as charged (the policy's, or its default from N at charge time); the policy's when nothing was
        delta = rounds[-1]["delta"] if rounds else ds.policy.delta
        spent = ledger.spent(name, delta, ds.policy.accountant) if rounds else 0.0
        report["datasets"][name] = {
            "epsilon_spent": spent, "epsilon_budget": ds.policy.epsilon_budget,
            "epsilon_remaining": max(ds.policy.epsilon_budget - spent, 0.0), "delta": delta,
            "accountant": ds.policy.accountant, "rounds": len(rounds),
            "runs": sorted({r["run_id"] for r in rounds}),
            "non_dp_rounds": sum(1 for r in rounds if r["noise_multiplier"] == 0),
        }
    if as_json:
        print(json.dumps(json_safe(report), indent=2))
        return
    table = Table(title=f"privacy budget of site {site.site_id}", title_justify="left")
    for col in ("dataset", "ε spent", "ε budget", "ε remaining", "δ", "accountant", "rounds", "runs"):
        table.add_column(col)
    for name, d in report["datasets"].items():
        spent_text = "∞ (non-DP rounds)" if d["non_dp_rounds"] else f"{d['epsilon_spent']:.4f}"
        table.add_row(name, spent_text, f"{d['epsilon_budget']:g}", f"{d['epsilon_remaining']:.4f}",
                      "–" if d["delta"] is None else f"{d['delta']:g}", d["accountant"], str(d["rounds"]),
                      str(len(d["runs"])))
    console.print(table)
    console.print(f"ledger: {site.ledger_path}")


def _imaging_dataset(config: Path, dataset: str):
    site = load_site_config(config)
    ds = site.dataset(dataset)
    if ds.manifest is None:
        raise SiteError(f"dataset '{dataset}' of site '{site.site_id}' has no manifest (it is not an imaging dataset)")
    return site, ds


def _validation(config: Path, dataset: str):
    from client.imaging.manifest import read_manifest, validate

    site, ds = _imaging_dataset(config, dataset)
    with console.status(f"validating {dataset} of site {site.site_id} …"):
        report = validate(read_manifest(ds.manifest), set(ds.labels) or {0, 1}, ds.require_deidentified)
    for problem in report.problems:
        console.print(f"[red]excluded[/] {problem}", highlight=False)
    for warning in report.warnings:
        console.print(f"[yellow]warning[/]  {warning}", highlight=False)
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
        from deploy.cli_ehr import validate_site_extract
        raise typer.Exit(validate_site_extract(site.dataset(dataset)))
    _, _, report = _validation(config, dataset)
    if report.problems:
        raise typer.Exit(1)


@site_app.command("ingest")
def site_ingest(
    config: Path = typer.Option(..., "--config", help="The site's config file (site.toml)."),
    dataset: str = typer.Option("hippocampus", help="Imaging dataset of the site config."),
) -> None:
    """Validate, then preprocess the valid cases into the site's cache (training uses only those)."""
    from rich.progress import track

    from client.imaging.preprocess import PreprocessCache, PreprocessSpec

    site, ds, report = _validation(config, dataset)
    cache = PreprocessCache(site.cache_dir / dataset, PreprocessSpec(), set(ds.labels) or {0, 1})
    for case in track(report.valid, description="preprocessing", console=console):
        cache.load(case)
    cache.save_memo()
    console.print(f"cache {cache.folder}: {cache.misses} case(s) preprocessed, {cache.hits} already cached; "
                  f"{report.excluded} case(s) excluded")


@data_app.command("dicomize")
def data_dicomize(
    out: Path = typer.Option(..., "--out", help="Folder for the sites' DICOM data, manifests and site configs."),
    sites: int = typer.Option(3, min=1, help="Synthetic sites to split the cases into."),
    cases_per_site: int = typer.Option(0, min=0, help="Limit per site (0: all)."),
    epsilon_budget: float = typer.Option(10.0, help="Lifetime ε written into each site's policy."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """MSD hippocampus NIfTI → DICOM MR series + DICOM SEG per case (synthetic, clearly fake identifiers)."""
    for site_id, config in _dicomize(out, sites, cases_per_site, epsilon_budget, data_dir).items():
        console.print(f"{site_id}: {config.parent} (site.toml, hippocampus.csv, dicom/)")


def _dicomize(out: Path, sites: int, cases_per_site: int, epsilon_budget: float, data_dir) -> dict[str, Path]:
    from rich.progress import Progress

    from client.imaging import hippocampus

    root, _ = resolve_data_dir(data_dir)
    total = sites * cases_per_site if cases_per_site else len(hippocampus.cases(root))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("DICOM from NIfTI", total=total)
        return hippocampus.dicomize_sites(root, out, sites, cases_per_site, epsilon_budget,
                                          on_case=lambda *_: progress.advance(task))


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app()
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; every process this command started has been stopped")
        sys.exit(130)


if __name__ == "__main__":
    main()
