"""Longest modules first: with ``-n 3 --dist loadfile --no-loadscope-reorder`` each worker takes whole
modules in collection order, so the real-process studies (minutes of waiting on heartbeats, restarts
and rounds) start at once instead of one of them being left to run alone at the end."""

from __future__ import annotations

# Roughly longest first (wall time in CI); every other module keeps its place after these.
SLOW_FIRST = ("test_outages.py", "test_secure_deployment.py", "test_fault_injection.py", "test_deployment.py",
              "test_seg_demo.py", "test_warm_site.py", "test_imaging_ingest.py", "test_seg_federation.py",
              "test_reliability.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a module and among the rest is unchanged
