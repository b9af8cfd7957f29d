"""Imaging ingestion on real files: the TotalSegmentator CT series and its NIfTI mask, pydicom's
bundled test files (plain, compressed), and every refused input written as real files.

(Over 400 lines on purpose: one test per accepted or refused input, all sharing the real CT series and
the DICOM writers at the top.)"""

from __future__ import annotations

import random
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from client.errors import SiteError
from client.ingest.imaging.dicom_series import (
    declares_deidentified,
    phi_attributes,
    read_dicom_series,
)
from client.ingest.imaging.io import read_image, read_mask
from client.ingest.imaging.volume import ImagingError, Volume
from tests.helpers import shared_data

PLANTED_NAME = "DOE^JANE^XYZZY"
PLANTED_ID = "XYZZY-4242"
PLANTED_PARTS = ("XYZZY", "DOE", "JANE", "4242")


def ct_folder() -> Path:
    return shared_data("totalseg_example_ct_dicom") / "example_ct_dicom"


@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_dicom_series(ct_folder())


def refused(call, *names: str) -> str:
    """Run ``call``; it must raise ImagingError naming every ``names`` and no planted patient value."""
    with pytest.raises(ImagingError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, SiteError)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    for part in PLANTED_PARTS:
        assert part not in message, f"patient value leaked into: {message}"
    return message


def mr_slice(**changes) -> pydicom.Dataset:
    """pydicom's MR_small with a planted patient identity."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientName = PLANTED_NAME
    ds.PatientID = PLANTED_ID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def write_series(folder: Path, n: int = 5, gap: float = 2.5, series_uid: str | None = None,
                 start: int = 0) -> list[Path]:
    """A real n-slice series: MR_small stacked along its normal (+z), distinct pixels per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    paths = []
    for z in range(start, start + n):
        ds = mr_slice(SeriesInstanceUID=series_uid, SOPInstanceUID=generate_uid(), InstanceNumber=z + 1)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, z0 = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z0 + z * gap, 4)]
        ds.PixelData = (ds.pixel_array + z * 10).astype(ds.pixel_array.dtype).tobytes()
        paths.append(folder / f"slice_{z:03d}.dcm")
        ds.save_as(paths[-1])
    return paths


# --- the real CT series -------------------------------------------------------------------------

def test_real_ct_series_geometry_and_hounsfield_units(ct):
    assert ct.array.shape == (20, 512, 512) and ct.array.dtype == np.float32
    assert ct.modality == "CT"
    assert ct.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    # Air outside the body is about -1000 HU: the stored values were rescaled (intercept -1024).
    assert np.mean(np.abs(ct.array + 1000) < 50) > 0.05
    assert ct.array.min() < -900 and ct.array.max() > 500
    # Slice order and rescale, against one file decoded directly: the highest slice is last.
    files = sorted(ct_folder().iterdir())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    top = max(range(len(files)), key=lambda i: float(headers[i].ImagePositionPatient[2]))
    ds = pydicom.dcmread(files[top])
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(ct.array[-1], expected.astype(np.float32))
    np.testing.assert_allclose(ct.affine @ [19, 0, 0, 1], [*map(float, ds.ImagePositionPatient), 1])
    # Axial, rows along +y (posterior), columns along +x (left), slices along +z (superior).
    np.testing.assert_allclose(ct.affine[:3, :3], [[0, 0, 0.9765625], [0, 0.9765625, 0], [2.0, 0, 0]])


def test_shuffled_file_order_and_names_give_the_identical_volume(ct, tmp_path):
    files = sorted(ct_folder().iterdir())
    random.Random(7).shuffle(files)
    for path in files:
        shutil.copy(path, tmp_path / uuid.uuid4().hex)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01 not dicom, hidden, must be skipped")
    again = read_image(tmp_path)
    np.testing.assert_array_equal(again.array, ct.array)
    np.testing.assert_array_equal(again.affine, ct.affine)
    assert again.spacing == ct.spacing


