"""The hospital's agent: check config and data, then keep an authenticated, gated SuperNode running.

``carefl site start --kit DIR --config site.toml`` fails fast, before any network traffic, on a
config, kit or dataset problem (exit 2, one message per problem). It then runs Flower's SuperNode
behind the site's code gate (deploy/site/gate.py) with the consortium CA, the site's EC key and a node
config that carries only the path of site.toml. Before each SuperNode start the agent checks the
link (deploy/site/link_check.py: a TLS handshake against the kit's CA); while the coordinator is down it
repeats that every few seconds, so a coordinator outage of any length (a crash, a maintenance
window) ends with the site reconnecting by itself within seconds of the coordinator's return. Flower's
SuperNode gives up on a lost coordinator after a few retries; the gate then exits (instead of hanging
on Flower's Runtime API thread) and the agent takes over. Two problems no retry can fix stop the
agent with exit 2 and a message saying what to do: a coordinator certificate the consortium CA does
not sign, and a key the coordinator keeps refusing.

By default the site is warm (``warm=True``; ``carefl site start --no-warm`` turns it off): the gate
starts carefl's warm SuperExec (deploy/site/warm.py), which forks each ClientApp from a process that has
the libraries imported, instead of Flower starting a new ``flwr-clientapp`` interpreter per message.
Either way the SuperNode, the gate, its executor and every ClientApp are one process group, stopped
together. The gate and the executor append per-message timestamps to ``<log dir>/timing.jsonl``.
"""

from __future__ import annotations

import hashlib
import logging
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from client.errors import SiteError
from client.site import SiteConfig, load_site_config
from deploy import processes
from deploy.site.approval import ApprovalError, approved_apps
from deploy.site.link_check import UNTRUSTED, check_link

# flower-supernode exits with 1 for every error; the SuperLink's refusal of an unknown key shows in its log
# as Flower's FLEET_NODE_ACTIVATION_FAILED error.
KEY_REFUSED_MARK = "Failed to activate SuperNode"
CONFIG_EXIT = 2  # a problem the site must fix; restarting the agent will not help (systemd: RestartPreventExitStatus)
PROBE_INTERVAL = 3.0  # seconds between TLS handshakes while the coordinator is unreachable
RETRY_MIN = 2.0       # first wait after a SuperNode that could not stay connected; doubles up to max_backoff
STAYED_UP = 30.0      # a SuperNode that ran longer than this had connected: its exit starts the backoff afresh
log = logging.getLogger("carefl.site")


@dataclass(frozen=True)
class AgentPlan:
    site: SiteConfig
    config_path: Path
    kit: Path
    coordinator: str
    approved: set[str]
    runtime_port: int
    refusal_patience: float = 150.0  # seconds of refused activations before concluding the key is unknown
    warm: bool = True                # ClientApps forked from a pre-imported executor (deploy/site/warm.py)

    @property
    def audit_key(self) -> Path | None:
        key = self.kit / "audit-signing.key"
        return key if key.is_file() else None

    def supernode_argv(self, max_wait: float = 60.0, log_dir: Path | None = None) -> list[str]:
        node_config = f'site-config="{self.config_path}"'
        gate = ["--audit-key", str(self.audit_key)] if self.audit_key else []
        if self.audit_key:
            node_config += f' audit-key="{self.audit_key}"'
        if self.warm:
            gate.append("--warm")
        if log_dir is not None:
            gate += ["--work-dir", str(log_dir)]
        return [sys.executable, "-m", "deploy.site.gate", str(self.config_path), *gate,
                "--root-certificates", str(self.kit / "ca.crt"), "--superlink", self.coordinator,
                "--auth-supernode-private-key", str(self.kit / "supernode.key"),
                "--node-config", node_config, "--port", str(self.runtime_port),
                "--max-retries", "5", "--max-wait-time", str(int(max_wait))]


def plan(kit: Path, config_path: Path, coordinator: str | None = None, runtime_port: int = 9094,
         check_data=None, refusal_patience: float = 150.0, warm: bool = True) -> AgentPlan:
    """Everything the agent needs, checked; SiteError lists every problem found."""
    kit, config_path = Path(kit).resolve(), Path(config_path).resolve()
    problems = []
    for name in ("ca.crt", "supernode.key"):
        if not (kit / name).is_file():
            problems.append(f"kit {kit} has no {name}")
    key = kit / "supernode.key"
    if key.is_file() and key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        problems.append(f"{key} is readable by other users; `chmod 600 {key}`")
    site = None
    try:
        site = load_site_config(config_path)
    except SiteError as exc:
        problems.append(str(exc))
    approved: set[str] = set()
    try:
        approved = approved_apps(config_path)
    except ApprovalError as exc:
        problems.append(str(exc))
    address = coordinator or (site.coordinator if site else "")
    if site is not None and not address:
        problems.append(f"site config {config_path}: [site] coordinator (host:port) is missing")
    if site is not None and check_data is not None:
        problems += check_data(site)
    if problems:
        raise SiteError("cannot start the site agent:\n  - " + "\n  - ".join(problems))
    return AgentPlan(site, config_path, kit, address, approved, runtime_port, refusal_patience, warm)


