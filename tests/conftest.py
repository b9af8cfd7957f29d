"""Longest modules first: with ``-n 3 --dist loadfile --no-loadscope-reorder`` each worker takes whole
modules in collection order, so the real-process studies (minutes of waiting on heartbeats, restarts
and rounds) start at once instead of one of them being left to run alone at the end.

Fixtures shared by several modules live here; plain helper functions in ``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import helpers

# Roughly longest first (wall time in CI); every other module keeps its place after these.
SLOW_FIRST = ("test_secure_deployment.py", "test_outages.py", "test_deployment.py", "test_public_finetune.py",
              "test_fault_injection.py", "test_seg_demo.py", "test_attacks.py",
              "test_privacy.py", "test_warm_site.py", "test_secure_aggregation.py",
              "test_run_report.py", "test_reliability.py", "test_server_round.py", "test_imaging_ingest.py",
              "test_seg_federation.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a module and among the rest is unchanged


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The real data directory with the UCI heart-disease files (else skip, or fail in CI)."""
    return helpers.data_dir()


@pytest.fixture(scope="module")
def cases():
    """The MSD hippocampus cases of the real data (else skip, or fail in CI)."""
    return helpers.hippocampus_cases()