def test_ct_nifti_mask_lies_on_the_body(ct):
    path = shared_data("totalseg_example_ct_dicom") / "example_seg_dicom.nii.gz"
    image = nib.load(str(path))
    raw = np.asarray(image.dataobj)
    labels = set(np.unique(raw).tolist())
    mask = read_mask(path, ct, labels)
    assert mask.shape == ct.array.shape and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == labels
    under = ct.array[mask > 0]
    # Organs are soft tissue; a mask flipped in y (the naive transpose of this file) falls half on air.
    assert under.mean() > -500
    assert under.mean() > 0 and np.mean(under < -500) < 0.05
    # Independent check with nibabel's own affine: voxel (i, j, k) of the file lands where read_mask put it.
    rng = np.random.default_rng(0)
    ijk = np.argwhere(raw > 0)[rng.choice(np.count_nonzero(raw), 2000, replace=False)]
    ras = nib.affines.apply_affine(image.affine, ijk)
    lps = ras * [-1, -1, 1]
    zyx = np.rint(nib.affines.apply_affine(np.linalg.inv(ct.affine), lps)).astype(int)
    np.testing.assert_array_equal(mask[zyx[:, 0], zyx[:, 1], zyx[:, 2]], raw[ijk[:, 0], ijk[:, 1], ijk[:, 2]])


def test_nifti_converted_from_the_series_has_the_series_geometry(ct):
    """The seg NIfTI was written from this series (dcm2niix-style, rows flipped): our NIfTI
    convention gives back exactly the DICOM grid."""
    seg = read_image(shared_data("totalseg_example_ct_dicom") / "example_seg_dicom.nii.gz")
    assert seg.array.shape == ct.array.shape and seg.array.dtype == np.float32 and seg.modality == ""
    np.testing.assert_allclose(seg.affine, ct.affine, atol=1e-4)


def test_hippocampus_nifti_axes_are_z_y_x():
    folder = shared_data("msd_hippocampus")
    for case in ("hippocampus_001", "hippocampus_003"):  # uint8 and float32 on disk
        path = folder / "imagesTr" / f"{case}.nii.gz"
        raw = np.asanyarray(nib.load(str(path)).dataobj)
        volume = read_image(path)
        assert volume.array.dtype == np.float32
        np.testing.assert_array_equal(volume.array, raw.transpose(2, 1, 0).astype(np.float32))
        # identity RAS affine → LPS: x and y negated; (z, y, x) columns, origin at voxel 0
        np.testing.assert_allclose(volume.affine, [[0, 0, -1, -1], [0, -1, 0, -1], [1, 0, 0, 1], [0, 0, 0, 1]])
        assert np.linalg.det(volume.affine[:3, :3]) < 0


# --- pydicom's bundled files ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_single_file_series(name, tmp_path):
    shutil.copy(get_testdata_file(name), tmp_path)
    ds = pydicom.dcmread(get_testdata_file(name))
    volume = read_image(tmp_path)
    assert volume.array.shape == (1, ds.Rows, ds.Columns) and volume.modality == name[:2]
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(volume.array[0], (ds.pixel_array * slope + intercept).astype(np.float32))
    assert volume.spacing == pytest.approx((float(ds.SliceThickness), *map(float, ds.PixelSpacing)))
    np.testing.assert_allclose(volume.affine[:3, 3], [float(v) for v in ds.ImagePositionPatient])


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_other_encodings_decode_like_the_plain_file(name, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "coded").mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "plain")
    shutil.copy(get_testdata_file(name), tmp_path / "coded")
    plain, coded = read_image(tmp_path / "plain"), read_image(tmp_path / "coded")
    assert np.abs(plain.array).max() > 0
    np.testing.assert_array_equal(coded.array, plain.array)
    np.testing.assert_array_equal(coded.affine, plain.affine)


def test_enhanced_multiframe_file_reads_like_its_single_frame_series(tmp_path):
    """pydicom ships no enhanced CT/MR file, so highdicom's legacy converter makes a real one
    (positions in PerFrameFunctionalGroups, orientation and spacing in SharedFunctionalGroups)."""
    import highdicom as hd

    paths = write_series(tmp_path / "series", n=6)
    datasets = [pydicom.dcmread(p) for p in paths]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets[::-1], series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1)
    (tmp_path / "enhanced").mkdir()
    enhanced.save_as(tmp_path / "enhanced" / "multiframe.dcm")
    header = pydicom.dcmread(tmp_path / "enhanced" / "multiframe.dcm", stop_before_pixels=True)
    assert int(header.NumberOfFrames) == 6 and "ImagePositionPatient" not in header

    single, multi = read_image(tmp_path / "series"), read_image(tmp_path / "enhanced")
    assert multi.array.shape == (6, 64, 64)
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    assert multi.spacing == pytest.approx((2.5, 0.3125, 0.3125)) and multi.modality == "MR"


