"""Run the real ServerApp against real ClientApps in one Python process, without a network.

For studies on one machine where Flower's Ray simulation does not fit (it gives nodes only a
partition id, not a site config): every node gets its own node config, messages go straight to the
ClientApp, and everything else — strategies, site policy, ledger, DP, the run directory — is the
code a deployment runs. Not a deployment: no TLS, no SuperLink.

``InProcessFederation`` runs such a study in one child process (``python -m deploy.demo.inprocess``),
for ``follow`` to watch like a loopback federation: ``carefl simulate`` of a task whose sites Flower's
simulation engine cannot build from a partition id.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from deploy.site.flower_seam import set_task_identity


class InProcessGrid:
    """A Flower Grid whose nodes are ClientApp calls in this process."""

    def __init__(self, client_app, node_configs: dict[int, dict], run_config: dict, run_id: int = 1) -> None:
        # Flower stamps new messages with the identity of the process's task (a ServerApp here).
        set_task_identity(task_id=1, run_id=run_id, node_id=0)
        self.client_app = client_app
        self.contexts = {n: Context(run_id=run_id, node_id=n, node_config=cfg, state=RecordDict(),
                                    run_config=run_config) for n, cfg in node_configs.items()}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


def run_in_process(node_configs: dict[int, dict], run_config: dict, run_id: int = 1) -> InProcessGrid:
    """Run one study: the app's ServerApp over ``InProcessGrid``; returns the grid (messages sent)."""
    from client.client_app import app as client_app
    from server.server_app import app as server_app

    grid = InProcessGrid(client_app, node_configs, run_config, run_id)
    server_app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid


class InProcessFederation:
    """One study of these sites (site id → site.toml) run by ``run_in_process`` in a child process that logs
    to ``<workdir>/study.log``; what ``follow`` needs of a federation (``submit``, ``alive``, ``run_status``,
    ``run_log``). The process leads its own group and is stopped with everything it started on exit."""

    RUN_ID = 1

    def __init__(self, workdir: Path, sites: dict[str, Path]) -> None:
        self.workdir = Path(workdir).resolve()
        self.sites = sites
        self.study = None

    def __enter__(self) -> "InProcessFederation":
        return self

    def __exit__(self, *exc) -> None:
        if self.study is not None:
            self.study.stop()

    @property
    def log_path(self) -> Path:
        return self.workdir / "study.log"

    def submit(self, run_config: dict) -> int:
        """Start the study: the app's run config with these overrides, one node per site."""
        from deploy import processes
        from deploy.coordinator.follow import app_run_config
        from deploy.coordinator.superlink import APP_DIR

        spec = self.workdir / "study.json"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps({
            "node_configs": {10 + i: {"site-config": str(Path(p).resolve())}
                             for i, p in enumerate(self.sites.values())},
            "run_config": app_run_config(**run_config), "run_id": self.RUN_ID}, indent=1))
        self.study = processes.start("in-process study", [sys.executable, "-m", "deploy.demo.inprocess", str(spec)],
                                     processes.flower_env(self.workdir / "flwr-home"), self.log_path, cwd=APP_DIR)
        return self.RUN_ID

    def alive(self) -> dict[str, bool]:
        return {}  # the one process is the study: its end is the run's status, not a failure of the federation

    def run_status(self, run_id: int) -> str:
        code = None if self.study is None else self.study.popen.poll()
        return "running" if code is None else "finished:completed" if code == 0 else "finished:failed"

    def run_log(self, run_id: int) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


def _main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    run_in_process({int(n): cfg for n, cfg in spec["node_configs"].items()}, spec["run_config"], int(spec["run_id"]))


if __name__ == "__main__":
    _main(sys.argv[1])
