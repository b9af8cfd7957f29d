"""Issue 20 §1, ingestion defects, each on real files written here (nibabel NIfTI, numpy .npy, pydicom
DICOM, CSV manifests):

1. NaN/±Inf voxels in an image or a mask refuse the case by count (never a value), on every read path
   (NIfTI, DICOM), and nothing non-finite is ever written to, or served from, the preprocessing cache.
2. A .npy mask beside a NIfTI image is in nibabel's (x, y, z) array order (what get_fdata() returns);
   beside a DICOM series it is in carefl's (z, y, x) order; a wrong shape names the order expected
   and the shape found vs expected.
3. Manifest problems carry their line numbers and come all at once, files that do not exist included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import client.ingest.imaging.preprocess as preprocess_module
from client.errors import SiteError
from client.ingest.imaging.io import read_image, read_mask
from client.ingest.imaging.manifest import read_manifest, validate
from client.ingest.imaging.preprocess import PreprocessCache, PreprocessSpec
from client.ingest.imaging.volume import ImagingError

LABELS = {1, 2}
SHAPE_XYZ = (7, 9, 5)  # nibabel's array order; every axis a different size, so every order is distinct
PLANTED = 987654.0     # an intensity the image holds: must never appear in a message
# Two storage orders: with a left-handed voxel order (det < 0, like dcm2niix output) read_nifti flips
# the rows, so only a reader that applies the image's own affine places a nibabel-order .npy right.
AFFINES = {"right-handed": np.diag([2.0, 1.5, 3.0, 1.0]), "left-handed": np.diag([-2.0, 1.5, 3.0, 1.0])}


def label_xyz() -> np.ndarray:
    """An asymmetric label map in nibabel's (x, y, z) order: any axis flip or swap moves it."""
    mask = np.zeros(SHAPE_XYZ, dtype=np.uint8)
    mask[1:3, 2:5, 1:2] = 1
    mask[4:6, 6:8, 3:5] = 2
    mask[0, 0, 4] = 2
    return mask


def write_case(folder: Path, affine: np.ndarray = AFFINES["right-handed"], nonfinite: tuple = ()) -> tuple[Path, Path]:
    """image.nii.gz (float32: 10 + 100 × label + small noise, one PLANTED voxel; ``nonfinite`` values
    written into background voxels) and its label map mask.nii.gz (uint8), in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    mask = label_xyz()
    image = (10 + 100 * mask + np.random.default_rng(0).uniform(0, 1, SHAPE_XYZ)).astype(np.float32)
    image[6, 0, 0] = PLANTED
    background = np.argwhere(mask == 0)
    for (x, y, z), value in zip(background[1:], nonfinite):
        image[x, y, z] = value
    nib.save(nib.Nifti1Image(image, affine), str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(folder / "mask.nii.gz"))
    return folder / "image.nii.gz", folder / "mask.nii.gz"


def write_series(folder: Path, n: int = 4, slope_of: dict[int, str] | None = None) -> Path:
    """A real n-slice DICOM series from pydicom's MR_small (64 × 64), slices 2.5 mm apart along +z."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for z in range(n):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, generate_uid(), z + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, z0 = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z0 + 2.5 * z, 4)]
        if slope_of and z in slope_of:
            ds.RescaleSlope, ds.RescaleIntercept = slope_of[z], "0"
        ds.save_as(folder / f"slice_{z:03d}.dcm")
    return folder


def refused(call, *names: str) -> str:
    """``call`` raises ImagingError naming every ``names``, and never the planted intensity."""
    with pytest.raises(ImagingError) as info:
        call()
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in: {message}"
    assert "987654" not in message and "nan," not in message.lower()
    return message


def manifest(path: Path, *rows: str) -> Path:
    path.write_text("case_id,image,mask,split\n" + "".join(row + "\n" for row in rows), encoding="utf-8")
    return path


# --- 1. non-finite voxels ------------------------------------------------------------------------

def test_nifti_image_with_nan_and_inf_is_refused_by_count(tmp_path):
    image, _ = write_case(tmp_path, nonfinite=(np.nan, np.nan, np.inf, -np.inf))
    message = refused(lambda: read_image(image, case="case-7"), "case case-7", str(image),
                      "4 non-finite voxels (NaN/Inf) in the image")
    assert "inf," not in message.lower()
    clean, _ = write_case(tmp_path / "clean")
    assert np.isfinite(read_image(clean).array).all()


