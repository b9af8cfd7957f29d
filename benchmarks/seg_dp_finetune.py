"""DP segmentation that segments: public pretraining, then DP fine-tuning at three shifted sites.

The experiment of docs/RESULTS.md ("Hippocampus with public pretraining and shifted sites"):

- MSD hippocampus is split into a public set (every 5th case, 52) the coordinator pretrains on
  without DP (``deploy/coordinator/pretrain.py``), and three private sites (round-robin over the other 208).
- Each site's images pass through a fixed acquisition shift (``hippocampus.SCANNER_SHIFTS``: a
  contrast curve, a coil bias field, thick slices with noise), so the public model is a baseline
  the federation has to beat.
- Rows, on the same test splits: the public model alone; each site alone (no DP, fine-tuned from the
  public model); FedAvg without DP; DP FedAvg from scratch; DP fine-tuning from the public model
  at ε ∈ {1, 4, 8} (δ = 1e-3 < 1/N at every site) over several seeds.

Federated rows run the real ServerApp and ClientApps (site configs, policy, ledger, DP engine) over
the in-process transport (deploy/demo/inprocess.py); each run has fresh ledgers. Fine-tuning settings
were chosen on public data only (``--tune``: the public set under its own shift, "public-tuning").

    python -m benchmarks.seg_dp_finetune --rows public,local,fedavg,dp-scratch,dp-ft --seeds 3
    python -m benchmarks.seg_dp_finetune --tune
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.figures import Figure, markdown_table
from client import training
from deploy.datasets.data_dir import resolve_data_dir
from deploy.datasets import hippocampus
from client.ingest.imaging.manifest import default_split
from client.ingest.imaging.preprocess import PreprocessCache, PreprocessSpec
from client.segmentation import PatientVolumes, evaluate
from deploy.coordinator.pretrain import PretrainSettings, cached_hippocampus_model
from shared_models.tasks import SEG_DP_FINETUNE
from shared_models import public_checkpoint
from shared_models.registry import build_model
from shared_models.seg_losses import DiceCE

# DP fine-tuning: chosen on public data (--tune), then fixed for every site and ε.
FINETUNE = {**SEG_DP_FINETUNE, "num-server-rounds": 15}
# From scratch every parameter trains: the same regime, clipped at 1 (per-patient norms ≈ 0.8 there)
SCRATCH = {**SEG_DP_FINETUNE, "train-params": "all", "clip-norm": 1.0, "num-server-rounds": 15}
NON_DP = {"train-params": "all", "optimizer": "adam", "lr": 1e-3, "batch-size": 4, "local-steps": 0,
          "local-epochs": 1, "num-server-rounds": 10}
DELTA = 1e-3
EPSILONS = (1.0, 4.0, 8.0)


def write_sites(data_dir: Path, out: Path) -> dict[str, Path]:
    """The three private sites' shifted images (NIfTI) and manifests; returns site id → manifest."""
    manifests = {}
    for site, cases in hippocampus.split_sites(hippocampus.private_cases(hippocampus.cases(data_dir)), 3).items():
        rows = []
        for case in cases:
            shifted = hippocampus.write_shifted_case(case, site, out / site / "images")
            rows.append((case.case_id, shifted.image, case.label, default_split(case.case_id)))
        manifests[site] = hippocampus.write_manifest(out / site / "hippocampus.csv", rows)
    return manifests


def site_volumes(manifests: dict[str, Path], cache_dir: Path) -> dict[str, tuple[PatientVolumes, PatientVolumes]]:
    from client.ingest.imaging.manifest import read_manifest

    cache = PreprocessCache(cache_dir, PreprocessSpec(), set(hippocampus.LABELS))
    sites = {}
    for site, manifest in manifests.items():
        cases = read_manifest(manifest)
        sites[site] = (PatientVolumes([cache.load(c) for c in cases if c.split == "train"]),
                       PatientVolumes([cache.load(c) for c in cases if c.split == "test"]))
    cache.save_memo()
    return sites


