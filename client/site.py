"""Who this site is, where its data lives, and its privacy policy: the site's own config file.

Deployment: the SuperNode is started with ``--node-config 'site-config="/etc/carefl/site.toml"'``.
The file belongs to the hospital; the coordinator never sees or sets it::

    [site]
    id = "cleveland"
    coordinator = "fl.example.org:443"    # where the site agent connects (deployment)
    device = "auto"                       # "cpu", "cuda", "cuda:1"; auto = cuda when present
    ledger = "privacy-ledger.sqlite"      # relative to this file
    audit_log = "audit.jsonl"             # signed, hash-chained audit log (docs/AUDIT.md)
    max_physical_batch = 256              # larger DP batches are split in memory (BatchMemoryManager)
    cache = "cache"                       # preprocessed imaging cases, keyed by content hash

    [approval]                            # app versions (FAB sha256) allowed to run here
    apps = ["3f5c…"]                      # `carefl site approve`; enforced by deploy/site/gate.py

    [datasets.heart-disease]
    path = "/data/uci_heart_disease/processed.cleveland.data"
    nominal_size = 200                    # public size the site discloses: its weight in FedAvg
                                          # (unset: equal weights; the exact N never leaves the site)
    epsilon_budget = 10.0                 # lifetime ε of this dataset, across all runs and studies
    delta = 1e-4                          # default: a power of ten ≥ 10× below 1/N
    min_noise_multiplier = 0.5
    max_clip_norm = 10.0
    max_sample_rate = 0.25                # 1.0 allows full-batch DP steps (DP fine-tuning)
    accountant = "prv"                    # or "rdp"
    allow_non_dp = false
    evaluation = "dp"                     # "exact": test counts leave without noise or charge (not DP)

    [datasets.hippocampus]                # imaging: a manifest of cases instead of a path
    manifest = "hippocampus.csv"
    labels = [0, 1, 2]
    require_deidentified = true           # refuse DICOM cases that carry identifying attributes
    epsilon_budget = 8.0

Simulation supplies only ``partition-id`` / ``num-partitions``; the site is then built from the
run config (``sim-data-dir``, ``sim-epsilon-budget``) with its ledger in the run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from client.ingest import heart_disease
from client.errors import SiteError
from privacy.policy import DatasetPolicy, PolicyError
from shared_models.toml_file import TomlFileError, read_toml


HEART_DISEASE = "heart-disease"
DATASET_SETTINGS = {"path", "manifest", "labels", "require_deidentified", "nominal_size", "modality"}  # besides the privacy policy


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset of the site: where it is, and the site's privacy policy for it."""

    name: str
    policy: DatasetPolicy
    path: Path | None = None          # a tabular extract (heart disease)
    manifest: Path | None = None      # an imaging manifest (CSV of cases)
    labels: tuple[int, ...] = ()      # declared label codes of the masks (imaging)
    require_deidentified: bool = False
    nominal_size: int | None = None   # the public size the site chooses to disclose (None: not disclosed)
    modality: tuple[str, ...] = ()    # imaging: the DICOM modalities its images must be (e.g. ("MR",)); (): CT, MR or PET

    @property
    def weight(self) -> int:
        """This dataset's aggregation weight as the coordinator sees it: the public nominal size, else 1
        (equal weights). Never the exact number of patients (docs/PRIVACY.md, "No exact N")."""
        return self.nominal_size or 1


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    datasets: dict[str, DatasetConfig]
    ledger_path: Path
    cache_dir: Path
    shard: int = 0
    num_shards: int = 1
    device: str = "auto"
    max_physical_batch: int = 256
    coordinator: str = ""  # host:port the site agent dials (deployment only)
    audit_log: Path | None = None  # the site's signed audit log (docs/AUDIT.md); None in simulation

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise SiteError(f"site '{self.site_id}' has no dataset '{name}' configured "
                            f"(it has: {', '.join(self.datasets) or 'none'})")
        return self.datasets[name]

    def load_heart_disease(self) -> heart_disease.SiteData:
        ds = self.dataset(HEART_DISEASE)
        if ds.path is None:
            raise SiteError(f"dataset '{HEART_DISEASE}' of site '{self.site_id}' has no path")
        return heart_disease.load_centre(ds.path, self.shard, self.num_shards)


