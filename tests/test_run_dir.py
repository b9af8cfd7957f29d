"""The run directory: JSON-safe records, whole-line appends, tolerant reads, a loadable model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from server import run_dir
from server.run_dir import RunDirectory, json_safe, read_jsonl
from shared_models.registry import build_model


def test_json_safe_turns_non_finite_into_none():
    value = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], 3: {"c": 0.5, "d": "x", "e": None, "f": 7}}
    assert json_safe(value) == {"a": None, "b": [1.0, None, [None, 2]], "3": {"c": 0.5, "d": "x", "e": None, "f": 7}}
    json.dumps(json_safe(value), allow_nan=False)  # strict JSON


def test_append_writes_whole_json_lines(tmp_path):
    rd = RunDirectory(tmp_path / "run")
    records = [{"round": 1, "site": "va", "auc": math.nan}, {"round": 2, "site": "va", "auc": 0.75}]
    for r in records:
        rd.append(run_dir.METRICS_FILE, r)
    text = (tmp_path / "run" / run_dir.METRICS_FILE).read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 2
    parsed = [json.loads(line) for line in lines]  # each line is one complete record
    assert parsed == [{"round": 1, "site": "va", "auc": None}, {"round": 2, "site": "va", "auc": 0.75}]
    assert "NaN" not in text
    assert read_jsonl(tmp_path / "run" / run_dir.METRICS_FILE) == parsed


def test_read_jsonl_ignores_a_trailing_partial_line(tmp_path):
    rd = RunDirectory(tmp_path)
    rd.append(run_dir.ROUNDS_FILE, {"round": 1, "pooled_accuracy": 0.8})
    rd.append(run_dir.ROUNDS_FILE, {"round": 2, "pooled_accuracy": 0.81})
    full = json.dumps({"round": 3, "pooled_accuracy": 0.82}, sort_keys=True)
    with open(tmp_path / run_dir.ROUNDS_FILE, "a") as fh:
        fh.write(full[: len(full) // 2])  # a writer caught mid-append
    records = read_jsonl(tmp_path / run_dir.ROUNDS_FILE)
    assert [r["round"] for r in records] == [1, 2]


def test_read_jsonl_missing_file(tmp_path):
    assert read_jsonl(tmp_path / "nothing.jsonl") == []


@pytest.mark.parametrize("name,kwargs", [("ehr-logreg", {"n_features": 13}), ("ehr-mlp", {"n_features": 13})])
def test_save_model_loads_with_weights_only(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    rd = RunDirectory(tmp_path)
    path = rd.save_model(model.state_dict(), name, kwargs)
    assert path == tmp_path / run_dir.MODEL_FILE
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.MODEL_FILE]  # no temp file left behind

    saved = torch.load(path, weights_only=True)
    assert saved["model"] == name and saved["model_kwargs"] == kwargs
    rebuilt = build_model(saved["model"], **saved["model_kwargs"])
    rebuilt.load_state_dict(saved["state_dict"])
    x = torch.randn(5, 13)
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x))


def test_write_summary_is_strict_json(tmp_path):
    rd = RunDirectory(tmp_path)
    path = rd.write_summary({"rounds": 3, "auc": math.nan, "sites": ("va", "cleveland")})
    loaded = json.loads(path.read_text())
    assert loaded == {"rounds": 3, "auc": None, "sites": ["va", "cleveland"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_dir.SUMMARY_FILE]
