"""End to end: the `carefl` command starts real Flower processes on 127.0.0.1 and stops them all."""

from __future__ import annotations

import json

import pytest

from deploy.site.approval import app_hash, approved_apps
from deploy.coordinator.superlink import APP_DIR
from tests.helpers import run_carefl


def test_demo_runs_a_tls_federation_of_four_hospitals(tmp_path):
    out = tmp_path / "demo"
    done = run_carefl(["demo", "--rounds", "2", "--local-steps", "50", "--out", str(out)], tmp_path, timeout=540)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites"] == ["cleveland", "hungarian", "switzerland", "va"]
    assert summary["rounds_completed"] == 2 and summary["strategy"] == "fedavg"
    assert {"mean_centre_accuracy", "pooled_accuracy", "pooled_auc"} <= summary.keys()
    # the figures come from the sites' DP evaluation releases: judged with their stated noise std
    assert summary["mean_centre_accuracy_std"] > 0
    assert summary["mean_centre_accuracy"] > 0.6 - 3 * summary["mean_centre_accuracy_std"]
    assert all({"accuracy", "auc"} <= m.keys() for m in summary["per_site"].values())
    # DP on by default: every site sized its noise for the study's ε = 4 at δ = 1e-4, from its own ledger
    assert summary["dp"]["enabled"] is True
    for site, m in summary["per_site"].items():
        assert 3.9 <= m["epsilon"] <= 4.0 and m["delta"] == 1e-4, site
        assert (out / "deployment" / "sites" / site / "privacy-ledger.sqlite").exists()
    assert (out / "final_model.pt").stat().st_size > 0
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(rounds) == [1] * 4 + [2] * 4
    # the live table and the summary table were shown
    assert "mean over centres" in done.stdout and "pooled test sets" in done.stdout
    # stood up the secure way: kits, a registered key per site, every site approved the app it ran
    kits = out / "deployment" / "kits"
    assert sorted(p.stem for p in (kits / "coordinator" / "sites").glob("*.pub")) == summary["sites"]
    registered = json.loads((out / "deployment" / "coordinator" / "sites.json").read_text())
    assert sorted(registered) == summary["sites"]
    for site in summary["sites"]:
        assert approved_apps(out / "deployment" / "sites" / site / "site.toml") == {app_hash(APP_DIR)}
        assert "SuperNode ID" in (out / "deployment" / "sites" / site / "agent" / "supernode.log").read_text()

    # one signed audit log per site and one for the coordinator; an auditor's verification passes,
    # recomputes every site's ε (dp-accounting PLD, not the site's Opacus PRV) within 1% of its ledger
    verified = run_carefl(["audit", "verify", "--run-dir", str(out), "--json"], tmp_path, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    actors = {a["actor"]: a for a in report["actors"]}
    assert report["ok"] and set(actors) == {"coordinator", *summary["sites"]}
    for site in summary["sites"]:
        recomputed = actors[site]["epsilon"]["heart-disease"]["recomputed_epsilon"]
        assert recomputed == pytest.approx(summary["per_site"][site]["epsilon"], rel=0.01), site
    # any single-byte edit of any log is caught
    for log in (out / "deployment" / "sites" / "va" / "audit.jsonl", out / "deployment" / "coordinator" / "audit.jsonl"):
        original = log.read_bytes()
        position = len(original) // 2
        log.write_bytes(original[:position] + bytes([original[position] ^ 0x01]) + original[position + 1:])
        tampered = run_carefl(["audit", "verify", "--run-dir", str(out)], tmp_path, timeout=120)
        assert tampered.returncode == 1 and "FAIL" in tampered.stdout, tampered.stdout
        log.write_bytes(original)
    # and so is the coordinator's log losing even its last record: every message carried its signed head,
    # which the sites logged, and the run's last message (the run-end witness) came after `run-end`
    coordinator_log = out / "deployment" / "coordinator" / "audit.jsonl"
    witnessed = [r["payload"]["coordinator_head"]["seq"]
                 for site in summary["sites"]
                 for r in map(json.loads, (out / "deployment" / "sites" / site / "audit.jsonl").read_text().splitlines())
                 if r["payload"].get("coordinator_head")]
    original = coordinator_log.read_bytes()
    lines = original.splitlines(keepends=True)
    assert max(witnessed) == len(lines) - 1 and json.loads(lines[-1])["event"] == "run-end"  # no unwitnessed tail
    coordinator_log.write_bytes(b"".join(lines[:-1]))
    truncated = run_carefl(["audit", "verify", "--run-dir", str(out)], tmp_path, timeout=120)
    assert truncated.returncode == 1 and "coordinator's log was truncated" in " ".join(truncated.stdout.split())
    coordinator_log.write_bytes(original)


def test_simulation_engine_runs_more_sites_than_hospitals(tmp_path):
    out = tmp_path / "sim"
    done = run_carefl(["simulate", "--sites", "6", "--rounds", "1", "--local-steps", "10", "--out", str(out)],
                      tmp_path, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["sites"]) == 6
    # every virtual site trained and released its DP evaluation; none disclosed a size, so each weighs 1
    # (how partitions 0 and 4 share Cleveland's rows: tests/test_client_app.py, simulation)
    assert all(m["weight"] == 1 and m["epsilon"] > 0 and m["eval_dp"] == 1.0 for m in summary["per_site"].values())


@pytest.mark.parametrize("args, expected", [
    (["demo", "--data-dir", "/nonexistent/carefl"], "carefl data fetch heart-disease"),
    (["demo", "--task", "mri"], "unknown task 'mri'"),
    (["demo", "--strategy", "fedmagic", "--lr", "0"], "strategy 'fedmagic' is not one of"),
    (["data", "fetch", "imagenet", "--data-dir", "/tmp"], "unknown data set 'imagenet'"),
])
def test_bad_arguments_get_one_clear_line_and_no_traceback(tmp_path, args, expected):
    done = run_carefl(args, tmp_path, timeout=60)
    assert done.returncode == 2
    output = " ".join((done.stdout + done.stderr).split())
    assert expected in output and "Traceback" not in output


def test_data_check_reports_counts_for_every_centre(tmp_path):
    done = run_carefl(["data", "check", "heart-disease"], tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for centre, split in (("cleveland", "199 / test 104"), ("hungarian", "172 / test 89"),
                          ("switzerland", "30 / test 16"), ("va", "85 / test 45")):
        line = next(l for l in done.stdout.splitlines() if l.startswith(centre))
        assert "md5 ok" in line and split in line
