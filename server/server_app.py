"""The coordinator's ServerApp: check the run config, find the sites, run the strategy, write results."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from privacy.audit import AuditLog
from server import checkpoint, feature_stats
from server.audit import CoordinatorAudit, WitnessedGrid
from server.consensus import OutlierWatch
from server.live_report import RunReporter
from server.rounds import RoundRecorder
from server.run_dir import RunDirectory, RunDirectoryBusy
from server.settings import RunConfigError, RunSettings
from server.sites import SecureAggregation, SiteGrid, SiteSelectionError, discover_sites, witness_run_end
from server.strategies import build_strategy
from server.validation import UpdateValidator
from shared_models import public_checkpoint
from shared_models.metrics import SCORE_BINS
from shared_models.registry import build_model
from shared_models.tasks import BINARY
from shared_models.trainable import trained_names

log = logging.getLogger("flwr")

app = ServerApp()


class StudyStopped(RuntimeError):
    """The study ended for a reason the operator can act on (written to the run directory as well)."""


# Expected ends of a study: a quorum that cannot be reached, sites that refuse or do not answer, a bad
# checkpoint or run config. Anything else is a bug and keeps its traceback.
STOPS = (SiteSelectionError, checkpoint.CheckpointError, RunConfigError)


class _OneLineStops(logging.Filter):
    """Flower logs a ServerApp's exception with its traceback; for StudyStopped one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, StudyStopped):
            record.msg, record.args = "carefl: the study stopped: %s", (exc,)
            record.exc_info = record.exc_text = None
        return True


log.addFilter(_OneLineStops())


def stop_with_superlink(poll: float = 1.0) -> threading.Event:
    """Stop this ServerApp when the SuperLink that runs it is gone (killed, host crash), instead of letting
    it retry for a minute and keep writing to a run directory that a resumed run may be using.

    Flower's SuperExec, which launched this process, ends with its SuperLink; when this process's parent
    changes, the SuperLink is gone. Flower's own SIGTERM handling then ends the run (its exit handlers
    run). Returns the event that ends the watch (set when the run ends)."""
    done = threading.Event()
    parent = os.getppid()

    def watch() -> None:
        while not done.wait(poll):
            if os.getppid() != parent:
                log.error("carefl: the SuperLink that runs this study is gone; stopping (resume with --resume)")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="carefl-superlink-watch", daemon=True).start()
    return done


def run_directory_for(settings: RunSettings, run_id: int) -> Path:
    if settings.resume_from:
        return Path(settings.resume_from).expanduser().resolve()
    if settings.out_dir:
        return Path(settings.out_dir).expanduser().resolve()
    return Path("runs", time.strftime("%Y%m%d-%H%M%S") + f"-run{run_id}").resolve()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    torch.manual_seed(settings.seed)
    run_dir = RunDirectory(run_directory_for(settings, context.run_id))
    try:
        run_dir.claim()
    except RunDirectoryBusy as exc:
        raise StudyStopped(str(exc)) from None
    log.info("carefl run %s → %s", context.run_id, run_dir.path)
    reporter = RunReporter(run_dir.path, tensorboard=settings.tensorboard)
    audit_path = Path(settings.audit_log) if settings.audit_log else run_dir.path / "audit.jsonl"
    grid = WitnessedGrid(grid, AuditLog(audit_path, "coordinator"))  # every message carries the log's head
    audit = None
    watchdog = stop_with_superlink()
    try:
        resumed = checkpoint.load(run_dir.path) if settings.resume_from else None
        remaining = settings.num_rounds - (resumed.round if resumed else 0)
        sites = discover_sites(grid, settings.sites, settings.min_sites, wait=settings.round_timeout,
                               study={"rounds": remaining, "secure-aggregation": settings.secure_aggregation})
        model_kwargs = _model_kwargs(settings, sites)
        log.info("sites: %s", ", ".join(f"{s.site_id} (node {s.node_id})" for s in sites))
        audit = CoordinatorAudit(audit_path, Path(settings.audit_key) if settings.audit_key else None, context.run_id)
        public = _public_model(settings, model_kwargs)
        audit.run_start(_app_hash(grid), dict(context.run_config), [s.site_id for s in sites],
                        init_model=_provenance_summary(public))
        _run(grid, context, settings, run_dir, sites, model_kwargs, audit, reporter, resumed, public)
    except STOPS as exc:  # an expected end: say why in the run directory, one line in the log, no traceback
        run_dir.record_stop(str(exc), getattr(exc, "server_round", None), settings.num_rounds)
        if audit is not None:
            audit.run_end(f"stopped: {exc}")
        raise StudyStopped(str(exc)) from None
    except Exception as exc:  # a bug: one line for the operator, the traceback in the run directory
        if audit is not None:
            audit.run_end(f"failed: {type(exc).__name__}")
        details = run_dir.path / "error.txt"
        details.write_text(traceback.format_exc())
        message = f"internal error ({type(exc).__name__}); details for a bug report in {details}"
        run_dir.record_stop(message, None, settings.num_rounds)
        raise StudyStopped(message) from None
    except BaseException as exc:
        if audit is not None:
            audit.run_end(f"failed: {type(exc).__name__}")
        raise
    else:
        audit.run_end("completed")
        witnessed = witness_run_end(grid, sites)
        log.info("run end witnessed by %d of %d sites", len(witnessed), len(sites))
    finally:
        watchdog.set()
        reporter.close()  # report.html of the run as it ended (a stopped run too); never raises
        run_dir.release()


