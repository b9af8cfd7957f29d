"""Ingestion defects of issue 20 §1, each on real DICOM files: pydicom's bundled test files, or files
written here with pydicom / highdicom.

1. A DICOM SEG must reference the image's series and share its frame of reference (not only its grid).
2. Only CT / MR / PET image storage objects (or the modalities a dataset declares) are read as images:
   an RT dose grid or a secondary capture has pixel data too.
3. Pixel data that no installed decoder handles (12-bit JPEG Extended with only Pillow) says so,
   naming the transfer syntax and the package, instead of "truncated or corrupt".
4. pydicom's warnings and log records (which quote header values) reach neither stderr nor the log as
   written: they become value-free carefl log records.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGExtended12Bit, generate_uid

from client.ingest.imaging import dicom_series
from client.ingest.imaging.dicom_series import phi_attributes, read_dicom_series
from client.ingest.imaging.third_party import value_free
from client.ingest.imaging.io import read_image, read_mask
from client.ingest.imaging.volume import ImagingError

REPO = Path(__file__).resolve().parent.parent
PLANTED_NAME = "DOE^JANE^XYZZY"
PLANTED_ID = "XYZZY-4242"
PLANTED_PARTS = ("XYZZY", "DOE", "JANE", "4242")


def refused(call, *names: str, absent: tuple[str, ...] = ()) -> str:
    """``call`` raises ImagingError naming every ``names``, no planted patient value and none of ``absent``."""
    with pytest.raises(ImagingError) as info:
        call()
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    for part in PLANTED_PARTS + tuple(absent):
        assert part not in message, f"{part!r} leaked into: {message}"
    return message


def write_series(folder: Path, n: int = 4, series_uid: str | None = None, frame_of_reference: str | None = None,
                 **changes) -> list[Path]:
    """pydicom's MR_small stacked n times along its normal (2.5 mm), with a planted patient identity."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid() if series_uid is None else series_uid
    paths = []
    for z in range(n):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.PatientName, ds.PatientID = PLANTED_NAME, PLANTED_ID
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, generate_uid(), z + 1
        if frame_of_reference is not None:
            ds.FrameOfReferenceUID = frame_of_reference
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, z0 = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z0 + 2.5 * z, 4)]
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        paths.append(folder / f"slice_{z:03d}.dcm")
        ds.save_as(paths[-1])
    return paths


def write_seg(source: list[Path], out: Path) -> Path:
    """A real BINARY DICOM SEG (highdicom) drawn on the given slices: a square on every slice."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets = [pydicom.dcmread(p) for p in source]
    mask = np.zeros((len(datasets), datasets[0].Rows, datasets[0].Columns), dtype=bool)
    mask[:, 20:40, 24:44] = True
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept("L1", "99CAREFL", "lesion"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=mask, segmentation_type="BINARY", segment_descriptions=[description],
        series_instance_uid=generate_uid(), series_number=2, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="carefl", manufacturer_model_name="test", software_versions="1", device_serial_number="none")
    seg.save_as(out)
    return out


def edited(path: Path, **changes) -> Path:
    """Rewrite a DICOM file with attributes set (value) or deleted (None)."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


# --- 1. a SEG must belong to the image's series and frame of reference ------------------------------

def test_seg_of_another_series_on_the_same_grid_is_refused(tmp_path):
    image_uid, other_uid = generate_uid(), generate_uid()
    series_a = write_series(tmp_path / "a", series_uid=image_uid)
    series_b = write_series(tmp_path / "b", series_uid=other_uid)  # same grid, same frame of reference
    volume = read_image(tmp_path / "a")
    assert volume.series_instance_uid == image_uid
    assert volume.frame_of_reference_uid == str(pydicom.dcmread(series_a[0]).FrameOfReferenceUID)

    own = write_seg(series_a, tmp_path / "own.dcm")
    mask = read_mask(own, volume, {1})
    assert mask.shape == volume.shape and mask[:, 20:40, 24:44].all() and mask.sum() == 4 * 20 * 20

    foreign = write_seg(series_b, tmp_path / "foreign.dcm")
    assert read_image(tmp_path / "b").affine.tolist() == volume.affine.tolist()  # geometry alone cannot tell
    refused(lambda: read_mask(foreign, volume, {1}), "foreign.dcm", "the SEG references another series",
            absent=(image_uid, other_uid))