def test_nifti_values_beyond_float32_are_non_finite_once_read(tmp_path):
    """A float64 file with a value float32 cannot hold would become Inf in the Volume: refused too."""
    data = np.full(SHAPE_XYZ, 5.0)
    data[1, 1, 1] = 1e300
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "huge.nii.gz"))
    refused(lambda: read_image(tmp_path / "huge.nii.gz"), "huge.nii.gz", "1 non-finite voxel (NaN/Inf)")


def test_dicom_series_with_non_finite_rescaled_voxels_is_refused(tmp_path):
    """DICOM goes through the same check: a RescaleSlope that overflows float32 on one slice."""
    series = write_series(tmp_path / "series", slope_of={2: "1e39"})
    stored = pydicom.dcmread(series / "slice_002.dcm").pixel_array
    expected = int(np.count_nonzero(stored))  # 0 × slope stays 0; every other pixel becomes Inf
    assert expected > 0
    refused(lambda: read_image(series, case="d1"), "case d1", str(series),
            f"{expected} non-finite voxels (NaN/Inf) in the image")
    assert np.isfinite(read_image(write_series(tmp_path / "fine")).array).all()


@pytest.mark.parametrize("kind", ["nifti", "npy"])
def test_mask_with_non_finite_values_is_refused_by_count(tmp_path, kind):
    image, _ = write_case(tmp_path)
    volume = read_image(image)
    data = label_xyz().astype(np.float32)
    data[0, 1, 0], data[0, 2, 0] = np.nan, np.inf
    if kind == "nifti":
        path = tmp_path / "soft.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINES["right-handed"]), str(path))
    else:
        path = tmp_path / "soft.npy"
        np.save(path, data)
    message = refused(lambda: read_mask(path, volume, LABELS, case="m1", image_file=image), path.name,
                      "2 non-finite voxels (NaN/Inf) in the label file")
    assert "non-integral" not in message


def test_an_image_in_the_mask_column_is_refused_without_listing_its_values(tmp_path):
    image, _ = write_case(tmp_path)
    volume = read_image(image)
    intensities = (np.arange(np.prod(SHAPE_XYZ)) + 1000).reshape(SHAPE_XYZ).astype(np.int16)
    nib.save(nib.Nifti1Image(intensities, AFFINES["right-handed"]), str(tmp_path / "ct.nii.gz"))
    message = refused(lambda: read_mask(tmp_path / "ct.nii.gz", volume, LABELS), "ct.nii.gz",
                      f"{intensities.size} unexpected label codes", "declared [1, 2]")
    assert "1000" not in message and "1100" not in message


def test_validate_excludes_the_non_finite_case_and_ingest_caches_nothing_of_it(tmp_path):
    good_image, good_mask = write_case(tmp_path / "good")
    bad_image, bad_mask = write_case(tmp_path / "bad", nonfinite=(np.nan,) * 3)
    cases = read_manifest(manifest(tmp_path / "m.csv", "good,good/image.nii.gz,good/mask.nii.gz,train",
                                   "bad,bad/image.nii.gz,bad/mask.nii.gz,train"))
    report = validate(cases, LABELS, require_deidentified=True)
    assert [c.case_id for c in report.valid] == ["good"]
    (problem,) = report.problems
    assert problem.case_id == "bad" and problem.line == 3 and problem.file == str(bad_image.resolve())
    assert problem.reason.startswith("3 non-finite voxels (NaN/Inf)")
    assert str(problem).startswith(f"line 3: case bad: {bad_image.resolve()}: 3 non-finite")

    cache = PreprocessCache(tmp_path / "cache", PreprocessSpec(shape=(8, 8, 8)), LABELS)
    x, y = cache.load(cases[0])
    assert x.shape == (1, 8, 8, 8) and np.isfinite(x).all() and set(np.unique(y)) <= {0, 1, 2}
    refused(lambda: cache.load(cases[1]), "case bad", "3 non-finite voxels (NaN/Inf)")
    assert len(list(cache.folder.glob("*.npz"))) == 1  # only the good case's entry