def _model_kwargs(settings: RunSettings, sites) -> dict:
    """What the model needs from the sites (EHR: the number of features they agree on)."""
    if settings.study.shared_statistics:
        schema_hashes = {s.site_id: s.schema_sha256 for s in sites if s.schema_sha256 != settings.study_schema().sha256}
        if schema_hashes:
            raise SiteSelectionError(f"sites {', '.join(sorted(schema_hashes))} read another version of schema "
                                     f"'{settings.schema}' than the coordinator's (sha256 differs)")
    if settings.study.metric_family == BINARY:
        n_features = {s.n_features for s in sites}
        if len(n_features) != 1:
            raise SiteSelectionError(f"sites disagree on the number of features: {sorted(n_features)}")
        return {"n_features": n_features.pop()}
    return {}


def _public_model(settings: RunSettings, model_kwargs: dict) -> public_checkpoint.PublicCheckpoint | None:
    """The study's round-0 model from ``init-checkpoint``, checked to be this study's architecture."""
    if not settings.init_checkpoint:
        return None
    try:
        public = public_checkpoint.load(Path(settings.init_checkpoint))
    except public_checkpoint.PublicCheckpointError as exc:
        raise checkpoint.CheckpointError(str(exc)) from None
    if public.model != settings.model:
        raise checkpoint.CheckpointError(f"init checkpoint {settings.init_checkpoint} is for model '{public.model}', "
                                         f"this study trains '{settings.model}'")
    try:
        build_model(settings.model, **model_kwargs).load_state_dict(public.state_dict)
    except RuntimeError:
        raise checkpoint.CheckpointError(f"init checkpoint {settings.init_checkpoint} does not fit model "
                                         f"'{settings.model}' as this study builds it") from None
    return public


def _provenance_summary(public: public_checkpoint.PublicCheckpoint | None) -> dict | None:
    """What the audit log and the report say about the initial model (provenance, minus the case list)."""
    if public is None:
        return None
    return {"weights_sha256": public.sha256, "model": public.model,
            **{k: v for k, v in public.provenance.items() if k not in ("case_ids", "weights_sha256")}}


def _app_hash(grid: Grid) -> str:
    try:
        return str(grid.run.fab_hash)
    except (AttributeError, NotImplementedError, TypeError):  # a Grid without run information (in-process)
        return ""


