"""The run report: one self-contained ``report.html`` made from a run directory alone.

It shows what the coordinator already holds and nothing else: the per-site metrics per round
(``metrics.jsonl``), the federation's pooled and mean-centre metrics (``rounds.jsonl``), each site's
cumulative ε as the site reported it, the final table (``summary.json``), the errors, and baselines
when the run directory has them. Plots are PNG inline (``shared_models/report_html.py``); the page
fetches nothing. A partial run (no ``summary.json`` yet), a run with errors and a run without DP all
give a report; ``carefl report RUN_DIR`` writes it again at any time.

Baselines (``<run dir>/baselines.json``, or a ``baselines`` entry of ``summary.json``): reference
figures to compare the federation with, e.g. from a benchmark script::

    {"centralised": {"pooled_auc": 0.86, "pooled_accuracy": 0.80},
     "local only":  {"mean_centre_accuracy": 0.74}}

label → {metric → value}, with the metric names of ``rounds.jsonl`` / ``metrics.jsonl``; a bare
number instead of the inner object means the task's headline metric (pooled AUC, or mean Dice).
Each baseline is a dashed line on every plot of its metric and a row of the final table.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from server.run_dir import (METRICS_FILE, ROUNDS_FILE, STOPPED, SUMMARY_FILE, atomic_write_bytes, read_jsonl,
                            stop_record)
from shared_models.tasks import BINARY, SEGMENTATION, TASKS
from shared_models.report_html import PALETTE, e, figure_img, new_figure, page

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


def _number(value) -> float | None:
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
            if _number(metrics) is not None:
                metrics = {HEADLINE.get(task or BINARY, "pooled_auc"): metrics}
            if not isinstance(metrics, dict):
                notes.append(f"{where}: baseline '{label}' is neither a number nor an object; ignored")
                continue
            good = {str(k): float(v) for k, v in metrics.items() if _number(v) is not None and math.isfinite(v)}
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


# -- formatting ----------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    v = _number(value)
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.4g}"


def _label(key: str, task: str) -> str:
    names = dict(SITE_METRICS[task]) | dict(FEDERATION_METRICS[task]) | LABELS
    return names.get(key, key.replace("_", " "))


def _column_of(key: str) -> str:
    """The final-table column a federation or baseline metric belongs to (pooled_auc → auc)."""
    for prefix in ("pooled_", "mean_centre_", "mean_"):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _status(run: RunData) -> tuple[str, str]:
    planned = run.rounds_planned
    done = run.rounds_done
    of = f"{done} of {planned}" if planned else str(done)
    if run.stopped is not None and run.summary is None:
        return "bad", f"stopped after {of} round(s): {run.stopped.get('reason', 'no reason recorded')}"
    if run.run_end and run.run_end != "completed":
        return "bad", f"stopped ({run.run_end}) after {of} round(s)"
    if run.summary is not None:
        completed = int(run.summary.get("rounds_completed", done) or 0)
        if planned and completed < planned:
            return "warn", f"finished after {completed} of {planned} round(s)"
        return "ok", f"completed: {of} round(s)"
    return "warn", (f"in progress or stopped: {of} round(s) recorded, no {SUMMARY_FILE} yet "
                    f"(written when the run completes)")


# -- plots ---------------------------------------------------------------------------------------

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _site_style(sites: list[str], site: str) -> dict:
    """Colour and marker of a site; earlier sites get larger markers, so equal values stay visible."""
    i = sites.index(site)
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
            "markersize": max(3.0, 8.0 - 1.2 * i), "linewidth": max(1.0, 2.4 - 0.35 * i)}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of one key; a round without a finite value is a gap (NaN) in the line."""
    by_round = {}
    for r in records:
        if "round" in r:
            v = _number(r.get(key))
            by_round[int(r["round"])] = v if v is not None and math.isfinite(v) else math.nan
    xs = sorted(by_round)
    return xs, [by_round[x] for x in xs]


