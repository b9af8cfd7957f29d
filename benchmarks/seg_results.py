"""Hippocampus segmentation: centralised, local-only and FedAvg (with or without DP) on the same data.

Same model, loss, preprocessing and test cases everywhere (the 3 synthetic sites of
deploy/datasets/hippocampus.py, each site's test split by case id). Centralised and local runs train
in-process; FedAvg runs the real ServerApp and ClientApps (site configs, policy, ledger, DP) over the
in-process transport of deploy/demo/inprocess.py. One epoch of centralised training and one FedAvg round
of one local epoch take the same number of gradient steps in total.

    python -m benchmarks.seg_results --mode centralised --epochs 40
    python -m benchmarks.seg_results --mode local --epochs 40
    python -m benchmarks.seg_results --mode fedavg --epochs 40 [--dp --target-epsilon 8]
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
from client.ingest.imaging.manifest import Case, default_split
from client.ingest.imaging.preprocess import PreprocessCache, PreprocessSpec
from client.segmentation import PatientVolumes, evaluate
from shared_models.registry import build_model
from shared_models.seg_losses import DiceCE


def site_volumes(data_dir: Path, cache_dir: Path) -> dict[str, tuple[PatientVolumes, PatientVolumes]]:
    cache = PreprocessCache(cache_dir, PreprocessSpec(), set(hippocampus.LABELS))
    sites = {}
    for site, cases in hippocampus.split_sites(hippocampus.cases(data_dir), 3).items():
        train, test = [], []
        for c in cases:
            split = default_split(c.case_id)
            (test if split == "test" else train).append(cache.load(Case(c.case_id, c.image, c.label, split)))
        sites[site] = (PatientVolumes(train), PatientVolumes(test))
    cache.save_memo()
    return sites


def train_and_test(train: PatientVolumes, tests: dict[str, PatientVolumes], epochs: int, every: int, lr: float,
                   batch: int, label: str) -> dict[str, float]:
    torch.manual_seed(0)
    model, loss, device = build_model("seg-unet3d"), DiceCE(), torch.device("cpu")
    start, dice = time.time(), {}
    for epoch in range(1, epochs + 1):
        settings = training.TrainSettings(local_steps=0, local_epochs=1, batch_size=batch, optimizer="adam",
                                          lr=lr, seed=epoch)
        training.train_dataset(model, train, settings, device, loss.per_sample)
        if epoch % every == 0 or epoch == epochs:
            dice = {s: evaluate(model, t, device)["mean-dice"] for s, t in tests.items()}
            print(f"{label} epoch {epoch}: mean Dice over sites {statistics.mean(dice.values()):.3f} "
                  f"({', '.join(f'{s} {d:.3f}' for s, d in dice.items())}), {time.time() - start:.0f}s", flush=True)
    return dice


def fedavg(data_dir: Path, out: Path, rounds: int, lr: float, batch: int, dp: bool, target_epsilon: float) -> dict:
    from client.site import write_site_config
    from deploy.demo.inprocess import run_in_process
    from deploy.coordinator.follow import app_run_config
    from server.run_dir import read_jsonl

    nodes = {}
    for i, (site, cases) in enumerate(hippocampus.split_sites(hippocampus.cases(data_dir), 3).items()):
        rows = [(c.case_id, c.image, c.label, default_split(c.case_id)) for c in cases]
        manifest = hippocampus.write_manifest(out / "sites" / site / "hippocampus.csv", rows)
        config = write_site_config(out / "sites" / site / "site.toml", site, manifest, device="auto",
                                   dataset="hippocampus", manifest=True, labels=sorted(hippocampus.LABELS),
                                   epsilon_budget=max(target_epsilon, 1.0) * 2, delta=1e-3, allow_non_dp=not dp,
                                   evaluation="exact")  # model quality: exact test sums (DP evaluation: dp_evaluation)
        nodes[10 + i] = {"site-config": str(config)}
    config = app_run_config(task="seg", model="seg-unet3d", **{
        "num-server-rounds": rounds, "local-epochs": 1, "local-steps": 0, "batch-size": batch, "optimizer": "adam",
        "lr": lr, "dp": dp, "target-epsilon": target_epsilon if dp else 0.0, "noise-multiplier": 0.0,
        "out-dir": str(out / "run"), "round-timeout": 600})
    start = time.time()
    run_in_process(nodes, config)
    for record in read_jsonl(out / "run" / "rounds.jsonl"):
        print(f"fedavg{' DP' if dp else ''} round {record['round']}: mean Dice over sites {record['mean_dice']:.3f}, "
              f"pooled {record['pooled_dice']:.3f}", flush=True)
    print(f"{time.time() - start:.0f}s; summary: {out / 'run' / 'summary.json'}")
    return json.loads((out / "run" / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("centralised", "local", "fedavg"), default="centralised")
    parser.add_argument("--dp", action="store_true", help="fedavg: patient-level DP at every site")
    parser.add_argument("--target-epsilon", type=float, default=8.0, help="fedavg --dp: study ε per site")
    parser.add_argument("--out", type=Path, default=Path("runs/seg-results"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache", type=Path, default=Path("runs/seg-cache"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.mode == "fedavg":
        fedavg(resolve_data_dir(args.data_dir)[0], args.out.resolve(), args.epochs, args.lr, args.batch, args.dp,
               args.target_epsilon)
        return
    sites = site_volumes(resolve_data_dir(args.data_dir)[0], args.cache)
    tests = {s: t for s, (_, t) in sites.items()}
    if args.mode == "centralised":
        pooled = PatientVolumes([item for train, _ in sites.values() for item in train.items])
        train_and_test(pooled, tests, args.epochs, args.every, args.lr, args.batch, "centralised")
    else:
        for site, (train, _) in sites.items():
            train_and_test(train, tests, args.epochs, args.every, args.lr, args.batch, f"local {site}")


def run(full: bool) -> list[Figure]:
    """``python -m benchmarks --full``: the whole hippocampus table (about 3 hours on 2 cores).
    The quick pass leaves its block in docs/BENCHMARKS.md as last measured."""
    if not full:
        print("hippocampus Dice table: --full only (hours of U-Net training); its last figures stay")
        return []
    torch.set_num_threads(2)
    data_dir = resolve_data_dir(None)[0]
    sites = site_volumes(data_dir, Path("runs/seg-cache"))
    tests = {s: t for s, (_, t) in sites.items()}
    pooled = PatientVolumes([item for train, _ in sites.values() for item in train.items])
    rows = []

    def row(label: str, dice: dict[str, float]) -> None:
        rows.append([label, f"{statistics.mean(dice.values()):.3f}", " / ".join(f"{d:.3f}" for d in dice.values())])

    row("centralised, 40 epochs (no DP)", train_and_test(pooled, tests, 40, 10, 2e-3, 4, "centralised"))
    own = {site: train_and_test(train, {site: tests[site]}, 40, 10, 2e-3, 4, f"local {site}")[site]
           for site, (train, _) in sites.items()}
    row("local only, 40 epochs, each site's own test split", own)
    out = Path("runs/seg-results").resolve()
    for label, dp, eps, rounds, lr, batch in (("FedAvg, 40 rounds (no DP)", False, 0.0, 40, 2e-3, 4),
                                              ("FedAvg + patient-level DP, ε = 8 (δ = 1e-3), batch 16, 30 rounds",
                                               True, 8.0, 30, 1e-3, 16)):
        summary = fedavg(data_dir, out / label.split(",")[0].replace(" ", "-").lower(), rounds, lr, batch, dp, eps)
        row(label, {s: summary["per_site"][s]["dice"] for s in sorted(summary["per_site"])})
    fed = float(rows[2][1])
    return [Figure(key="quality-hippocampus", title="Quality under privacy: hippocampus segmentation",
                   command="python -m benchmarks --only seg_results --full",
                   goal="FedAvg ≥ 0.80 mean Dice and within 0.03 of centralised; DP FedAvg useful",
                   anchor="centralised training on the same cases (published nnU-Net ≈ 0.89)",
                   ours=f"FedAvg {fed:.3f} vs centralised {float(rows[0][1]):.3f}; with DP {float(rows[3][1]):.3f}",
                   met=fed >= 0.80 and float(rows[0][1]) - fed <= 0.03 and float(rows[3][1]) >= 0.80,
                   table=markdown_table(["training", "mean Dice over sites", "per site"], rows))]


if __name__ == "__main__":
    main()