def _run(grid: Grid, context: Context, settings: RunSettings, run_dir: RunDirectory, sites, model_kwargs: dict,
         audit: CoordinatorAudit, reporter: RunReporter, resumed: checkpoint.Checkpoint | None,
         public: public_checkpoint.PublicCheckpoint | None) -> None:
    site_ids = [s.site_id for s in sites]
    recorder = RoundRecorder(run_dir, site_ids)
    strategy = build_strategy(settings, n_sites=len(sites))
    model = build_model(settings.model, **model_kwargs)
    initial = public.array_record() if public is not None else ArrayRecord(model.state_dict())
    trained = None if settings.train_params == "all" else trained_names(model, settings.train_params)
    done = 0
    if resumed is not None:  # the checkpoint of the run being resumed, in this run directory
        if resumed.run_config.get("model") != settings.model:
            raise checkpoint.CheckpointError(f"checkpoint is for model '{resumed.run_config.get('model')}', "
                                             f"this run asks for '{settings.model}'")
        done, initial = resumed.round, resumed.array_record()
        checkpoint.restore_strategy(strategy, resumed)
        checkpoint.number_rounds_from(strategy, done)
        checkpoint.drop_rounds_after(run_dir.path, done)
        log.info("resuming %s after round %d of %d", run_dir.path, done, settings.num_rounds)

    def on_replies(*args) -> None:
        recorder.on_replies(*args)
        audit.on_replies(*args)

    def end_round(server_round: int, arrays: ArrayRecord):
        if server_round == 0:
            return recorder.end_round(0, arrays)
        absolute = done + server_round
        audit.aggregate(absolute, arrays)
        result = recorder.end_round(absolute, arrays)
        path = checkpoint.save(run_dir.path, absolute, arrays, strategy, dict(context.run_config))
        audit.checkpoint(absolute, path)
        reporter.round_done(absolute)
        return result

    watch = OutlierWatch(settings.consensus)

    def on_consensus(server_round: int, agreement, radius: float) -> None:
        absolute = done + server_round
        flagged = watch.observe(absolute, agreement)
        recorder.on_consensus(agreement, radius, flagged)
        audit.consensus(absolute, agreement, radius)
        for site, reason in flagged.items():
            excluded = settings.consensus.policy == "exclude"
            audit.flagged(absolute, site, reason, excluded)
            if excluded:
                site_grid.exclude(site, reason)
            else:
                log.warning("site %s flagged: %s", site, reason)

    def on_secure_sum(server_round: int, outcome) -> None:
        record = outcome.record()
        recorder.on_secure_sum(record)
        audit.secure_sum(done + server_round, record)

    secure = SecureAggregation(equal_weights=settings.distributed_dp, max_update_norm=settings.max_update_norm,
                               on_sum=on_secure_sum) if settings.secure_aggregation else None
    site_grid = SiteGrid(grid, sites, on_replies, UpdateValidator(max_norm=settings.max_update_norm),
                         quorum=max(1, min(settings.min_sites, len(sites))), retries=settings.round_retries,
                         wait_for_sites=settings.round_timeout, trained=trained, rule=settings.consensus,
                         on_consensus=on_consensus, secure=secure)
    train_config, evaluate_config = settings.train_config(), settings.evaluate_config()
    if public is not None:  # each site logs it beside the hash of the model it receives
        train_config["init-checkpoint-sha256"] = public.sha256
    if settings.study.shared_statistics:  # one shared encoding, from every site's DP statistics
        stats = feature_stats.gather(grid, sites, settings.study_schema(), settings.stats_noise_multiplier,
                                     run_dir.path, on_replies=audit.on_replies).to_json()
        train_config["feature-stats"] = evaluate_config["feature-stats"] = stats
    remaining = settings.num_rounds - done
    if remaining > 0:
        try:
            result_arrays = strategy.start(
                grid=site_grid,
                initial_arrays=initial,
                num_rounds=remaining,
                timeout=settings.round_timeout,
                train_config=ConfigRecord(train_config),
                evaluate_config=ConfigRecord(evaluate_config),
                evaluate_fn=end_round,
            ).arrays
        except SiteSelectionError as exc:  # the round's own records: who failed and why, who was charged
            recorder.stop_round(exc.server_round, exc.site_errors, str(exc))
            raise
    else:
        result_arrays = initial
    if strategy.average is not None and strategy.average.weight > 0:  # the published model is the average
        result_arrays = strategy.average.current()

    run_dir.save_model(result_arrays.to_torch_state_dict(), settings.model, model_kwargs)
    per_site = {}
    for s in sites:
        train = recorder.last_train.get(s.site_id, {})
        privacy = {k: train[k] for k in ("epsilon", "delta", "dp") if k in train}
        evaluated = recorder.last_eval.get(s.site_id, {})
        # the dataset's lifetime ε is the latest the site stated: after its last evaluation release, if DP
        latest = {k: evaluated[k] for k in ("epsilon", "delta") if k in evaluated}
        per_site[s.site_id] = {**evaluated, **privacy, **latest, "weight": s.weight,
                               **({"flagged": watch.flagged[s.site_id]} if s.site_id in watch.flagged else {})}
    final = {k: v for k, v in recorder.last_round.items()
             if k not in ("round", "seconds", "sites_replied", "secure_aggregation")}  # the last: rounds.jsonl
    run_dir.write_summary({
        "run_id": context.run_id,
        "task": settings.task,
        "dataset": settings.study.dataset_name(settings.schema),
        "model": settings.model,
        "strategy": settings.strategy,
        "train_params": settings.train_params,
        "weight_average": settings.weight_average,
        "init_model": _provenance_summary(public),
        "rounds": settings.num_rounds,
        "rounds_completed": recorder.last_round.get("round", 0),
        "sites": site_ids,
        "per_site": per_site,
        "flagged": dict(watch.flagged),
        "outlier_policy": settings.consensus.policy,
        "secure_aggregation": {"enabled": settings.secure_aggregation, "distributed_dp": settings.distributed_dp},
        **final,
        **({"pooled_auc_method": f"sum of per-site score histograms ({SCORE_BINS} bins); ties inside a bin count 1/2"}
           if settings.study.metric_family == BINARY else
           {"pooled_dice_method": "per class Σ per-case Dice / Σ cases over all sites' test cases (DP sums)",
            "data_note": "MSD hippocampus is single-centre (Vanderbilt); its sites are a synthetic split"}),
        "config": dict(context.run_config),
        "seconds": round(time.time() - run_dir.started, 1),
        "dp": {"enabled": settings.dp, "unit": "patient", "noise_multiplier": settings.noise_multiplier,
               "clip_norm": settings.clip_norm,
               "note": "patient-level DP-SGD at each site; per_site.<id>.epsilon is that site's lifetime ε for "
                       "the dataset at per_site.<id>.delta, from the site's own ledger" if settings.dp else
                       "NO differential privacy: sites with allow_non_dp released undefended updates"},
    })
    log.info("run directory: %s", run_dir.path)
