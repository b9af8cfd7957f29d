"""Who this site is and where its data lives, from the SuperNode's node config.

Deployment: ``--node-config 'site-id="cleveland" data-path="/data/processed.cleveland.data"'``
(optionally ``device="cuda:0"``). Simulation supplies only ``partition-id`` / ``num-partitions``;
the site then maps its partition onto a centre of the data directory in the run config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client import heart_disease
from client.errors import SiteError


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    data_path: Path
    shard: int = 0
    num_shards: int = 1
    device: str = "auto"

    def load_data(self) -> heart_disease.SiteData:
        return heart_disease.load_centre(self.data_path, self.shard, self.num_shards)


def site_from_configs(node_config: dict, run_config: dict) -> SiteConfig:
    """Resolve the site from node config (deployment) or partition id (simulation)."""
    device = str(node_config.get("device", "auto"))
    if "site-id" in node_config or "data-path" in node_config:
        missing = [k for k in ("site-id", "data-path") if not node_config.get(k)]
        if missing:
            raise SiteError(f"node config lacks {', '.join(missing)} (set them with flower-supernode --node-config)")
        return SiteConfig(str(node_config["site-id"]), Path(str(node_config["data-path"])), device=device)
    if "partition-id" in node_config:
        sim_dir = str(run_config.get("sim-data-dir", ""))
        if not sim_dir:
            raise SiteError("simulation run without sim-data-dir in the run config")
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        centre, shard, num_shards = heart_disease.partition_for(pid, num)
        return SiteConfig(
            site_id=f"sim-{pid:04d}-{centre}",
            data_path=heart_disease.centre_file(Path(sim_dir), centre),
            shard=shard,
            num_shards=num_shards,
            device=device,
        )
    raise SiteError("node config has neither site-id/data-path nor partition-id")
