"""``carefl demo`` and ``carefl simulate``: a whole consortium on this machine, then one run followed to the end.

    carefl demo [--task TASK]                    kits, TLS, authenticated site agents on 127.0.0.1
    carefl simulate [--task TASK] --sites N      the same apps without a deployment: Flower's simulation
                                                 engine (Ray) for heart disease, else in one process

Each task of the table (shared_models/tasks.py) has its demo sites here (``DEMO_SITES``): how many
``carefl demo`` starts and how they are written.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import typer

from client.ingest.heart_disease import PUBLISHED_TRAIN_SIZES
from client.site import write_site_config
from deploy.cli.common import DataDir, TensorBoardFlag, console, heart_disease_files, out_dir, tensorboard_config
from deploy.cli.data import dicomize_sites
from deploy.coordinator.follow import check_run_config, follow
from deploy.datasets.data_dir import resolve_data_dir
from deploy.demo.inprocess import InProcessFederation
from deploy.demo.loopback import LocalFederation
from server.settings import STRATEGIES
from shared_models.tasks import TASKS, UnknownTaskError, get_task


@dataclass(frozen=True)
class DemoOptions:
    """What the person chose on the command line that the sites' writers use."""
    data_dir: Optional[Path]
    epsilon_budget: float = 10.0
    seg_cases: int = 30
    pretrain_epochs: int = 60


@dataclass(frozen=True)
class DemoSites:
    """A task's demo sites: how many ``carefl demo`` starts, and the writer of ``n`` of them into a deployment
    folder, which returns site id → site.toml and the run-config entries the sites need (e.g. init-checkpoint)."""
    sites: int
    write: Callable[[Path, int, DemoOptions], tuple[dict[str, Path], dict]]
    about: str


def _heart_disease_sites(deployment: Path, n: int, opts: DemoOptions) -> tuple[dict[str, Path], dict]:
    """The 4 UCI hospitals. Each hospital's own config file: its data, its privacy policy, its ledger (kept per
    demo run). Each declares FLamby's published training size as its public weight (docs/PRIVACY.md, "No exact N")."""
    files = heart_disease_files(opts.data_dir)
    return {c: write_site_config(deployment / "sites" / c / "site.toml", c, p, epsilon_budget=opts.epsilon_budget,
                                 delta=1e-4, nominal_size=PUBLISHED_TRAIN_SIZES[c])
            for c, p in list(files.items())[:n]}, {}


def _synthetic_ehr_sites(deployment: Path, n: int, opts: DemoOptions) -> tuple[dict[str, Path], dict]:
    """Synthetic hospitals' visit extracts (``carefl data synth-ehr``) and their site configs: visit histories,
    sequence model, DP; sites first pool DP feature statistics (round 0)."""
    from deploy.datasets.synthetic_ehr import synthesize

    extracts = synthesize(deployment / "extracts", sites=n, seed=0)
    console.print(f"wrote synthetic visit extracts for {', '.join(extracts)} (schema diabetes-visits)")
    return {name: write_site_config(deployment / "sites" / name / "site.toml", name, path, dataset="diabetes-visits",
                                    epsilon_budget=opts.epsilon_budget, delta=1e-4)
            for name, path in extracts.items()}, {}


def _hippocampus_sites(deployment: Path, n: int, opts: DemoOptions) -> tuple[dict[str, Path], dict]:
    """Synthetic DICOM sites from the hippocampus data, and DP fine-tuning of the public model: norms + head,
    full-batch SGD steps (shared_models/tasks.py)."""
    extra = {"init-checkpoint": str(_public_hippocampus_model(opts.data_dir, opts.pretrain_epochs))}
    console.print(f"writing synthetic DICOM (MR series + SEG) for {n} sites, {opts.seg_cases} cases each, "
                  f"each through its own scanner's shift …")
    return dict(dicomize_sites(deployment / "sites", n, opts.seg_cases, opts.epsilon_budget, opts.data_dir)), extra


# Each task of the table (shared_models/tasks.py) → its demo sites (tests/test_task_table.py: none is missing).
DEMO_SITES: dict[str, DemoSites] = {
    "ehr": DemoSites(4, _heart_disease_sites, "UCI heart disease, 4 hospitals"),
    "ehr-seq": DemoSites(3, _synthetic_ehr_sites, "synthetic diabetes visit histories, 3 sites, sequence model"),
    "seg": DemoSites(3, _hippocampus_sites, "hippocampus MRI, 3 sites (DP fine-tuning of a public U-Net)"),
}