def _style_rounds_axis(ax, run: RunData) -> None:
    from matplotlib.ticker import MaxNLocator

    last = max(run.rounds_done, run.rounds_planned or 0, 1)
    if last <= 15:
        ax.set_xticks(range(1, last + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, last + 0.5)
    ax.set_xlabel("round")
    ax.grid(True, alpha=0.3)


def _on_unit_scale(ax, key: str) -> None:
    """Dice, accuracy, AUC, F1 … are drawn on their natural 0–1 scale, so a rise from 0.01 to 0.03 looks as
    small as it is; losses keep an automatic scale."""
    if "loss" not in key:
        ax.set_ylim(0, 1.02)


def _baseline_lines(ax, baselines: dict, key: str, task: str, color: str = "#555") -> list:
    """Each baseline of ``key`` as a horizontal line (one dash style per baseline)."""
    styles = ((0, (6, 3)), (0, (6, 2, 1, 2)), (0, (1, 2)), (0, (10, 4)))
    drawn = []
    for i, (label, metrics) in enumerate(baselines.items()):
        if key in metrics:
            drawn.append(ax.axhline(metrics[key], color=color, linestyle=styles[i % len(styles)], linewidth=1.3,
                                    label=f"baseline {label}: {_label(key, task)} {metrics[key]:.3f}"))
    return drawn


def _plot_federation(run: RunData) -> str:
    task = run.task
    keys = [(k, label) for k, label in FEDERATION_METRICS[task][:4]
            if any(_number(r.get(k)) is not None for r in run.rounds)]
    if not keys:
        return '<p class="muted">no round has finished with a federation metric yet</p>'
    fig = new_figure(9, 3.8)
    ax = fig.subplots()
    for i, (key, label) in enumerate(keys):
        xs, ys = _series(run.rounds, key)
        ax.plot(xs, ys, marker="o", markersize=4, color=PALETTE[i % len(PALETTE)], label=label)
        if any(PERSONALISED + key in r for r in run.rounds):
            xs, ys = _series(run.rounds, PERSONALISED + key)
            ax.plot(xs, ys, marker="^", markersize=4, linestyle=":", color=PALETTE[i % len(PALETTE)],
                    label=f"{label}, fine-tuned at each site")
        _baseline_lines(ax, run.baselines, key, task, color=PALETTE[i % len(PALETTE)])
    _on_unit_scale(ax, keys[0][0])
    _style_rounds_axis(ax, run)
    ax.set_title("federation metrics per round (from the sites' aggregate test metrics)", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return figure_img(fig, "federation metrics per round")


MAX_SITE_LINES = 12  # beyond this a per-site panel shows the sites' min–max band instead of one line each


def _site_band(ax, run: RunData, key: str):
    """Shade the range of ``key`` over all sites per round; returns a legend handle (None if no data)."""
    by_round: dict[int, list[float]] = {}
    for r in run.metrics:
        value = _number(r.get(key))
        if value is not None and "round" in r:
            by_round.setdefault(int(r["round"]), []).append(value)
    if not by_round:
        return None
    rounds = sorted(by_round)
    return ax.fill_between(rounds, [min(by_round[x]) for x in rounds], [max(by_round[x]) for x in rounds],
                           color="#1f77b4", alpha=0.25, linewidth=0)


def _plot_sites(run: RunData, keys: list[str], title: str, alt: str, federation: bool = True) -> str:
    """One panel per metric, one line per site; the federation's mean over sites dashed in black."""
    task, sites = run.task, run.sites
    keys = [k for k in keys if any(_number(r.get(k)) is not None for r in run.metrics)]
    if not keys:
        return f'<p class="muted">no site has reported {e(alt)} yet</p>'
    cols = len(keys) if len(keys) <= 3 else 2
    rows = math.ceil(len(keys) / cols)
    fig = new_figure({1: 8, 2: 9.5, 3: 11}[cols], 0.6 + 2.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    handles = {}
    for ax, key in zip(axes, keys):
        if len(sites) > MAX_SITE_LINES:  # hundreds of simulated sites: their spread, not one line each
            line = _site_band(ax, run, key)
            if line is not None:
                handles.setdefault(f"range over {len(sites)} sites", line)
        for site in sites if len(sites) <= MAX_SITE_LINES else ():
            xs, ys = _series([r for r in run.metrics if r.get("site") == site], key)
            (line,) = ax.plot(xs, ys, label=site, **_site_style(sites, site))
            handles.setdefault(site, line)
        mean_key = MEAN_OVER_SITES.get(key)
        if federation and mean_key and any(mean_key in r for r in run.rounds):
            xs, ys = _series(run.rounds, mean_key)
            (line,) = ax.plot(xs, ys, color="black", linestyle="--", linewidth=1.5, label="mean over sites")
            handles.setdefault("mean over sites", line)
        for line in _baseline_lines(ax, run.baselines, key, task):
            handles.setdefault(line.get_label(), line)
        if len(keys) > 1:
            ax.set_title(_label(key, task), fontsize=10)
        else:
            ax.set_ylabel(_label(key, task))
        _on_unit_scale(ax, key)
        _style_rounds_axis(ax, run)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(handles) / 5), 1, 1))
    return figure_img(fig, alt)


