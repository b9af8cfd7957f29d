"""What a study's task means at a site: which dataset, how to train on it, how to evaluate.

The ClientApp handlers are the same for every task; a task object hides whether one patient is a
table row (``ehr``) or a preprocessed image volume (``seg``).
"""

from __future__ import annotations

import hashlib

import torch

from client import segmentation, training
from client.audit import combined_hash
from client.imaging.preprocess import PreprocessSpec
from client.site import TASK_DATASET, DatasetConfig, SiteConfig
from privacy.policy import DPRequest
from shared_models.seg_losses import DiceCE

TASKS = tuple(TASK_DATASET)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class EhrTask:
    def __init__(self, site: SiteConfig, run_config: dict) -> None:
        self.dataset: DatasetConfig = site.dataset(TASK_DATASET["ehr"])
        self.data = site.load_heart_disease()
        self.n_train, self.n_test = len(self.data.y_train), len(self.data.y_test)
        self.model_kwargs = {"n_features": self.data.n_features}
        self.excluded = self.data.rows_incomplete
        self._file = self.dataset.path
        self._shard = (site.shard, site.num_shards)

    def exclusion_reasons(self) -> dict[str, int]:
        return {"missing value in a kept column": int(self.excluded)}

    def fingerprint(self) -> str:
        """Which rows this site trains on: the extract's hash, its shard and the FLamby preprocessing."""
        return combined_hash(file_sha256(self._file), f"shard {self._shard}", "heart-disease/flamby-v1")

    def train(self, model, settings, device, dp: DPRequest, max_physical_batch: int) -> dict:
        return training.train(model, self.data.x_train, self.data.y_train, settings, device, dp, max_physical_batch)

    def evaluate(self, model, device) -> dict:
        return training.evaluate(model, self.data.x_test, self.data.y_test, device)


class SegTask:
    def __init__(self, site: SiteConfig, run_config: dict) -> None:
        self.dataset = site.dataset(TASK_DATASET["seg"])
        spec = PreprocessSpec(spacing=(float(run_config.get("seg-spacing", 1.0)),) * 3,
                              shape=segmentation.parse_shape(run_config.get("seg-shape", "48,64,48")))
        self.images = segmentation.load_site_images(site, self.dataset, spec)
        self.n_train, self.n_test = len(self.images.train), len(self.images.test)
        self.model_kwargs = {}
        self.excluded = self.images.excluded
        self._fingerprint_parts = (file_sha256(self.dataset.manifest), repr(spec), repr(sorted(self.dataset.labels)),
                                   f"{self.n_train}/{self.n_test}")
        self.loss = DiceCE(lambda_dice=float(run_config.get("seg-lambda-dice", 1.0)),
                           lambda_ce=float(run_config.get("seg-lambda-ce", 1.0)))

    def exclusion_reasons(self) -> dict[str, int]:
        return {"failed validation (see `carefl site validate`)": int(self.excluded)}

    def fingerprint(self) -> str:
        """The case list, the preprocessing and the label set: unchanged inputs give the same value."""
        return combined_hash(*self._fingerprint_parts)

    def train(self, model, settings, device, dp: DPRequest, max_physical_batch: int) -> dict:
        return training.train_dataset(model, self.images.train, settings, device, self.loss.per_sample, dp,
                                      max_physical_batch)

    def evaluate(self, model, device) -> dict:
        return segmentation.evaluate(model, self.images.test, device)


def load_task(site: SiteConfig, run_config: dict):
    task = str(run_config.get("task", "ehr"))
    if task == "ehr":
        return EhrTask(site, run_config)
    if task == "seg":
        return SegTask(site, run_config)
    raise ValueError(f"unknown task '{task}'; one of {', '.join(TASKS)}")


def device_for(site: SiteConfig) -> torch.device:
    return training.pick_device(site.device)