def demo_sites(task: str) -> DemoSites:
    """The task's demo sites; an unknown task is the table's one error."""
    study = get_task(task)
    if study.name not in DEMO_SITES:
        raise UnknownTaskError(f"task '{study.name}' has no demo sites (deploy/cli/demo.py: DEMO_SITES); "
                               f"demo sites exist for {', '.join(DEMO_SITES)}")
    return DEMO_SITES[study.name]


TASK_HELP = " | ".join(TASKS) + " (shared_models/tasks.py). " + "; ".join(
    f"{name}: {DEMO_SITES[name].about}" for name in TASKS if name in DEMO_SITES) + "."
SegCases = typer.Option(30, min=4, help="seg: hippocampus cases per site (DICOM written per run).")
PretrainEpochs = typer.Option(60, min=1, help="seg: epochs of the public model (built once, then cached).")


def demo(
    task: str = typer.Option("ehr", help=TASK_HELP),
    rounds: int = typer.Option(5, min=1, help="Federated rounds."),
    strategy: Optional[str] = typer.Option(None, help=" | ".join(STRATEGIES)),
    model: Optional[str] = typer.Option(None, help="A model of the task (default: the task's, shared_models/tasks.py)."),
    lr: Optional[float] = typer.Option(None, help="Local learning rate."),
    local_steps: Optional[int] = typer.Option(None, help="Optimizer steps per site and round."),
    data_dir: Optional[Path] = DataDir,
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<time>-demo)."),
    target_epsilon: Optional[float] = typer.Option(None, help="Study ε each site sizes its noise for (default 4)."),
    epsilon_budget: float = typer.Option(10.0, help="Lifetime ε budget written into each demo site's policy."),
    seg_cases: int = SegCases,
    pretrain_epochs: int = PretrainEpochs,
    tensorboard: bool = TensorBoardFlag,
) -> None:
    """A real consortium on 127.0.0.1: kits, TLS, authenticated sites that approved the app, then one run."""
    study, maker = get_task(task), demo_sites(task)
    out = out_dir(out, "demo")
    sites, extra = maker.write(out / "deployment", maker.sites, DemoOptions(data_dir, epsilon_budget, seg_cases,
                                                                           pretrain_epochs))
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


# Dataset kinds whose virtual site Flower's simulation engine builds from a partition id (client/site.py:
# site_from_configs): partition i → centre i mod 4. Other tasks are simulated on their demo sites, in one process.
RAY_PARTITIONED_KINDS = ("heart-disease",)


def simulate(
    task: str = typer.Option("ehr", help=" | ".join(TASKS) + " (shared_models/tasks.py)."),
    sites: int = typer.Option(4, "--sites", min=2, help="Virtual sites (heart disease: partition i → centre i mod 4; "
                                                       "other tasks: that many demo sites)."),
    rounds: int = typer.Option(5, min=1),
    strategy: Optional[str] = typer.Option(None),
    model: Optional[str] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    local_steps: Optional[int] = typer.Option(None),
    data_dir: Optional[Path] = DataDir,
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<time>-sim)."),
    seg_cases: int = SegCases,
    pretrain_epochs: int = PretrainEpochs,
    tensorboard: bool = TensorBoardFlag,
) -> None:
    """The same apps without a deployment, for studies with many sites: heart disease on Flower's simulation
    engine (Ray); other tasks on that many demo sites in one process (deploy/demo/inprocess.py)."""
    study = get_task(task)
    if study.dataset_kind in RAY_PARTITIONED_KINDS:
        heart_disease_files(data_dir)
        root, _ = resolve_data_dir(data_dir)
        out = out_dir(out, "sim")
        run_config = check_run_config(rounds, strategy, model, lr, local_steps,
                                      {"sim-data-dir": str(root), "out-dir": str(out), "min-sites": sites,
                                       **tensorboard_config(tensorboard)}, defaults=study.defaults())
        with LocalFederation(out / "deployment", {}, simulated_sites=sites) as fed:
            follow(fed, run_config, out)
        return
    maker = demo_sites(task)
    out = out_dir(out, "sim")
    names, extra = maker.write(out / "deployment", sites, DemoOptions(data_dir, seg_cases=seg_cases,
                                                                      pretrain_epochs=pretrain_epochs))
    extra.update({"sites": ",".join(names), "out-dir": str(out), **tensorboard_config(tensorboard)})
    run_config = check_run_config(rounds, strategy, model, lr, local_steps, extra,
                                  defaults=study.defaults(from_checkpoint="init-checkpoint" in extra))
    console.print(f"{len(names)} {task} sites in one process; its log: {out / 'deployment' / 'study.log'}")
    with InProcessFederation(out / "deployment", names) as fed:
        follow(fed, run_config, out)
