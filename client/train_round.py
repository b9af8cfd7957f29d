"""A training round's site-side steps around the train handler's one privacy call (client/client_app.py:
``train`` → privacy/release.py: ``charge_round``): the model as the study trains it, this site's place in a
secure sum, training under the charged request, and the reply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import audit_records
from client import secure_aggregation as secagg
from client import training
from client.tasks import device_for
from privacy import release
from shared_models.trainable import freeze_except

log = logging.getLogger("carefl.site")

PLAN_CACHE = "carefl-noise-plan"  # the run state's record of the σ planning found (the PRV search takes seconds)


def dataset(site, task) -> release.SiteDataset:
    """The task's dataset as the site's privacy steps see it."""
    return release.SiteDataset(site.site_id, task.dataset.name, task.n_train, task.dataset.policy, site.ledger_path,
                               statistics=hasattr(task, "statistics_vectors"))


def plan_cache(context: Context) -> ConfigRecord:
    return context.state.config_records.setdefault(PLAN_CACHE, ConfigRecord())


def study_plan(config, context: Context, data: release.SiteDataset) -> release.StudyPlan:
    """This site's DP request for the study (σ planned once per run, cached in the run's state)."""
    settings = training.TrainSettings.from_config(config)
    return release.plan_study(config, data, settings.batch_size, training.planned_steps(settings, data.n),
                              plan_cache(context))


@dataclass
class Trainable:
    """The global model as this site trains it: only the ``train-params`` parameters train, get noise and are
    sent (shared_models/trainable.py)."""

    model: torch.nn.Module
    which: str          # the study's train-params
    trained: list[str]  # names of the trained parameters
    dimension: int      # d: how many numbers train (the ledger's trained_parameters)

    @classmethod
    def freeze(cls, model: torch.nn.Module, which: str) -> "Trainable":
        trained = freeze_except(model, which)  # frozen ones: not trained, not noised, not sent
        return cls(model, which, trained, sum(p.numel() for p in model.parameters() if p.requires_grad))

    def facts(self, msg: Message) -> dict:
        """What the round's ``dp-round`` record says about the model (docs/PRIVACY.md, "Public pretraining")."""
        config = msg.content["config"]
        return {"train_params": self.which, "trained_parameters": self.dimension,
                "model_in_sha256": msg.content["arrays"].object_id,
                **({"init_checkpoint_sha256": str(config["init-checkpoint-sha256"])}
                   if config.get("init-checkpoint-sha256") else {})}

    def arrays(self) -> tuple[dict, list[str]]:
        """The trained model's state and the names of the arrays the reply holds."""
        state = self.model.cpu().state_dict()
        return state, (list(state) if self.which == "all" else list(self.trained))


def open_secure_group(msg: Message, context: Context) -> release.SecureGroup | None:
    """Under secure aggregation, stage 3 before any charge: keep the shares the round's other sites sent
    (client/secure_aggregation.py: a broken protocol refuses here) and return this site's place in the sum.
    None when the round is not securely aggregated."""
    if not bool(msg.content["config"].get("secure-aggregation", False)):
        return None
    group = secagg.open_shares(msg, context)
    return release.SecureGroup(len(group), float(msg.content[secagg.RECORD]["weight"]))


def train(task, trainable: Trainable, settings: training.TrainSettings, site, charged: release.Release) -> dict:
    """Train under the request the ledger charged (DP-SGD by default); the training's own metrics."""
    dp = charged.request
    if not dp.enabled:
        log.warning("NON-DP ROUND on dataset '%s' (allow_non_dp = true): its ε is now unbounded", charged.dataset)
    metrics = task.train(trainable.model, settings, device_for(site), dp, site.max_physical_batch)
    if dp.enabled and metrics.pop("sample-rate") != charged.sample_rate:  # the charged q must be the one sampled
        raise RuntimeError("sample rate used in training differs from the one charged; weights withheld")
    return metrics


def reply(msg: Message, context: Context, audit, trainable: Trainable, charged: release.Release, metrics: dict,
          weight: float, group: release.SecureGroup | None) -> RecordDict:
    """The train reply: the trained arrays — under secure aggregation masked, so the coordinator can unmask
    nothing but the sum — the dataset's public weight, the step count, the trained dimension and what the
    release may say. The training loss (not DP) and the sample rate (B/N) stay in the site's log (dp-round)."""
    state, names = trainable.arrays()
    if group is not None:
        arrays, clipped = secagg.masked_update(msg, context, state, names)
        audit_records.log(audit, "secure-aggregation", charged.run_id, round=charged.server_round, group=group.sites,
                          clipped_coordinates=clipped)
    else:
        arrays = ArrayRecord(state if trainable.which == "all" else {name: state[name] for name in names})
    released = {k: v for k, v in charged.reply_metrics().items() if k != "sample-rate"}
    return RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": weight, "local-steps": metrics["local-steps"],
                                 **released, "trained-parameters": trainable.dimension}),
    })
