"""The site's ClientApp: ``query``, ``train`` and ``evaluate`` handlers.

Every handler replies with a Flower error (never a traceback, never a data value) when the
site cannot do the work, so the coordinator sees a reason and no weights leave the site.
"""

from __future__ import annotations

import functools
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import audit as audit_mod
from client import secure_aggregation as secagg
from client import training
from client.errors import SiteError
from client.site import site_from_configs
from client.tasks import device_for, load_task
from privacy import release
from privacy.gaussian import noisy_sum
from privacy.ledger import AlreadyCharged, BudgetExceeded, LedgerError
from privacy.policy import DPRequest, RequestRefused, check_request
from shared_models.feature_stats import l2_bound
from shared_models.metrics import PERSONAL_PREFIX
from shared_models.registry import build_model, model_names
from shared_models.trainable import freeze_except

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
    study = msg.content.config_records.get("study")
    rounds = int(study.get("rounds", 0)) if study is not None else 0
    if study is not None:
        _check_secure(task.dataset, bool(study.get("secure-aggregation", False)), site.site_id)
    if rounds > 0:  # would this site take the whole study? (refused here, no site is charged for it)
        release.check_study(_plan(dict(context.run_config), context, task), task.dataset.policy, site.ledger_path,
                            task.dataset.name, task.n_train, rounds, site.site_id)
    if audit is not None and task.excluded:
        audit.append("data-exclusions", {"run_id": str(context.run_id), "dataset": task.dataset.name,
                                         "excluded": int(task.excluded), "reasons": task.exclusion_reasons()})
    task_name = str(context.run_config.get("task", "ehr"))
    info = ConfigRecord({"site-id": site.site_id, "task": task_name, "dataset": task.dataset.name,
                         "models": model_names(task_name)})
    if hasattr(task, "schema"):  # the coordinator checks every site reads the study's schema, byte for meaning
        info["schema-sha256"] = task.schema.sha256
    # No exact N leaves the site: the weight is the size the site chose to disclose, or 1 (docs/PRIVACY.md).
    counts = MetricRecord({"nominal-size": task.dataset.weight,
                           "n-features": int(task.model_kwargs.get("n_features", 0))})
    return Message(RecordDict({"site": info, "counts": counts}), reply_to=msg)


def _plan(config, context: Context, task) -> release.StudyPlan:
    """This site's DP request for the study (σ planned once per run, cached in the run's state)."""
    settings = training.TrainSettings.from_config(config)
    cache = context.state.config_records.setdefault("carefl-noise-plan", ConfigRecord())
    return release.plan_request(config, task.dataset.policy, task.dataset.name, task.n_train, settings.batch_size,
                                training.planned_steps(settings, task.n_train),
                                statistics=hasattr(task, "statistics_vectors"), cache=cache)


def _check_secure(dataset, secure: bool, site_id: str) -> None:
    """A dataset whose policy requires secure aggregation takes no study without it."""
    if dataset.policy.require_secure_aggregation and not secure:
        raise RequestRefused(f"site {site_id} requires secure aggregation for dataset '{dataset.name}' and this "
                             f"study runs without it (run config secure-aggregation = true)")


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
    if audit is not None:
        audit.append("dp-round", charged.audit_record(dataset_fingerprint=task.fingerprint()))
    total = noisy_sum(task.statistics_vectors(), bound, sigma)
    metrics = MetricRecord({"sum": [float(v) for v in total], "l2-bound": bound, "noise-multiplier": sigma,
                            "epsilon": charged.charge.epsilon_after, "delta": charged.charge.delta})
    return Message(RecordDict({"statistics": metrics}), reply_to=msg)


def _check_distributed(plan: release.StudyPlan, group: list[int], weight: float) -> None:
    """Distributed DP counts on the noise of ``honest_sites`` sites of the sum: the sum must hold that many, each
    weighted equally (docs/PRIVACY.md, "Distributed DP")."""
    if len(group) < plan.honest_sites:
        raise RequestRefused(f"distributed DP assumes {plan.honest_sites} honest sites in the sum, and this round's "
                             f"secure sum holds only {len(group)}")
    if abs(weight * len(group) - 1.0) > 1e-9:
        raise RequestRefused("distributed DP needs every site of the sum weighted equally")


