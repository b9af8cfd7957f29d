"""What a run directory holds, read for the run report: summary, per-site and per-round metrics, baselines,
the coordinator audit log's view of the run — and, per metric family (shared_models/tasks.py), which
metrics the report shows and what they are called."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from server.run_dir import METRICS_FILE, ROUNDS_FILE, STOPPED, SUMMARY_FILE, read_jsonl, stop_record
from shared_models.tasks import BINARY, SEGMENTATION, TASKS


REPORT_FILE = "report.html"


BASELINES_FILE = "baselines.json"


AUDIT_FILE = "audit.jsonl"


# Per metric family (shared_models/tasks.py): the per-site test metrics plotted and tabled (key, label), the federation metrics of
# rounds.jsonl, and which federation metric is the mean over sites of a site metric.
SITE_METRICS = {
    BINARY: (("accuracy", "accuracy"), ("auc", "AUC"), ("sensitivity", "sensitivity"),
            ("specificity", "specificity"), ("f1", "F1")),
    SEGMENTATION: (("dice", "mean foreground Dice"), ("dice_1", "Dice, label 1"), ("dice_2", "Dice, label 2"),
            ("iou_1", "IoU, label 1"), ("iou_2", "IoU, label 2")),
}


PLOTTED_SITE_METRICS = {BINARY: ("accuracy", "auc", "f1", "test_loss"),
                        SEGMENTATION: ("dice", "dice_1", "dice_2", "test_loss")}


FEDERATION_METRICS = {
    BINARY: (("pooled_auc", "pooled AUC"), ("pooled_accuracy", "pooled accuracy"),
            ("mean_centre_auc", "mean-centre AUC"), ("mean_centre_accuracy", "mean-centre accuracy"),
            ("pooled_sensitivity", "pooled sensitivity"), ("pooled_specificity", "pooled specificity"),
            ("pooled_f1", "pooled F1")),
    SEGMENTATION: (("mean_dice", "mean Dice over sites"), ("pooled_dice", "pooled Dice"),
            ("pooled_dice_1", "pooled Dice, label 1"), ("pooled_dice_2", "pooled Dice, label 2")),
}


HEADLINE = {t.metric_family: t.headline for t in TASKS.values()}  # the task table's, per family


MEAN_OVER_SITES = {"accuracy": "mean_centre_accuracy", "auc": "mean_centre_auc", "dice": "mean_dice"}


LABELS = {"test_loss": "test loss", "train_loss": "training loss", "epsilon": "ε"}


FEDERATION_ROWS = {BINARY: (("pooled (all test patients)", "pooled_"), ("mean over sites", "mean_centre_")),
                   SEGMENTATION: (("pooled (all test cases)", "pooled_"), ("mean over sites", "mean_"))}


# With personalise = finetune (docs/OPERATIONS.md) a site also reports its fine-tuned model's figures.
PERSONAL, PERSONALISED = "personal_", "personalised_"

# Every figure derived from an evaluation release has its noise std beside it (server/metrics.py), and each
# site record says whether its release was DP (eval_dp = 0: the site's policy released it exactly).
STD, EVAL_DP = "_std", "eval_dp"


class ReportError(ValueError):
    """The folder is not a run directory; the message says why."""


@dataclass
class RunData:
    path: Path
    summary: dict | None
    metrics: list[dict]
    rounds: list[dict]
    baselines: dict[str, dict[str, float]]
    notes: list[str] = field(default_factory=list)  # problems met while reading, shown in the report
    run_end: str | None = None  # the coordinator audit log's last run-end status, when the log is here
    started: dict = field(default_factory=dict)  # that log's run-start (config, sites) for a partial run
    unfinished: list[dict] = field(default_factory=list)  # its rejections in a round that never completed

    @property
    def config(self) -> dict:
        return (self.summary or {}).get("config") or self.started.get("config") or {}

    @property
    def task_name(self) -> str:
        """The run's task as configured (ehr, ehr-seq, seg)."""
        return str((self.summary or {}).get("task") or self.config.get("task") or self.task)

    @property
    def task(self) -> str:
        """The task's metric family (shared_models/tasks.py): Dice, or binary risk; read from the metrics when
        the run names no task the table knows."""
        task = (self.summary or {}).get("task") or self.config.get("task")
        if task in TASKS:
            return TASKS[task].metric_family
        return SEGMENTATION if any("dice" in r for r in self.metrics) else BINARY

    @property
    def sites(self) -> list[str]:
        named = (self.summary or {}).get("sites") or self.started.get("sites") or []
        return list(dict.fromkeys([*named, *(str(r["site"]) for r in self.metrics if "site" in r)]))

    @property
    def exact_evaluation_sites(self) -> list[str]:
        """Sites that released test metrics without DP in any round (policy evaluation = "exact", or a non-DP
        study): their figures are marked not DP."""
        return list(dict.fromkeys(str(r["site"]) for r in self.metrics if number(r.get(EVAL_DP)) == 0.0))

    @property
    def stopped(self) -> dict | None:
        """metrics.jsonl's record of why the run stopped (its last attempt), if it did."""
        return stop_record(self.metrics)

    @property
    def rounds_done(self) -> int:
        stop = self.stopped
        unfinished = int(stop["round"]) if stop and stop.get("round") else None  # the round it stopped in
        return max([int(r.get("round", 0)) for r in self.rounds + self.metrics
                    if r.get("event") != STOPPED and r.get("round") != unfinished] or [0])

    @property
    def rounds_planned(self) -> int | None:
        value = ((self.summary or {}).get("rounds") or self.config.get("num-server-rounds")
                 or (self.stopped or {}).get("rounds_planned"))
        return int(value) if isinstance(value, (int, float)) else None


