"""Run the real ServerApp against real ClientApps in one Python process, without a network.

For studies on one machine where Flower's Ray simulation does not fit (it gives nodes only a
partition id, not a site config): every node gets its own node config, messages go straight to the
ClientApp, and everything else — strategies, site policy, ledger, DP, the run directory — is the
code a deployment runs. Not a deployment: no TLS, no processes, no SuperLink.
"""

from __future__ import annotations

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