def _dataset_from_toml(name: str, raw: dict, base: Path, where: str) -> DatasetConfig:
    raw = dict(raw)
    settings = {k: raw.pop(k) for k in list(raw) if k in DATASET_SETTINGS}
    try:
        policy = DatasetPolicy.from_dict(raw, where=where)
    except PolicyError as exc:
        raise SiteError(str(exc)) from None
    if "path" not in settings and "manifest" not in settings:
        raise SiteError(f"{where}: give the data's path (tabular) or manifest (imaging)")
    labels = settings.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
        raise SiteError(f"{where}: labels must be a list of integer label codes")
    modality = settings.get("modality", [])
    modality = [modality] if isinstance(modality, str) else modality
    if not isinstance(modality, list) or not all(isinstance(m, str) and m.upper() in ("CT", "MR", "PT", "PET")
                                                 for m in modality):
        raise SiteError(f"{where}: modality must be CT, MR or PET (or a list of them)")
    nominal = settings.get("nominal_size")
    if nominal is not None and not (isinstance(nominal, int) and not isinstance(nominal, bool) and nominal >= 1):
        raise SiteError(f"{where}: nominal_size must be a whole number >= 1 (the size the site discloses)")
    return DatasetConfig(
        name=name, policy=policy,
        path=(base / str(settings["path"])).resolve() if "path" in settings else None,
        manifest=(base / str(settings["manifest"])).resolve() if "manifest" in settings else None,
        labels=tuple(labels), require_deidentified=bool(settings.get("require_deidentified", False)),
        nominal_size=nominal, modality=tuple(m.upper() for m in modality),
    )


def read_site_toml(path: Path) -> dict:
    """The raw contents of a site config file (the one reader of site.toml: this module, the gate's
    approval check and `carefl site approve` all read it here); SiteError naming the file."""
    try:
        return read_toml(path, "site config")
    except TomlFileError as exc:
        raise SiteError(str(exc)) from None


def load_site_config(path: Path) -> SiteConfig:
    """Read and check a site config file; every problem is a SiteError naming the file."""
    path = Path(path)
    raw = read_site_toml(path)
    site = raw.get("site", {})
    datasets = raw.get("datasets", {})
    problems = []
    if not site.get("id"):
        problems.append("[site] id is missing")
    if not datasets:
        problems.append("no [datasets.<name>] section")
    if problems:
        raise SiteError(f"site config {path}: " + "; ".join(problems))
    return SiteConfig(
        site_id=str(site["id"]),
        datasets={name: _dataset_from_toml(name, ds, path.parent, f"site config {path} [datasets.{name}]")
                  for name, ds in datasets.items()},
        ledger_path=(path.parent / str(site.get("ledger", "privacy-ledger.sqlite"))).resolve(),
        cache_dir=(path.parent / str(site.get("cache", "cache"))).resolve(),
        device=str(site.get("device", "auto")),
        max_physical_batch=int(site.get("max_physical_batch", 256)),
        coordinator=str(site.get("coordinator", "")),
        audit_log=(path.parent / str(site.get("audit_log", "audit.jsonl"))).resolve(),
    )


def write_site_config(path: Path, site_id: str, data_path: Path, ledger: str = "privacy-ledger.sqlite",
                      device: str = "auto", dataset: str = HEART_DISEASE, coordinator: str = "",
                      approved_apps: tuple[str, ...] = (), max_physical_batch: int | None = None,
                      **settings) -> Path:
    """Write a one-dataset site config file (demo and provisioning).

    ``data_path`` is the tabular extract, or for imaging the manifest (pass ``manifest=True``);
    ``settings`` holds DatasetPolicy settings plus ``labels`` / ``require_deidentified``.
    """
    manifest = settings.pop("manifest", False)
    policy = {k: v for k, v in settings.items() if k not in DATASET_SETTINGS}
    DatasetPolicy.from_dict(policy, where="site policy")  # refuse to write an invalid policy

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v) if isinstance(v, (int, float)) else json.dumps(str(v))  # JSON strings are TOML strings

    lines = ["[site]", f"id = {value(site_id)}", f"device = {value(device)}", f"ledger = {value(ledger)}"]
    lines += [f"coordinator = {value(coordinator)}"] if coordinator else []
    lines += [f"max_physical_batch = {max_physical_batch}"] if max_physical_batch else []
    lines += ["", "[approval]", f"apps = {value(list(approved_apps))}"]
    lines += ["", f"[datasets.{dataset}]", f"{'manifest' if manifest else 'path'} = {value(Path(data_path).resolve())}"]
    lines += [f"{k} = {value(v)}" for k, v in settings.items() if v is not None]
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
        dataset = DatasetConfig(HEART_DISEASE, policy, path=heart_disease.centre_file(Path(sim_dir), centre))
        return SiteConfig(
            site_id=site_id,
            datasets={HEART_DISEASE: dataset},
            ledger_path=Path(out_dir) / "sim-ledgers" / f"{site_id}.sqlite",
            cache_dir=Path(out_dir) / "sim-cache" / site_id,
            shard=shard,
            num_shards=num_shards,
        )
    raise SiteError("node config has neither site-config (a site's config file) nor partition-id (simulation)")
