"""A restarting site ends its own previous Fleet session, so the coordinator lets it back in at once.

Kept apart because it is about reconnecting, not about what may run: the SuperLink keeps a node
"online" until its heartbeat expires (2 × 30 s) and refuses to activate a node it thinks is online,
so without this a site that restarts (after a crash, or after the coordinator came back from an
outage) would be refused for up to a minute while ``carefl coordinator status`` shows the dead session
online (docs/OPERATIONS.md). Security: docs/SECURITY.md ("SuperNode authentication").
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from deploy.site import flower_seam as seam

NODE_ID_FILE = "node-id"  # in the work directory: the node id of this site's last session
log = logging.getLogger("carefl.gate")


def end_stale_sessions(node_id_file: Path) -> None:
    """The node id of each activation is kept in ``node_id_file``; when an activation is refused, the
    gate deactivates that node id with a request signed by the site's own key (the SuperLink accepts
    it only for the node that key belongs to), then activates once more.
    """

    def ending_stale_session(activate):
        def activate_ending_stale_session(client, request):
            try:
                response = activate(client, request)
            except httpx.HTTPStatusError as exc:
                previous = _read_node_id(node_id_file)
                if exc.response.status_code != 412 or previous is None:
                    raise
                log.info("the coordinator still holds this site's previous session (node %s) open; ending it",
                         previous)
                try:
                    seam.deactivate_node(client, previous)
                except httpx.HTTPError:
                    raise exc from None  # not our node, or not online after all: the original refusal stands
                response = activate(client, request)
            _write_node_id(node_id_file, response.node_id)
            return response
        return activate_ending_stale_session

    seam.wrap_node_activation(ending_stale_session)


def _read_node_id(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_node_id(path: Path, node_id: int) -> None:
    if _read_node_id(path) != node_id:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{node_id}\n")
        tmp.replace(path)