def _plot_epsilon(run: RunData) -> str:
    sites = run.sites
    dp_records = [r for r in run.metrics if _number(r.get("dp")) == 1.0]
    finite = [r for r in dp_records if _number(r.get("epsilon")) is not None and math.isfinite(r["epsilon"])]
    if not finite:
        return ""
    fig = new_figure(9, 3.8)
    ax = fig.subplots()
    top = 0.0
    if len(sites) > MAX_SITE_LINES:
        _site_band(ax, run, "epsilon").set_label(f"range over {len(sites)} sites")
        top = max(r["epsilon"] for r in finite)
    for site in sites if len(sites) <= MAX_SITE_LINES else ():
        mine = [r for r in finite if r.get("site") == site]
        if not mine:
            continue
        xs, ys = _series(mine, "epsilon")
        deltas = sorted({r["delta"] for r in mine if _number(r.get("delta")) is not None})
        label = f"{site} (δ={', '.join(f'{d:g}' for d in deltas)})" if deltas else site
        ax.plot(xs, ys, label=label, **_site_style(sites, site))
        top = max([top, *ys])
        budgets = sorted({r["epsilon_budget"] for r in mine if _number(r.get("epsilon_budget")) is not None})
        for budget in budgets:  # a site's own lifetime budget, when its replies carry it
            ax.axhline(budget, color=_site_style(sites, site)["color"], linestyle=":", linewidth=1.2, label=f"{site} budget ε={budget:g}")
            top = max(top, budget)
    target = _number(run.config.get("target-epsilon"))
    if run.config.get("dp", True) and target and target > 0:
        ax.axhline(target, color="#b00020", linestyle="--", linewidth=1.5,
                   label=f"study target ε={target:g} (each site sized σ for it)")
        top = max(top, target)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_ylabel("cumulative ε (site's lifetime)")
    ax.set_title("ε per site after each round, as each site's ledger reported it", fontsize=10)
    _style_rounds_axis(ax, run)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return figure_img(fig, "epsilon per site per round")


# -- sections ------------------------------------------------------------------------------------

def _overview(run: RunData) -> str:
    s, cfg = run.summary or {}, run.config
    cls, status = _status(run)
    dp = s.get("dp") or {}
    if not (cfg or dp):
        dp_html = e("unknown (no run configuration in this directory yet)")
    elif dp.get("enabled", cfg.get("dp")):
        sigma, target = _number(cfg.get("noise-multiplier")), _number(cfg.get("target-epsilon"))
        how = (f"σ = {sigma:g} asked of every site" if sigma else
               f"each site sized σ for a study ε of {target:g}" if target else "on")
        dp_html = e(f"patient-level DP-SGD ({how}, clip norm {_fmt(cfg.get('clip-norm'), 2)})")
    else:
        dp_html = '<span class="bad">off: sites released updates without differential privacy</span>'
    rows = [
        ("status", f'<span class="{cls}">{e(status)}</span>'),
        ("run", e(s.get("run_id", run.started.get("run_id", "—")))),
        ("task", e(f"{run.task_name}" + (f" ({s['dataset']})" if s.get("dataset") else ""))),
        ("model", e(s.get("model") or cfg.get("model") or "—")),
        ("strategy", e(s.get("strategy") or cfg.get("strategy") or "—")),
        ("sites", e(", ".join(run.sites) or "—")),
        ("differential privacy", dp_html),
    ]
    init = s.get("init_model") if isinstance(s.get("init_model"), dict) else None
    if init or cfg.get("init-checkpoint"):
        what = (f"public checkpoint, weights sha256 {str(init.get('weights_sha256', ''))[:16]}…: "
                f"{init.get('dataset', '?')} ({init.get('train_cases', '?')} training cases, licence "
                f"{init.get('licence', '?')}), no DP, costs the sites no ε" if init else str(cfg["init-checkpoint"]))
        rows.append(("initial model", e(what)))
    train_params = s.get("train_params") or cfg.get("train-params")
    if train_params and train_params != "all":
        rows.append(("trained at the sites", e(f"{train_params} (the rest frozen: not trained, noised or sent)")))
    if _number(s.get("seconds")) is not None:
        rows.append(("duration", e(f"{s['seconds']:.0f} s")))
    if s.get("data_note"):
        rows.append(("data", e(s["data_note"])))
    return "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _last_good(run: RunData) -> dict[str, dict]:
    """Each site's latest record without an error (a partial run has no summary.json)."""
    last: dict[str, dict] = {}
    for r in run.metrics:
        if "site" in r and "error" not in r:
            last[str(r["site"])] = r
    return last


