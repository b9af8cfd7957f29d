"""The site's ClientApp: ``query``, ``train`` and ``evaluate`` handlers, shaped like Flower's quickstart —
unpack the message, make the release's privacy steps through privacy/release.py (a training round's in one
call, ``charge_round``), compute, pack the reply. A training round's other steps are client/train_round.py's;
the audit records a handler adds are built in client/audit_records.py.

Every handler replies with a Flower error (never a traceback, never a data value) when the
site cannot do the work, so the coordinator sees a reason and no weights leave the site.
"""

from __future__ import annotations

import functools
import logging

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import audit as audit_mod
from client import audit_records, train_round, training
from client import secure_aggregation as secagg
from client.errors import SiteError
from client.site import site_from_configs
from client.tasks import device_for, load_task
from privacy import release
from privacy.gaussian import noisy_sum
from privacy.ledger import AlreadyCharged, BudgetExceeded, LedgerError
from privacy.policy import RequestRefused
from shared_models.feature_stats import l2_bound
from shared_models.metrics import PERSONAL_PREFIX
from shared_models.registry import build_model, model_names

log = logging.getLogger("carefl.site")

app = ClientApp()

# Error codes in replies (Flower reserves small numbers for its own).
CODE_SITE_ERROR = 4001     # data or configuration at the site
CODE_BAD_REQUEST = 4002    # the coordinator asked for something invalid
CODE_INTERNAL = 4003       # unexpected failure; details stay in the site's own log
CODE_PRIVACY = 4004        # refused by the site's privacy policy or budget


def _error(msg: Message, audit, code: int, reason: str) -> Message:
    audit_mod.log_refusal(audit, msg, code, reason)
    return Message(Error(code, reason), reply_to=msg)


def replies_with_errors(handler):
    """Turn failures into error replies whose reason is safe to send to the coordinator, and log
    every reply and refusal to the site's audit log (the reply then carries the log's signed head)."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            audit = audit_mod.open_log(site_from_configs(context.node_config, context.run_config), context.node_config)
        except SiteError:
            audit = None  # the handler meets the same problem and replies with it
        try:
            return audit_mod.log_reply(audit, msg, handler(msg, context, audit))
        except (RequestRefused, BudgetExceeded, AlreadyCharged, LedgerError) as exc:
            log.warning("refused %s: %s", msg.metadata.message_type, exc)
            return _error(msg, audit, CODE_PRIVACY, f"refused by site privacy policy: {exc}")
        except SiteError as exc:  # details (paths, lines) stay in the site's log: a path can identify
            log.warning("site error handling %s: %s", msg.metadata.message_type, exc)
            return _error(msg, audit, CODE_SITE_ERROR, f"site error: {exc.public}; details are in the site's log")
        except (ValueError, KeyError, TypeError) as exc:
            return _error(msg, audit, CODE_BAD_REQUEST, f"refused: {exc}")
        except Exception:  # noqa: BLE001 - the details may carry data; keep them local
            log.exception("unexpected failure handling %s", msg.metadata.message_type)
            return _error(msg, audit, CODE_INTERNAL, "internal error at the site; see the site's log")

    return wrapped


def _model_from(msg: Message, model_kwargs: dict):
    config = msg.content["config"]
    model = build_model(str(config["model"]), **model_kwargs)
    try:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    except RuntimeError:
        raise ValueError(f"the arrays sent do not fit model '{config['model']}'") from None
    return model


def _site_task(context: Context, msg: Message | None = None):
    """The site and the run's task; ehr-seq tasks encode with the feature statistics the message carries."""
    site = site_from_configs(context.node_config, context.run_config)
    config = msg.content.config_records.get("config") if msg is not None else None
    stats = str(config.get("feature-stats", "")) if config is not None else ""
    return site, load_task(site, dict(context.run_config), stats)


@app.query()
@replies_with_errors
def query(msg: Message, context: Context, audit) -> Message:
    """Identity and capabilities: site id, task, models, the dataset's public nominal size; no data statistics."""
    site, task = _site_task(context)
    data = train_round.dataset(site, task)
    study = msg.content.config_records.get("study")
    rounds = int(study.get("rounds", 0)) if study is not None else 0
    if study is not None:
        release.check_secure(data, bool(study.get("secure-aggregation", False)))
    if rounds > 0:  # would this site take the whole study? (refused here, no site is charged for it)
        release.check_study(train_round.study_plan(dict(context.run_config), context, data), data.policy,
                            data.ledger_path, data.name, data.n, rounds, data.site_id)
    if task.excluded:
        audit_records.log(audit, "data-exclusions", str(context.run_id), dataset=task.dataset.name,
                          excluded=int(task.excluded), reasons=task.exclusion_reasons())
    task_name = str(context.run_config.get("task", "ehr"))
    info = ConfigRecord({"site-id": site.site_id, "task": task_name, "dataset": task.dataset.name,
                         "models": model_names(task_name)})
    if hasattr(task, "schema"):  # the coordinator checks every site reads the study's schema, byte for meaning
        info["schema-sha256"] = task.schema.sha256
    # No exact N leaves the site: the weight is the size the site chose to disclose, or 1 (docs/PRIVACY.md).
    counts = MetricRecord({"nominal-size": task.dataset.weight,
                           "n-features": int(task.model_kwargs.get("n_features", 0))})
    return Message(RecordDict({"site": info, "counts": counts}), reply_to=msg)


@app.query("secagg_keys")
@replies_with_errors
def secagg_keys(msg: Message, context: Context, audit) -> Message:
    """Secure aggregation, stage 1: this round's public keys (client/secure_aggregation.py)."""
    return Message(secagg.keys(msg, context), reply_to=msg)


