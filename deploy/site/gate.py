"""The site's gated SuperNode: Flower's own SuperNode, with the site's code gate, in one process.

``python -m deploy.site.gate SITE_TOML [--audit-key KEY] [--warm] [--work-dir DIR] <flower-supernode
arguments>`` (gate_args.py) runs Flower's ``flower-supernode`` with one change: every pulled message
first passes the approval hook (approval_hook.py), which refuses messages of apps the site has not
approved before anything of them is stored, installed or run, and every reply passes the egress guard
(egress_hook.py, egress.py), which lets out only what the site's rules and ledger allow. The gate runs in the SuperNode process,
not in the app it judges, so the app cannot skip it. Everything it takes from Flower's internals
comes through deploy/site/flower_seam.py, which refuses to load (and so the gate to start) if a Flower
upgrade moved it. Limits: docs/SECURITY.md.

Two things keep a site reconnecting after coordinator outages (docs/OPERATIONS.md): when Flower gives
up on a lost SuperLink, the gate exits (Flower alone would hang on its Runtime API thread) so the site
agent can start a new SuperNode once the coordinator answers; and a new SuperNode first ends the
site's own previous session if the SuperLink still holds it open (stale_session.py).

``--warm`` runs the SuperNode with ``--isolation process`` and starts, as its child, the site's warm
SuperExec (warm_launch.py, deploy/site/warm.py): ClientApps are forked from a process with the
libraries already imported instead of a new ``flwr-clientapp`` interpreter per message. The gate is
the same in both modes: a refused message never becomes a task, so no executor can ever pick it up.
With ``--work-dir`` the gate appends per-message timestamps (pulled, stored, reply sent; ids only) to
``DIR/timing.jsonl`` (timing.py), and the warm executor's children add theirs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from deploy.site import approval_hook, egress_hook, gate_args, warm_launch
from deploy.site import flower_seam as seam
from deploy.site.stale_session import NODE_ID_FILE, end_stale_sessions
from deploy.site.timing import TIMING_FILE

log = logging.getLogger("carefl.gate")  # the gate's modules all log here


def main(argv: list[str] | None = None) -> None:
    args = gate_args.parse(sys.argv[1:] if argv is None else argv)
    timing_log = None
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        timing_log = args.work_dir / TIMING_FILE
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s carefl-gate: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    supernode_argv = args.supernode
    if args.warm:  # first: its library imports then overlap with the gate's own
        supernode_argv = warm_launch.start_warm_or_stay_cold(supernode_argv, args.work_dir or Path.cwd())
    from client.site import load_site_config
    from privacy.audit import AuditLog
    site = load_site_config(args.site_config)
    # opacus (imported with the site's privacy code) calls logging.basicConfig at import; without this,
    # every Flower DEBUG record (one per Runtime API call) would be copied to the SuperNode's log.
    logging.getLogger("flwr").propagate = False
    audit = AuditLog(site.audit_log, site.site_id, args.audit_key) if site.audit_log else None
    approval_hook.install(args.site_config, audit, timing_log)
    egress_hook.install(args.site_config, audit, timing_log)  # outside the approval check: sees what it let in
    if args.work_dir is not None:
        end_stale_sessions(args.work_dir / NODE_ID_FILE)
    seam.exit_without_teardown()  # after Flower's own exit handlers (audit records are already on disk)
    seam.run_supernode(supernode_argv)
    # Flower returns here when it gave up on a lost SuperLink (its retries ran out mid-session). Left to
    # itself the process would never end: its Runtime API thread is stopped only by flwr_exit's handlers.
    # Exit through them, so the site agent sees the exit and reconnects once the coordinator is back.
    seam.exit_connection_lost("carefl-gate: the connection to the SuperLink was lost and Flower stopped "
                              "retrying; the site agent reconnects when the coordinator answers again")


if __name__ == "__main__":
    main()
