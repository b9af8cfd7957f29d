"""A real Flower deployment on 127.0.0.1: one SuperLink, one SuperNode per site, TLS on every hop.

Used by ``carefl demo`` and the end-to-end tests. Each SuperNode's node config points only at its
own site's data; runs are submitted with Flower's own ``flwr run``; every process we start is
stopped on success, failure or Ctrl-C.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy import processes
from deploy.tls import make_server_tls

CONNECTION = "carefl-local"
APP_DIR = Path(__file__).resolve().parent.parent  # the repository root is the Flower App


class DeploymentError(RuntimeError):
    """The local federation could not be started or the run failed."""


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def node_config_arg(config: dict) -> str:
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


@dataclass
class LocalFederation:
    workdir: Path
    sites: dict[str, dict]  # site id → node config
    tls: bool = True
    simulated_sites: int = 0  # > 0: Flower's simulation engine (Ray) runs this many virtual sites
    app_dir: Path = APP_DIR
    procs: list[processes.Managed] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.port = processes.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cli_home = self.workdir / "coordinator" / "flwr-cli"

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        coord = self.workdir / "coordinator"
        tls_args: list[str] = ["--insecure"]
        self._root_cert: Path | None = None
        if self.simulated_sites:
            # One process on loopback, no network hop between sites: nothing for TLS to protect.
            self.tls = False
            tls_args = ["--insecure", "--simulation"]
        elif self.tls:
            certs = make_server_tls(coord / "tls", ["127.0.0.1", "localhost"])
            tls_args = ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
                        "--ssl-keyfile", str(certs.server_key)]
            self._root_cert = certs.ca_cert
        link = processes.start(
            "superlink",
            [processes.tool("flower-superlink"), *tls_args, "--host", "127.0.0.1", "--port", str(self.port),
             "--database", str(coord / "state.db"), "--disable-runtime-dependency-installation"],
            processes.flower_env(coord / "flwr-home"), coord / "superlink.log", cwd=coord,
        )
        self.procs.append(link)
        processes.wait_for_port(self.port, timeout, link)
        for site_id, node_config in ({} if self.simulated_sites else self.sites).items():
            site_dir = self.workdir / "sites" / site_id
            client_tls = ["--root-certificates", str(self._root_cert)] if self.tls else ["--insecure"]
            node = processes.start(
                f"supernode {site_id}",
                [processes.tool("flower-supernode"), *client_tls, "--superlink", self.address,
                 "--port", str(processes.free_port()), "--node-config", node_config_arg(node_config),
                 "--max-retries", "30", "--max-wait-time", "120"],
                processes.flower_env(site_dir / "flwr-home"), site_dir / "supernode.log", cwd=site_dir,
            )
            self.procs.append(node)
        self._write_cli_config()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def alive(self) -> dict[str, bool]:
        return {p.name: p.alive() for p in self.procs}

    # -- runs --------------------------------------------------------------------------------
    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines.append(f'root-certificates = "{self._root_cert}"' if self.tls else "insecure = true")
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run Flower's CLI against this federation."""
        return subprocess.run([processes.tool("flwr"), *args], env=processes.flower_env(self.cli_home),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              cwd=self.app_dir)

    def submit(self, run_config: dict) -> int:
        """``flwr run`` the app with these run-config overrides; return the run id."""
        overrides = self.workdir / "coordinator" / f"run-config-{time.time_ns()}.toml"
        overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        args = ["run", str(self.app_dir), CONNECTION, "--run-config", str(overrides), "--format", "json"]
        if self.simulated_sites:
            args += ["--federation-config", f"num_supernodes={self.simulated_sites} client_resources_num_cpus=1"]
        done = self.flwr(*args)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success", False):
            raise DeploymentError(f"flwr run failed: {(done.stdout + done.stderr).strip()[-2000:]}")
        return int(reply["run-id"])

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
        done = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            runs = json.loads(done.stdout).get("runs", [])
        except json.JSONDecodeError:
            return "unknown"
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def run_log(self, run_id: int) -> str:
        done = self.flwr("log", str(run_id), CONNECTION, "--show", timeout=60)
        return done.stdout + done.stderr
