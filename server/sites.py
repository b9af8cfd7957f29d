"""Which Flower node is which hospital, and a Grid that only talks to the chosen sites.

Flower knows nodes by number only. At the start of a run the coordinator sends every connected
node a ``query`` and learns its site id; from then on work goes only to the sites of this run,
never to whatever else happens to be connected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("flwr")

QUERY_TIMEOUT = 120.0  # one query round trip; a ClientApp process has to start at the site


class SiteSelectionError(RuntimeError):
    """The sites this run needs did not all answer."""


@dataclass
class SiteInfo:
    site_id: str
    node_id: int
    n_train: int
    n_test: int
    n_features: int
    models: list[str] = field(default_factory=list)


def _query(grid: Grid, node_ids: list[int]) -> tuple[list[SiteInfo], dict[int, str]]:
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    answered, failed = [], {}
    for reply in grid.send_and_receive(messages, timeout=QUERY_TIMEOUT):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed[node] = reply.error.reason or "no reason given"
            continue
        info, counts = reply.content["site"], reply.content["counts"]
        answered.append(SiteInfo(str(info["site-id"]), node, int(counts["n-train"]), int(counts["n-test"]),
                                 int(counts["n-features"]), list(info.get("models", []))))
    return answered, failed


def discover_sites(grid: Grid, wanted: tuple[str, ...], min_sites: int, wait: float,
                   poll: float = 1.0) -> list[SiteInfo]:
    """Query connected nodes until the wanted sites (or, if none named, ``min_sites``) answered."""
    found: dict[str, SiteInfo] = {}
    asked: set[int] = set()
    failures: dict[int, str] = {}
    deadline = time.monotonic() + wait
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            asked.update(new)
            answered, failed = _query(grid, new)
            failures.update(failed)
            for info in answered:
                if info.site_id in found:
                    raise SiteSelectionError(f"two nodes claim site id '{info.site_id}'")
                found[info.site_id] = info
        if wanted and all(s in found for s in wanted):
            return [found[s] for s in wanted]
        if not wanted and len(found) >= min_sites and not new:
            return sorted(found.values(), key=lambda s: s.site_id)
        if time.monotonic() > deadline:
            missing = [s for s in wanted if s not in found] if wanted else []
            detail = "; ".join(f"node {n}: {r}" for n, r in failures.items())
            need = f"sites {', '.join(missing)} did not answer" if missing else (
                f"only {len(found)} site(s) answered, {min_sites} needed")
            raise SiteSelectionError(f"{need} within {wait:.0f}s" + (f" (errors: {detail})" if detail else ""))
        time.sleep(poll)


RepliesHook = Callable[[str, int, list[tuple[str, Message]]], None]


class SiteGrid:
    """A Grid restricted to the selected sites that reports every reply to ``on_replies``.

    Flower's strategies sample from ``get_node_ids()``; giving them only our sites' nodes is
    what keeps work away from nodes that are connected but not part of this run.
    """

    def __init__(self, grid: Grid, sites: list[SiteInfo], on_replies: RepliesHook) -> None:
        self._grid = grid
        self._site_of = {s.node_id: s.site_id for s in sites}
        self._on_replies = on_replies

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def site_of(self, node_id: int) -> str:
        return self._site_of[node_id]

    def get_node_ids(self) -> Iterable[int]:
        connected = set(self._grid.get_node_ids())
        return [n for n in self._site_of if n in connected]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stray = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self._site_of]
        if stray:
            raise SiteSelectionError(f"refusing to send to nodes outside this run: {stray}")
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages:
            first = messages[0]
            config = first.content.config_records.get("config", {})
            server_round = int(config.get("server-round", 0))
            self._on_replies(first.metadata.message_type,
                             server_round,
                             [(self._site_of.get(r.metadata.src_node_id, "?"), r) for r in replies])
        return replies
