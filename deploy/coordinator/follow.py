"""Submitting a run and following it to the end, for every command that starts one.

``follow`` works against anything that can submit a run and report its status: the loopback
federation of ``carefl demo`` / ``carefl simulate`` or a real coordinator (``carefl coordinator run``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import tomllib

from rich.console import Console
from rich.live import Live

from deploy.coordinator.superlink import APP_DIR, DeploymentError
from deploy.coordinator.progress import progress_table, summary_table
from server.run_dir import METRICS_FILE, SUMMARY_FILE, read_jsonl, stop_record
from server.settings import RunSettings

console = Console()
LOST_CONTACT = 60.0  # seconds without any answer about the run before `follow` gives up on the SuperLink
ASK_EVERY = 10.0     # seconds between questions to Flower while the run directory shows the run going on


def app_run_config(**overrides) -> dict:
    """The app's run config (pyproject.toml's ``[tool.flwr.app.config]``) with ``overrides``."""
    return {**tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"], **overrides}


def check_run_config(rounds, strategy, model, lr, local_steps, extra: dict, defaults: dict | None = None) -> dict:
    """Overrides for the app's run config, checked here so that mistakes fail before any process starts.

    ``defaults`` (the task's, shared_models/tasks.py) give way to what the person asked for on the command
    line; ``extra`` (what the command itself decided: sites, run directory …) is applied last."""
    given = {"num-server-rounds": rounds, "strategy": strategy, "model": model, "lr": lr, "local-steps": local_steps}
    overrides = {**(defaults or {}), **{k: v for k, v in given.items() if v is not None}, **extra}
    RunSettings.from_run_config(app_run_config(**overrides))
    return overrides


def _ended(out: Path) -> bool:
    """The run directory holds the run's end: its summary, or the record of why it stopped."""
    return (out / SUMMARY_FILE).exists() or stop_record(read_jsonl(out / METRICS_FILE)) is not None


def follow(fed, run_config: dict, out: Path, poll: float = 2.0) -> dict:
    """Submit, show the live table until the run ends, and return its summary."""
    rounds = int(run_config.get("num-server-rounds", 15))
    run_id = fed.submit(run_config)
    console.print(f"[bold]run {run_id}[/] submitted → {out}")
    status, answered, asked = "starting", time.monotonic(), time.monotonic()
    with Live(progress_table(out, rounds, status), console=console, refresh_per_second=2) as live:
        while not status.startswith("finished"):
            time.sleep(poll)
            dead = [name for name, ok in fed.alive().items() if not ok]
            if dead:
                raise DeploymentError(f"{', '.join(dead)} stopped unexpectedly (its log is in the deployment directory)")
            # Each question to Flower is a `flwr` process (a CPU-second): asked every poll once the run directory
            # says the run ended, every ASK_EVERY s before (a ServerApp that died without writing is still seen)
            if not _ended(out) and time.monotonic() - asked < ASK_EVERY:
                live.update(progress_table(out, rounds, status))
                continue
            asked = time.monotonic()
            status = fed.run_status(run_id)
            if status != "unknown":
                answered = time.monotonic()
            elif time.monotonic() - answered > LOST_CONTACT:
                raise DeploymentError(f"no answer from the coordinator's SuperLink about run {run_id} for "
                                      f"{LOST_CONTACT:.0f} s (is it down?). Once it is back, continue the study with "
                                      f"`carefl coordinator run --resume {out}`")
            live.update(progress_table(out, rounds, status))
    summary_path = out / SUMMARY_FILE
    if status != "finished:completed" or not summary_path.exists():
        stop = stop_record(read_jsonl(out / METRICS_FILE))
        report = f"; report: {out / 'report.html'}" if (out / "report.html").exists() else ""
        if stop is not None:  # an expected end: the ServerApp wrote why
            raise DeploymentError(f"run {run_id} stopped: {stop.get('reason')}{report}")
        tail = "\n".join(fed.run_log(run_id).strip().splitlines()[-15:])
        raise DeploymentError(f"run {run_id} ended with status '{status}'{report}. Last coordinator log lines:\n{tail}")
    summary = json.loads(summary_path.read_text())
    console.print(summary_table(summary))
    console.print(f"run directory: {out}  (report.html, summary.json, metrics.jsonl, final_model.pt)")
    return summary
