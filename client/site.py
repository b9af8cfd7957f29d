"""Who this site is, where its data lives, and its privacy policy: the site's own config file.

Deployment: the SuperNode is started with ``--node-config 'site-config="/etc/carefl/site.toml"'``.
The file belongs to the hospital; the coordinator never sees or sets it::

    [site]
    id = "cleveland"
    device = "auto"                       # "cpu", "cuda", "cuda:1"; auto = cuda when present
    ledger = "privacy-ledger.sqlite"      # relative to this file
    max_physical_batch = 256              # larger DP batches are split in memory (BatchMemoryManager)

    [datasets.heart-disease]
    path = "/data/uci_heart_disease/processed.cleveland.data"
    epsilon_budget = 10.0                 # lifetime ε of this dataset, across all runs and studies
    delta = 1e-4                          # default: a power of ten ≥ 10× below 1/N
    min_noise_multiplier = 0.5
    max_clip_norm = 10.0
    max_sample_rate = 0.25
    accountant = "prv"                    # or "rdp"
    allow_non_dp = false

Simulation supplies only ``partition-id`` / ``num-partitions``; the site is then built from the
run config (``sim-data-dir``, ``sim-epsilon-budget``) with its ledger in the run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from client import heart_disease
from client.errors import SiteError
from privacy.policy import DatasetPolicy, PolicyError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DATASET = "heart-disease"  # the one dataset a site trains on so far


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    data_path: Path
    policy: DatasetPolicy
    ledger_path: Path
    dataset: str = DATASET
    shard: int = 0
    num_shards: int = 1
    device: str = "auto"
    max_physical_batch: int = 256

    def load_data(self) -> heart_disease.SiteData:
        return heart_disease.load_centre(self.data_path, self.shard, self.num_shards)


def load_site_config(path: Path) -> SiteConfig:
    """Read and check a site config file; every problem is a SiteError naming the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteError(f"site config {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteError(f"site config {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SiteError(f"site config {path} is not valid TOML: {exc}") from None
    site = raw.get("site", {})
    dataset = raw.get("datasets", {}).get(DATASET)
    problems = []
    if not site.get("id"):
        problems.append("[site] id is missing")
    if dataset is None:
        problems.append(f"[datasets.{DATASET}] is missing")
    elif not dataset.get("path"):
        problems.append(f"[datasets.{DATASET}] path is missing")
    if problems:
        raise SiteError(f"site config {path}: " + "; ".join(problems))
    dataset = dict(dataset)
    data_path = (path.parent / str(dataset.pop("path"))).resolve()
    try:
        policy = DatasetPolicy.from_dict(dataset, where=f"site config {path} [datasets.{DATASET}]")
    except PolicyError as exc:
        raise SiteError(str(exc)) from None
    return SiteConfig(
        site_id=str(site["id"]),
        data_path=data_path,
        policy=policy,
        ledger_path=(path.parent / str(site.get("ledger", "privacy-ledger.sqlite"))).resolve(),
        device=str(site.get("device", "auto")),
        max_physical_batch=int(site.get("max_physical_batch", 256)),
    )


def write_site_config(path: Path, site_id: str, data_path: Path, ledger: str = "privacy-ledger.sqlite",
                      device: str = "auto", **policy) -> Path:
    """Write a site config file (demo and provisioning); ``policy`` holds DatasetPolicy settings."""
    DatasetPolicy.from_dict(policy, where="site policy")  # refuse to write an invalid policy

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, (int, float)) else json.dumps(str(v))  # JSON strings are TOML strings

    lines = ["[site]", f"id = {value(site_id)}", f"device = {value(device)}", f"ledger = {value(ledger)}", "",
             f"[datasets.{DATASET}]", f"path = {value(Path(data_path).resolve())}"]
    lines += [f"{k} = {value(v)}" for k, v in policy.items() if v is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def site_from_configs(node_config: dict, run_config: dict) -> SiteConfig:
    """The site from its config file (deployment) or from its partition id (simulation)."""
    if "site-config" in node_config:
        return load_site_config(Path(str(node_config["site-config"])))
    if "partition-id" in node_config:
        sim_dir, out_dir = str(run_config.get("sim-data-dir", "")), str(run_config.get("out-dir", ""))
        if not sim_dir or not out_dir:
            raise SiteError("simulation run needs sim-data-dir and out-dir in the run config")
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        centre, shard, num_shards = heart_disease.partition_for(pid, num)
        site_id = f"sim-{pid:04d}-{centre}"
        try:
            # virtual sites belong to whoever runs the simulation: non-DP baselines are allowed
            policy = DatasetPolicy(epsilon_budget=float(run_config.get("sim-epsilon-budget", 10.0)),
                                   delta=float(run_config.get("sim-delta", 0.0)) or None, allow_non_dp=True)
        except PolicyError as exc:
            raise SiteError(f"simulation policy: {exc}") from None
        return SiteConfig(
            site_id=site_id,
            data_path=heart_disease.centre_file(Path(sim_dir), centre),
            policy=policy,
            ledger_path=Path(out_dir) / "sim-ledgers" / f"{site_id}.sqlite",
            shard=shard,
            num_shards=num_shards,
        )
    raise SiteError("node config has neither site-config (a site's config file) nor partition-id (simulation)")