def test_the_cache_never_writes_nor_serves_a_non_finite_volume(tmp_path, monkeypatch):
    image, mask = write_case(tmp_path / "case")
    (case,) = read_manifest(manifest(tmp_path / "m.csv", "c1,case/image.nii.gz,case/mask.nii.gz,train"))
    spec = PreprocessSpec(shape=(8, 8, 8))
    cache = PreprocessCache(tmp_path / "cache", spec, LABELS)
    target = cache.folder / f"{cache.key(case)}.npz"

    # a stale entry holding NaN (as an earlier version could write): discarded and preprocessed anew
    np.savez(target, image=np.full((1, 8, 8, 8), np.nan, dtype=np.float32), label=np.zeros((8, 8, 8), np.uint8))
    x, y = cache.load(case)
    assert np.isfinite(x).all() and (cache.hits, cache.misses) == (0, 1)
    with np.load(target) as stored:
        assert np.isfinite(stored["image"]).all()

    # preprocessing that yields NaN (whatever the cause) is refused before anything is written
    target.unlink()
    real = preprocess_module.preprocess

    def poisoned(volume, labels, spec):
        x, y = real(volume, labels, spec)
        x[0, 0, 0, :2] = np.nan
        return x, y

    monkeypatch.setattr(preprocess_module, "preprocess", poisoned)
    refused(lambda: cache.load(case), "case c1", "2 non-finite voxels (NaN/Inf) in the preprocessed image")
    assert not target.exists() and not list(cache.folder.glob("*.npz*"))


# --- 2. the .npy mask's axis order -------------------------------------------------------------