def test_seg_in_another_frame_of_reference_is_refused(tmp_path):
    series = write_series(tmp_path / "a")
    volume = read_image(tmp_path / "a")
    moved = generate_uid()
    seg = edited(write_seg(series, tmp_path / "seg.dcm"), FrameOfReferenceUID=moved)
    refused(lambda: read_mask(seg, volume, {1}), "seg.dcm", "another frame of reference",
            absent=(moved, volume.frame_of_reference_uid))


def test_seg_without_a_series_reference_is_refused(tmp_path):
    series = write_series(tmp_path / "a")
    volume = read_image(tmp_path / "a")
    seg = edited(write_seg(series, tmp_path / "seg.dcm"), ReferencedSeriesSequence=None)
    refused(lambda: read_mask(seg, volume, {1}), "seg.dcm", "does not say which series",
            absent=(volume.series_instance_uid,))


def test_blanked_series_uid_falls_back_to_geometry_but_keeps_the_frame_of_reference_check(tmp_path):
    """Anonymisers blank SeriesInstanceUID (the real CT example has it blank): nothing to compare, the
    grid decides; a SEG in another frame of reference is still refused."""
    series = write_series(tmp_path / "a")
    seg = write_seg(series, tmp_path / "seg.dcm")
    for path in series:
        edited(path, SeriesInstanceUID="")
    volume = read_image(tmp_path / "a")
    assert volume.series_instance_uid is None and volume.frame_of_reference_uid
    assert read_mask(seg, volume, {1}).sum() == 4 * 20 * 20
    edited(seg, FrameOfReferenceUID=generate_uid())
    refused(lambda: read_mask(seg, volume, {1}), "another frame of reference")


def test_nifti_volumes_carry_no_uids(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), dtype=np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    volume = read_image(tmp_path / "x.nii.gz")
    assert volume.series_instance_uid is None and volume.frame_of_reference_uid is None


def test_one_series_in_two_frames_of_reference_is_refused(tmp_path):
    paths = write_series(tmp_path)
    edited(paths[2], FrameOfReferenceUID=generate_uid())
    refused(lambda: read_image(tmp_path), "2 frames of reference")


# --- 2. only image objects of the declared modalities -----------------------------------------------

def test_rt_dose_grid_is_not_an_image(tmp_path):
    shutil.copy(get_testdata_file("rtdose.dcm"), tmp_path / "dose.dcm")
    refused(lambda: read_image(tmp_path), "dose.dcm", "RT Dose Storage", "CT, MR or PET image storage")


def test_single_frame_rt_dose_with_full_geometry_is_still_refused(tmp_path):
    """One frame of rtdose.dcm has everything a slice needs (position, orientation, spacing, pixels):
    before the SOP class check it was read as an image volume."""
    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    frame = ds.pixel_array[0]
    ds.NumberOfFrames, ds.PixelData = 1, np.ascontiguousarray(frame).tobytes()
    del ds.GridFrameOffsetVector
    ds.save_as(tmp_path / "dose1.dcm")
    written = pydicom.dcmread(tmp_path / "dose1.dcm")
    assert len(dicom_series._frames_of(tmp_path / "dose1.dcm", written, None)) == 1  # geometry alone passes
    refused(lambda: read_image(tmp_path), "dose1.dcm", "not an image series", "RT Dose Storage")


def test_secondary_capture_is_not_an_image_series(tmp_path):
    shutil.copy(get_testdata_file("JPEG-lossy.dcm"), tmp_path / "capture.dcm")
    refused(lambda: read_image(tmp_path), "capture.dcm", "Secondary Capture Image Storage")


