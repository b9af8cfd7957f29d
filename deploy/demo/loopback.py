"""A whole consortium on 127.0.0.1, stood up exactly as a real one is (``carefl demo``, tests).

Kits are provisioned into the work directory (consortium CA, coordinator certificate, one EC key
per site); the coordinator starts its SuperLink with TLS and SuperNode authentication and registers
the site keys; each site approves the app's hash in its own site.toml and starts its agent with
``carefl site start`` (a gated SuperNode). Every process we start is stopped on success, failure
or Ctrl-C. ``simulated_sites > 0`` instead runs Flower's simulation engine (Ray) on one SuperLink.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deploy import processes
from deploy.site.approval import app_hash, approve
from deploy.coordinator.superlink import APP_DIR, Coordinator, DeploymentError
from deploy.coordinator.provision import load_consortium, provision

__all__ = ["APP_DIR", "DeploymentError", "LocalFederation"]


@dataclass
class LocalFederation:
    workdir: Path
    sites: dict[str, Path]  # site id → that site's own site.toml (data, policy)
    simulated_sites: int = 0
    app_dir: Path = APP_DIR
    warm: bool = True  # site agents fork ClientApps from a pre-imported executor (False: --no-warm)
    agents: list[processes.Managed] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.coordinator: Coordinator | None = None

    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def kits(self) -> Path:
        return self.workdir / "kits"

    def provision_kits(self) -> Path:
        """consortium.toml for loopback and the kits; returns the coordinator's kit."""
        port = processes.free_port()
        spec = self.workdir / "consortium.toml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text('[consortium]\nname = "carefl-demo"\ndays = 30\n\n[coordinator]\n'
                        f'hosts = ["127.0.0.1", "localhost"]\nport = {port}\nlisten-host = "127.0.0.1"\n\n'
                        + "".join(f'[sites."{s}"]\n' for s in self.sites))
        provision(load_consortium(spec), self.kits)
        return self.kits / "coordinator"

    def start(self, timeout: float = 60.0) -> None:
        if self.simulated_sites:
            self.coordinator = Coordinator(self.workdir / "coordinator", app_dir=self.app_dir)
            self.coordinator.start(timeout)
            return
        self.coordinator = Coordinator(self.workdir / "coordinator", self.provision_kits(), app_dir=self.app_dir)
        self.coordinator.start(timeout)
        digest = app_hash(self.app_dir)
        for site_id, config in self.sites.items():
            approve(config, digest)  # what each hospital does with `carefl site approve`
            self.agents.append(self.start_agent(site_id, config))

    def start_agent(self, site_id: str, config: Path) -> processes.Managed:
        """``carefl site start`` for one site, as its IT would run it (logs beside its site.toml)."""
        log_dir = Path(config).resolve().parent / "agent"
        argv = [processes.tool("carefl"), "site", "start", "--kit", str(self.kits / site_id), "--config",
                str(config), "--coordinator", f"127.0.0.1:{self.coordinator.port}",
                "--runtime-port", str(processes.free_port()), "--log-dir", str(log_dir)]
        if not self.warm:
            argv.append("--no-warm")
        return processes.start(f"site {site_id}", argv, processes.flower_env(log_dir / "flwr-home"),
                               log_dir / "agent.log")

    def stop(self) -> None:
        for agent in reversed(self.agents):
            agent.stop()
        self.agents.clear()
        if self.coordinator is not None:
            self.coordinator.stop()

    def alive(self) -> dict[str, bool]:
        procs = (self.coordinator.procs if self.coordinator else []) + self.agents
        return {p.name: p.alive() for p in procs}

    def submit(self, run_config: dict) -> int:
        return self.coordinator.submit(run_config, self.simulated_sites)

    def run_status(self, run_id: int) -> str:
        return self.coordinator.run_status(run_id)

    def run_log(self, run_id: int) -> str:
        return self.coordinator.run_log(run_id)