def test_synthetic_series_is_sorted_by_position_not_name(tmp_path):
    paths = write_series(tmp_path, n=4, gap=3.0)
    # Rename so that name order is the reverse of position order.
    for i, path in enumerate(paths):
        path.rename(tmp_path / f"{9 - i}.dcm")
    volume = read_image(tmp_path)
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    for z in range(4):
        np.testing.assert_array_equal(volume.array[z], base + 10 * z)
    assert volume.spacing == pytest.approx((3.0, 0.3125, 0.3125))


# --- refused inputs --------------------------------------------------------------------------------

def test_truncated_file_is_named(tmp_path):
    paths = write_series(tmp_path, n=3)
    paths[1].write_bytes(paths[1].read_bytes()[:-500])
    refused(lambda: read_image(tmp_path), paths[1].name, "truncated")


def test_non_dicom_file_is_named(tmp_path):
    write_series(tmp_path, n=3)
    (tmp_path / "notes.txt").write_text(f"patient {PLANTED_NAME}\n")
    refused(lambda: read_image(tmp_path), "notes.txt", "not a DICOM file")


def test_file_without_pixel_data(tmp_path):
    paths = write_series(tmp_path, n=3)
    ds = pydicom.dcmread(paths[2])
    del ds.PixelData
    ds.save_as(paths[2])
    refused(lambda: read_image(tmp_path), paths[2].name, "no pixel data")


def test_two_series_in_one_folder(tmp_path):
    write_series(tmp_path, n=3)
    write_series(tmp_path, n=2, start=10)
    refused(lambda: read_image(tmp_path), str(tmp_path), "mixed series: 2 series")


def test_duplicate_slice_positions(tmp_path):
    paths = write_series(tmp_path, n=4)
    ds = pydicom.dcmread(paths[3])
    ds.ImagePositionPatient = pydicom.dcmread(paths[1]).ImagePositionPatient
    ds.save_as(paths[3])
    refused(lambda: read_image(tmp_path), "duplicate slice position", paths[1].name, paths[3].name)


def test_missing_middle_slice_is_inconsistent_spacing(tmp_path):
    paths = write_series(tmp_path, n=5)
    paths[2].unlink()
    refused(lambda: read_image(tmp_path), str(tmp_path), "inconsistent slice spacing", paths[1].name, paths[3].name)