def test_declared_modalities_are_enforced(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    assert read_dicom_series(tmp_path, modalities={"CT"}).modality == "CT"
    assert read_dicom_series(tmp_path, modalities=["ct", "MR"]).modality == "CT"
    refused(lambda: read_dicom_series(tmp_path, modalities={"MR"}), "ct.dcm", "CT Image Storage",
            "the dataset declares MR", "expected MR image storage")
    refused(lambda: read_dicom_series(tmp_path, modalities=["PET"]), "CT Image Storage", "PET image storage")
    refused(lambda: read_dicom_series(tmp_path, modalities=["US"]), "carefl reads CT, MR and PT")


def test_a_sites_declared_modality_reaches_validation_and_refuses_other_images(tmp_path):
    """site.toml's ``modality`` for an imaging dataset: `carefl site validate` refuses an MR series in a CT
    dataset naming the case and the SOP class, and accepts it in an MR dataset."""
    from client.site import write_site_config
    from deploy.datasets.hippocampus import write_manifest
    from tests.helpers import run_carefl

    images = write_series(tmp_path / "mr")
    mask = tmp_path / "mask.npy"
    np.save(mask, np.zeros((len(images), *pydicom.dcmread(images[0]).pixel_array.shape), dtype=np.uint8))
    manifest = write_manifest(tmp_path / "site" / "images.csv", [("case-a", tmp_path / "mr", mask)])
    verdicts = {}
    for declared in ("CT", "MR"):
        config = write_site_config(tmp_path / declared / "site.toml", "s1", manifest, dataset="scans", manifest=True,
                                   labels=[0, 1], modality=declared, epsilon_budget=10.0, delta=1e-3)
        done = run_carefl(["site", "validate", "--config", str(config), "--dataset", "scans"], tmp_path, timeout=120)
        verdicts[declared] = (done.returncode, " ".join((done.stdout + done.stderr).split()))
    assert verdicts["CT"][0] != 0 and "case-a" in verdicts["CT"][1] and "the dataset declares CT" in verdicts["CT"][1]
    assert verdicts["MR"][0] == 0, verdicts["MR"][1]
    assert PLANTED_NAME not in verdicts["CT"][1] + verdicts["MR"][1]


def test_modality_must_match_the_declaration(tmp_path):
    write_series(tmp_path / "ct", n=2, Modality="CT")  # MR Image Storage objects that say CT
    refused(lambda: read_dicom_series(tmp_path / "ct", modalities={"MR"}), "Modality is CT",
            "the dataset declares MR")
    write_series(tmp_path / "odd", n=2, Modality="XYZZY")  # a value that is no defined term is not quoted
    refused(lambda: read_dicom_series(tmp_path / "odd", modalities={"MR"}), "Modality is an unrecognised value")
    assert read_dicom_series(tmp_path / "odd").modality == "XYZZY"  # undeclared: the SOP class decides


def test_missing_sop_class_uses_the_file_meta_and_else_refuses(tmp_path):
    paths = write_series(tmp_path, n=2)
    for path in paths:
        edited(path, SOPClassUID="")  # as in the real CT example: the file meta still says MR Image Storage
    assert read_image(tmp_path).modality == "MR"
    ds = pydicom.dcmread(paths[1])
    del ds.file_meta.MediaStorageSOPClassUID
    ds.save_as(paths[1], enforce_file_format=False)
    refused(lambda: read_image(tmp_path), paths[1].name, "no SOPClassUID")


# --- 3. no installed decoder: say so, not "truncated or corrupt" ------------------------------------

def test_12_bit_jpeg_extended_without_a_decoder_is_named(tmp_path, caplog):
    decoder = get_decoder(JPEGExtended12Bit)
    if "pylibjpeg" in decoder.available_plugins:
        pytest.skip("pylibjpeg-libjpeg is installed here: 12-bit JPEG Extended decodes")
    jpeg = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))  # real 12-bit JPEG Extended pixel data
    assert jpeg.file_meta.TransferSyntaxUID == JPEGExtended12Bit and int(jpeg.BitsStored) == 12
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # an MR slice carrying those pixels
    ds.PatientName, ds.PatientID = PLANTED_NAME, PLANTED_ID
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "PhotometricInterpretation", "SamplesPerPixel"):
        setattr(ds, keyword, jpeg[keyword].value)
    ds.PixelData = jpeg.PixelData
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jpeg12.dcm")
    with caplog.at_level(logging.DEBUG):
        message = refused(lambda: read_image(tmp_path), "jpeg12.dcm", "JPEG Extended (Process 2 and 4)",
                          str(JPEGExtended12Bit), "no installed decoder handles", "pylibjpeg-libjpeg")
    assert "truncated" not in message and "corrupt" not in message
    if decoder.is_available:  # Pillow tried and declined: its failure is in the error, not also in the log
        assert "pillow" in message
        assert not [r for r in caplog.records if "logged ERROR" in r.getMessage()]


