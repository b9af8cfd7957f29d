"""The task table: what a study's ``task`` means, in one place for every command, the apps and the report.

A task names the site dataset it trains on, the kind of that dataset, the model and run configuration a
study starts from, the metric family the sites report and the report draws, and the headline metric.
Like Opacus' accountants: a dict and one lookup with one error message. Adding a task touches this table,
the task's site code (``client/tasks.py``: how a site loads and trains it) and its demo sites
(``deploy/cli/demo.py: DEMO_SITES``, for ``carefl demo`` and ``carefl simulate``); a new default model is
also registered in ``shared_models/registry.py``. docs/ARCHITECTURE.md, "Adding a task", has the whole list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BINARY = "binary"              # accuracy, AUC, F1 from confusion counts and score histograms
SEGMENTATION = "segmentation"  # Dice per class from overlap counts

# What a ``train-params`` choice (shared_models/trainable.py) needs of a task's models, beyond any model.
TRAIN_PARAMS_NEED = {"decoder": "a U-Net"}


class UnknownTaskError(ValueError):
    """A task name that is not in the table."""


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    dataset: str | None          # the site.toml dataset it trains on; None: the study schema's name
    dataset_kind: str            # "heart-disease" (UCI files) | "ehr-extract" (schema-driven CSV) | "imaging"
    default_model: str           # shared_models.registry name
    metric_family: str           # BINARY | SEGMENTATION
    headline: str                # summary.json key the report leads with
    run_config: dict = field(default_factory=dict)     # run-config defaults of a study from scratch
    finetune_config: dict = field(default_factory=dict)  # ... of a study that starts from a public checkpoint
    shared_statistics: bool = False  # sites first pool DP feature statistics (round 0) for one encoding
    train_params: tuple[str, ...] = ("all", "norms-head")  # train-params its models offer (shared_models/trainable.py)

    def dataset_name(self, schema: str = "") -> str:
        return self.dataset or schema

    def defaults(self, from_checkpoint: bool = False) -> dict:
        """Run-config keys a study of this task starts from (``task`` and ``model`` included)."""
        if from_checkpoint and not self.finetune_config:
            raise UnknownTaskError(f"task '{self.name}' has no public-checkpoint fine-tuning")
        extra = self.finetune_config if from_checkpoint else self.run_config
        return {"task": self.name, "model": self.default_model, **extra}

    def train_params_problem(self, which: str) -> str | None:
        """Why a study of this task cannot train ``which`` (a train-params choice), or None when it can."""
        if which in self.train_params:
            return None
        offering = [t.name for t in TASKS.values() if which in t.train_params]
        return (f"'train-params' = \"{which}\" needs {TRAIN_PARAMS_NEED.get(which, 'another model')} "
                f"(task {', '.join(offering) or 'none'})")


# DP fine-tuning of a public U-Net (init-checkpoint): the scale and shift of every normalisation layer and
# the output layer (924 numbers) trained with a few full-batch SGD steps, clipped near the per-patient
# gradient norm (≈ 0.2 on public data). Chosen on public data only: docs/RESULTS.md, "DP segmentation".
SEG_DP_FINETUNE = {"train-params": "norms-head", "optimizer": "sgd", "lr": 1.0, "batch-size": 64, "local-steps": 2,
                   "local-epochs": 1, "clip-norm": 0.2}

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("ehr", "UCI heart disease, one hospital per site (FLamby Fed-Heart-Disease)", "heart-disease",
         "heart-disease", "ehr-logreg", BINARY, "pooled_auc"),
    Task("ehr-seq", "a schema-driven visit extract per site, per-patient visit histories, sequence model", None,
         "ehr-extract", "ehr-gru-attn", BINARY, "pooled_auc",
         run_config={"schema": "diabetes-visits", "batch-size": 40, "optimizer": "sgd", "lr": 1.0,
                     "local-steps": 0, "local-epochs": 2},
         shared_statistics=True),
    Task("seg", "hippocampus MRI segmentation (MSD Task04), 3-D U-Net", "hippocampus", "imaging", "seg-unet3d",
         SEGMENTATION, "mean_dice",
         run_config={"batch-size": 4, "optimizer": "adam", "lr": 2e-3},
         finetune_config=SEG_DP_FINETUNE, train_params=("all", "decoder", "norms-head")),
)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task '{name}'; available: {', '.join(TASKS)}") from None