def public_model(path: Path) -> torch.nn.Module:
    model = build_model("seg-unet3d")
    model.load_state_dict(public_checkpoint.load(path).state_dict)
    return model


def federated(manifests: dict[str, Path], out: Path, settings: dict, dp: bool, epsilon: float,
              init: Path | None, seed: int) -> dict[str, float]:
    """One study with the real apps in-process; returns each site's test Dice after the last round."""
    from client.site import write_site_config
    from deploy.demo.inprocess import run_in_process
    from deploy.coordinator.follow import app_run_config

    nodes = {}
    for i, (site, manifest) in enumerate(manifests.items()):
        config = write_site_config(out / "sites" / site / "site.toml", site, manifest, device="auto",
                                   dataset="hippocampus", manifest=True, labels=sorted(hippocampus.LABELS),
                                   epsilon_budget=max(epsilon, 1.0) * 2, delta=DELTA, allow_non_dp=not dp,
                                   max_sample_rate=1.0, min_noise_multiplier=0.3, max_physical_batch=16,
                                   evaluation="exact")  # model quality: exact test sums (DP evaluation: dp_evaluation)
        nodes[10 + i] = {"site-config": str(config)}
    config = app_run_config(task="seg", model="seg-unet3d", **{
        **settings, "dp": dp, "target-epsilon": epsilon if dp else 0.0, "noise-multiplier": 0.0, "seed": seed,
        "init-checkpoint": str(init) if init else "", "out-dir": str(out / "run"), "round-timeout": 3600})
    start = time.time()
    run_in_process(nodes, config)
    summary = json.loads((out / "run" / "summary.json").read_text())
    dice = {s: summary["per_site"][s]["dice"] for s in sorted(summary["per_site"])}
    eps = {s: summary["per_site"][s].get("epsilon") for s in sorted(summary["per_site"])}
    print(f"{out.name}: mean Dice {statistics.mean(dice.values()):.3f} ({_fmt(dice)}), ε {eps}, "
          f"{time.time() - start:.0f}s", flush=True)
    return dice


def local_alone(sites, init: Path, epochs: int, seed: int) -> dict[str, float]:
    """Each site fine-tunes the public model on its own training split, without DP; its own test split."""
    dice = {}
    for site, (train, test) in sites.items():
        torch.manual_seed(seed)
        model = public_model(init)
        for epoch in range(1, epochs + 1):
            settings = training.TrainSettings(local_steps=0, local_epochs=1, batch_size=4, optimizer="adam",
                                              lr=1e-3, seed=seed * 1000 + epoch)
            training.train_dataset(model, train, settings, torch.device("cpu"), DiceCE().per_sample)
        dice[site] = evaluate(model, test, torch.device("cpu"))["mean-dice"]
    print(f"local alone: {_fmt(dice)}", flush=True)
    return dice


def _fmt(dice: dict[str, float]) -> str:
    return ", ".join(f"{s} {d:.3f}" for s, d in dice.items())


def _row(label: str, runs: list[dict[str, float]]) -> list[str]:
    means = [statistics.mean(r.values()) for r in runs]
    spread = f" ± {statistics.stdev(means):.3f}" if len(means) > 1 else ""
    per_site = " / ".join(f"{statistics.mean(r[s] for r in runs):.3f}" for s in sorted(runs[0]))
    return [label, f"{statistics.mean(means):.3f}{spread}", per_site, str(len(runs))]


ROW_LABELS = {
    "public": "public model only (52 public cases, no site data)",
    "local": "each site alone, no DP (public model fine-tuned 10 epochs, all parameters)",
    "fedavg": "FedAvg, no DP, from the public model (10 rounds × 1 epoch, all parameters)",
    "dp-scratch": "DP FedAvg from scratch, ε = 8 (all parameters, same DP regime)",
    **{f"dp-ft-{eps:g}": f"DP fine-tuning from the public model, ε = {eps:g} (norms + head)" for eps in EPSILONS},
}


