"""Hippocampus segmentation baselines without federation: centralised and local-only training.

Same model, loss, preprocessing and test cases as the federated runs (the 3 synthetic sites of
client/imaging/hippocampus.py, each site's test split by case id), trained in-process for a fixed
number of epochs; prints mean foreground Dice per site's test split after every few epochs.

    python -m benchmarks.seg_results --mode centralised --epochs 40
    python -m benchmarks.seg_results --mode local --epochs 40
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("centralised", "local"), default="centralised")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache", type=Path, default=Path("runs/seg-cache"))
    args = parser.parse_args()
    torch.set_num_threads(2)
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
