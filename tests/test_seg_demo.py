"""End to end: `carefl demo --task seg`, a DP U-Net federation of 3 sites that read DICOM (real processes)."""

from __future__ import annotations

import json

from tests.test_deployment import _carefl


def test_seg_demo_runs_a_dp_unet_federation_from_dicom(tmp_path):
    out = tmp_path / "seg"
    done = _carefl(["demo", "--task", "seg", "--seg-cases", "22", "--rounds", "1", "--out", str(out)], tmp_path,
                   timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "seg" and summary["model"] == "seg-unet3d" and summary["rounds_completed"] == 1
    assert summary["sites"] == ["site-1", "site-2", "site-3"] and 0.0 <= summary["mean_dice"] <= 1.0
    for site, m in summary["per_site"].items():
        assert 0.0 <= m["dice"] <= 1.0 and m["delta"] == 1e-3 and 0 < m["epsilon"] <= 4.0, site
        # the site read DICOM: its cache holds one preprocessed file per valid case
        cache = out / "deployment" / "sites" / site / "cache" / "hippocampus"
        assert len(list(cache.glob("*.npz"))) == m["num_train"] + m["num_test"] == 22
    assert all("error" not in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
