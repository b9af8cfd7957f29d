"""``carefl demo`` and ``carefl simulate``: a whole consortium on this machine, then one run followed to the end.

    carefl demo [--task ehr|seg|ehr-seq]    kits, TLS, authenticated site agents on 127.0.0.1
    carefl simulate --sites N               the same apps on Flower's simulation engine (Ray)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from client.ingest.heart_disease import PUBLISHED_TRAIN_SIZES
from client.site import write_site_config
from deploy.cli.common import DataDir, TensorBoardFlag, console, heart_disease_files, out_dir, tensorboard_config
from deploy.cli.data import dicomize_sites
from deploy.coordinator.follow import check_run_config, follow
from deploy.datasets.data_dir import resolve_data_dir
from deploy.demo.loopback import LocalFederation
from server.settings import STRATEGIES
from shared_models.tasks import get_task


def demo(
    task: str = typer.Option("ehr", help="ehr: UCI heart disease, 4 hospitals; seg: hippocampus MRI, 3 sites "
                                         "(DP fine-tuning of a public U-Net); ehr-seq: synthetic diabetes visit "
                                         "histories, 3 sites, sequence model."),
    rounds: int = typer.Option(5, min=1, help="Federated rounds."),
    strategy: Optional[str] = typer.Option(None, help=" | ".join(STRATEGIES)),
    model: Optional[str] = typer.Option(None, help="A model of the task (default: the task's, shared_models/tasks.py)."),
    lr: Optional[float] = typer.Option(None, help="Local learning rate."),
    local_steps: Optional[int] = typer.Option(None, help="Optimizer steps per site and round."),
    data_dir: Optional[Path] = DataDir,
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<time>-demo)."),
    target_epsilon: Optional[float] = typer.Option(None, help="Study ε each site sizes its noise for (default 4)."),
    epsilon_budget: float = typer.Option(10.0, help="Lifetime ε budget written into each demo site's policy."),
    seg_cases: int = typer.Option(30, min=4, help="seg: hippocampus cases per site (DICOM written per run)."),
    pretrain_epochs: int = typer.Option(60, min=1, help="seg: epochs of the public model (built once, then cached)."),
    tensorboard: bool = TensorBoardFlag,
) -> None:
    """A real consortium on 127.0.0.1: kits, TLS, authenticated sites that approved the app, then one run."""
    study = get_task(task)
    out = out_dir(out, "demo")
    extra = {}
    if study.name == "ehr":
        files = heart_disease_files(data_dir)
        # Each hospital's own config file: its data, its privacy policy, its ledger (kept per demo run).
        # Each declares FLamby's published training size as its public weight (docs/PRIVACY.md, "No exact N").
        sites = {c: write_site_config(out / "deployment" / "sites" / c / "site.toml", c, p,
                                      epsilon_budget=epsilon_budget, delta=1e-4,
                                      nominal_size=PUBLISHED_TRAIN_SIZES[c]) for c, p in files.items()}
    elif study.name == "ehr-seq":
        # Visit histories, sequence model, DP; sites first pool DP feature statistics (round 0).
        sites = _synthetic_ehr_sites(out / "deployment", epsilon_budget)
    else:
        # DP fine-tuning of the public model: norms + head, full-batch SGD steps (shared_models/tasks.py)
        extra["init-checkpoint"] = str(_public_hippocampus_model(data_dir, pretrain_epochs))
        console.print(f"writing synthetic DICOM (MR series + SEG) for 3 sites, {seg_cases} cases each, "
                      f"each through its own scanner's shift …")
        sites = dict(dicomize_sites(out / "deployment" / "sites", 3, seg_cases, epsilon_budget, data_dir))
    extra.update({"sites": ",".join(sites), "out-dir": str(out), **tensorboard_config(tensorboard)})
    if target_epsilon is not None:
        extra["target-epsilon"] = target_epsilon
    run_config = check_run_config(rounds, strategy, model, lr, local_steps, extra,
                                  defaults=study.defaults(from_checkpoint="init-checkpoint" in extra))
    console.print(f"provisioning kits, starting the coordinator (TLS, SuperNode authentication) and "
                  f"{len(sites)} site agents on 127.0.0.1; logs in {out / 'deployment'}")
    with LocalFederation(out / "deployment", sites) as fed:
        follow(fed, run_config, out)


def _public_hippocampus_model(data_dir: Optional[Path], epochs: int) -> Path:
    """The coordinator's public model (public MSD cases, no DP), built on first use and cached by the hash of
    everything it depends on ($CAREFL_CACHE, default ~/.cache/carefl)."""
    from rich.progress import Progress

    from deploy.coordinator.pretrain import PretrainSettings, cached_hippocampus_model

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
    from deploy.datasets.synthetic_ehr import synthesize

    extracts = synthesize(deployment / "extracts", sites=3, seed=0)
    console.print(f"wrote synthetic visit extracts for {', '.join(extracts)} (schema diabetes-visits)")
    return {name: write_site_config(deployment / "sites" / name / "site.toml", name, path, dataset="diabetes-visits",
                                    epsilon_budget=epsilon_budget, delta=1e-4) for name, path in extracts.items()}


def simulate(
    sites: int = typer.Option(4, "--sites", min=2, help="Virtual sites (partition i → centre i mod 4)."),
    rounds: int = typer.Option(5, min=1),
    strategy: Optional[str] = typer.Option(None),
    model: Optional[str] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    local_steps: Optional[int] = typer.Option(None),
    data_dir: Optional[Path] = DataDir,
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<time>-sim)."),
    tensorboard: bool = TensorBoardFlag,
) -> None:
    """The same apps on Flower's simulation engine (Ray), for studies with many sites."""
    heart_disease_files(data_dir)
    root, _ = resolve_data_dir(data_dir)
    out = out_dir(out, "sim")
    run_config = check_run_config(rounds, strategy, model, lr, local_steps,
                             {"sim-data-dir": str(root), "out-dir": str(out), "min-sites": sites,
                              **tensorboard_config(tensorboard)})
    with LocalFederation(out / "deployment", {}, simulated_sites=sites) as fed:
        follow(fed, run_config, out)