def _final_table(run: RunData) -> str:
    task = run.task
    columns = list(SITE_METRICS[task])
    per_site = (run.summary or {}).get("per_site") or _last_good(run)
    source = (f"from {SUMMARY_FILE}" if (run.summary or {}).get("per_site")
              else "each site's latest round without an error (the run has no summary yet)")
    final_round = run.rounds[-1] if run.rounds else {}
    head = ("<tr><th>site / federation</th><th>train</th><th>test</th>" + "".join(f"<th>{e(lab)}</th>"
            for _, lab in columns) + "<th>ε (lifetime)</th></tr>")
    body = []

    def values_row(label: str, values: dict, cls: str = "", bold: bool = False) -> str:
        cells = "".join(f"<td class=num>{'<b>' if bold else ''}{_fmt(values.get(k))}{'</b>' if bold else ''}</td>"
                        for k, _ in columns)
        return f'<tr{cls}><th>{e(label)}</th><td></td><td></td>{cells}<td></td></tr>'

    for site in run.sites:
        m = per_site.get(site) or {}
        if _number(m.get("dp")) == 0.0:
            eps = '<span class="bad">no DP</span>'
        elif _number(m.get("epsilon")) is not None:
            eps = e(_fmt(m["epsilon"]) + (f" (δ={m['delta']:g})" if _number(m.get("delta")) is not None else ""))
        else:
            eps = "—"
        body.append(f"<tr><td>{e(site)}</td><td class=num>{e(m.get('num_train', '—'))}</td>"
                    f"<td class=num>{e(m.get('num_test', '—'))}</td>"
                    + "".join(f"<td class=num>{_fmt(m.get(k))}</td>" for k, _ in columns) + f"<td class=nowrap>{eps}</td></tr>")
        personal = {k[len(PERSONAL):]: v for k, v in m.items() if k.startswith(PERSONAL)}
        if personal:
            body.append(values_row(f"{site}, fine-tuned at the site", personal, ' class="muted"'))
    federation = run.summary if (run.summary or {}).get("per_site") else final_round
    rows = [*FEDERATION_ROWS[task], *((f"{label}, fine-tuned at each site", PERSONALISED + prefix)
                                      for label, prefix in FEDERATION_ROWS[task])]
    for label, prefix in rows:
        values = {k[len(prefix):]: v for k, v in (federation or {}).items() if k.startswith(prefix)}
        if any(_number(values.get(k)) is not None for k, _ in columns):
            body.append(values_row(label, values, bold=True))
    for label, metrics in run.baselines.items():
        values = {_column_of(k): v for k, v in metrics.items()}
        other = [f"{_label(k, task)} {_fmt(v)}" for k, v in metrics.items()
                 if _column_of(k) not in dict(columns)]
        body.append(f'<tr class="muted"><td>baseline: {e(label)}</td><td></td><td></td>'
                    + "".join(f"<td class=num>{_fmt(values.get(k))}</td>" for k, _ in columns)
                    + f"<td>{e('; '.join(other))}</td></tr>")
    note = (f'<p class="muted">Per site: its test metrics of the final global model ({e(source)}). '
            f"Pooled: over all sites' test {'patients' if task == BINARY else 'cases'}, from counts "
            f"{'and score histograms ' if task == BINARY else ''}the sites sent; mean over sites: each site "
            f"weighs the same.</p>")
    return f"<table>{head}{''.join(body)}</table>{note}"