def _log_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _audit(agent: AgentPlan):
    from privacy.audit import AuditLog
    return AuditLog(agent.site.audit_log, agent.site.site_id, agent.audit_key) if agent.site.audit_log else None


def run(agent: AgentPlan, log_dir: Path, max_backoff: float = 60.0, attempts: int | None = None) -> int:
    """Keep the gated SuperNode running (logging start and stop); return an exit code when retrying cannot help."""
    audit = _audit(agent)
    if audit is not None:
        audit.append("agent-start", {
            "config_sha256": hashlib.sha256(agent.config_path.read_bytes()).hexdigest(),
            "approved_apps": sorted(agent.approved),
            "policies": {name: asdict(ds.policy) for name, ds in agent.site.datasets.items()}})
    reason = "stopped"
    try:
        code = _supervise(agent, log_dir, max_backoff, attempts)
        reason = f"exit {code}"
        return code
    finally:
        if audit is not None:
            audit.append("agent-stop", {"reason": reason})


def _supervise(agent: AgentPlan, log_dir: Path, max_backoff: float, attempts: int | None) -> int:
    """Wait until the coordinator answers (a TLS handshake every ``PROBE_INTERVAL`` s), run the gated
    SuperNode until it exits, and start over: a coordinator outage of any length ends with the site
    back online within seconds of the coordinator's return."""
    delay, tries, refused_since = RETRY_MIN, 0, None
    log_path = log_dir / "supernode.log"
    while True:
        if not _wait_for_coordinator(agent):
            return CONFIG_EXIT
        tries += 1
        started = time.monotonic()
        offset = log_path.stat().st_size if log_path.exists() else 0
        node = processes.start("supernode", agent.supernode_argv(log_dir=log_dir),
                               processes.flower_env(log_dir / "flwr-home"),
                               log_path, cwd=log_dir)  # its own group: stopping it stops its ClientApps
        try:
            code = node.popen.wait()
        finally:
            node.stop()  # whatever of its group is left (a ClientApp mid-round) goes with it
        if attempts is not None and tries >= attempts:
            return code
        if KEY_REFUSED_MARK in _log_since(log_path, offset):
            # Flower answers an unknown key and a node it still thinks is online with the same error; the
            # gate ends this site's own stale session first (deploy/site/gate.py), so a refusal that lasts is
            # almost surely an unknown key: retry for a while, then give up.
            refused_since = refused_since or time.monotonic()
            if time.monotonic() - refused_since >= agent.refusal_patience:
                log.error("the coordinator at %s does not know this site's key; send %s to the coordinator "
                          "(`carefl coordinator add-site %s supernode.pub`)", agent.coordinator,
                          agent.kit / "supernode.pub", agent.site.site_id)
                return CONFIG_EXIT
            log.warning("the coordinator refused to activate this site (unknown key, or it still sees the site "
                        "online after a restart); retrying in 10 s")
            time.sleep(10)
            continue
        refused_since = None
        if time.monotonic() - started > STAYED_UP:
            delay = RETRY_MIN  # it was connected and working: a new outage, start the backoff again
        if not check_link(agent.coordinator, agent.kit / "ca.crt").ok:
            log.warning("SuperNode exited with code %s: the coordinator %s is gone; waiting for it (see %s)",
                        code, agent.coordinator, log_path)
            continue  # the link check paces the wait, and reconnects within seconds of the coordinator's return
        log.warning("SuperNode exited with code %s (connection to the coordinator %s lost or refused; see %s); "
                    "reconnecting in %.0f s", code, agent.coordinator, log_path, delay)
        time.sleep(delay)
        delay = min(delay * 2, max_backoff)  # a coordinator that answers but keeps dropping us: back off


def _wait_for_coordinator(agent: AgentPlan) -> bool:
    """Block until the coordinator completes a TLS handshake; False (logged) if its certificate is not the
    consortium's, which no retry can fix."""
    waiting_since = last_note = None
    while True:
        link = check_link(agent.coordinator, agent.kit / "ca.crt")
        if link.ok:
            if waiting_since is not None:
                log.info("coordinator %s reachable again after %.0f s; reconnecting", agent.coordinator,
                         time.monotonic() - waiting_since)
            return True
        if link.state == UNTRUSTED:
            log.error("%s", link.detail)
            return False
        now = time.monotonic()
        if waiting_since is None:
            waiting_since = last_note = now
            log.warning("coordinator %s unreachable (%s); checking every %.0f s", agent.coordinator, link.detail,
                        PROBE_INTERVAL)
        elif now - last_note >= 300:
            last_note = now
            log.warning("coordinator %s still unreachable after %.0f s (%s)", agent.coordinator,
                        now - waiting_since, link.detail)
        time.sleep(PROBE_INTERVAL)
