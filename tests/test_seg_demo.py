"""End to end: `carefl demo --task seg`, DP fine-tuning of a public U-Net at 3 sites that read DICOM (real processes)."""

from __future__ import annotations

import json

import csv

from deploy.datasets import hippocampus
from shared_models import public_checkpoint
from tests.helpers import data_dir, run_carefl


def test_seg_demo_fine_tunes_a_public_unet_under_dp_from_dicom(tmp_path):
    out = tmp_path / "seg"
    cache = tmp_path / "cache"  # the public model is built here on first use (1 epoch: what matters is the path)
    done = run_carefl(["demo", "--task", "seg", "--seg-cases", "10", "--rounds", "1", "--pretrain-epochs", "1",
                       "--out", str(out)], tmp_path, timeout=600, env={"CAREFL_CACHE": str(cache)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "built in" in done.stdout and "Traceback" not in done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "seg" and summary["model"] == "seg-unet3d" and summary["rounds_completed"] == 1
    # it started from the cached public checkpoint and trained only norms + head
    (checkpoint,) = (cache / "public-models").glob("*.pt")
    public = public_checkpoint.load(checkpoint)
    assert summary["init_model"]["weights_sha256"] == public.sha256 and summary["train_params"] == "norms-head"
    public_ids = set(public.provenance["case_ids"])
    for site in summary["sites"]:  # no site holds a public case
        with open(out / "deployment" / "sites" / site / "hippocampus.csv", newline="") as fh:
            assert not {row["case_id"] for row in csv.DictReader(fh)} & public_ids
    assert public_ids <= {c.case_id for c in hippocampus.public_cases(hippocampus.cases(data_dir()))}
    assert summary["sites"] == ["site-1", "site-2", "site-3"] and summary["mean_dice_std"] > 0  # DP evaluation
    for site, m in summary["per_site"].items():  # a few noisy test cases: a site's Dice may be undefined (null)
        assert (m["dice"] is None or 0.0 <= m["dice"] <= 1.0) and m["delta"] == 1e-3 and 0 < m["epsilon"] <= 4.0, site
        dp_rounds = [json.loads(line)["payload"] for line in
                     (out / "deployment" / "sites" / site / "audit.jsonl").read_text().splitlines()
                     if json.loads(line)["event"] == "dp-round"
                     and json.loads(line)["payload"].get("mechanism") == "training"]
        assert [r["model_in_sha256"] for r in dp_rounds] == [public.sha256] and dp_rounds[0]["sample_rate"] == 1.0
        # the site read DICOM: its cache holds one preprocessed file per valid case
        cache = out / "deployment" / "sites" / site / "cache" / "hippocampus"
        assert len(list(cache.glob("*.npz"))) == 10
        assert m["weight"] == 1  # a demo site discloses no size: FedAvg weighs the sites equally
    assert all("error" not in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
