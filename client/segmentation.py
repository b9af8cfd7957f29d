"""Imaging at the site: the valid, preprocessed cases of a dataset, and U-Net evaluation (the site's own
exact figures, and the per-case vectors of its evaluation release).

One dataset item is one patient's whole preprocessed volume, so DP-SGD's unit is the patient.
Cases come from the preprocessing cache (``carefl site ingest`` fills it); a case not yet cached is
validated and cached on first use, and a case that fails validation is remembered as excluded, so a
round never re-reads DICOM and never crashes on data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from client.errors import SiteError
from client.ingest.imaging.manifest import Case, read_manifest, validate
from client.ingest.imaging.preprocess import PreprocessCache, PreprocessSpec
from client.site import DatasetConfig, SiteConfig
from shared_models.eval_release import seg_vectors
from shared_models.seg_metrics import per_case, seg_report

log = logging.getLogger("carefl.site")

EVAL_BATCH = 2
NUM_CLASSES = 3  # background and the two hippocampus labels (the U-Net's outputs)


class PatientVolumes(Dataset):
    """(image [1, z, y, x] float32, label [1, z, y, x] int64) per patient."""

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image, label = self.items[i]
        return torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))[None]


@dataclass
class SiteImages:
    train: PatientVolumes
    test: PatientVolumes
    excluded: int


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"seg-shape must be three integers like '48,64,48', got '{text}'") from None
    if len(shape) != 3 or min(shape) < 8 or any(v % 8 for v in shape):
        raise ValueError("seg-shape must be three multiples of 8 (the U-Net halves each axis three times)")
    return shape  # type: ignore[return-value]


def load_site_images(site: SiteConfig, dataset: DatasetConfig, spec: PreprocessSpec) -> SiteImages:
    if dataset.manifest is None:
        raise SiteError(f"dataset '{dataset.name}' has no manifest; it is not an imaging dataset")
    labels = set(dataset.labels) or {0, 1}
    cache = PreprocessCache(site.cache_dir / dataset.name, spec, labels)
    train, test, excluded = [], [], 0
    for case in read_manifest(dataset.manifest):
        item = _cached_or_validated(cache, case, labels, dataset.require_deidentified, dataset.modality)
        if item is None:
            excluded += 1
        else:
            (train if case.split == "train" else test).append(item)
    cache.save_memo()
    if excluded:
        log.warning("dataset %s: %d case(s) excluded by validation (run `carefl site validate`)",
                    dataset.name, excluded)
    if not train or not test:
        raise SiteError(f"dataset '{dataset.name}' has {len(train)} valid training and {len(test)} valid test "
                        f"case(s); both are needed")
    return SiteImages(PatientVolumes(train), PatientVolumes(test), excluded)


def _cached_or_validated(cache: PreprocessCache, case: Case, labels: set[int], require_deidentified: bool,
                         modalities: tuple[str, ...] = ()):
    key = cache.key(case)
    marker = cache.folder / f"{key}.invalid"
    if marker.exists():
        return None
    if not (cache.folder / f"{key}.npz").exists():
        report = validate([case], labels, require_deidentified, modalities)
        if report.problems:
            marker.write_text("\n".join(str(p) for p in report.problems) + "\n")
            return None
    return cache.load(case)


@torch.no_grad()
def _predict(model: torch.nn.Module, test: PatientVolumes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-volume label maps of every test patient, and their truths."""
    model.to(device).eval()
    preds, truths = [], []
    for start in range(0, len(test), EVAL_BATCH):
        images, labels = zip(*(test[i] for i in range(start, min(start + EVAL_BATCH, len(test)))))
        logits = model(torch.stack(images).to(device))
        preds.append(logits.argmax(1, keepdim=True).cpu())
        truths.append(torch.stack(labels))
    return torch.cat(preds), torch.cat(truths)


def evaluate(model: torch.nn.Module, test: PatientVolumes, device: torch.device,
             num_classes: int = NUM_CLASSES) -> dict:
    """The site's own exact Dice/IoU per class (its local tools and benchmarks); what leaves is the release."""
    return seg_report(*_predict(model, test, device), num_classes)


def evaluation_vectors(model: torch.nn.Module, test: PatientVolumes, device: torch.device,
                       num_classes: int = NUM_CLASSES) -> np.ndarray:
    """One bounded vector per test case (its Dice and IoU per class, and a 1), for the evaluation release."""
    return seg_vectors(*per_case(*_predict(model, test, device), num_classes))
