"""Shared test helpers: the real data directory, real site configs, the app's run config."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The real data (``$CAREFL_DATA``, else ../shared/data beside the repo); skip if absent."""
    root = Path(os.environ.get("CAREFL_DATA", REPO.parent / "shared" / "data"))
    if not (root / "uci_heart_disease").is_dir():
        pytest.skip(f"real data not found under {root}")
    return root


def site_config(folder: Path, centre: str, **policy) -> Path:
    """A real site config file for one hospital of the real data, with a ledger beside it."""
    from client.ingest.heart_disease import centre_file
    from client.site import write_site_config

    policy = {"epsilon_budget": 10.0, "delta": 1e-4, **policy}
    return write_site_config(folder / centre / "site.toml", centre, centre_file(data_dir(), centre),
                             device="cpu", **policy)


def default_run_config(**overrides) -> dict:
    """The app's own run config from pyproject.toml, with overrides."""
    from deploy.coordinator.follow import app_run_config

    return app_run_config(**overrides)


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.5 s; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def hippocampus_cases():
    """The MSD hippocampus cases beside the repo (skip if absent)."""
    from deploy.datasets import hippocampus

    root = REPO.parent / "shared" / "data"
    if not (root / hippocampus.FOLDER).is_dir():
        pytest.skip(f"hippocampus data not found under {root}")
    return hippocampus.cases(root)


def hippocampus_site(folder: Path, site_id: str, site_cases, max_sample_rate: float = 0.6) -> Path:
    """A site config for ``site_cases`` (every third case in the test split), DP policy for small crops."""
    from deploy.datasets import hippocampus
    from client.site import write_site_config

    rows = [(c.case_id, c.image, c.label, "test" if i % 3 == 2 else "train") for i, c in enumerate(site_cases)]
    manifest = hippocampus.write_manifest(folder / site_id / "hippocampus.csv", rows)
    return write_site_config(folder / site_id / "site.toml", site_id, manifest, device="cpu",
                             dataset="hippocampus", manifest=True, labels=[0, 1, 2], epsilon_budget=50.0,
                             delta=1e-3, max_sample_rate=max_sample_rate, min_noise_multiplier=0.3)