def rows_of(results: dict[str, list[dict[str, float]]]) -> list[list[str]]:
    return [_row(label, results[key]) for key, label in ROW_LABELS.items() if key in results]


def table(rows_wanted: set[str], seeds: int, data_dir: Path, out: Path) -> dict[str, list[dict[str, float]]]:
    """Each wanted row's per-site test Dice, one dict per seed; also written to ``out/results.json``."""
    torch.set_num_threads(2)
    start = time.time()
    init, built = cached_hippocampus_model(data_dir, out / "cache", PretrainSettings())
    provenance = public_checkpoint.load(init).provenance
    print(f"public model {init.name} ({'built now' if built else 'cached'}; public held-out Dice "
          f"{provenance['held_out_mean_dice']}, {provenance['seconds']} s to train)", flush=True)
    manifests = write_sites(data_dir, out / "shifted-sites")
    sites = site_volumes(manifests, out / "cache" / "preprocessed")
    results: dict[str, list[dict[str, float]]] = {}
    if "public" in rows_wanted:
        model = public_model(init)
        results["public"] = [{s: evaluate(model, test, torch.device("cpu"))["mean-dice"] for s, (_, test) in sites.items()}]
    if "local" in rows_wanted:
        results["local"] = [local_alone(sites, init, 10, seed) for seed in range(1)]
    if "fedavg" in rows_wanted:
        results["fedavg"] = [federated(manifests, out / f"fedavg-s{seed}", NON_DP, False, 0.0, init, seed)
                             for seed in range(1)]
    if "dp-scratch" in rows_wanted:
        results["dp-scratch"] = [federated(manifests, out / f"dp-scratch-s{seed}", SCRATCH, True, 8.0, None, seed)
                                 for seed in range(1)]
    if "dp-ft" in rows_wanted:
        for eps in EPSILONS:
            key = f"dp-ft-{eps:g}"
            results[key] = [federated(manifests, out / f"{key}-s{seed}", FINETUNE, True, eps, init, seed)
                            for seed in range(seeds)]
    print(f"total {time.time() - start:.0f}s")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def figure(results: dict[str, list[dict[str, float]]]) -> Figure:
    def mean(key: str) -> float:
        return statistics.mean(statistics.mean(r.values()) for r in results[key])

    ft8, ft4, public = mean("dp-ft-8"), mean("dp-ft-4"), mean("public")
    return Figure(key="quality-hippocampus-dp", title="DP segmentation: public pretraining + DP fine-tuning",
                  command="python -m benchmarks --only seg_dp_finetune --full",
                  goal="ε = 8: mean Dice ≥ 0.80 and ≥ public-only + 0.05; ε = 4: ≥ 0.75 (all three together)",
                  anchor=f"the public model alone on the shifted sites: {public:.3f}",
                  ours=f"ε = 8: {ft8:.3f}; ε = 4: {ft4:.3f}; ε = 1: {mean('dp-ft-1'):.3f}",
                  met=ft8 >= 0.80 and ft8 >= public + 0.05 and ft4 >= 0.75,
                  table=markdown_table(HEADER, rows_of(results)))


HEADER = ["training (δ = 1e-3 per site)", "mean Dice over sites", "per site (1 / 2 / 3)", "seeds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="public,local,fedavg,dp-scratch,dp-ft")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/seg-dp-finetune"))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    results = table(set(args.rows.split(",")), args.seeds, resolve_data_dir(args.data_dir)[0], args.out.resolve())
    print(markdown_table(HEADER, rows_of(results)))


def run(full: bool) -> list[Figure]:
    """``make bench ARGS=--full``: the whole table (about an hour on 2 cores); the quick pass skips it."""
    if not full:
        print("DP fine-tuning table: --full only (U-Net training); its last figures stay")
        return []
    results = table(set(ROW_LABELS) | {"dp-ft"}, 3, resolve_data_dir(None)[0], Path("runs/seg-dp-finetune").resolve())
    return [figure(results)]


if __name__ == "__main__":
    main()
