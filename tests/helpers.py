"""Shared test helpers: the real data directory and an in-process transport for Flower messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The real data (``$CAREFL_DATA``, else ../shared/data beside the repo); skip if absent."""
    root = Path(os.environ.get("CAREFL_DATA", REPO.parent / "shared" / "data"))
    if not (root / "uci_heart_disease").is_dir():
        pytest.skip(f"real data not found under {root}")
    return root


def site_config(folder: Path, centre: str, **policy) -> Path:
    """A real site config file for one hospital of the real data, with a ledger beside it."""
    from client.heart_disease import centre_file
    from client.site import write_site_config

    policy = {"epsilon_budget": 10.0, "delta": 1e-4, **policy}
    return write_site_config(folder / centre / "site.toml", centre, centre_file(data_dir(), centre),
                             device="cpu", **policy)


def default_run_config(**overrides) -> dict:
    """The app's own run config from pyproject.toml, with overrides."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**cfg, **overrides}


class InProcessGrid:
    """Delivers messages straight to the real ClientApp of each node, in this process.

    Only the network transport is replaced: the ServerApp, strategies, ClientApp handlers,
    data loading and training all run for real.
    """

    def __init__(self, client_app, node_configs: dict[int, dict], run_config: dict) -> None:
        # Flower stamps new messages with the identity of the process's task (a ServerApp here).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.client_app = client_app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config=run_config)
                         for n, cfg in node_configs.items()}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies
