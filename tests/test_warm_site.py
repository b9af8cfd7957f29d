"""Warm sites (deploy/site/warm.py): ClientApps forked from a pre-imported executor, with the code gate,
fresh app code per approved FAB and the ledger charged per round exactly as with Flower's own
per-message processes. Real processes on 127.0.0.1, plus in-process checks of what a fork resets."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from deploy.site import warm
from deploy.site.approval import app_hash, approve
from privacy.ledger import PrivacyLedger
from tests.helpers import default_run_config, running_consortium_with_policy, wait_run

SITES = {"site-a": "cleveland", "site-c": "switzerland"}  # site-c approves nothing
SENTINEL = "warm-test-sentinel"


def _timings(site_dir: Path, run_id: int) -> list[dict]:
    merged: dict[str, dict] = {}
    for line in (site_dir / "agent" / "timing.jsonl").read_text().splitlines():
        rec = json.loads(line)
        merged.setdefault(rec["message_id"], {}).update(rec)
    return [r for r in merged.values() if r.get("run_id") == run_id]


def _charges(site_dir: Path, run_id: int) -> list[dict]:
    ledger = site_dir / "privacy-ledger.sqlite"
    return [r for r in PrivacyLedger(ledger).rounds() if r["run_id"] == str(run_id)] if ledger.exists() else []


def _new_app_version(folder: Path) -> Path:
    """The app with one change: importing its ClientApp module leaves a file beside that module."""
    for name in ("server", "client", "shared_models", "privacy", "deploy"):
        shutil.copytree(Path(__file__).resolve().parent.parent / name, folder / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(Path(__file__).resolve().parent.parent / "pyproject.toml", folder / "pyproject.toml")
    with (folder / "client" / "client_app.py").open("a") as fh:
        fh.write(f"\n\nimport pathlib as _p  # noqa: E402\n_p.Path(__file__).with_name({SENTINEL!r}).write_text("
                 f"str(__import__('os').getpid()))\n")
    return folder


def test_warm_sites_gate_every_message_load_each_approved_version_and_charge_per_round(tmp_path):
    """Two runs at once on one warm executor per site: the app as it is, and a new version of it that
    only site-a approved. site-c approved neither."""
    app2 = _new_app_version(tmp_path / "app-v2")
    digest2 = app_hash(app2)
    # RDP accounting: what a warm site runs and charges does not depend on the accountant
    with running_consortium_with_policy(tmp_path / "c", SITES, unapproved=("site-c",), accountant="rdp") as c:
        coord, kits, digest = c["coord"], c["kits"], c["digest"]
        assert digest2 != digest
        approve(kits / "site-a" / "site.toml", digest2)
        run1 = coord.submit(default_run_config(**{"num-server-rounds": 1, "local-steps": 5, "min-sites": 1,
                                                  "sites": "", "out-dir": str(tmp_path / "run1")}))
        coord.app_dir = app2
        run2 = coord.submit(default_run_config(**{"num-server-rounds": 1, "local-steps": 5, "min-sites": 1,
                                                  "sites": "site-a", "out-dir": str(tmp_path / "run2")}))
        for run in (run1, run2):
            assert wait_run(coord, run, timeout=240) == "finished:completed", coord.run_log(run)

        # site-a: every message of both runs ran in a child forked from one warm executor, each from its FAB
        executors = set()
        for run, fab in ((run1, digest), (run2, digest2)):
            forked = [r for r in _timings(kits / "site-a", run) if "pid" in r]
            assert sorted(r["type"] for r in forked) == ["evaluate", "query", "query.witness", "train"]
            assert all(r["mode"] == "warm" and r["exit_code"] == 0 and r["fab_sha256"] == fab for r in forked)
            executors |= {r["executor_pid"] for r in forked}
            assert not executors & {r["pid"] for r in forked}
            # one round: its training and its evaluation release, each charged once, in the site's ledger
            assert [r["kind"] for r in _charges(kits / "site-a", run)] == ["training", "evaluation"]
        assert len(executors) == 1
        assert "Start `flwr-clientapp` process" not in (kits / "site-a" / "agent" / "supernode.log").read_text()
        # the new version's code ran (its module left its mark beside itself); the old version's did not
        apps = kits / "site-a" / "agent" / "flwr-home" / "apps"
        assert (next(apps.glob(f"*.{digest2[:8]}")) / "client" / SENTINEL).read_text().isdigit()
        assert not (next(apps.glob(f"*.{digest[:8]}")) / "client" / SENTINEL).exists()

        # site-c is warm too and refused both: no task reached its executor, nothing computed or charged
        for run in (run1, run2):
            refused = _timings(kits / "site-c", run)
            assert refused and all("refused" in r and "pid" not in r for r in refused)
        assert "carefl-warm" in (kits / "site-c" / "agent" / "supernode.log").read_text()
        assert not (kits / "site-c" / "privacy-ledger.sqlite").exists()
        assert not (kits / "site-c" / "cache").exists()


def _in_fork(fn) -> str:
    """Run ``fn`` in a forked child of this process; its printed line."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read)
        try:
            out = str(fn())
        except BaseException as exc:  # noqa: BLE001
            out = f"error: {exc!r}"
        os.write(write, out.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        out = fh.read()
    os.waitpid(pid, 0)
    return out


def test_a_forked_child_gets_fresh_random_streams_and_keeps_no_module_of_ours():
    torch = pytest.importorskip("torch")

    def child():
        warm.reset_after_fork()
        ours = sorted(n for n in sys.modules if n.split(".")[0] in ("client", "deploy", "privacy", "tests"))
        return json.dumps([torch.rand(3).tolist(), __import__("numpy").random.rand(), ours])

    first, second = json.loads(_in_fork(child)), json.loads(_in_fork(child))
    assert first[0] != second[0] and first[1] != second[1]
    assert first[2] == [] and "deploy.site.warm" in sys.modules  # only the child forgot them


def test_app_modules_must_come_from_the_installed_fab(tmp_path, monkeypatch):
    for version in ("old", "new"):
        (tmp_path / version / "warmpkg").mkdir(parents=True)
        (tmp_path / version / "warmpkg" / "__init__.py").write_text(f"VERSION = {version!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "old"))
    import warmpkg
    assert warmpkg.VERSION == "old"
    new = tmp_path / "new"
    assert warm.app_top_levels(new) == {"warmpkg"}
    with pytest.raises(RuntimeError, match="not loaded from the approved app"):
        warm.verify_app_modules(new, {"warmpkg"})
    assert warm.forget_modules({"warmpkg"}) == ["warmpkg"]
    monkeypatch.syspath_prepend(str(new))
    import warmpkg as again
    assert again.VERSION == "new"
    warm.verify_app_modules(new, {"warmpkg"})
    warm.forget_modules({"warmpkg"})
