"""The coordinator's SuperLink, started from its startup kit, and Flower's CLI pointed at it.

``Coordinator.start`` runs ``flower-superlink`` with TLS from the kit, ``--enable-supernode-auth``,
a persistent ``--database`` in the state directory, runtime dependency installation off and no
phone-home, then registers every site key of the kit under the site's name. Runs are submitted with
Flower's own ``flwr run`` through a connection that only this machine uses (Control API on
127.0.0.1; sites only ever see ``/v1/fleet/*``, see docs/SECURITY.md).

Without a kit it can also run Flower's simulation engine (``simulation=True``): one process on
loopback, no sites to authenticate.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy import processes

from shared_models.toml_file import TomlFileError, read_toml

CONNECTION = "carefl"
APP_DIR = Path(__file__).resolve().parents[2]  # the repository root is the Flower App
PID_FILE = "superlink.json"
SITES_FILE = "sites.json"  # site name → Flower node id


class DeploymentError(RuntimeError):
    """The federation could not be started, or a run failed; the message says what to look at."""


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


@dataclass
class Coordinator:
    state_dir: Path
    kit: Path | None = None          # None: simulation (insecure loopback SuperLink, Ray)
    port: int | None = None          # default: coordinator.toml's port (simulation: a free port)
    app_dir: Path = APP_DIR
    procs: list[processes.Managed] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.kit = Path(self.kit).resolve() if self.kit else None
        settings = self._kit_settings() if self.kit else {}
        self.listen_host = str(settings.get("listen-host", "127.0.0.1"))
        self.port = int(self.port or settings.get("port") or processes.free_port())
        self.cli_home = self.state_dir / "flwr-cli"

    @property
    def simulation(self) -> bool:
        return self.kit is None

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _kit_settings(self) -> dict:
        path = self.kit / "coordinator.toml"
        missing = [n for n in ("coordinator.toml", "ca.crt", "coordinator.crt", "coordinator.key")
                   if not (self.kit / n).is_file()]
        if missing:
            raise DeploymentError(f"{self.kit} is not a coordinator kit: missing {', '.join(missing)} "
                                  f"(make kits with `carefl provision`)")
        try:
            return read_toml(path, "coordinator kit settings").get("coordinator", {})
        except TomlFileError as exc:
            raise DeploymentError(str(exc)) from None

    # -- the SuperLink ---------------------------------------------------------------------------
    def superlink_argv(self) -> list[str]:
        if self.simulation:
            security = ["--insecure", "--simulation"]
        else:
            security = ["--ssl-ca-certfile", str(self.kit / "ca.crt"),
                        "--ssl-certfile", str(self.kit / "coordinator.crt"),
                        "--ssl-keyfile", str(self.kit / "coordinator.key"), "--enable-supernode-auth"]
        return [processes.tool("flower-superlink"), *security, "--host", self.listen_host, "--port", str(self.port),
                "--database", str(self.state_dir / "superlink.db"), "--disable-runtime-dependency-installation"]

    def start(self, timeout: float = 60.0) -> processes.Managed:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        link = processes.start("superlink", self.superlink_argv(), processes.flower_env(self.state_dir / "flwr-home"),
                               self.state_dir / "superlink.log", cwd=self.state_dir)
        self.procs.append(link)
        try:
            processes.wait_for_port(self.port, timeout, link)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise DeploymentError(f"SuperLink did not start: {exc}") from None
        self._write_cli_config()
        (self.state_dir / PID_FILE).write_text(json.dumps({"pid": link.pid, "port": self.port}))
        if not self.simulation:
            self.register_sites()
        return link

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        (self.state_dir / PID_FILE).unlink(missing_ok=True)

    def alive(self) -> dict[str, bool]:
        return {p.name: p.alive() for p in self.procs}

    # -- Flower's CLI ----------------------------------------------------------------------------
    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.admin_address}"',
                 "insecure = true" if self.simulation else f'root-certificates = "{self.kit / "ca.crt"}"']
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        if not (self.cli_home / "config.toml").exists():
            self._write_cli_config()
        return subprocess.run([processes.tool("flwr"), *args], env=processes.flower_env(self.cli_home),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              cwd=self.app_dir)

    def _flwr_json(self, *args: str, timeout: float = 60.0) -> dict:
        done = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success", False):
            raise DeploymentError(f"`flwr {' '.join(args)}` failed: {(done.stdout + done.stderr).strip()[-1500:]}")
        return reply

    def nodes(self) -> list[dict]:
        """Registered SuperNodes as Flower lists them (node id, status, online/offline times)."""
        return list(self._flwr_json("supernode", "list", CONNECTION).get("nodes", []))

    def site_nodes(self) -> dict[str, str]:
        """Site name → Flower node id, as recorded when the site's key was registered here."""
        try:
            return json.loads((self.state_dir / SITES_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def register_sites(self) -> list[str]:
        """Register every kit site key not yet registered; return the names registered now.

        Flower lists nodes by id only, so the name → id map is kept in the state directory.
        """
        names = self.site_nodes()
        added = []
        for pub in sorted((self.kit / "sites").glob("*.pub")):
            if pub.stem in names:
                continue
            done = self.flwr("supernode", "register", str(pub), CONNECTION, "--name", pub.stem, "--format", "json")
            try:
                reply = json.loads(done.stdout)
            except json.JSONDecodeError:
                reply = {}
            if reply.get("success"):
                names[pub.stem] = str(reply["node-id"])
                added.append(pub.stem)
            elif "already in use" not in str(reply.get("error-message", "")):
                raise DeploymentError(f"registering site {pub.stem!r} ({pub}) failed: "
                                      f"{(done.stdout + done.stderr).strip()[-800:]}")
        (self.state_dir / SITES_FILE).write_text(json.dumps(names, indent=1))
        return added

    def submit(self, run_config: dict, simulated_sites: int = 0) -> int:
        """``flwr run`` the app with these run-config overrides; return the run id."""
        if not self.simulation:  # one signed audit log per coordinator, across runs (docs/AUDIT.md)
            run_config = {"audit-log": str(self.state_dir / "audit.jsonl"),
                          "audit-key": str(self.kit / "audit-signing.key"), **run_config}
        overrides = self.state_dir / f"run-config-{time.time_ns()}.toml"
        overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        args = ["run", str(self.app_dir), CONNECTION, "--run-config", str(overrides)]
        if simulated_sites:
            args += ["--federation-config", f"num_supernodes={simulated_sites} client_resources_num_cpus=1"]
        return int(self._flwr_json(*args, timeout=180)["run-id"])

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


def running_superlink(state_dir: Path) -> dict | None:
    """The pid/port of a SuperLink started with ``--background`` from this state directory, if alive."""
    path = Path(state_dir) / PID_FILE
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return info


def stop_background(state_dir: Path, grace: float = 10.0) -> bool:
    """Stop the SuperLink (and everything it started) that ``--background`` left running."""
    info = running_superlink(state_dir)
    if info is None:
        return False
    processes.stop_tree(int(info["pid"]), grace)
    (Path(state_dir) / PID_FILE).unlink(missing_ok=True)
    return True
