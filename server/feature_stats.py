"""Before training: pool the sites' noisy feature statistics into the one encoding every site uses.

Each site of the run answers one ``query.feature_stats`` message with a DP noisy sum of bounded
per-patient vectors (client/client_app.py: feature_stats, charged to its own ledger). The coordinator
adds them up and decodes the total (shared_models/feature_stats.py). The result is written to the run
directory and sent with every train and evaluate message; a resumed run reuses it (asking again would
be a second release, which the sites' ledgers refuse for the same run).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.run_dir import atomic_write_json
from server.sites import QUERY_TIMEOUT, SiteInfo
from shared_models.feature_stats import FeatureStats, decode, l2_bound, layout
from shared_models.schema import Schema

log = logging.getLogger("flwr")

STATS_FILE = "feature_stats.json"
MESSAGE_TYPE = "query.feature_stats"


class FeatureStatsError(RuntimeError):
    """A site did not contribute its statistics; the run cannot encode features identically."""


def gather(grid: Grid, sites: list[SiteInfo], schema: Schema, noise_multiplier: float, run_dir: Path,
           on_replies=None) -> FeatureStats:
    """Ask every site once, add the noisy sums, decode, and record what was pooled."""
    existing = run_dir / STATS_FILE
    if existing.exists():  # a resumed run: the sites released their statistics already
        stats = FeatureStats.from_json(json.loads(existing.read_text())["stats"])
        stats.check(schema)
        log.info("feature statistics reused from %s", existing)
        return stats
    config = ConfigRecord({"schema-sha256": schema.sha256, "stats-noise-multiplier": float(noise_multiplier)})
    messages = [Message(RecordDict({"config": config}), dst_node_id=s.node_id, message_type=MESSAGE_TYPE)
                for s in sites]
    by_node = {s.node_id: s.site_id for s in sites}
    replies = list(grid.send_and_receive(messages, timeout=QUERY_TIMEOUT))
    if on_replies is not None:
        on_replies(MESSAGE_TYPE, 0, [(by_node.get(r.metadata.src_node_id, "?"), r) for r in replies])
    width = len(layout(schema))
    total, problems, privacy = np.zeros(width), {}, {}
    for reply in replies:
        site = by_node.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")
        if reply.has_error():
            problems[site] = reply.error.reason or "no reason given"
            continue
        record = reply.content.metric_records.get("statistics")
        vector = np.asarray(record.get("sum", []) if record is not None else [], dtype=np.float64)
        if vector.shape != (width,) or not np.isfinite(vector).all():
            problems[site] = f"its statistics are not {width} finite numbers"
            continue
        total += vector
        privacy[site] = {"epsilon": float(record.get("epsilon", float("nan"))),
                         "delta": float(record.get("delta", float("nan")))}
    missing = sorted(set(by_node.values()) - set(privacy) - set(problems))
    problems.update({site: "no reply" for site in missing})
    if problems:
        raise FeatureStatsError("feature statistics are needed from every site of the run; "
                                + "; ".join(f"{site}: {reason}" for site, reason in sorted(problems.items())))
    # every site adds its own N(0, (σ · L2 bound)²) per coordinate (privacy/gaussian.py)
    stats = decode(schema, total, noise_std=noise_multiplier * l2_bound(schema) * math.sqrt(len(privacy)))
    atomic_write_json(existing, {
        "schema": schema.name, "schema_sha256": schema.sha256, "noise_multiplier": noise_multiplier,
        "layout": layout(schema), "noisy_total": total.tolist(), "sites": privacy, "stats": stats.to_json(),
        "note": "each site's share is a DP release (Gaussian mechanism) charged to its own ledger as round 0"})
    log.info("feature statistics pooled from %d sites (noise multiplier %g)", len(privacy), noise_multiplier)
    return stats