# --- 4. third-party warnings: no header values on stderr or in the log ------------------------------

PLANTED_UID = "1.2.826.0.XYZZY.4242"  # not a valid UI value: pydicom warns, quoting it


def _series_that_makes_pydicom_warn(folder: Path, monkeypatch) -> None:
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)
    write_series(folder, n=3, series_uid=PLANTED_UID)
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.WARN)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.WARN)
    with pytest.warns(UserWarning, match="XYZZY"):  # the fixture does make pydicom quote the value
        pydicom.dcmread(next(folder.iterdir())).get("SeriesInstanceUID")


def test_pydicom_warnings_become_value_free_log_records(tmp_path, monkeypatch, caplog, capfd):
    _series_that_makes_pydicom_warn(tmp_path, monkeypatch)
    capfd.readouterr()
    caplog.clear()  # the fixture's own direct pydicom read (outside carefl) did log the value
    with warnings.catch_warnings(record=True) as escaped, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        volume = read_image(tmp_path)
        assert {"PatientID", "PatientName"} <= set(phi_attributes(tmp_path))
    assert volume.shape == (3, 64, 64)
    assert [str(w.message) for w in escaped] == []  # nothing left as a Python warning
    out, err = capfd.readouterr()
    assert not [part for part in PLANTED_PARTS if part in out + err]
    assert not [r for r in caplog.records if r.name.split(".")[0] in ("pydicom", "highdicom")]
    ours = [r for r in caplog.records if r.name == "carefl.imaging"]
    assert ours and any("pydicom warned about an invalid value (VR UI)" in r.getMessage() for r in ours)
    assert not [part for part in PLANTED_PARTS if part in caplog.text]
    assert all(getattr(r, "carefl_file", None) for r in ours)  # kept on the record, out of the message


def test_pydicom_warnings_never_reach_stderr_of_a_process(tmp_path, monkeypatch):
    """A real process whose root logger writes to stderr (as a CLI's does) and whose warnings are shown."""
    _series_that_makes_pydicom_warn(tmp_path, monkeypatch)
    script = ("import logging, sys\n"
              "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"
              "from client.ingest.imaging.dicom_series import phi_attributes\n"
              "from client.ingest.imaging.io import read_image\n"
              "print(read_image(sys.argv[1]).shape, phi_attributes(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-W", "always", "-c", script, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(3, 64, 64)" in done.stdout
    assert not [part for part in PLANTED_PARTS if part in done.stdout + done.stderr], done.stderr[-2000:]
    assert "carefl.imaging" in done.stderr and "invalid value (VR UI)" in done.stderr


def test_value_free_keeps_keywords_and_drops_values():
    said = value_free("Invalid value for VR PN: 'DOE^JANE^XYZZY' in (0010,0010). Please see <https://x>")
    assert said == "an invalid value (PatientName, VR PN)"
    said = value_free('The value length (100) exceeds the maximum length of 64 allowed for VR LO.')
    assert said == "a value longer than its VR allows (VR LO)"
    assert value_free("something about XYZZY 4242 JANE") == "a problem it did not classify"
