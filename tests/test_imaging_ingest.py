"""Site ingestion of imaging cases: manifest, validation of every case at once, preprocessing cache."""

from __future__ import annotations

import numpy as np
import pytest

from client.errors import SiteError
from deploy.datasets import hippocampus
from deploy.datasets.dicomize import dicomize_case
from client.ingest.imaging.manifest import default_split, read_manifest, validate
from client.ingest.imaging.preprocess import PreprocessCache, PreprocessSpec
from tests import helpers

LABELS = {0, 1, 2}


def test_hippocampus_split_is_deterministic_and_complete(cases):
    assert len(cases) == 260
    sites = hippocampus.split_sites(cases, 3)
    assert [len(v) for v in sites.values()] == [87, 87, 86]
    ids = [c.case_id for v in sites.values() for c in v]
    assert sorted(ids) == sorted(c.case_id for c in cases)  # disjoint and complete
    assert sites == hippocampus.split_sites(hippocampus.cases(helpers.data_root()), 3)


def test_validate_lists_every_problem_and_keeps_the_good_cases(tmp_path, cases):
    good = cases[:2]
    wrong_shape = tmp_path / "wrong_shape.npy"
    np.save(wrong_shape, np.zeros((3, 4, 5), dtype=np.uint8))
    rows = [(c.case_id, c.image, c.label) for c in good]
    rows.append(("missing", tmp_path / "nope.nii.gz", good[0].label))
    rows.append(("badshape", good[0].image, wrong_shape))
    # a label outside the declared set: take a real label map and add code 7
    import nibabel as nib
    img = nib.load(good[1].label)
    data = np.asarray(img.dataobj).astype(np.uint8)
    data[data == 2] = 7
    bad_labels = tmp_path / "labels7.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), bad_labels)
    rows.append(("badlabels", good[1].image, bad_labels))
    manifest = hippocampus.write_manifest(tmp_path / "manifest.csv", rows)

    report = validate(read_manifest(manifest), LABELS, require_deidentified=True)
    assert [c.case_id for c in report.valid] == [c.case_id for c in good]
    by_case = {p.case_id: p for p in report.problems}
    assert set(by_case) == {"missing", "badshape", "badlabels"} and report.excluded == 3
    assert "nope.nii.gz" in by_case["missing"].file
    assert "shape" in by_case["badshape"].reason
    assert "7" in by_case["badlabels"].reason
    assert report.summary() == "2 valid case(s), 3 excluded"


def test_manifest_structure_errors_are_reported_together(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("case_id,image,mask,split\na,x.nii.gz,y.nii.gz,train\na,x.nii.gz,y.nii.gz,later\n,,,\n")
    with pytest.raises(SiteError) as info:
        read_manifest(bad)
    message = str(info.value)
    assert "appears twice" in message and "split must be" in message and "empty case_id" in message
    (tmp_path / "cols.csv").write_text("id,image\n1,x\n")
    with pytest.raises(SiteError, match="missing column"):
        read_manifest(tmp_path / "cols.csv")
    assert default_split("hippocampus_001") == default_split("hippocampus_001") in ("train", "test")


def test_identified_dicom_is_refused_when_policy_requires_deidentified(tmp_path, cases):
    import pydicom

    case = cases[0]
    series, seg = dicomize_case(case.image, case.label, tmp_path / "dicom", case.case_id, {1: "anterior", 2: "posterior"})
    manifest = hippocampus.write_manifest(tmp_path / "m.csv", [(case.case_id, series, seg)])
    # the synthetic series is pseudonymised (PatientIdentityRemoved = YES): kept, with a warning
    report = validate(read_manifest(manifest), LABELS, require_deidentified=True)
    assert len(report.valid) == 1 and report.warnings and "PatientName" in report.warnings[0].reason
    # a real-looking series without that declaration is refused under the policy, kept without it
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        ds.PatientIdentityRemoved = "NO"
        ds.PatientName = "DOE^JANE^XYZZY"
        ds.save_as(path)
    refused = validate(read_manifest(manifest), LABELS, require_deidentified=True)
    assert not refused.valid and "require_deidentified" in refused.problems[0].reason
    assert "XYZZY" not in str(refused.problems[0])
    kept = validate(read_manifest(manifest), LABELS, require_deidentified=False)
    assert len(kept.valid) == 1 and kept.warnings


def test_preprocessing_cache_hits_on_unchanged_data_and_misses_on_change(tmp_path, cases):
    case = cases[0]
    manifest = hippocampus.write_manifest(tmp_path / "m.csv", [(case.case_id, case.image, case.label)])
    (c,) = read_manifest(manifest)
    spec = PreprocessSpec(shape=(40, 56, 40))
    cache = PreprocessCache(tmp_path / "cache", spec, LABELS)
    x, y = cache.load(c)
    assert x.shape == (1, 40, 56, 40) and y.shape == (40, 56, 40) and x.dtype == np.float32
    assert set(np.unique(y)) <= LABELS and (y > 0).sum() > 100
    assert abs(float(x[x != x.min()].mean())) < 1.0  # z-scored MR intensities
    x2, y2 = PreprocessCache(tmp_path / "cache", spec, LABELS).load(c)  # a new process, same disk
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    again = PreprocessCache(tmp_path / "cache", spec, LABELS)
    again.load(c)
    assert (again.hits, again.misses) == (1, 0)
    other = PreprocessCache(tmp_path / "cache", PreprocessSpec(shape=(32, 48, 32)), LABELS)
    other.load(c)
    assert (other.hits, other.misses) == (0, 1)
    # changed content → new key
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(case.label.read_bytes())
    (c2,) = read_manifest(hippocampus.write_manifest(tmp_path / "m2.csv", [(case.case_id, case.image, copy)]))
    key_before = again.key(c2)
    import nibabel as nib
    img = nib.load(copy)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(data, img.affine), copy)
    assert again.key(c2) != key_before


def test_cli_dicomize_validate_ingest(tmp_path, cases):
    import subprocess
    import sys

    carefl = [sys.executable, "-m", "deploy.cli"]
    data = str(helpers.data_root())

    def run(*args):
        return subprocess.run(carefl + list(args), capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "COLUMNS": "200"})

    done = run("data", "dicomize", "--out", str(tmp_path / "sites"), "--sites", "2", "--cases-per-site", "2",
               "--data-dir", data)
    assert done.returncode == 0, done.stdout + done.stderr
    config = tmp_path / "sites" / "site-1" / "site.toml"
    # break one case: delete a slice in the middle of its series → inconsistent spacing
    series = sorted((tmp_path / "sites" / "site-1" / "dicom").glob("*/mr"))[0]
    sorted(series.iterdir())[5].unlink()
    validated = run("site", "validate", "--config", str(config))
    assert validated.returncode == 1
    assert "1 valid case(s), 1 excluded" in validated.stdout and "Traceback" not in validated.stderr
    ingested = run("site", "ingest", "--config", str(config))
    assert ingested.returncode == 0, ingested.stdout + ingested.stderr
    assert "1 case(s) preprocessed, 0 already cached; 1 case(s) excluded" in ingested.stdout
    again = run("site", "ingest", "--config", str(config))
    assert "0 case(s) preprocessed, 1 already cached" in again.stdout
