"""The auditor's commands (docs/AUDIT.md):

    carefl audit verify LOG --key PUB [--against COORDINATOR_LOG --coordinator-key PUB] [--json]
    carefl audit verify --run-dir RUN_DIR [--json]
    carefl audit verify --state-dir STATE --kit COORDINATOR_KIT [--site SITE_KIT ...] [--json]
    carefl audit report LOG... --out report.html [--key ACTOR=PUB ...] | --run-dir RUN_DIR

``verify`` exits 0 only when every log verifies and every check holds; otherwise 1, naming the
first failing record (line, seq) and why. Registered on ``carefl`` by deploy/cli/main.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from deploy.coordinator.follow import console
from privacy.auditor.discover import discover, discover_coordinator
from privacy.auditor.results import COORDINATOR, AuditError, AuditSummary
from privacy.auditor.verify import audit_consortium, audit_logs, audit_run_dir

audit_app = typer.Typer(no_args_is_help=True, help="Verify signed audit logs and report on them (auditors).")


@audit_app.command("verify")
def verify_cmd(
    log: Optional[Path] = typer.Argument(None, help="An audit log (audit.jsonl) of a site or the coordinator."),
    key: Optional[Path] = typer.Option(None, "--key", help="The log writer's audit-signing.pub (from its kit)."),
    against: Optional[Path] = typer.Option(None, "--against", help="The coordinator's audit log, to compare with."),
    coordinator_key: Optional[Path] = typer.Option(None, "--coordinator-key",
                                                   help="The coordinator's audit-signing.pub."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="A `carefl demo` run directory: every log in "
                                                                   "it, with the public keys of its kits."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="A coordinator's state directory: its "
                                             "audit.jsonl (one log for all its runs), verified with --kit's key."),
    kit: Optional[Path] = typer.Option(None, "--kit", help="With --state-dir: the coordinator's kit "
                                       "(audit-signing.pub)."),
    site: Optional[List[Path]] = typer.Option(None, "--site", help="With --state-dir: a site's kit folder "
                                              "(audit-signing.pub and audit.jsonl; its name is the site id), "
                                              "compared with the coordinator's log. Repeatable."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
) -> None:
    """Check chain, signatures, order, DP and budget rules and ε of logs; exit 1 on the first failure."""
    single = log is not None or key is not None or against is not None or coordinator_key is not None
    if run_dir is not None:
        if single or state_dir is not None:
            raise AuditError("--run-dir takes every log and key from the run directory; give either it, "
                             "--state-dir, or LOG --key PUB")
        summary = audit_run_dir(run_dir)
    elif state_dir is not None:
        if single:
            raise AuditError("--state-dir takes the coordinator's log from the state directory; give either it "
                             "or LOG --key PUB")
        if kit is None:
            raise AuditError("--state-dir needs --kit: the coordinator's kit, whose audit-signing.pub signs its log")
        summary = audit_consortium(*discover_coordinator(state_dir, kit, list(site or [])))
    else:
        if kit is not None or site:
            raise AuditError("--kit and --site go with --state-dir")
        if log is None:
            raise AuditError("give a LOG with its --key, or --run-dir RUN_DIR")
        if key is None:
            raise AuditError(f"--key is needed: the public key (audit-signing.pub) of whoever wrote {log}")
        if coordinator_key is not None and against is None:
            raise AuditError("--coordinator-key goes with --against COORDINATOR_LOG")
        summary = audit_logs(log, key, against, coordinator_key)
    if as_json:
        typer.echo(summary.to_json())
    else:
        _print(summary)
    raise typer.Exit(0 if summary.ok else 1)


def _print(summary: AuditSummary) -> None:
    table = Table(title="audit logs")
    for column in ("actor", "records", "chain / signatures", "ε logged vs recomputed (max diff)",
                   "against coordinator", "result"):
        table.add_column(column)
    for actor in summary.actors:
        log = actor.log
        if not log.ok:
            where = "" if log.failure.line is None else f" line {log.failure.line}"
            where += "" if log.failure.seq is None else f" (seq {log.failure.seq})"
            chain = f"[red]FAIL{where}[/]"
        elif not log.signatures_checked:
            chain = "[yellow]chain ok, signatures not checked[/]"
        else:
            chain = "[green]ok[/]"
        if actor.role == COORDINATOR or not (log.entries or log.ok):
            eps = "—"
        elif not actor.epsilon:
            eps = "no DP rounds"
        else:
            diff = actor.max_rel_diff
            bad = any(f.check == "epsilon" and f.level == "error" for f in actor.findings)
            warn = any(f.check == "epsilon" and f.level == "warning" for f in actor.findings)
            text = "—" if diff is None else f"{100 * diff:.3f}%"
            if bad:
                eps = f"[red]{text} FAIL[/]"
            else:
                eps = f"[yellow]{text} (see warnings)[/]" if warn else f"[green]{text}[/]"
        against = {None: "—", True: "[green]ok[/]", False: "[red]FAIL[/]"}[actor.against]
        result = "[green]PASS[/]" if actor.ok else "[red]FAIL[/]"
        table.add_row(actor.actor, str(log.records), chain, eps, against, result)
    console.print(table)
    for problem in summary.problems:
        console.print(f"[red]FAIL[/] {problem.message}", highlight=False)
    for actor in summary.actors:
        if not actor.log.ok:
            console.print(f"[red]FAIL[/] {actor.actor}: {actor.log.path} {actor.log.failure}", highlight=False)
        for finding in actor.findings[:20]:
            tag = "[red]FAIL[/]" if finding.level == "error" else "[yellow]warning[/]"
            console.print(f"{tag} {finding}", highlight=False)
        if len(actor.findings) > 20:
            console.print(f"… and {len(actor.findings) - 20} more findings for {actor.actor} (--json lists all)")
    if summary.ok:
        console.print("[green]all logs verify and every check holds[/]")
    else:
        console.print(f"[bold red]audit failed:[/] {summary.first_problem()}", highlight=False)


@audit_app.command("report")
def report_cmd(
    logs: Optional[List[Path]] = typer.Argument(None, help="Audit logs (site and coordinator)."),
    out: Path = typer.Option(Path("audit-report.html"), "--out", help="The HTML file to write."),
    key: Optional[List[str]] = typer.Option(None, "--key", help="ACTOR=PUB: verify that actor's log with its "
                                                                "audit-signing.pub (repeatable)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="A `carefl demo` run directory: its logs and "
                                                                   "the public keys of its kits."),
) -> None:
    """A privacy officer's HTML summary per site and dataset: ε over time, budget, refusals, exclusions."""
    from privacy.auditor.report import write_report

    if run_dir is not None:
        if logs or key:
            raise AuditError("--run-dir takes every log and key from the run directory; give either it or LOGs")
        keys, found = discover(run_dir)
        paths = [p for p in found.values() if p.exists()]
        if not paths:
            raise AuditError(f"{run_dir} holds no audit log")
        public_keys = {actor: path for actor, path in keys.items() if path.is_file()}
    else:
        if not logs:
            raise AuditError("give the LOG files to report on, or --run-dir RUN_DIR")
        paths = list(logs)
        public_keys = {}
        for item in key or []:
            actor, sep, path = item.partition("=")
            if not sep or not actor or not path:
                raise AuditError(f"--key {item!r}: expected ACTOR=PATH, e.g. --key coordinator=kits/coordinator/"
                                 f"audit-signing.pub")
            public_keys[actor] = Path(path)
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise AuditError(f"no such log file: {', '.join(missing)}")
    written = write_report(paths, out, public_keys or None)
    console.print(f"report written to {written} ({len(paths)} log(s)"
                  + ("" if public_keys else "; signatures not checked: no keys given") + ")", highlight=False)
