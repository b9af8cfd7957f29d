"""The run report: one self-contained ``report.html`` made from a run directory alone.

It shows what the coordinator already holds and nothing else: the per-site metrics per round
(``metrics.jsonl``), the federation's pooled and mean-centre metrics (``rounds.jsonl``), each site's
cumulative ε as the site reported it, the final table (``summary.json``), the errors, and baselines
when the run directory has them. Test figures come from the sites' DP evaluation releases: each is shown
± its noise std, and a site that released exactly (its policy's choice) is marked not DP. Plots are PNG
inline (``shared_models/report_html.py``); the page fetches nothing. A partial run (no ``summary.json``
yet), a run with errors and a run without DP all give a report; ``carefl report RUN_DIR`` writes it
again at any time.

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
import math
from pathlib import Path

from server.metrics import DRAWS
from server.report_data import (FEDERATION_METRICS, FEDERATION_ROWS, PERSONAL, PERSONALISED,
                                PLOTTED_SITE_METRICS, REPORT_FILE, SITE_METRICS, RunData, load_run, metric_label,
                                number, std_of)
from server.report_data import ReportError
from server.report_plots import plot_agreement, plot_epsilon, plot_federation, plot_sites
from server.run_dir import SUMMARY_FILE, atomic_write_bytes
from shared_models.tasks import BINARY
from shared_models.report_html import e, page

__all__ = ["REPORT_FILE", "ReportError", "load_run", "render", "write_report"]  # ReportError: load_run's


# -- formatting ----------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    v = number(value)
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.4g}"


def _fmt_pm(record: dict, key: str, digits: int = 3) -> str:
    """A figure with its noise std (``0.812 ± 0.034``) when it has one above 0."""
    std = std_of(record, key)
    text = _fmt(record.get(key), digits)
    return f"{text} ± {std:.{digits}f}" if std and text != "—" else text


NOT_DP = '<span class="bad">evaluation not DP</span>'


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


# -- sections ------------------------------------------------------------------------------------

def _overview(run: RunData) -> str:
    s, cfg = run.summary or {}, run.config
    cls, status = _status(run)
    dp = s.get("dp") or {}
    if not (cfg or dp):
        dp_html = e("unknown (no run configuration in this directory yet)")
    elif dp.get("enabled", cfg.get("dp")):
        sigma, target = number(cfg.get("noise-multiplier")), number(cfg.get("target-epsilon"))
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
    if number(s.get("seconds")) is not None:
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
    head = ("<tr><th>site / federation</th><th>weight</th><th>test</th>" + "".join(f"<th>{e(lab)}</th>"
            for _, lab in columns) + "<th>ε (lifetime)</th></tr>")
    body = []

    def values_row(label: str, values: dict, cls: str = "", bold: bool = False) -> str:
        cells = "".join(f"<td class=num>{'<b>' if bold else ''}{e(_fmt_pm(values, k))}{'</b>' if bold else ''}</td>"
                        for k, _ in columns)
        return f'<tr{cls}><th>{e(label)}</th><td></td><td></td>{cells}<td></td></tr>'

    for site in run.sites:
        m = per_site.get(site) or {}
        if number(m.get("dp")) == 0.0:
            eps = '<span class="bad">no DP</span>'
        elif number(m.get("epsilon")) is not None:
            eps = e(_fmt(m["epsilon"]) + (f" (δ={m['delta']:g})" if number(m.get("delta")) is not None else ""))
        else:
            eps = "—"
        marked = f" {NOT_DP}" if site in run.exact_evaluation_sites else ""
        body.append(f"<tr><td>{e(site)}{marked}</td><td class=num>{e(m.get('weight', '—'))}</td>"
                    f"<td class=num>{e(_fmt_pm(m, 'num_test', 0) if 'num_test' in m else '—')}</td>"
                    + "".join(f"<td class=num>{e(_fmt_pm(m, k))}</td>" for k, _ in columns)
                    + f"<td class=nowrap>{eps}</td></tr>")
        personal = {k[len(PERSONAL):]: v for k, v in m.items() if k.startswith(PERSONAL)}
        if personal:
            body.append(values_row(f"{site}, fine-tuned at the site", personal, ' class="muted"'))
    federation = run.summary if (run.summary or {}).get("per_site") else final_round
    rows = [*FEDERATION_ROWS[task], *((f"{label}, fine-tuned at each site", PERSONALISED + prefix)
                                      for label, prefix in FEDERATION_ROWS[task])]
    for label, prefix in rows:
        values = {k[len(prefix):]: v for k, v in (federation or {}).items() if k.startswith(prefix)}
        if any(number(values.get(k)) is not None for k, _ in columns):
            body.append(values_row(label, values, bold=True))
    for label, metrics in run.baselines.items():
        values = {_column_of(k): v for k, v in metrics.items()}
        other = [f"{metric_label(k, task)} {_fmt(v)}" for k, v in metrics.items()
                 if _column_of(k) not in dict(columns)]
        body.append(f'<tr class="muted"><td>baseline: {e(label)}</td><td></td><td></td>'
                    + "".join(f"<td class=num>{_fmt(values.get(k))}</td>" for k, _ in columns)
                    + f"<td>{e('; '.join(other))}</td></tr>")
    note = (f'<p class="muted">Per site: its test metrics of the final global model ({e(source)}). '
            f"Pooled: over all sites' test {'patients' if task == BINARY else 'cases'}, from the "
            f"{'counts and score histograms' if task == BINARY else 'per-class Dice and IoU sums and case counts'} "
            f"the sites released{'' if task == BINARY else ' (a mean over cases)'}; mean over sites: each site "
            f"weighs the same. Every test figure comes from those released sums: ± is its noise std (each site's "
            f"DP evaluation adds Gaussian noise to every count it sends; the std is found by adding that noise again, "
            f"{DRAWS} times); test patients are a noisy count too.</p>")
    exact = run.exact_evaluation_sites
    if exact:
        note += (f'<p class="bad">Evaluation not DP at {e(", ".join(exact))}: the site\'s policy released its test '
                 f"counts exactly (evaluation = \"exact\", or a non-DP study), without noise and without charging "
                 f"its ε.</p>")
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
            + "".join(f"<th>{e(metric_label(k, run.task))}</th>" for k in keys) + "</tr>")
    rows = "".join(f"<tr><td class=num>{e(r.get('round'))}</td><td>{e(', '.join(r.get('sites_replied') or []))}</td>"
                   f"<td class=num>{_fmt(r.get('seconds'), 1)}</td>"
                   + "".join(f"<td class=num>{e(_fmt_pm(r, k))}</td>" for k in keys) + "</tr>" for r in run.rounds)
    return f"<details><summary>every round ({len(run.rounds)})</summary><table>{head}{rows}</table></details>"


def _privacy_section(run: RunData) -> str:
    dp_values = {number(r.get("dp")) for r in run.metrics if "dp" in r}
    if run.config.get("dp") is False or dp_values == {0.0}:
        return ('<p class="bad">Differential privacy was off in this run: the sites that allowed it '
                "(allow_non_dp) released undefended updates, so no ε is stated.</p>")
    plot = plot_epsilon(run)
    if not plot:
        return '<p class="muted">no site has reported an ε yet</p>'
    parts = [plot, '<p class="muted">ε is per patient, cumulative over the dataset\'s lifetime at the site (all '
                   "runs, every release: training, and each round's evaluation release), each with the δ the site "
                   "reported. Each site's lifetime budget is its own policy and is enforced there; a site refuses "
                   "a round that would exceed it (that refusal is listed under errors). The site's privacy officer sees the budget with <code>carefl site budget</code>.</p>"]
    if 0.0 in dp_values:
        parts.append('<p class="bad">Some rounds ran without DP (see the final table).</p>')
    return "".join(parts)


def _secure_sum_section(run: RunData) -> str:
    """Under secure aggregation: no update was seen alone, so no agreement exists to show; what each round's sum
    held instead (server/secure_aggregation.py)."""
    rows = "".join(
        f"<tr><td>{e(r['round'])}</td><td>{e(', '.join(s.get('summed', [])))}</td>"
        f"<td>{e(', '.join(s.get('dropped', [])) or '–')}</td><td>{e(', '.join(s.get('recovered', [])) or '–')}</td>"
        f"<td><code>{e(str(s.get('sum_sha256', ''))[:16])}</code></td></tr>"
        for r in run.rounds if isinstance(s := r.get("secure_aggregation"), dict))
    distributed = " Sites that opted in added their share of distributed DP noise (docs/PRIVACY.md)." \
        if run.config.get("distributed-dp") is True else ""
    return ('<p>Secure aggregation (SecAgg+) was on: the coordinator received masked updates and could unmask only '
            "their sum, so no site's update, and no agreement between updates, was ever visible to it. Each site "
            f"bounded its own update before masking.{distributed}</p>"
            + (f"<table><tr><th>round</th><th>in the sum</th><th>dropped before masking</th><th>silent at "
               f"unmasking (mask rebuilt from shares)</th><th>sum sha256</th></tr>{rows}</table>" if rows else ""))


def _agreement_section(run: RunData) -> str:
    """Which sites' updates disagreed with the others, how the coordinator bounded them, and who was flagged."""
    if run.config.get("secure-aggregation") is True:
        return _secure_sum_section(run)
    plot = plot_agreement(run)
    if not plot:
        return ('<p class="muted">no consensus records: fewer than 3 sites sent updates in a round, or the run '
                "predates them</p>")
    flagged = (run.summary or {}).get("flagged") or {}
    if not flagged:  # a stopped run has no summary: the rounds' own records
        for r in run.metrics:
            if r.get("flagged"):
                flagged.setdefault(str(r["site"]), str(r["flagged"]))
    policy = str(run.config.get("outlier-policy", "flag"))
    outliers = {}
    for r in run.metrics:
        if isinstance(r.get("consensus"), dict) and r["consensus"].get("outlier"):
            outliers.setdefault(str(r["site"]), []).append(f"{r['round']} ({r['consensus']['outlier']})")
    parts = [plot]
    if flagged:
        rows = "".join(f"<tr><td>{e(site)}</td><td>{e(reason)}</td></tr>" for site, reason in flagged.items())
        parts.append(f'<p class="bad">{len(flagged)} site(s) flagged'
                     + (" and excluded from the rest of the run" if policy == "exclude" else "")
                     + f":</p><table><tr><th>site</th><th>why</th></tr>{rows}</table>")
    else:
        parts.append("<p>no site was flagged: none was an outlier "
                     f"{e(run.config.get('outlier-rounds', 3))} rounds in a row.</p>")
    if outliers:
        cells = "".join(f"<tr><td>{e(site)}</td><td>{e(', '.join(rounds))}</td></tr>" for site, rounds in outliers.items())
        parts.append(f"<details><summary>outlier rounds per site</summary><table><tr><th>site</th>"
                     f"<th>rounds (why)</th></tr>{cells}</table></details>")
    parts.append('<p class="muted">Every round the coordinator compares each update with the round\'s consensus (the '
                 "geometric median of the updates). An update longer than <code>bound-factor</code> × the median "
                 "update counts less the longer it is (far); one pointing against the consensus is opposed; one "
                 "that barely moved is idle (docs/OPERATIONS.md, \"Bounded aggregation\"). Under DP an honest "
                 "site's update is mostly noise, so an honest site is an outlier now and then; a site that is "
                 "one round after round is flagged.</p>")
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
        "<h2>Federation metrics per round</h2>", plot_federation(run), _rounds_table(run),
        "<h2>Test metrics per site and round</h2>",
        plot_sites(run, site_keys, "test metrics of the global model at each site", "test metrics per site"),
        "<h2>Agreement between the sites' updates</h2>", _agreement_section(run),
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
