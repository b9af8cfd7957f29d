"""A privacy officer's report from audit logs: one self-contained HTML file (plots inline as PNG).

Per site and dataset: runs, rounds, ε spent over time against the budget (every ε with its δ and
accountant), budget left, refusals and their reasons, data exclusions; per log, whether it verified
(when public keys are given). The logs hold no patient-derived values; every string is still escaped.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

from privacy.auditor.epsilon import DatasetEpsilon
from privacy.auditor.chain import verify_log
from privacy.auditor.results import COORDINATOR, ActorAudit
from privacy.auditor.verify import audit_actor, compare_with_coordinator
from shared_models.report_html import e, figure_img, new_figure, page


def fmt_eps(value, delta=None) -> str:
    if value is None:
        text = "—"
    elif isinstance(value, float) and math.isinf(value):
        text = "∞"
    else:
        text = f"{value:.4g}"
    return text + (f" at δ={delta:g}" if delta is not None else "")


def _peek_actor(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.readline().decode("utf-8")).get("actor")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None


def _status(audit: ActorAudit) -> str:
    log = audit.log
    if not log.ok:
        return f'<span class="bad">does not verify</span>: {e(log.failure)}'
    if not log.signatures_checked:
        return (f'<span class="warn">chain intact, signatures not checked</span> '
                f'<span class="muted">(no public key given for {e(audit.actor)})</span>')
    errors = audit.errors
    if errors:
        return f'<span class="bad">verified, but {len(errors)} finding(s) fail</span>'
    return (f'<span class="ok">verified</span> <span class="muted">({log.records} records, signatures by key '
            f'{e(log.key_fingerprint)})</span>')


def _plot(table: DatasetEpsilon) -> str:
    """ε over time for one dataset, with the budget, as an <img> with a base64 PNG."""
    from matplotlib import dates as mdates

    rows = [r for r in table.rounds if r.dp and r.logged_after is not None and math.isfinite(r.logged_after)]
    if not rows:
        return '<p class="muted">no DP round with a finite ε to plot</p>'
    times = [dt.datetime.strptime(r.time, "%Y-%m-%dT%H:%M:%S.%fZ") for r in rows]
    fig = new_figure(8, 3.6)
    ax = fig.subplots()
    ax.step(times, [r.logged_after for r in rows], where="post", marker="o", label="ε logged by the site")
    recomputed = [(t, r.recomputed_after) for t, r in zip(times, rows)
                  if r.recomputed_after is not None and math.isfinite(r.recomputed_after)]
    if recomputed:
        ax.plot([t for t, _ in recomputed], [v for _, v in recomputed], "x", color="black",
                label="ε recomputed (dp-accounting)")
    budgets = {r.budget for r in rows if r.budget is not None}
    for budget in sorted(budgets):
        ax.axhline(budget, color="#b00020", linestyle="--", label=f"budget ε={budget:g}")
    deltas = sorted({r.delta for r in rows if r.delta is not None})
    accountants = sorted({r.accountant for r in rows})
    ax.set_title(f"{table.dataset}: cumulative ε at δ={', '.join(f'{d:g}' for d in deltas)} "
                 f"({', '.join(accountants)})", fontsize=10)
    ax.set_ylabel("ε")
    top = max([r.logged_after for r in rows] + list(budgets))
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("time (UTC)")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return figure_img(fig, f"ε over time for {table.dataset}")


def _site_section(audit: ActorAudit) -> str:
    entries = audit.log.entries
    out = [f"<h2>Site {e(audit.actor)}</h2>", f"<p>Log <code>{e(audit.log.path)}</code>: {_status(audit)}"]
    if audit.against is not None:
        out.append(" · against the coordinator's log: " + ('<span class="ok">consistent</span>' if audit.against
                                                            else '<span class="bad">inconsistent</span>'))
    out.append("</p>")
    if audit.log.first_time:
        out.append(f'<p class="muted">records from {e(audit.log.first_time)} to {e(audit.log.last_time)}</p>')
    starts = [r for r in entries if r["event"] == "agent-start"]
    if starts:
        apps = starts[-1]["payload"].get("approved_apps") or []
        out.append(f"<p>Agent started {len(starts)} time(s); approved apps at the last start: "
                   + (", ".join(f"<code>{e(a)}</code>" for a in apps) or "none") + "</p>")
    out.append(_findings(audit))
    for table in audit.epsilon.values():
        out.append(_dataset_section(table, entries))
    out.append(_refusals(entries))
    out.append(_exclusions(entries))
    return "\n".join(out)


def _findings(audit: ActorAudit) -> str:
    if not audit.findings:
        return ""
    items = "".join(f'<li><span class="{"bad" if f.level == "error" else "warn"}">{e(f.level)}</span> '
                    f'[{e(f.check)}] {e(f)}</li>' for f in audit.findings)
    return f"<h3>Findings</h3><ul>{items}</ul>"


def _dataset_section(table: DatasetEpsilon, entries: list[dict]) -> str:
    last_dp = next((r for r in reversed(table.rounds) if r.dp), None)
    out = [f"<h3>Dataset {e(table.dataset)}</h3>"]
    runs = table.runs
    left = None
    if last_dp is not None:
        payload = next((rec["payload"] for rec in entries if rec["seq"] == last_dp.seq), {})
        left = payload.get("budget_left")
        if not isinstance(left, (int, float)) and last_dp.budget is not None and last_dp.logged_after is not None:
            left = last_dp.budget - last_dp.logged_after
    exact = sum(1 for rec in entries if rec["event"] == "non-dp-release"
                and rec["payload"].get("dataset") == table.dataset)
    summary = [("runs", ", ".join(runs) or "—"), ("releases (DP)", len(table.dp_rounds)),
               ("non-DP rounds", table.non_dp_rounds),
               ("evaluations released exactly (not DP, not charged)", exact)]
    if last_dp is not None:
        summary += [("accountant", last_dp.accountant),
                    ("ε spent", fmt_eps(last_dp.logged_after, last_dp.delta)),
                    ("ε recomputed by the auditor", fmt_eps(last_dp.recomputed_after, last_dp.delta)),
                    ("budget", fmt_eps(last_dp.budget, last_dp.delta)),
                    ("budget left", fmt_eps(left, last_dp.delta)),
                    ("each kind alone (recomputed; together they compose to the ε spent)",
                     ", ".join(f"{k} {fmt_eps(v)}" for k, v in table.by_mechanism().items()) or "—")]
    out.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary) + "</table>")
    out.append(_plot(table))
    head = ("<tr><th>time (UTC)</th><th>run</th><th>round</th><th>release</th><th>DP</th><th>σ</th><th>q</th>"
            "<th>steps</th>"
            "<th>ε before</th><th>ε after</th><th>recomputed</th><th>difference</th><th>check</th></tr>")
    rows = []
    for r in table.rounds:
        diff = "—" if r.rel_diff is None or not math.isfinite(r.rel_diff) else f"{100 * r.rel_diff:+.2f}%"
        cls = {"ok": "ok", "error": "bad", "warning": "warn"}.get(r.status, "muted")
        rows.append(f"<tr><td>{e(r.time)}</td><td>{e(r.run_id)}</td><td class=num>{e(r.round)}</td>"
                    f"<td>{e(r.mechanism)}</td><td>{'yes' if r.dp else 'no'}</td><td class=num>{e(_g(r.sigma))}</td>"
                    f"<td class=num>{e(_g(r.sample_rate))}</td><td class=num>{e(r.steps)}</td>"
                    f"<td class=num>{e(fmt_eps(r.logged_before, r.delta))}</td>"
                    f"<td class=num>{e(fmt_eps(r.logged_after, r.delta))}</td>"
                    f"<td class=num>{e(fmt_eps(r.recomputed_after, r.delta))}</td><td class=num>{e(diff)}</td>"
                    f'<td class="{cls}" title="{e(r.message)}">{e(r.status)}</td></tr>')
    out.append(f"<details><summary>{len(table.rounds)} release(s)</summary><table>{head}{''.join(rows)}</table>"
               f"</details>")
    return "\n".join(out)


def _g(value) -> str:
    return "—" if value is None else f"{value:g}"


def _refusals(entries: list[dict]) -> str:
    refusals = [r["payload"] for r in entries if r["event"] == "refusal"]
    if not refusals:
        return "<h3>Refusals</h3><p>none</p>"
    counts = Counter((str(p.get("message_type")), p.get("code"), str(p.get("reason"))) for p in refusals)
    rows = "".join(f"<tr><td>{e(t)}</td><td class=num>{e(c)}</td><td>{e(reason)}</td><td class=num>{n}</td></tr>"
                   for (t, c, reason), n in counts.most_common())
    return (f"<h3>Refusals ({len(refusals)})</h3><table><tr><th>message</th><th>code</th><th>reason</th>"
            f"<th>count</th></tr>{rows}</table>")


def _exclusions(entries: list[dict]) -> str:
    per: dict[str, Counter] = defaultdict(Counter)
    total: Counter = Counter()
    for rec in entries:
        if rec["event"] != "data-exclusions":
            continue
        p = rec["payload"]
        dataset = str(p.get("dataset"))
        total[dataset] += p.get("excluded") if isinstance(p.get("excluded"), int) else 0
        for reason, n in (p.get("reasons") or {}).items():
            per[dataset][str(reason)] += n if isinstance(n, int) else 0
    if not total:
        return "<h3>Data exclusions</h3><p>none logged</p>"
    rows = "".join(f"<tr><td>{e(d)}</td><td class=num>{total[d]}</td><td>"
                   + ", ".join(f"{e(r)}: {n}" for r, n in per[d].most_common()) + "</td></tr>" for d in total)
    return ("<h3>Data exclusions</h3><p class=muted>counts summed over every time the site checked its data</p>"
            f"<table><tr><th>dataset</th><th>excluded</th><th>reasons</th></tr>{rows}</table>")


def _coordinator_section(audit: ActorAudit) -> str:
    entries = audit.log.entries
    out = [f"<h2>Coordinator</h2><p>Log <code>{e(audit.log.path)}</code>: {_status(audit)}</p>", _findings(audit)]
    runs: dict[str, dict] = {}
    for rec in entries:
        p = rec["payload"]
        run = runs.setdefault(str(p.get("run_id")), {"status": "—", "sites": [], "app": "—", "updates": Counter(),
                                                     "rejections": 0, "aggregates": 0, "checkpoints": 0})
        if rec["event"] == "run-start":
            run.update(sites=p.get("sites") or [], app=p.get("app_sha256"), start=rec["time"])
        elif rec["event"] == "run-end":
            run["status"] = p.get("status")
        elif rec["event"] == "update":
            run["updates"][str(p.get("site"))] += 1
        elif rec["event"] == "rejection":
            run["rejections"] += 1
        elif rec["event"] == "aggregate":
            run["aggregates"] += 1
        elif rec["event"] == "checkpoint":
            run["checkpoints"] += 1
    runs.pop("None", None)  # site-head records carry no run id
    if runs:
        rows = "".join(
            f"<tr><td>{e(rid)}</td><td><code>{e(str(r['app'])[:16])}…</code></td>"
            f"<td>{e(', '.join(map(str, r['sites'])))}</td>"
            f"<td>{e(', '.join(f'{s}: {n}' for s, n in sorted(r['updates'].items())))}</td>"
            f"<td class=num>{r['rejections']}</td><td class=num>{r['aggregates']}</td>"
            f"<td class=num>{r['checkpoints']}</td><td>{e(r['status'])}</td></tr>" for rid, r in runs.items())
        out.append("<table><tr><th>run</th><th>app sha256</th><th>sites</th><th>updates received</th>"
                   "<th>rejections</th><th>aggregates</th><th>checkpoints</th><th>status</th></tr>"
                   f"{rows}</table>")
    flags = [r["payload"] for r in entries if r["event"] == "site-flagged"]
    if flags:  # sites whose updates disagreed with the consensus round after round (server/consensus.py)
        out.append("<h3>Flagged sites</h3><table><tr><th>run</th><th>round</th><th>site</th><th>excluded</th>"
                   "<th>why</th></tr>" + "".join(
                       f"<tr><td>{e(f.get('run_id'))}</td><td class=num>{e(f.get('round'))}</td><td>{e(f.get('site'))}"
                       f"</td><td>{'yes' if f.get('excluded') else 'no'}</td><td>{e(f.get('reason'))}</td></tr>"
                       for f in flags) + "</table>")
    rejections = Counter(str(r["payload"].get("reason")) for r in entries if r["event"] == "rejection")
    if rejections:
        out.append("<h3>Rejections</h3><table><tr><th>reason</th><th>count</th></tr>" + "".join(
            f"<tr><td>{e(k)}</td><td class=num>{n}</td></tr>" for k, n in rejections.most_common()) + "</table>")
    return "\n".join(out)


def build_audits(log_paths: list[Path], public_keys: dict[str, Path] | None = None) -> list[ActorAudit]:
    audits = []
    for path in log_paths:
        actor = _peek_actor(Path(path)) or Path(path).parent.name
        key = (public_keys or {}).get(actor)
        audits.append(audit_actor(verify_log(Path(path), key), actor if key is not None else None))
    coordinator = next((a for a in audits if a.role == COORDINATOR), None)
    if coordinator is not None:
        for audit in audits:
            if audit.role != COORDINATOR and audit.log.public_key is not None:
                compare_with_coordinator(audit, coordinator.log)
    return audits


def write_report(log_paths: list[Path], out: Path, public_keys: dict[str, Path] | None = None) -> Path:
    """Write the HTML report of ``log_paths`` to ``out``; with ``public_keys`` (actor → audit-signing.pub)
    each log is verified and the sites are compared with the coordinator's log."""
    audits = build_audits(log_paths, public_keys)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    overview = "".join(f"<tr><td>{e(a.actor)}</td><td>{e(a.role)}</td><td class=num>{a.log.records}</td>"
                       f"<td>{_status(a)}</td></tr>" for a in audits)
    intro = (f"<h1>carefl privacy audit report</h1><p class=muted>generated {e(generated)} from {len(audits)} "
             f"log(s). Every ε is stated with its δ; ε is per patient (one patient = one DP sample) and per "
             f"dataset, over the dataset's lifetime.</p>")
    table = ("<table><tr><th>participant</th><th>role</th><th>records</th><th>verification</th></tr>"
             f"{overview}</table>")
    body = [intro, table]
    if not public_keys:
        body.append("<p class=warn>No public keys were given: the logs' signatures were not checked, so this "
                    "report shows what the files say, not that they are authentic.</p>")
    for audit in audits:
        body.append(_coordinator_section(audit) if audit.role == COORDINATOR else _site_section(audit))
    text = page("carefl privacy audit", "".join(body))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