@pytest.mark.parametrize("handedness", sorted(AFFINES))
def test_npy_beside_a_nifti_image_is_in_nibabels_array_order(tmp_path, handedness):
    image, mask = write_case(tmp_path, AFFINES[handedness])
    npy = tmp_path / "mask.npy"
    np.save(npy, nib.load(str(mask)).get_fdata())  # what tools beside a NIfTI image write: (x, y, z)
    volume = read_image(image)
    from_npy = read_mask(npy, volume, LABELS, image_file=image)
    np.testing.assert_array_equal(from_npy, read_mask(mask, volume, LABELS))
    # independent check: the image was built as 10 + 100 × label, so every label lies on its intensity
    for label in (0, 1, 2):
        under = volume.array[from_npy == label]
        assert under.size and (under[under < PLANTED] // 100 == label).all()
    naive = np.load(npy).transpose(2, 1, 0)  # the old (z, y, x) rule, by hand: misplaced rows here
    assert np.array_equal(naive, from_npy) == (handedness == "right-handed")
    # a trailing singleton axis (x, y, z, 1), as some tools save it, is the same mask
    np.save(tmp_path / "mask4d.npy", np.load(npy)[..., None])
    np.testing.assert_array_equal(read_mask(tmp_path / "mask4d.npy", volume, LABELS, image_file=image), from_npy)


def test_npy_in_the_wrong_order_beside_a_nifti_image_names_order_and_shapes(tmp_path):
    image, mask = write_case(tmp_path)
    volume = read_image(image)
    np.save(tmp_path / "zyx.npy", label_xyz().transpose(2, 1, 0))
    refused(lambda: read_mask(tmp_path / "zyx.npy", volume, LABELS, case="n1", image_file=image),
            "case n1", "zyx.npy", "shape mismatch", "nibabel's (x, y, z) array order",
            "found shape (5, 9, 7)", "expected (7, 9, 5)", "looks like carefl's (z, y, x) order")
    np.save(tmp_path / "cropped.npy", label_xyz()[:-1])
    message = refused(lambda: read_mask(tmp_path / "cropped.npy", volume, LABELS, image_file=image),
                      "nibabel's (x, y, z)", "found shape (6, 9, 5)", "expected (7, 9, 5)")
    assert "looks like" not in message


def test_npy_beside_a_dicom_series_is_in_carefls_z_y_x_order(tmp_path):
    series = write_series(tmp_path / "series", n=4)
    volume = read_image(series)
    assert volume.array.shape == (4, 64, 64)
    labels = np.zeros((4, 64, 64), dtype=np.uint8)
    labels[1, 10:20, 30:40], labels[3, 40:50, 5:9] = 1, 2
    np.save(tmp_path / "zyx.npy", labels)
    np.testing.assert_array_equal(read_mask(tmp_path / "zyx.npy", volume, LABELS, image_file=series), labels)
    np.save(tmp_path / "xyz.npy", labels.transpose(2, 1, 0))
    refused(lambda: read_mask(tmp_path / "xyz.npy", volume, LABELS, image_file=series),
            "xyz.npy", "shape mismatch", "carefl's (z, y, x) order", "found shape (64, 64, 4)",
            "expected (4, 64, 64)", "looks like (x, y, z) order")


def test_manifest_cases_use_the_npy_convention(tmp_path):
    write_case(tmp_path / "a", AFFINES["left-handed"])
    np.save(tmp_path / "a" / "good.npy", nib.load(str(tmp_path / "a" / "mask.nii.gz")).get_fdata())
    np.save(tmp_path / "a" / "zyx.npy", label_xyz().transpose(2, 1, 0))
    cases = read_manifest(manifest(tmp_path / "m.csv", "ok,a/image.nii.gz,a/good.npy,train",
                                   "wrong,a/image.nii.gz,a/zyx.npy,test"))
    report = validate(cases, LABELS, require_deidentified=True)
    assert [c.case_id for c in report.valid] == ["ok"]
    (problem,) = report.problems
    assert problem.line == 3 and problem.file.endswith("zyx.npy") and "nibabel's (x, y, z)" in problem.reason
    cache = PreprocessCache(tmp_path / "cache", PreprocessSpec(shape=(16, 16, 16)), LABELS)  # pads: nothing cut
    _, y = cache.load(cases[0])  # the cache reads the .npy by the same rule
    assert set(np.unique(y)) == {0, 1, 2}


# --- 3. manifest problems: line numbers, all at once ---------------------------------------------

def test_structural_problems_and_missing_files_are_listed_together_with_lines(tmp_path):
    write_case(tmp_path)
    path = manifest(tmp_path / "m.csv",
                    "a,image.nii.gz,mask.nii.gz,train",
                    "a,image.nii.gz,mask.nii.gz,train",
                    "b,nope.nii.gz,mask.nii.gz,",
                    "c,image.nii.gz,gone.npy,later")
    with pytest.raises(SiteError) as info:
        read_manifest(path)
    message = str(info.value)
    expected = ["4 problem(s)", "line 3: case_id 'a' appears twice (first on line 2)",
                "line 4: case 'b': image nope.nii.gz not found", "line 5: case 'c': mask gone.npy not found",
                "line 5: split must be train, test or empty"]
    for part in expected:
        assert part in message, (part, message)
    assert message.index("line 3:") < message.index("line 4:") < message.index("line 5:")


def test_missing_files_are_excluded_cases_with_their_line(tmp_path):
    write_case(tmp_path)
    path = tmp_path / "m.csv"  # a blank line (skipped by csv) must not shift the line numbers
    path.write_text("case_id,image,mask\nok,image.nii.gz,mask.nii.gz\n\nlost,nope.nii.gz,gone.nii.gz\n"
                    "nomask,image.nii.gz,gone.nii.gz\n", encoding="utf-8")
    cases = read_manifest(path)
    assert [(c.case_id, c.line) for c in cases] == [("ok", 2), ("lost", 4), ("nomask", 5)]
    report = validate(cases, LABELS, require_deidentified=True)
    assert [c.case_id for c in report.valid] == ["ok"]
    found = [(p.line, p.case_id, Path(p.file).name, p.reason) for p in report.problems]
    assert found == [(4, "lost", "nope.nii.gz", "image not found"), (4, "lost", "gone.nii.gz", "mask file not found"),
                     (5, "nomask", "gone.nii.gz", "mask file not found")]
    assert str(report.problems[0]) == f"line 4: case lost: {(tmp_path / 'nope.nii.gz').resolve()}: image not found"
    assert report.summary() == "1 valid case(s), 2 excluded"


def test_cli_site_validate_prints_every_problem_with_its_line(tmp_path):
    from client.site import write_site_config

    write_case(tmp_path / "good")
    write_case(tmp_path / "nan", nonfinite=(np.nan, np.inf))
    path = manifest(tmp_path / "m.csv", "good,good/image.nii.gz,good/mask.nii.gz,train",
                    "lost,nope.nii.gz,good/mask.nii.gz,train",
                    "nan,nan/image.nii.gz,nan/mask.nii.gz,test")
    config = write_site_config(tmp_path / "site.toml", "site-x", path, dataset="hippocampus", manifest=True,
                               labels=[0, 1, 2], device="cpu", epsilon_budget=50.0, delta=1e-3)

    def carefl(*args):
        return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "COLUMNS": "400"})

    done = carefl("site", "validate", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    out = " ".join(done.stdout.split())  # rich may wrap long lines
    assert "line 3: case lost:" in out and "image not found" in out
    assert "line 4: case nan:" in out and "2 non-finite voxels (NaN/Inf)" in out
    assert "1 valid case(s), 2 excluded" in out and "Traceback" not in done.stderr
    assert "987654" not in done.stdout + done.stderr

    manifest(path, "good,good/image.nii.gz,good/mask.nii.gz,train", "good,good/image.nii.gz,good/mask.nii.gz,train",
             "lost,nope.nii.gz,good/mask.nii.gz,train")
    broken = carefl("site", "validate", "--config", str(config))
    assert broken.returncode == 2, broken.stdout + broken.stderr
    text = " ".join((broken.stdout + broken.stderr).split())
    assert "line 3: case_id 'good' appears twice" in text and "line 4: case 'lost': image nope.nii.gz not found" in text
