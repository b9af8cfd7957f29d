"""``carefl site predict``: a global model used at the site (deploy/site/predict.py).

A real hippocampus case written as a DICOM MR series → a DICOM SEG on the source grid, read back by highdicom and
by carefl's own SEG reader; a real heart-disease centre → risk scores; bad inputs → one line, no traceback.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import hippocampus_cases, hippocampus_site, run_carefl, site_config

SEG_SUMMARY = {"run_id": 7, "task": "seg", "model": "seg-unet3d", "strategy": "fedavg", "rounds": 3,
               "rounds_completed": 3, "sites": ["site-a", "site-b"], "init_model": None,
               "per_site": {"site-a": {"epsilon": 1.5, "delta": 1e-3}, "site-b": {"epsilon": 2.0, "delta": 1e-3}},
               "pooled_dice": 0.61, "pooled_dice_std": 0.05, "config": {"seg-shape": "48,64,48", "seg-spacing": 1.0}}


def _run_dir(folder, name, kwargs, summary):
    from server.run_dir import RunDirectory
    from shared_models.registry import build_model

    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    rd = RunDirectory(folder)
    path = rd.save_model(model.state_dict(), name, kwargs)
    rd.write_summary(summary)
    return path, model


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory):
    from deploy.datasets.dicomize import dicomize_case
    from deploy.datasets.hippocampus import LABELS

    root = tmp_path_factory.mktemp("predict-seg")
    cases = hippocampus_cases()
    series, _ = dicomize_case(cases[0].image, cases[0].label, root / "dicom", "case0",
                              {k: v for k, v in LABELS.items() if k})
    new = root / "new"
    shutil.copytree(series, new / "series-a")  # a folder of series folders, no mask
    toml = hippocampus_site(root, "site-a", cases[:3])
    model_path, model = _run_dir(root / "run", "seg-unet3d", {}, SEG_SUMMARY)
    return root, toml, model_path, model, new, cases[0]


def _one_line_error(result):
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output
    return output


def test_preprocessing_grid_maps_back_onto_the_source_grid(seg_setup):
    """The inverse of preprocess: a mask taken to the model grid and back equals the source mask."""
    from client.ingest.imaging.io import read_image, read_mask
    from client.ingest.imaging.preprocess import PreprocessSpec, preprocess
    from deploy.site.predict import model_grid, to_source_grid

    *_, case = seg_setup
    volume = read_image(case.image)
    mask = read_mask(case.label, volume, {0, 1, 2})
    spec = PreprocessSpec()
    x, grid_labels = preprocess(volume, mask, spec)
    x2, grid_affine = model_grid(volume, spec.spacing, spec.shape)
    assert np.allclose(x, x2)  # the same image the model was trained on
    back = to_source_grid(grid_labels, grid_affine, volume.affine, volume.shape)
    assert back.shape == mask.shape
    fg = (mask > 0) | (back > 0)
    assert (back[fg] == mask[fg]).mean() > 0.95


def test_segmentation_round_trip(seg_setup):
    import highdicom as hd
    import pydicom

    from client.ingest.imaging.io import read_image, read_mask
    from deploy.site.predict import model_grid, to_source_grid

    root, toml, model_path, model, new, _ = seg_setup
    out = root / "out"
    result = run_carefl(["site", "predict", "--config", str(toml), "--model", str(model_path),
                         "--input", str(new), "--out", str(out)], root, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    seg_file = out / "series-a.seg.dcm"
    assert seg_file.is_file()

    sources = [pydicom.dcmread(p) for p in sorted((new / "series-a").iterdir())]
    volume = read_image(new / "series-a")
    normal = volume.affine[:3, 0]
    sources.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))
    seg = hd.seg.segread(seg_file)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["anterior hippocampus", "posterior hippocampus"]
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert algo.AlgorithmName == "carefl seg-unet3d" and algo.AlgorithmVersion == sha[:16]
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], combine_segments=True)
    assert pixels.shape == (len(sources), sources[0].Rows, sources[0].Columns) == volume.shape

    # carefl's own SEG reader puts it on the series' grid by geometry: it must equal the model's prediction
    on_grid = read_mask(seg_file, volume, {0, 1, 2})
    assert np.array_equal(on_grid, pixels)
    x, grid_affine = model_grid(volume, (1.0, 1.0, 1.0), (48, 64, 48))
    with torch.no_grad():
        grid = model.eval()(torch.from_numpy(x)[None]).argmax(1)[0].numpy().astype(np.uint8)
    expected = to_source_grid(grid, grid_affine, volume.affine, volume.shape)
    assert (on_grid == expected).mean() > 0.999

    card = json.loads((out / "model-card.json").read_text())
    assert card["model_sha256"] == sha and card["privacy"]["site-a"]["epsilon"] == 1.5
    assert card["validation_metrics"]["pooled_dice"] == {"value": 0.61, "noise_std": 0.05}
    assert (out / "model-card.md").is_file()
    records = [json.loads(line) for line in (toml.parent / "audit.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "predict" and records[-1]["payload"]["outputs"] == 1
    assert str(root) not in (toml.parent / "audit.jsonl").read_text()  # no path, no case id


def test_ehr_risk_scores(tmp_path):
    from client.ingest.heart_disease import read_centre
    from client.site import load_site_config

    toml = site_config(tmp_path, "hungarian")
    summary = {"run_id": 3, "task": "ehr", "model": "ehr-logreg", "strategy": "fedprox", "rounds": 2,
               "rounds_completed": 2, "sites": ["hungarian"], "init_model": None,
               "per_site": {"hungarian": {"epsilon": 0.9, "delta": 1e-4}}, "pooled_auc": 0.8, "pooled_auc_std": 0.1}
    model_path, _ = _run_dir(tmp_path / "run", "ehr-logreg", {"n_features": 13}, summary)
    out = tmp_path / "out"
    result = run_carefl(["site", "predict", "--config", str(toml), "--model", str(model_path), "--out", str(out)],
                        tmp_path, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "risk-scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    source = toml.parent
    kept = read_centre(load_site_config(toml).dataset("heart-disease").path)  # the site's own file
    assert len(rows) == len(kept.rows) > 0 and [int(r["row"]) for r in rows] == [int(v) for v in kept.rows]
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    card = json.loads((out / "model-card.json").read_text())
    assert card["model_sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert card["privacy"]["hungarian"]["epsilon"] == 0.9 and card["task"] == "ehr"
    records = [json.loads(line) for line in (source / "audit.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "predict" and records[-1]["payload"]["inputs"] == len(rows)


def test_bad_inputs_fail_in_one_line(seg_setup, tmp_path):
    root, toml, model_path, _, new, _ = seg_setup
    empty = tmp_path / "not-dicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image\n")
    result = run_carefl(["site", "predict", "--config", str(toml), "--model", str(model_path),
                         "--input", str(empty), "--out", str(tmp_path / "o1")], tmp_path, timeout=90)
    assert "no DICOM series" in _one_line_error(result)

    ehr_model, _ = _run_dir(tmp_path / "run", "ehr-logreg", {"n_features": 13}, {})
    result = run_carefl(["site", "predict", "--config", str(toml), "--model", str(ehr_model), "--input", str(new),
                         "--out", str(tmp_path / "o2"), "--dataset", "hippocampus"], tmp_path, timeout=90)
    assert "imaging" in _one_line_error(result)
