"""Where a consortium's audit logs and public keys are: every participant's audit.jsonl and
audit-signing.pub in a `carefl demo` run directory, or a real coordinator's state directory with its
kit and the site kit folders sent to the auditor.

Apart because it is only about file layout: it maps actor → path and decides nothing about the
logs, so the commands that take a folder (``verify --run-dir``/``--state-dir``, ``report --run-dir``)
share it, and the checks never depend on where the files came from.
"""

from __future__ import annotations

from pathlib import Path

from privacy.auditor.results import COORDINATOR, AuditError

LOG_NAME = "audit.jsonl"
KEY_NAME = "audit-signing.pub"


def discover(run_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Public keys (kit → audit-signing.pub) and logs (actor → audit.jsonl) of a demo run directory."""
    run_dir = Path(run_dir)
    deployment = run_dir / "deployment"
    kits = deployment / "kits"
    if not kits.is_dir():
        raise AuditError(f"{run_dir} has no deployment/kits folder: not the run directory of `carefl demo` (a real "
                         f"coordinator's log: `carefl audit verify --state-dir STATE --kit COORDINATOR_KIT`)")
    keys = {d.name: d / KEY_NAME for d in sorted(kits.iterdir()) if d.is_dir() and d.name != "ca"}
    logs = {COORDINATOR: deployment / COORDINATOR / LOG_NAME}
    sites = deployment / "sites"
    names = set(keys) - {COORDINATOR}
    if sites.is_dir():
        names |= {d.name for d in sites.iterdir() if (d / LOG_NAME).exists()}
    for name in sorted(names):
        logs[name] = sites / name / LOG_NAME
    return keys, logs


def discover_coordinator(state_dir: Path, kit: Path, site_kits: list[Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    """Keys and logs of a real consortium: the coordinator's one audit log for all its runs
    (``<state dir>/audit.jsonl``) with its kit's key, and, for each site kit folder given, that site's log
    and key. A site kit is a folder holding ``audit-signing.pub`` and ``audit.jsonl`` (as a site's kit
    does, or as a site sends them to the auditor); its name is the site id."""
    state_dir, kit = Path(state_dir), Path(kit)
    if not (state_dir / LOG_NAME).is_file():
        raise AuditError(f"{state_dir} holds no {LOG_NAME}: not the --state-dir of a coordinator that ran a study")
    keys, logs = {COORDINATOR: kit / KEY_NAME}, {COORDINATOR: state_dir / LOG_NAME}
    for site in site_kits:
        site = Path(site)
        if not site.is_dir():
            raise AuditError(f"--site {site}: not a folder (give a site's kit folder, with {KEY_NAME} and {LOG_NAME})")
        keys[site.name], logs[site.name] = site / KEY_NAME, site / LOG_NAME
    return keys, logs
