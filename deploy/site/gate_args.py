"""The gate's own command line, kept apart so its entry point reads as the order of start-up steps.

``python -m deploy.site.gate SITE_TOML [--audit-key KEY] [--warm] [--work-dir DIR] <flower-supernode
arguments>``: the gate's options come first, in any order; everything after them is passed to
Flower's ``flower-supernode`` untouched, so Flower's own parser judges it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

USAGE = ("usage: python -m deploy.site.gate SITE_TOML [--audit-key KEY] [--warm] [--work-dir DIR] "
         "[flower-supernode arguments]")
FLAGS = ("--warm",)                      # the gate's options without a value
OPTIONS = ("--audit-key", "--work-dir")  # and with one


@dataclass
class GateArgs:
    site_config: Path                # site.toml, resolved
    audit_key: Path | None = None    # signing key of the site's audit log
    warm: bool = False               # start the warm executor (deploy/site/warm_launch.py)
    work_dir: Path | None = None     # timing log, node id of the last session, the executor's secret
    supernode: list[str] = field(default_factory=list)  # flower-supernode's own arguments


def parse(argv: list[str]) -> GateArgs:
    """The gate's options, and flower-supernode's arguments after them; exits with the usage if empty."""
    argv = list(argv)
    if not argv:
        sys.exit(USAGE)
    args = GateArgs(Path(argv.pop(0)).resolve())
    while argv[:1] and argv[0] in FLAGS + OPTIONS:
        if argv[0] == "--warm":
            args.warm = True
            del argv[:1]
            continue
        if argv[0] == "--audit-key":
            args.audit_key = Path(argv[1])
        else:
            args.work_dir = Path(argv[1]).resolve()
        del argv[:2]
    args.supernode = argv
    return args
