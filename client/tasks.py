"""What a study's task means at a site: which dataset, how to train on it, how to evaluate.

The ClientApp handlers are the same for every task; a task object hides whether one patient is a
table row (``ehr``) or a preprocessed image volume (``seg``). Evaluation gives one bounded vector per
test patient (``eval_layout``, shared_models/eval_release.py); the handler releases their noisy sum.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from client import segmentation, training
from client.ingest import ehr_encode as ehr_ingest
from client.ingest.ehr_extract import load_extract
from client.audit import combined_hash
from client.ingest.imaging.preprocess import PreprocessSpec
from client.errors import SiteError
from client.site import DatasetConfig, SiteConfig
from privacy.policy import DPRequest
from shared_models.eval_release import binary_layout, seg_layout
from shared_models.feature_stats import FeatureStats, patient_vectors
from shared_models.schema import builtin_schema
from shared_models.seg_losses import DiceCE
from shared_models.sequence import HistoryDataset
from shared_models.tasks import TASKS, get_task



def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class EhrTask:
    def __init__(self, site: SiteConfig, run_config: dict) -> None:
        self.dataset: DatasetConfig = site.dataset(TASKS["ehr"].dataset)
        self.data = site.load_heart_disease()
        self.n_train, self.n_test = len(self.data.y_train), len(self.data.y_test)
        self.model_kwargs = {"n_features": self.data.n_features}
        self.excluded = self.data.rows_incomplete  # a file with a damaged row is refused, not trimmed
        self._file = self.dataset.path
        self._shard = (site.shard, site.num_shards)

    def exclusion_reasons(self) -> dict[str, int]:
        """Reason → rows, as the schema's report counts them (as task ehr-seq's): counts only, never a row."""
        return {reason: int(n) for reason, n in self.data.exclusions.items()}

    def fingerprint(self) -> str:
        """Which rows this site trains on: the extract's hash, its shard and the FLamby preprocessing."""
        return combined_hash(file_sha256(self._file), f"shard {self._shard}", "heart-disease/flamby-v1")

    def train(self, model, settings, device, dp: DPRequest, max_physical_batch: int) -> dict:
        return training.train(model, self.data.x_train, self.data.y_train, settings, device, dp, max_physical_batch)

    eval_layout = binary_layout()  # what its evaluation release holds (shared_models/eval_release.py)

    def evaluation_vectors(self, model, device) -> np.ndarray:
        return training.evaluation_vectors(model, self.data.x_test, self.data.y_test, device)


class SegTask:
    def __init__(self, site: SiteConfig, run_config: dict) -> None:
        self.dataset = site.dataset(TASKS["seg"].dataset)
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

    eval_layout = seg_layout(segmentation.NUM_CLASSES)

    def evaluation_vectors(self, model, device) -> np.ndarray:
        return segmentation.evaluation_vectors(model, self.images.test, device)


class EhrSeqTask:
    """A schema-driven extract with one row per visit: one sample is one patient's whole history.

    The study's schema ships in the approved app bundle (``run_config["schema"]`` names it), so the
    app's hash covers it. Patients are split into train/test by a hash of their id, so the split is
    the same in every message and needs no state. Inputs are encoded with the federation's shared
    feature statistics, which arrive with each train/evaluate message.
    """

    TEST_PERCENT = 30

    def __init__(self, site: SiteConfig, run_config: dict, feature_stats: str = "") -> None:
        self.schema = builtin_schema(str(run_config.get("schema", "")))
        if self.schema.visits is None:
            raise ValueError(f"schema '{self.schema.name}' has no [visits]: task ehr-seq needs visit histories")
        self.dataset = site.dataset(self.schema.name)
        if self.dataset.path is None:
            raise SiteError(f"dataset '{self.schema.name}' of site '{site.site_id}' has no path")
        self.extract = load_extract(self.dataset.path, self.schema)
        self.train_patients, self.test_patients = [], []
        for rows in ehr_ingest.patient_rows(self.extract):
            pid = self.extract.patient_ids[rows[0]]
            digest = int(hashlib.sha256(f"{self.schema.name}|{pid}".encode()).hexdigest()[:8], 16)
            (self.test_patients if digest % 100 < self.TEST_PERCENT else self.train_patients).append(rows)
        self.n_train, self.n_test = len(self.train_patients), len(self.test_patients)
        self.model_kwargs = {"n_features": len(ehr_ingest.feature_names(self.schema))}
        self.excluded = self.extract.report.rows_excluded
        self.stats = FeatureStats.from_json(feature_stats) if feature_stats else None

    def exclusion_reasons(self) -> dict[str, int]:
        return {reason: int(n) for reason, n in self.extract.report.counts()["problems"].items()}

    def fingerprint(self) -> str:
        return combined_hash(file_sha256(self.dataset.path), self.schema.sha256, f"test {self.TEST_PERCENT}% by id hash")

    def statistics_vectors(self) -> np.ndarray:
        """One bounded vector per training patient (shared_models/feature_stats.py)."""
        return patient_vectors(self.schema, self.extract.values, self.train_patients)

    def _histories(self, patients) -> HistoryDataset:
        if self.stats is None:
            raise ValueError("the message carries no feature statistics; ehr-seq encodes with the federation's")
        seqs, y = ehr_ingest.histories(self.extract, self.stats, patients)
        return HistoryDataset(seqs, y, max_len=self.schema.visits.max_visits or None)

    def train(self, model, settings, device, dp: DPRequest, max_physical_batch: int) -> dict:
        return training.train_dataset(model, self._histories(self.train_patients), settings, device,
                                      training.binary_per_sample, dp, max_physical_batch)

    eval_layout = binary_layout()

    def evaluation_vectors(self, model, device) -> np.ndarray:
        return training.evaluation_vectors_dataset(model, self._histories(self.test_patients), device)


# How a site loads and trains each task of the task table (shared_models/tasks.py), by its name.
SITE_TASKS = {"ehr": EhrTask, "seg": SegTask, "ehr-seq": EhrSeqTask}
if SITE_TASKS.keys() != TASKS.keys():  # adding a task to the table without its site code fails at import
    raise ImportError(f"client/tasks.py has site code for {sorted(SITE_TASKS)}, the task table names {sorted(TASKS)}")


def load_task(site: SiteConfig, run_config: dict, feature_stats: str = ""):
    study = get_task(str(run_config.get("task", "ehr")))
    if study.shared_statistics:
        return SITE_TASKS[study.name](site, run_config, feature_stats)
    return SITE_TASKS[study.name](site, run_config)


def device_for(site: SiteConfig) -> torch.device:
    return training.pick_device(site.device)
