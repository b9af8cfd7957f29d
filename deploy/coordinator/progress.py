"""Live progress of a run for people: a table per round and site, read from the run directory.

The coordinator's ServerApp appends ``metrics.jsonl``; this only reads it, so it works the same
for a loopback demo, a simulation, or a remote run whose directory is shared.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from server.run_dir import METRICS_FILE, ROUNDS_FILE, read_jsonl


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _quality(rec: dict):
    """Accuracy for classification, mean foreground Dice for segmentation."""
    return rec.get("accuracy", rec.get("dice"))


def _epsilon(rec: dict) -> str:
    """ε with its δ; a non-DP round is shown loudly, never as a number."""
    if rec.get("dp") == 0.0:
        return "[bold red]NO DP[/]"
    if rec.get("epsilon") is None:
        return "–"
    return f"{rec['epsilon']:.2f} ({rec.get('delta', 0):.0e})"


def _note(rec: dict, flagged: bool) -> str:
    """The site's error, else how its update compared with the others' (server/consensus.py)."""
    if rec.get("error"):
        return rec["error"]
    outlier = (rec.get("consensus") or {}).get("outlier", "")
    return " ".join(part for part in ("[bold red]FLAGGED[/]" if flagged else "",
                                      f"[yellow]outlier: {outlier}[/]" if outlier else "") if part)


def progress_table(run_dir: Path, total_rounds: int, status: str) -> Table:
    """Latest round's line per site, plus the federation's mean-centre and pooled figures."""
    records = read_jsonl(run_dir / METRICS_FILE)
    rounds = read_jsonl(run_dir / ROUNDS_FILE)
    latest: dict[str, dict] = {}
    for rec in records:
        if "site" in rec:  # (the run's stop record has none)
            latest[rec["site"]] = rec
    done = rounds[-1]["round"] if rounds else 0
    table = Table(title=f"carefl run — round {done}/{total_rounds} — {status}", title_justify="left")
    for col, justify in (("site", "left"), ("round", "right"), ("weight", "right"),
                         ("test acc. / Dice", "right"), ("AUC", "right"), ("ε (δ)", "right"), ("note", "left")):
        table.add_column(col, justify=justify)
    flagged = {r["site"]: r["flagged"] for r in records if r.get("flagged") and "site" in r}
    for site, rec in sorted(latest.items()):
        table.add_row(site, str(rec["round"]), str(rec.get("weight", "–")), _fmt(_quality(rec)),
                      _fmt(rec.get("auc")), _epsilon(rec), _note(rec, site in flagged))
    if rounds:
        last = rounds[-1]
        table.add_section()
        table.add_row("mean over centres", str(last["round"]), "", _fmt(last.get("mean_centre_accuracy",
                                                                                last.get("mean_dice"))),
                      _fmt(last.get("mean_centre_auc")), "", f"{last.get('seconds', 0):.1f}s this round")
        table.add_row("pooled test sets", str(last["round"]), "", _fmt(last.get("pooled_accuracy",
                                                                               last.get("pooled_dice"))),
                      _fmt(last.get("pooled_auc")), "", "")
    return table


def summary_table(summary: dict) -> Table:
    table = Table(title=f"carefl summary — {summary['strategy']} / {summary['model']}, "
                        f"{summary['rounds_completed']} rounds", title_justify="left")
    for col in ("site", "weight", "test (DP)", "acc. / Dice", "AUC", "sensitivity", "specificity", "F1", "ε (δ)"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site in summary["sites"]:
        m = summary["per_site"].get(site, {})
        table.add_row(site, str(m.get("weight", "")), _fmt(m.get("num_test"), 0), _fmt(_quality(m)),
                      _fmt(m.get("auc")), _fmt(m.get("sensitivity")), _fmt(m.get("specificity")), _fmt(m.get("f1")),
                      _epsilon(m))
    table.add_section()
    table.add_row("mean over centres", "", "", _fmt(summary.get("mean_centre_accuracy", summary.get("mean_dice"))),
                  _fmt(summary.get("mean_centre_auc")), "", "", "", "")
    table.add_row("pooled test sets", "", "", _fmt(summary.get("pooled_accuracy", summary.get("pooled_dice"))),
                  _fmt(summary.get("pooled_auc")),
                  _fmt(summary.get("pooled_sensitivity")), _fmt(summary.get("pooled_specificity")),
                  _fmt(summary.get("pooled_f1")), "")
    return table
