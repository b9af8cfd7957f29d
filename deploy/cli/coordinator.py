"""``carefl provision`` and ``carefl coordinator``: what the consortium lead runs.

    carefl provision consortium.toml --out kits/
    carefl coordinator start|stop|status|run|add-site|app-hash|pretrain
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from client.errors import SiteError
from deploy.cli.common import Kit, StateDir, TensorBoardFlag, console, tensorboard_config
from deploy.site.approval import app_hash
from deploy.coordinator.superlink import APP_DIR, Coordinator, DeploymentError, running_superlink, stop_background
from deploy.coordinator.provision import add_site, load_consortium, provision
from deploy.coordinator.follow import check_run_config, follow
from server.settings import STRATEGIES
from shared_models.tasks import TASKS, get_task

coordinator_app = typer.Typer(no_args_is_help=True, help="Commands for the consortium's coordinator.")


def provision_cmd(
    consortium: Path = typer.Argument(..., help="consortium.toml: the coordinator's host names and the sites."),
    out: Path = typer.Option(Path("kits"), "--out", help="Folder for the kits (one per participant)."),
) -> None:
    """Make the consortium CA, the coordinator's certificate, every site's keys, and one kit per participant."""
    spec = load_consortium(consortium)
    report = provision(spec, out)
    console.print(f"{len(report.created)} file(s) written, {len(report.kept)} existing kept (never overwritten)")
    console.print(f"  {out / 'coordinator'}  → the coordinator")
    for site in spec.sites:
        console.print(f"  {out / site.name}  → site {site.name}" + (" (its own key)" if site.public_key else ""))
    console.print(f"[yellow]{out / 'ca' / 'ca.key'} signs the coordinator's certificate: keep it offline, "
                  f"it belongs in no kit[/]")


# -- coordinator ---------------------------------------------------------------------------------

@coordinator_app.command("start")
def coordinator_start(
    kit: Path = Kit,
    state_dir: Path = StateDir,
    background: bool = typer.Option(False, "--background", help="Return once it is up (stop with `stop`)."),
) -> None:
    """Start the SuperLink (TLS, SuperNode authentication, persistent state) and register the kit's sites."""
    if running_superlink(state_dir):
        raise DeploymentError(f"a SuperLink started from {state_dir} is already running")
    coord = Coordinator(state_dir, kit)
    link = coord.start()
    console.print(f"SuperLink up on {coord.listen_host}:{coord.port} (TLS, SuperNode authentication); "
                  f"sites registered: {', '.join(coord.site_nodes()) or 'none'}; log {coord.state_dir / 'superlink.log'}")
    if background:
        coord.procs.clear()  # leave it running; `carefl coordinator stop` stops it by pid
        return
    try:
        code = link.popen.wait()
        raise DeploymentError(f"SuperLink exited with code {code}; see {coord.state_dir / 'superlink.log'}")
    finally:
        coord.stop()


@coordinator_app.command("stop")
def coordinator_stop(state_dir: Path = StateDir) -> None:
    """Stop a SuperLink started with --background from this state directory."""
    console.print("stopped" if stop_background(state_dir) else f"no SuperLink of {state_dir} is running")


def _running(kit: Path, state_dir: Path) -> Coordinator:
    info = running_superlink(state_dir)
    if info is None:
        raise DeploymentError(f"no SuperLink of {state_dir} is running; `carefl coordinator start --kit {kit} "
                              f"--state-dir {state_dir} --background` first")
    return Coordinator(state_dir, kit, port=int(info["port"]))


@coordinator_app.command("status")
def coordinator_status(kit: Path = Kit, state_dir: Path = StateDir) -> None:
    """Which sites are online, as the SuperLink sees them."""
    coord = _running(kit, state_dir)
    by_id = {str(n["node-id"]): n for n in coord.nodes()}
    table = Table(title="sites", title_justify="left")
    for col in ("site", "node id", "status", "online since", "offline since"):
        table.add_column(col)
    for site, node_id in sorted(coord.site_nodes().items()):
        node = by_id.get(node_id, {})
        status = str(node.get("status", "unknown"))
        colour = {"online": "green", "offline": "red"}.get(status, "yellow")
        table.add_row(site, node_id, f"[{colour}]{status}[/]", str(node.get("online-at", "–")),
                      str(node.get("offline-at", "–")))
    console.print(table)


