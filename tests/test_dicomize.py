"""NIfTI → DICOM MR series + SEG on real MSD hippocampus cases, read back through the DICOM path."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from client.ingest.imaging.dicom_series import declares_deidentified, phi_attributes
from deploy.datasets.dicomize import dicomize_case, rescale_for
from client.ingest.imaging.io import read_image, read_mask
from client.ingest.imaging.volume import ImagingError
from tests.helpers import shared_data

NAMES = {1: "anterior hippocampus", 2: "posterior hippocampus"}


def case_files(case: str):
    folder = shared_data("msd_hippocampus")
    return folder / "imagesTr" / f"{case}.nii.gz", folder / "labelsTr" / f"{case}.nii.gz"


@pytest.mark.parametrize("case, seg_type", [
    ("hippocampus_001", "BINARY"),    # uint8 image and labels on disk
    ("hippocampus_003", "LABELMAP"),  # float32 image (non-integral) and float32 labels on disk
])
def test_round_trip_through_dicom(case, seg_type, tmp_path):
    image, label = case_files(case)
    series, seg = dicomize_case(image, label, tmp_path, case, NAMES, segmentation_type=seg_type)
    assert series.is_dir() and seg.is_file() and seg.parent != series  # the SEG is not in the series folder

    original, converted = read_image(image), read_image(series)
    assert converted.modality == "MR"
    assert converted.array.shape == original.array.shape and converted.array.dtype == np.float32
    assert converted.spacing == pytest.approx(original.spacing)
    np.testing.assert_allclose(converted.affine, original.affine, atol=1e-4)
    value_range = float(original.array.max() - original.array.min())
    assert np.abs(converted.array - original.array).max() <= 1e-3 * value_range

    labels = read_mask(label, original, {1, 2})
    from_seg = read_mask(seg, converted, {1, 2})
    np.testing.assert_array_equal(from_seg, labels)
    assert set(np.unique(from_seg).tolist()) == {0, 1, 2}

    files = sorted(series.iterdir())
    assert len(files) == original.array.shape[0]
    first = pydicom.dcmread(files[0])
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.Modality == "MR" and first.BitsAllocated == 16
    dataset = pydicom.dcmread(seg)
    assert dataset.SegmentationType == seg_type
    # highdicom adds an explicit segment 0 "Background" to LABELMAP objects
    assert {s.SegmentNumber: s.SegmentLabel for s in dataset.SegmentSequence if s.SegmentNumber > 0} == NAMES
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert dataset.StudyInstanceUID == first.StudyInstanceUID


def test_identities_are_synthetic(tmp_path):
    image, label = case_files("hippocampus_001")
    series, seg = dicomize_case(image, label, tmp_path, "hippocampus_001", NAMES)
    for source in (series, seg):
        assert set(phi_attributes(source)) <= {"PatientName", "PatientID"}
        assert declares_deidentified(source)
    for path in [*series.iterdir(), seg]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientName) == "CAREFL^SYNTHETIC^hippocampus_001"
        assert ds.PatientID == "CAREFL-FAKE-hippocampus_001"
        assert not ds.get("PatientBirthDate")
        assert ds.PatientIdentityRemoved == "YES"


def test_seg_of_another_case_is_refused(tmp_path):
    image_a, label_a = case_files("hippocampus_001")
    image_b, label_b = case_files("hippocampus_003")
    _, seg_a = dicomize_case(image_a, label_a, tmp_path, "a", NAMES)
    series_b, _ = dicomize_case(image_b, label_b, tmp_path, "b", NAMES)
    with pytest.raises(ImagingError) as info:
        read_mask(seg_a, read_image(series_b), {1, 2})
    assert "seg.dcm" in str(info.value) and "shape mismatch" in str(info.value)


def test_seg_on_a_shifted_grid_is_refused(tmp_path):
    image, label = case_files("hippocampus_001")
    series, seg = dicomize_case(image, label, tmp_path, "c", NAMES)
    dataset = pydicom.dcmread(seg)
    for group in dataset.PerFrameFunctionalGroupsSequence:
        position = group.PlanePositionSequence[0].ImagePositionPatient
        position[0] = float(position[0]) + 0.5
        group.PlanePositionSequence[0].ImagePositionPatient = position
    dataset.save_as(seg)
    with pytest.raises(ImagingError, match="geometry differs") as info:
        read_mask(seg, read_image(series), {1, 2})
    assert "seg.dcm" in str(info.value)


def test_refuses_to_overwrite_and_checks_label_names(tmp_path):
    image, label = case_files("hippocampus_001")
    dicomize_case(image, label, tmp_path, "d", NAMES)
    with pytest.raises(ImagingError, match="already exists") as info:
        dicomize_case(image, label, tmp_path, "d", NAMES)
    assert str(info.value).startswith("case d: ")
    with pytest.raises(ImagingError, match="unexpected label codes \\[2\\]"):
        dicomize_case(image, label, tmp_path, "e", {1: "anterior hippocampus"})
    with pytest.raises(ImagingError, match="1..K"):
        dicomize_case(image, label, tmp_path, "f", {1: "a", 3: "c"})


def test_rescale_is_exact_for_whole_numbers_and_fine_for_floats():
    whole = np.array([0, 17, 4000], dtype=np.float32)
    assert rescale_for(whole) == (1.0, 0.0)
    assert rescale_for(whole - 1024) == (1.0, -1024.0)
    rng = np.random.default_rng(1)
    floats = rng.uniform(-3.5, 2776.88, 10_000).astype(np.float32)
    slope, intercept = rescale_for(floats)
    stored = np.clip(np.round((floats - intercept) / slope), 0, 65535)
    assert np.abs(stored * slope + intercept - floats).max() <= 1e-3 * np.ptp(floats)