@app.query("secagg_shares")
@replies_with_errors
def secagg_shares(msg: Message, context: Context, audit) -> Message:
    """Secure aggregation, stage 2: shares of this round's mask secrets, encrypted for the other sites."""
    return Message(secagg.shares(msg, context), reply_to=msg)


@app.query("secagg_unmask")
@replies_with_errors
def secagg_unmask(msg: Message, context: Context, audit) -> Message:
    """Secure aggregation, stage 4: the shares that let the coordinator remove the masks from the sum."""
    return Message(secagg.unmask(msg, context), reply_to=msg)


@app.query("witness")
@replies_with_errors
def witness(msg: Message, context: Context, audit) -> Message:
    """The coordinator's last message of a run: the site logs the head it carries (the coordinator's log
    up to its run-end record), so no record of a finished run is left without a witness outside it."""
    return Message(RecordDict(), reply_to=msg)


@app.query("feature_stats")
@replies_with_errors
def feature_stats(msg: Message, context: Context, audit) -> Message:
    """Release this site's share of the federation's feature statistics, with DP, once per run.

    One noisy sum of bounded per-patient vectors (shared_models/feature_stats.py, privacy/gaussian.py),
    charged to the ledger as round 0 of the run before anything is computed: a Gaussian mechanism is
    one step at sample rate 1, composed with the training rounds by the same accountant.
    """
    site, task = _site_task(context, msg)
    if not hasattr(task, "statistics_vectors"):
        raise ValueError(f"task '{context.run_config.get('task')}' has no federated feature statistics")
    config = msg.content["config"]
    if str(config.get("schema-sha256", "")) != task.schema.sha256:
        raise ValueError(f"the coordinator's schema differs from this site's '{task.schema.name}' (sha256 mismatch)")
    sigma, bound = float(config["stats-noise-multiplier"]), l2_bound(task.schema)
    charged = release.charge_statistics(task.dataset.policy, site.ledger_path, task.dataset.name, task.n_train,
                                        str(context.run_id), sigma, bound)
    audit_records.log_release(audit, charged, task)
    total = noisy_sum(task.statistics_vectors(), bound, sigma)
    metrics = MetricRecord({"sum": [float(v) for v in total], "l2-bound": bound, "noise-multiplier": sigma,
                            "epsilon": charged.charge.epsilon_after, "delta": charged.charge.delta})
    return Message(RecordDict({"statistics": metrics}), reply_to=msg)


@app.train()
@replies_with_errors
def train(msg: Message, context: Context, audit) -> Message:
    """Check the request against the site's policy, charge the ledger, then train (DP-SGD by default).

    The budget is charged before training, in one transaction with its check: a refused round
    trains nothing and sends nothing; a crash after the charge over-counts rather than under-counts.
    """
    site, task = _site_task(context, msg)
    config = msg.content["config"]
    settings = training.TrainSettings.from_config(config)
    model = train_round.Trainable.freeze(_model_from(msg, task.model_kwargs), str(config.get("train-params", "all")))
    group = train_round.open_secure_group(msg, context)  # a broken protocol refuses before any charge
    charged = release.charge_round(config, train_round.dataset(site, task), str(context.run_id), settings.batch_size,
                                   training.planned_steps(settings, task.n_train), model.dimension, group,
                                   train_round.plan_cache(context))
    audit_records.log_release(audit, charged, task, lambda: model.facts(msg))
    metrics = train_round.train(task, model, settings, site, charged)
    reply = train_round.reply(msg, context, audit, model, charged, metrics, task.dataset.weight, group)
    return Message(reply, reply_to=msg)


@app.evaluate()
@replies_with_errors
def evaluate(msg: Message, context: Context, audit) -> Message:
    """Release this site's test metrics: one Gaussian mechanism on bounded per-patient vectors (the task's
    ``eval_layout``), checked and charged to the dataset's ledger before anything is computed, like the
    feature-statistics release; exact, not charged and logged as not DP where the policy opts out."""
    site, task = _site_task(context, msg)
    config = msg.content["config"]
    model = _model_from(msg, task.model_kwargs)
    layout = task.eval_layout
    charged = release.charge_evaluation(config, task.dataset.policy, site.ledger_path, task.dataset.name,
                                        task.n_train, task.n_test, str(context.run_id), int(config["server-round"]),
                                        layout.l2_bound)
    audit_records.log_release(audit, charged, task)
    if charged.noise_multiplier == 0:
        log.warning("EXACT EVALUATION on dataset '%s' (%s): its test metrics leave without DP",
                    task.dataset.name, charged.reason)
    report = release.release_evaluation(charged, task.evaluation_vectors(model, device_for(site)), layout)
    if str(config.get("personalise", "none")) == "finetune":
        report.update(_personalised_report(msg, context, audit, site, task, model))
    return Message(RecordDict({"metrics": MetricRecord(report)}), reply_to=msg)


def _personalised_report(msg: Message, context: Context, audit, site, task, model) -> dict:
    """Fine-tune a copy of the global model on this site's training split and evaluate it.

    The fine-tuned model never leaves the site; only its test counts do, exactly, under ``personal-*`` keys.
    Those counts are a non-private function of the training data, so the site treats the request
    like a non-DP round: its policy must allow non-DP use of the dataset.
    """
    no_dp = release.check_personalisation(task.dataset.policy)
    settings = training.TrainSettings.from_config(msg.content["config"])
    task.train(model, settings, device_for(site), no_dp, site.max_physical_batch)
    audit_records.log(audit, "finetune", str(context.run_id), dataset=task.dataset.name,
                      round=int(msg.content["config"].get("server-round", 0)), steps=settings.local_steps, dp=False,
                      sent="test metrics only")
    return release.exact_sums(task.evaluation_vectors(model, device_for(site)), task.eval_layout, PERSONAL_PREFIX)
