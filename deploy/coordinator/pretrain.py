"""Public pretraining at the coordinator: a model trained, without DP, on data anyone may use.

DP fine-tuning from a model that already segments is what lets a ~70-patient site learn under a
useful ε (docs/PRIVACY.md, "Public pretraining"). The data here is public (a published dataset the
coordinator holds), never a site's: it costs no privacy budget and needs none. What it does not
protect is that public data itself, which the released model may memorise as any model does.

The result is a ``shared_models.public_checkpoint`` file with its provenance; a study starts from
it with the run-config key ``init-checkpoint``. Hyper-parameters are chosen on the public data
alone: the public cases' own ``test`` split is held out and its Dice is recorded in the provenance.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from client import training
from client.ingest.imaging.manifest import Case
from client.ingest.imaging.preprocess import PreprocessCache, PreprocessSpec
from client.segmentation import PatientVolumes, evaluate
from shared_models import public_checkpoint
from shared_models.registry import build_model
from shared_models.seg_losses import DiceCE

VERSION = 1  # bump when the training below changes: cached demo checkpoints are keyed by it


@dataclass(frozen=True)
class PretrainSettings:
    model: str = "seg-unet3d"
    epochs: int = 60
    lr: float = 2e-3
    batch_size: int = 4
    seed: int = 0
    shape: tuple[int, int, int] = (48, 64, 48)
    spacing: float = 1.0

    def key(self, cases: list[Case]) -> str:
        """Everything the checkpoint depends on: settings, code version, the cases and their split."""
        text = repr((VERSION, asdict(self), sorted((c.case_id, c.split) for c in cases)))
        return hashlib.sha256(text.encode()).hexdigest()


def pretrain(cases: list[Case], labels: set[int], settings: PretrainSettings, out: Path, cache_dir: Path,
             dataset: str, licence: str, on_epoch: Callable[[int, float], None] | None = None) -> str:
    """Train on the public ``cases`` (their ``train`` split), write ``out``; returns the weights' hash.

    ``on_epoch(epoch, seconds)`` reports progress. The ``test`` split's Dice (public held-out cases)
    goes into the provenance, so the coordinator can judge the model without any site's data."""
    spec = PreprocessSpec(spacing=(settings.spacing,) * 3, shape=settings.shape)
    cache = PreprocessCache(cache_dir, spec, labels)
    train = PatientVolumes([cache.load(c) for c in cases if c.split == "train"])
    held_out = PatientVolumes([cache.load(c) for c in cases if c.split == "test"])
    cache.save_memo()
    if not len(train):
        raise ValueError("the public data has no training cases")
    torch.manual_seed(settings.seed)
    model, loss, device = build_model(settings.model), DiceCE(), training.pick_device()
    start = time.time()
    for epoch in range(1, settings.epochs + 1):
        step = training.TrainSettings(local_steps=0, local_epochs=1, batch_size=settings.batch_size,
                                      optimizer="adam", lr=settings.lr, seed=settings.seed * 100_003 + epoch)
        training.train_dataset(model, train, step, device, loss.per_sample)
        if on_epoch:
            on_epoch(epoch, time.time() - start)
    report = evaluate(model, held_out, device) if len(held_out) else {}
    provenance = {
        "dataset": dataset, "licence": licence, "public": True,
        "case_ids": sorted(c.case_id for c in cases),
        "cases_sha256": public_checkpoint.cases_sha256([c.case_id for c in cases]),
        "train_cases": len(train), "held_out_cases": len(held_out),
        "held_out_mean_dice": round(float(report["mean-dice"]), 4) if report else None,
        "training": {"optimizer": "adam", "lr": settings.lr, "batch_size": settings.batch_size,
                     "epochs": settings.epochs, "loss": "DiceCE(1, 1)", "dp": False, "augmentation": "none"},
        "preprocessing": {"spacing_mm": settings.spacing, "shape": list(settings.shape)},
        "seed": settings.seed, "torch": str(torch.__version__), "pretrain_version": VERSION,
        "seconds": round(time.time() - start, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return public_checkpoint.save(out, settings.model, {}, model.cpu().state_dict(), provenance)


def hippocampus_public_cases(data_dir: Path) -> list[Case]:
    """MSD hippocampus's public set (``hippocampus.public_cases``), split train/test by case id."""
    from deploy.datasets import hippocampus
    from client.ingest.imaging.manifest import default_split

    return [Case(c.case_id, c.image, c.label, default_split(c.case_id))
            for c in hippocampus.public_cases(hippocampus.cases(data_dir))]


def cached_hippocampus_model(data_dir: Path, cache_root: Path, settings: PretrainSettings = PretrainSettings(),
                             on_epoch: Callable[[int, float], None] | None = None) -> tuple[Path, bool]:
    """The public hippocampus model for these settings, trained on first use and cached by the hash of
    everything it depends on. Returns (path, whether it was built now)."""
    from deploy.datasets import hippocampus

    cases = hippocampus_public_cases(data_dir)
    path = Path(cache_root) / "public-models" / f"hippocampus-{settings.key(cases)[:16]}.pt"
    if path.is_file():
        try:
            public_checkpoint.load(path)
            return path, False
        except public_checkpoint.PublicCheckpointError:
            path.unlink()  # damaged: build it again
    pretrain(cases, set(hippocampus.LABELS), settings, path, Path(cache_root) / "preprocessed", "MSD Task04 Hippocampus "
             f"(public set: every {hippocampus.PUBLIC_EVERY}th case)", hippocampus.LICENCE, on_epoch)
    return path, True