def number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _read_baselines(path: Path, summary: dict | None, task: str | None, notes: list[str]) -> dict:
    raw: dict = {}
    sources = [(f"{SUMMARY_FILE} baselines", (summary or {}).get("baselines"))]
    if (path / BASELINES_FILE).is_file():
        try:
            sources.append((BASELINES_FILE, json.loads((path / BASELINES_FILE).read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            notes.append(f"{BASELINES_FILE} is not readable JSON ({exc}); no baseline shown from it")
    for where, value in sources:
        if value is None:
            continue
        if not isinstance(value, dict):
            notes.append(f"{where}: expected an object label → {{metric: value}}; ignored")
            continue
        for label, metrics in value.items():
            if number(metrics) is not None:
                metrics = {HEADLINE.get(task or BINARY, "pooled_auc"): metrics}
            if not isinstance(metrics, dict):
                notes.append(f"{where}: baseline '{label}' is neither a number nor an object; ignored")
                continue
            good = {str(k): float(v) for k, v in metrics.items() if number(v) is not None and math.isfinite(v)}
            if len(good) < len(metrics):
                notes.append(f"{where}: baseline '{label}' has non-numeric values; those are ignored")
            if good:
                raw[str(label)] = good
    return raw


def _read_audit(path: Path, whole: bool) -> tuple[dict | None, str | None, list[dict]]:
    """From the coordinator's audit log in the run directory (when it is there): the last run-start
    payload (run id, config, sites), that run's end status and its rejections (round, site, reason).
    ``whole=False`` reads only the tail (enough for the status of a finished run)."""
    log = path / AUDIT_FILE
    start, status, rejections = None, None, []
    try:
        with open(log, "rb") as fh:
            if not whole:
                fh.seek(max(0, log.stat().st_size - 16384))
            for line in fh:
                if not any(tag in line for tag in (b'"run-start"', b'"run-end"', b'"rejection"')):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                payload = record.get("payload") if isinstance(record, dict) else None
                if not isinstance(payload, dict):
                    continue
                if record.get("event") == "run-start":
                    start, status, rejections = payload, None, []
                elif record.get("event") == "run-end":
                    status = str(payload.get("status"))
                elif record.get("event") == "rejection":
                    rejections.append(payload)
    except OSError:
        return None, None, []
    return start, status, rejections


def load_run(path: Path) -> RunData:
    """Read a run directory; ReportError when there is no run there at all."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path} does not exist")
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory (give the run directory that holds {SUMMARY_FILE})")
    files = [path / name for name in (SUMMARY_FILE, METRICS_FILE, ROUNDS_FILE)]
    if not any(f.exists() for f in files):
        raise ReportError(f"{path} is not a carefl run directory: it has none of {SUMMARY_FILE}, {METRICS_FILE}, "
                          f"{ROUNDS_FILE}")
    notes: list[str] = []
    summary = None
    if files[0].exists():
        try:
            summary = json.loads(files[0].read_text(encoding="utf-8"))
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            notes.append(f"{SUMMARY_FILE} could not be read ({exc}); the report uses the per-round files only")
            summary = None
    try:
        metrics = [r for r in read_jsonl(files[1]) if isinstance(r, dict)]
        rounds = [r for r in read_jsonl(files[2]) if isinstance(r, dict)]
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read the run directory {path}: {exc}") from None
    started, run_end, rejections = _read_audit(path, whole=summary is None)
    run = RunData(path, summary, metrics, rounds, {}, notes, run_end, started or {})
    # what stopped a run mid-round: its replies never reached metrics.jsonl, the audit log has them
    run.unfinished = [r for r in rejections if isinstance(r.get("round"), int) and r["round"] > run.rounds_done]
    run.baselines = _read_baselines(path, summary, run.task, notes)
    return run

def std_of(record: dict, key: str) -> float | None:
    """The noise std written beside ``key`` in a record (None when the record has none)."""
    value = number(record.get(key + STD))
    return value if value is not None and math.isfinite(value) else None


def metric_label(key: str, task: str) -> str:
    names = dict(SITE_METRICS[task]) | dict(FEDERATION_METRICS[task]) | LABELS
    return names.get(key, key.replace("_", " "))
