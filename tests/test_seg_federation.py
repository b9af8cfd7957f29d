"""Two rounds of a federated, DP U-Net segmentation on tiny crops: real ServerApp, real ClientApp."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict

from client.client_app import app as client_app
from deploy.datasets import hippocampus
from privacy.ledger import PrivacyLedger
from server.run_dir import read_jsonl
from server.server_app import app as server_app
from deploy.demo.inprocess import InProcessGrid
from tests.helpers import default_run_config, hippocampus_site


def _site(folder, site_id, site_cases):
    # exact test counts: checkable; RDP accounting: the federation does not depend on the accountant
    return hippocampus_site(folder, site_id, site_cases, evaluation="exact", accountant="rdp")


def test_two_round_dp_unet_federation(tmp_path, cases):
    split = hippocampus.split_sites(cases[:18], 3)  # 6 patients per site: 4 train, 2 test
    nodes = {20 + i: {"site-config": str(_site(tmp_path / "sites", s, c))} for i, (s, c) in enumerate(split.items())}
    cfg = default_run_config(**{
        "task": "seg", "model": "seg-unet3d", "num-server-rounds": 2, "local-epochs": 1, "local-steps": 0,
        "batch-size": 2, "lr": 0.05, "noise-multiplier": 0.5, "target-epsilon": 0.0, "clip-norm": 1.0,
        "seg-shape": "24,32,24", "out-dir": str(tmp_path / "run"), "round-timeout": 5})
    grid = InProcessGrid(client_app, nodes, cfg)
    server_app(grid, Context(run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "seg" and summary["dataset"] == "hippocampus" and summary["rounds_completed"] == 2
    assert summary["sites"] == ["site-1", "site-2", "site-3"]
    for site, metrics in summary["per_site"].items():
        assert 0.0 <= metrics["dice"] <= 1.0 and metrics["weight"] == 1
        assert metrics["epsilon"] > 0 and metrics["delta"] == 1e-3
    assert summary["mean_dice"] == pytest.approx(sum(m["dice"] for m in summary["per_site"].values()) / 3)
    assert 0.0 <= summary["pooled_dice"] <= 1.0 and "single-centre" in summary["data_note"]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 6 and all("error" not in r for r in records)
    # every site charged both rounds to its own ledger, one patient = one volume (q = batch / patients)
    for site in summary["sites"]:
        rounds = PrivacyLedger(tmp_path / "sites" / site / "privacy-ledger.sqlite").rounds("hippocampus")
        assert [r["round"] for r in rounds] == [1, 2] and all(r["sample_rate"] == 0.5 for r in rounds)