def _errors(run: RunData) -> str:
    failed = [r for r in run.metrics if "error" in r]
    if not failed and not run.unfinished:
        return "<p>none: every site replied in every recorded round</p>"
    rows = [(str(r.get("round")), r.get("site"), r["error"]) for r in failed]
    rows += [(f"{r['round']} (not completed)", r.get("site"), r.get("reason")) for r in run.unfinished]
    cells = "".join(f"<tr><td class=num>{e(n)}</td><td>{e(site)}</td><td>{e(reason)}</td></tr>"
                    for n, site, reason in rows)
    return (f"<p>{len(failed)} site-round(s) without a usable reply; the site's curve has a gap there."
            + (" The run stopped in a round whose failures come from the coordinator's audit log."
               if run.unfinished else "") + "</p>"
            f"<table><tr><th>round</th><th>site</th><th>reason (as the site or the coordinator gave it)</th></tr>"
            f"{cells}</table>")


def _rounds_table(run: RunData) -> str:
    if not run.rounds:
        return ""
    keys = [k for k, _ in FEDERATION_METRICS[run.task] if any(k in r for r in run.rounds)]
    head = ("<tr><th>round</th><th>sites replied</th><th>seconds</th>"
            + "".join(f"<th>{e(_label(k, run.task))}</th>" for k in keys) + "</tr>")
    rows = "".join(f"<tr><td class=num>{e(r.get('round'))}</td><td>{e(', '.join(r.get('sites_replied') or []))}</td>"
                   f"<td class=num>{_fmt(r.get('seconds'), 1)}</td>"
                   + "".join(f"<td class=num>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in run.rounds)
    return f"<details><summary>every round ({len(run.rounds)})</summary><table>{head}{rows}</table></details>"


def _privacy_section(run: RunData) -> str:
    dp_values = {_number(r.get("dp")) for r in run.metrics if "dp" in r}
    if run.config.get("dp") is False or dp_values == {0.0}:
        return ('<p class="bad">Differential privacy was off in this run: the sites that allowed it '
                "(allow_non_dp) released undefended updates, so no ε is stated.</p>")
    plot = _plot_epsilon(run)
    if not plot:
        return '<p class="muted">no site has reported an ε yet</p>'
    parts = [plot, '<p class="muted">ε is per patient, cumulative over the dataset\'s lifetime at the site (all '
                   "runs), each with the δ the site reported. Each site's lifetime budget is its own policy and "
                   "is enforced there; a site refuses a round that would exceed it (that refusal is listed under "
                   "errors). The site's privacy officer sees the budget with <code>carefl site budget</code>.</p>"]
    if 0.0 in dp_values:
        parts.append('<p class="bad">Some rounds ran without DP (see the final table).</p>')
    return "".join(parts)


def render(run: RunData) -> str:
    """The report page of a loaded run directory."""
    task = run.task
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    site_keys = list(PLOTTED_SITE_METRICS[task])
    body = [
        f"<h1>carefl run report: {e(run.path.name)}</h1>",
        f'<p class="muted">generated {e(generated)} from <code>{e(run.path)}</code>. It holds only what the '
        f"coordinator received: each site's aggregate test metrics, training loss and ε per round. No "
        f"patient-level value leaves a site.</p>",
        *[f'<p class="warn">{e(n)}</p>' for n in run.notes],
        _overview(run),
        "<h2>Final results</h2>", _final_table(run),
        "<h2>Federation metrics per round</h2>", _plot_federation(run), _rounds_table(run),
        "<h2>Test metrics per site and round</h2>",
        _plot_sites(run, site_keys, "test metrics of the global model at each site", "test metrics per site"),
        "<h2>Training loss per site and round</h2>",
        _plot_sites(run, ["train_loss"], "mean local training loss at each site (before aggregation)",
                    "training loss per site", federation=False),
        "<h2>Privacy: ε per site and round</h2>", _privacy_section(run),
        "<h2>Errors and missing replies</h2>", _errors(run),
    ]
    if run.config:
        rows = "".join(f"<tr><td><code>{e(k)}</code></td><td>{e(v)}</td></tr>" for k, v in sorted(run.config.items()))
        body.append(f"<h2>Run configuration</h2><details><summary>{len(run.config)} settings</summary>"
                    f"<table>{rows}</table></details>")
    return page(f"carefl run {run.path.name}", "".join(body))


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Render ``run_dir`` into ``out`` (default ``<run_dir>/report.html``), atomically."""
    run = load_run(Path(run_dir))
    target = Path(out) if out is not None else run.path / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, render(run).encode("utf-8"))
    return target
