"""Hippocampus segmentation: centralised, local-only and FedAvg (with or without DP) on the same data.

Same model, loss, preprocessing and test cases everywhere (the 3 synthetic sites of
client/imaging/hippocampus.py, each site's test split by case id). Centralised and local runs train
in-process; FedAvg runs the real ServerApp and ClientApps (site configs, policy, ledger, DP) over the
in-process transport of deploy/inprocess.py. One epoch of centralised training and one FedAvg round
of one local epoch take the same number of gradient steps in total.

    python -m benchmarks.seg_results --mode centralised --epochs 40
    python -m benchmarks.seg_results --mode local --epochs 40
    python -m benchmarks.seg_results --mode fedavg --epochs 40 [--dp --target-epsilon 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from client import training
from client.data_dir import resolve_data_dir
from client.imaging import hippocampus
from client.imaging.manifest import Case, default_split
from client.imaging.preprocess import PreprocessCache, PreprocessSpec
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


def run(train: PatientVolumes, tests: dict[str, PatientVolumes], epochs: int, every: int, lr: float,
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


def fedavg(data_dir: Path, out: Path, rounds: int, lr: float, batch: int, dp: bool, target_epsilon: float) -> None:
    from client.site import write_site_config
    from deploy.inprocess import run_in_process
    from deploy.runs import app_run_config
    from server.run_dir import read_jsonl

    nodes = {}
    for i, (site, cases) in enumerate(hippocampus.split_sites(hippocampus.cases(data_dir), 3).items()):
        rows = [(c.case_id, c.image, c.label, default_split(c.case_id)) for c in cases]
        manifest = hippocampus.write_manifest(out / "sites" / site / "hippocampus.csv", rows)
        config = write_site_config(out / "sites" / site / "site.toml", site, manifest, device="auto",
                                   dataset="hippocampus", manifest=True, labels=sorted(hippocampus.LABELS),
                                   epsilon_budget=max(target_epsilon, 1.0) * 2, delta=1e-3, allow_non_dp=not dp)
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
        run(pooled, tests, args.epochs, args.every, args.lr, args.batch, "centralised")
    else:
        for site, (train, _) in sites.items():
            run(train, tests, args.epochs, args.every, args.lr, args.batch, f"local {site}")


if __name__ == "__main__":
    main()