@coordinator_app.command("run")
def coordinator_run(
    kit: Path = Kit,
    state_dir: Path = StateDir,
    task: str = typer.Option("ehr", help=" | ".join(TASKS) + " (shared_models/tasks.py)"),
    sites: Optional[str] = typer.Option(None, help="Comma-separated site ids; only these receive work."),
    rounds: int = typer.Option(5, min=1),
    min_sites: Optional[int] = typer.Option(None, min=1, help="Sites a round needs (default: all named)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory from its checkpoint."),
    strategy: Optional[str] = typer.Option(None, help=" | ".join(STRATEGIES)),
    model: Optional[str] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    local_steps: Optional[int] = typer.Option(None),
    target_epsilon: Optional[float] = typer.Option(None, help="Study ε each site sizes its noise for."),
    round_timeout: Optional[float] = typer.Option(None, help="Seconds a site has to reply in each round "
                                                  "(default 600; keep it well above a site's slowest round)."),
    round_retries: Optional[int] = typer.Option(None, min=0, help="Re-sends of a round that has fewer than "
                                                "min-sites valid updates (default 1)."),
    max_update_norm: Optional[float] = typer.Option(None, min=0, help="Reject an update farther than this (L2) "
                                                    "from the global model (default 0: off)."),
    byzantine_sites: Optional[int] = typer.Option(None, min=0, help="krum / multikrum: sites that may be hostile."),
    bound_factor: Optional[float] = typer.Option(None, min=1.0, help="An update longer than this × the round's "
                                                 "median update counts less the longer it is (default 3)."),
    outlier_policy: Optional[str] = typer.Option(None, help="flag | exclude: what happens to a site that is an "
                                                 "outlier outlier-rounds rounds in a row (default flag)."),
    secure_aggregation: bool = typer.Option(False, "--secure-aggregation", help="SecAgg+: the coordinator sees "
                                            "only the sum of the sites' updates (FedAvg family only)."),
    distributed_dp: bool = typer.Option(False, "--distributed-dp", help="With --secure-aggregation: sites whose "
                                        "policy opts in add σ/√t each (docs/PRIVACY.md); needs a fixed "
                                        "noise multiplier, --local-steps 1 and sgd."),
    noise_multiplier: Optional[float] = typer.Option(None, help="σ to ask of every site (or of the secure sum, "
                                                     "under --distributed-dp) instead of a target ε."),
    init_checkpoint: Optional[Path] = typer.Option(None, help="seg: start from this public checkpoint (`carefl "
                                                   "coordinator pretrain`) and DP fine-tune it (shared_models/"
                                                   "tasks.py: SEG_DP_FINETUNE)."),
    train_params: Optional[str] = typer.Option(None, help="all | decoder | norms-head: what the sites train."),
    trim_beta: Optional[float] = typer.Option(None, help="fedtrimmedavg: fraction cut at each end (default 0.2)."),
    weight_average: Optional[float] = typer.Option(None, min=0.0, max=0.99, help="Decay of a moving average of the "
                                                   "global models: the sites evaluate it and the run publishes it "
                                                   "(post-processing, no ε; default 0: off)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default <state-dir>/runs/<time>-<task>)."),
    tensorboard: bool = TensorBoardFlag,
) -> None:
    """Submit a study to the named sites and follow it round by round (or resume one after a crash)."""
    coord = _running(kit, state_dir)
    if resume is not None:
        from server.checkpoint import CheckpointError, load
        try:
            saved = load(resume.resolve()).run_config
        except CheckpointError as exc:
            raise DeploymentError(str(exc)) from None
        console.print(f"resuming {resume} (app sha256:{app_hash(coord.app_dir)})")
        follow(coord, {**saved, "resume-from": str(resume.resolve()), "out-dir": str(resume.resolve())},
               resume.resolve())
        return
    study = get_task(task)
    if init_checkpoint is not None and not study.finetune_config:
        raise SiteError(f"--init-checkpoint is offered for tasks that start from a public model "
                        f"({', '.join(t.name for t in TASKS.values() if t.finetune_config)})")
    if not sites:
        raise SiteError("name the sites of the study with --sites a,b,c")
    names = [s.strip() for s in sites.split(",") if s.strip()]
    unknown = [s for s in names if s not in coord.site_nodes()]
    if unknown:
        raise DeploymentError(f"site(s) {', '.join(unknown)} are not registered at this coordinator "
                              f"(known: {', '.join(coord.site_nodes()) or 'none'})")
    out = (out or coord.state_dir / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{task}").resolve()
    extra = {"sites": ",".join(names), "out-dir": str(out), "min-sites": min_sites or len(names),
             **tensorboard_config(tensorboard)}
    if init_checkpoint is not None:
        extra["init-checkpoint"] = str(init_checkpoint.resolve())
    if train_params is not None:
        extra["train-params"] = train_params
    if target_epsilon is not None:
        extra["target-epsilon"] = target_epsilon
    if noise_multiplier is not None:  # a fixed σ replaces the study's target ε
        extra.update({"noise-multiplier": noise_multiplier, "target-epsilon": 0.0})
    if secure_aggregation or distributed_dp:
        extra.update({"secure-aggregation": secure_aggregation, "distributed-dp": distributed_dp})
    knobs = {"round-timeout": round_timeout, "round-retries": round_retries, "max-update-norm": max_update_norm,
             "byzantine-sites": byzantine_sites, "trim-beta": trim_beta, "bound-factor": bound_factor,
             "outlier-policy": outlier_policy, "weight-average": weight_average}
    extra.update({k: v for k, v in knobs.items() if v is not None})
    run_config = check_run_config(rounds, strategy, model, lr, local_steps, extra,
                                  defaults=study.defaults(from_checkpoint=init_checkpoint is not None))
    console.print(f"app sha256:{app_hash(coord.app_dir)} (each site must have approved it)")
    follow(coord, run_config, out)


@coordinator_app.command("pretrain")
def coordinator_pretrain(
    out: Path = typer.Option(..., "--out", help="The checkpoint file to write (its provenance goes beside it, .json)."),
    dataset: str = typer.Option("hippocampus", help="hippocampus: the public set of MSD Task04 (every 5th case); "
                                                  "or give --manifest for public data of your own."),
    manifest: Optional[Path] = typer.Option(None, help="A manifest of public cases (case_id,image,mask,split; "
                                                       "labels 0, 1, 2 as seg-unet3d has); its test split is "
                                                       "held out to judge the model."),
    dataset_name: Optional[str] = typer.Option(None, help="With --manifest: the public data set's name."),
    licence: Optional[str] = typer.Option(None, help="With --manifest: the licence that makes it public."),
    epochs: int = typer.Option(60, min=1),
    lr: float = typer.Option(2e-3, min=0.0),
    seed: int = typer.Option(0),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the public data set is (else "
                                                                      "$CAREFL_DATA, else ~/.cache/carefl)."),
) -> None:
    """Train the study's starting model, without DP, on public data (never a site's), with its provenance."""
    from rich.progress import Progress

    from deploy.datasets.data_dir import resolve_data_dir
    from deploy.datasets import hippocampus
    from client.ingest.imaging.manifest import read_manifest
    from deploy.coordinator.pretrain import PretrainSettings, hippocampus_public_cases, pretrain

    if manifest is not None:
        if not dataset_name or not licence:
            raise SiteError("with --manifest also give --dataset-name and --licence: the checkpoint records both")
        cases, name, licence_text = read_manifest(manifest), dataset_name, licence
    elif dataset == "hippocampus":
        cases = hippocampus_public_cases(resolve_data_dir(data_dir)[0])
        name = f"MSD Task04 Hippocampus (public set: every {hippocampus.PUBLIC_EVERY}th case)"
        licence_text = hippocampus.LICENCE
    else:
        raise SiteError(f"unknown public data set '{dataset}'; available: hippocampus (or --manifest)")
    settings = PretrainSettings(epochs=epochs, lr=lr, seed=seed)
    console.print(f"pretraining {settings.model} on {len(cases)} public case(s) of {name}, no DP, {epochs} epochs")
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("epochs", total=epochs)
        digest = pretrain(cases, set(hippocampus.LABELS), settings, out, out.parent / ".preprocessed", name,
                          licence_text, on_epoch=lambda *_: progress.advance(bar))
    provenance = out.with_suffix(".json")
    console.print(f"wrote {out} (weights sha256:{digest}); provenance in {provenance}")
    console.print(f"start a study from it: carefl coordinator run … --init-checkpoint {out}")


@coordinator_app.command("add-site")
def coordinator_add_site(
    name: str = typer.Argument(..., help="The site's id."),
    public_key: Path = typer.Argument(..., help="The site's supernode.pub (from `carefl site keygen`)."),
    kit: Path = Kit,
    state_dir: Path = StateDir,
    replace: bool = typer.Option(False, "--replace", help="Rotate: replace the site's existing key."),
) -> None:
    """Add a site that made its own key; registered now if the SuperLink runs, else at the next start."""
    target = add_site(kit, name, public_key, replace)
    console.print(f"site {name}: key stored in {target}")
    if running_superlink(state_dir):
        added = _running(kit, state_dir).register_sites()
        console.print(f"registered with the running SuperLink: {', '.join(added) or 'already registered'}")


@coordinator_app.command("app-hash")
def coordinator_app_hash(app: Path = typer.Option(APP_DIR, "--app", help="The Flower app folder.")) -> None:
    """The sha256 of the app the coordinator runs: what sites put in their approval list."""
    print(app_hash(app))