@app.train()
@replies_with_errors
def train(msg: Message, context: Context, audit) -> Message:
    """Check the request against the site's policy, charge the ledger, then train (DP-SGD by default).

    The budget is charged before training, in one transaction with its check: a refused round
    trains nothing and sends nothing; a crash after the charge over-counts rather than under-counts.
    """
    site, task = _site_task(context, msg)
    config = msg.content["config"]
    secure = bool(config.get("secure-aggregation", False))
    _check_secure(task.dataset, secure, site.site_id)
    settings = training.TrainSettings.from_config(config)
    model = _model_from(msg, task.model_kwargs)
    which = str(config.get("train-params", "all"))
    trained = freeze_except(model, which)  # frozen ones: not trained, not noised, not sent
    dimension = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = _plan(config, context, task)
    group = secagg.open_shares(msg, context) if secure else []  # a broken protocol refuses before any charge
    if plan.honest_sites > 1:
        _check_distributed(plan, group, float(msg.content[secagg.RECORD]["weight"]))
    charged = release.charge_training(plan, task.dataset.policy, site.ledger_path, task.dataset.name, task.n_train,
                                      str(context.run_id), int(config["server-round"]), dimension)
    if audit is not None:
        audit.append("dp-round", charged.audit_record(
            dataset_fingerprint=task.fingerprint(), train_params=which, trained_parameters=dimension,
            model_in_sha256=msg.content["arrays"].object_id,
            **({"init_checkpoint_sha256": str(config["init-checkpoint-sha256"])}
               if config.get("init-checkpoint-sha256") else {})))
    dp, q = plan.request, plan.sample_rate
    if not dp.enabled:
        log.warning("NON-DP ROUND on dataset '%s' (allow_non_dp = true): its ε is now unbounded", task.dataset.name)
    metrics = task.train(model, settings, device_for(site), dp, site.max_physical_batch)
    if dp.enabled and metrics.pop("sample-rate") != q:  # the charged q must be the one Opacus sampled with
        raise RuntimeError("sample rate used in training differs from the one charged; weights withheld")
    state = model.cpu().state_dict()
    names = list(state) if which == "all" else list(trained)
    if secure:  # only the masked update leaves; the coordinator can unmask nothing but the sum
        arrays, clipped = secagg.masked_update(msg, context, state, names)
        if audit is not None:
            audit.append("secure-aggregation", {"run_id": str(context.run_id), "round": int(config["server-round"]),
                                                "group": len(group), "clipped_coordinates": clipped})
    else:
        arrays = ArrayRecord(state if which == "all" else {name: state[name] for name in trained})
    # The training loss is not DP and the sample rate is batch / N: both stay in the site's log (dp-round).
    released = {k: v for k, v in charged.reply_metrics().items() if k != "sample-rate"}
    reply = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": task.dataset.weight, "local-steps": metrics["local-steps"],
                                 **released, "trained-parameters": dimension}),
    })
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
    if audit is not None:
        audit.append(charged.audit_event, charged.audit_record(dataset_fingerprint=task.fingerprint()))
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
    check_request(task.dataset.policy, DPRequest(enabled=False, noise_multiplier=0.0, clip_norm=0.0), 0.0)
    settings = training.TrainSettings.from_config(msg.content["config"])
    task.train(model, settings, device_for(site), DPRequest(enabled=False, noise_multiplier=0.0, clip_norm=0.0),
               site.max_physical_batch)
    if audit is not None:
        audit.append("finetune", {"run_id": str(context.run_id), "dataset": task.dataset.name,
                                  "round": int(msg.content["config"].get("server-round", 0)),
                                  "steps": settings.local_steps, "dp": False, "sent": "test metrics only"})
    return release.exact_sums(task.evaluation_vectors(model, device_for(site)), task.eval_layout, PERSONAL_PREFIX)