def test_inconsistent_orientation_and_size(tmp_path):
    paths = write_series(tmp_path / "a", n=3)
    ds = pydicom.dcmread(paths[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(paths[1])
    refused(lambda: read_image(tmp_path / "a"), paths[1].name, "ImageOrientationPatient differs")
    paths = write_series(tmp_path / "b", n=3)
    ds = pydicom.dcmread(paths[2])
    ds.Rows, ds.PixelData = 32, ds.pixel_array[:32].tobytes()
    ds.save_as(paths[2])
    refused(lambda: read_image(tmp_path / "b"), paths[2].name, "Rows/Columns differ")


def test_empty_folder(tmp_path):
    refused(lambda: read_image(tmp_path), str(tmp_path), "no DICOM files")
    (tmp_path / ".hidden").write_bytes(b"x")
    refused(lambda: read_image(tmp_path), str(tmp_path), "no DICOM files")


def _undecodable_syntax():
    for uid in (JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGExtended12Bit):
        if not get_decoder(uid).is_available:
            return uid
    pytest.skip("every candidate compressed transfer syntax has a decoder installed here")


def test_transfer_syntax_without_decoder_names_syntax_and_package(tmp_path):
    uid = _undecodable_syntax()
    ds = mr_slice()
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([b"\xff\xd8 bogus compressed bytes \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "compressed.dcm")
    message = refused(lambda: read_image(tmp_path), "compressed.dcm", str(uid), uid.name, "install")
    assert "pylibjpeg-libjpeg" in message


def test_corrupt_bytes_with_an_installed_decoder(tmp_path):
    ds = mr_slice()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x00" * 64])  # an RLE header claiming no segments
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "rle.dcm")
    refused(lambda: read_image(tmp_path), "rle.dcm", "could not be decoded", "RLE Lossless")


def _nifti_like(reference_path: Path, data: np.ndarray, out: Path, shift_mm: float = 0.0) -> Path:
    """A label NIfTI with the reference file's header (and a planted name in its description)."""
    image = nib.load(str(reference_path))
    affine = image.affine.copy()
    affine[0, 3] += shift_mm
    header = image.header.copy()
    header["descrip"] = PLANTED_NAME.encode()
    header.set_data_dtype(data.dtype)
    nib.save(nib.Nifti1Image(data, affine, header), str(out))
    return out


@pytest.fixture
def hippo():
    folder = shared_data("msd_hippocampus")
    image = folder / "imagesTr" / "hippocampus_003.nii.gz"  # 34×52×35: every axis order is distinct
    label = folder / "labelsTr" / "hippocampus_003.nii.gz"  # stored as float32 on disk
    return read_image(image), label, np.asarray(nib.load(str(label)).dataobj)


def test_nifti_mask_reads_and_is_checked(hippo, tmp_path):
    volume, label, raw = hippo
    mask = read_mask(label, volume, {1, 2})
    np.testing.assert_array_equal(mask, raw.transpose(2, 1, 0))
    bad = _nifti_like(label, raw[:-1].copy(), tmp_path / "short.nii.gz")
    refused(lambda: read_mask(bad, volume, {1, 2}), "short.nii.gz", "shape mismatch",
            str(volume.array.shape), str((raw.shape[2], raw.shape[1], raw.shape[0] - 1)))
    moved = _nifti_like(label, raw, tmp_path / "moved.nii.gz", shift_mm=5.0)
    refused(lambda: read_mask(moved, volume, {1, 2}), "moved.nii.gz", "geometry differs")
    extra = raw.copy()
    extra[extra == 2] = 7
    extra_path = _nifti_like(label, extra, tmp_path / "extra.nii.gz")
    refused(lambda: read_mask(extra_path, volume, {1, 2}), "extra.nii.gz", "unexpected label codes [7]")
    fractional = _nifti_like(label, raw.astype(np.float32) * 0.5, tmp_path / "soft.nii.gz")
    refused(lambda: read_mask(fractional, volume, {1, 2}), "soft.nii.gz", "non-integral")
    as_bytes = _nifti_like(label, raw.astype(np.uint8), tmp_path / "bytes.nii.gz")
    np.testing.assert_array_equal(read_mask(as_bytes, volume, {1, 2}), mask)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(label.read_bytes()[:200])
    refused(lambda: read_mask(broken, volume, {1, 2}), "broken.nii.gz", "unreadable")


def test_npy_mask(hippo, tmp_path):
    volume, _, raw = hippo
    np.save(tmp_path / "ok.npy", raw.transpose(2, 1, 0))
    np.testing.assert_array_equal(read_mask(tmp_path / "ok.npy", volume, {1, 2}), raw.transpose(2, 1, 0))
    np.save(tmp_path / "xyz.npy", raw)  # not transposed: (x, y, z)
    refused(lambda: read_mask(tmp_path / "xyz.npy", volume, {1, 2}), "xyz.npy", "shape mismatch",
            str(tuple(raw.shape)), str(volume.array.shape))
    refused(lambda: read_mask(tmp_path / "ok.npy", volume, {1}), "ok.npy", "unexpected label codes [2]")


def test_a_dicom_image_is_not_a_mask(hippo, tmp_path):
    volume, _, _ = hippo
    mr_slice().save_as(tmp_path / "image.dcm")
    refused(lambda: read_mask(tmp_path / "image.dcm", volume, {1}), "image.dcm", "not a DICOM Segmentation")


# --- PHI -----------------------------------------------------------------------------------------

def test_phi_attributes_lists_keywords_never_values(tmp_path):
    from client.ingest.imaging.dicom_series import PHI_KEYWORDS

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for element in list(ds.iterall()):
        if element.keyword in PHI_KEYWORDS:
            element.value = None
    ds.PatientName = PLANTED_NAME
    ds.PatientID = PLANTED_ID
    ds.PatientBirthDate = "19700101"
    ds.save_as(tmp_path / "one.dcm")
    expected = ["PatientBirthDate", "PatientID", "PatientName"]
    assert phi_attributes(tmp_path) == phi_attributes(tmp_path / "one.dcm") == phi_attributes(ds) == expected
    assert declares_deidentified(tmp_path) is False
    ds.PatientIdentityRemoved = "YES"
    assert declares_deidentified(ds) is True
    # Nested values count too; an empty or separator-only name does not.
    ds.PatientName = "^^"
    ds.OtherPatientIDsSequence = [pydicom.Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID = PLANTED_ID
    assert phi_attributes(ds) == ["OtherPatientIDsSequence", "PatientBirthDate", "PatientID"]


def test_phi_of_the_real_ct_series():
    found = phi_attributes(ct_folder())
    assert "PatientName" not in found and "PatientID" not in found  # blank in this fixture (SOURCE.md)
    assert "InstitutionAddress" in found
    assert declares_deidentified(ct_folder()) is False
