"""Turn a public NIfTI image + label pair into a DICOM MR series + DICOM SEG with fake identities.

Why: hospitals hand carefl DICOM, but public segmentation data (e.g. MSD hippocampus) is NIfTI.
Converting it lets the whole DICOM path (series reading, SEG alignment, PHI checks) run end to
end on real anatomy without any real patient identity: PatientName ``CAREFL^SYNTHETIC^<case>``,
PatientID ``CAREFL-FAKE-<case>``, no birth date, PatientIdentityRemoved ``YES``.

Geometry comes from ``read_image`` (our (z, y, x) LPS convention), so reading the series back
gives the same array and affine: each z index is one file, rows run along y, columns along x.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from client.ingest.imaging.io import read_image, read_mask
from client.ingest.imaging.volume import ImagingError

MAX_STORED = 65535  # unsigned 16-bit pixels
CASE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")  # fits PN / LO values and file names
SOFTWARE = "carefl dicomize"
DEID_METHOD = "synthetic identifiers; converted from public NIfTI by carefl"


def dicomize_case(image_nifti: Path, label_nifti: Path, out_dir: Path, case_id: str,
                  label_names: dict[int, str], *, segmentation_type: str = "BINARY") -> tuple[Path, Path]:
    """Write ``out_dir/<case_id>/mr/`` (one MR file per slice) and ``out_dir/<case_id>/seg.dcm``.

    ``label_names`` must name labels 1..K (DICOM segment numbers are consecutive); label k
    becomes segment k. BINARY SEG is the default because more viewers read it than LABELMAP.
    Returns (series_folder, seg_file).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    image_nifti, label_nifti, out_dir = Path(image_nifti), Path(label_nifti), Path(out_dir)
    if not CASE_ID.match(case_id):
        raise ImagingError(image_nifti, "case id must be 1-40 characters of letters, digits, '_', '.', '-'", case_id)
    numbers = sorted(label_names)
    if numbers != list(range(1, len(numbers) + 1)) or not all(str(label_names[k]).strip() for k in numbers):
        raise ImagingError(label_nifti, "label names must be given for labels 1..K, consecutively, "
                                        "each non-empty (DICOM SEG segment numbers)", case_id)
    if segmentation_type.upper() not in ("BINARY", "LABELMAP"):
        raise ImagingError(label_nifti, "segmentation type must be BINARY or LABELMAP", case_id)

    volume = read_image(image_nifti, case=case_id)
    labels = read_mask(label_nifti, volume, set(numbers), case=case_id)
    affine = volume.affine
    gap, row_spacing, col_spacing = volume.spacing
    axes = affine[:3, :3] / np.array(volume.spacing)
    if np.abs(axes.T @ axes - np.eye(3)).max() > 1e-4:
        raise ImagingError(image_nifti, "the NIfTI affine is sheared (axes not orthogonal); "
                                        "DICOM slices cannot represent it without resampling", case_id)
    if not np.all(np.isfinite(volume.array)):
        raise ImagingError(image_nifti, "image holds NaN or infinite values", case_id)

    case_dir = out_dir / case_id
    series_dir = case_dir / "mr"
    seg_file = case_dir / "seg.dcm"
    if (series_dir.exists() and any(series_dir.iterdir())) or seg_file.exists():
        raise ImagingError(case_dir, "output already exists; remove it first (new UIDs would mix series)", case_id)
    series_dir.mkdir(parents=True, exist_ok=True)

    slope, intercept = rescale_for(volume.array)
    stored = np.clip(np.round((volume.array.astype(np.float64) - intercept) / slope), 0, MAX_STORED).astype(np.uint16)

    low, high = float(volume.array.min()), float(volume.array.max())
    window_center, window_width = (low + high) / 2, max(high - low, 1.0)
    study_uid, series_uid, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    row_cos, col_cos = axes[:, 2], axes[:, 1]
    normal = axes[:, 0]
    slices = []
    for z in range(stored.shape[0]):
        ds = _mr_slice(case_id, study_uid, series_uid, frame_of_reference, z)
        position = affine[:3, :3] @ np.array([z, 0.0, 0.0]) + affine[:3, 3]
        ds.ImagePositionPatient = [DSfloat(v, auto_format=True) for v in position]
        ds.ImageOrientationPatient = [DSfloat(v, auto_format=True) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [DSfloat(row_spacing, auto_format=True), DSfloat(col_spacing, auto_format=True)]
        ds.SliceThickness = DSfloat(gap, auto_format=True)
        ds.SpacingBetweenSlices = DSfloat(gap, auto_format=True)
        ds.SliceLocation = DSfloat(float(position @ normal), auto_format=True)
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.RescaleSlope = DSfloat(slope, auto_format=True)
        ds.RescaleIntercept = DSfloat(intercept, auto_format=True)
        ds.RescaleType = "US"  # unspecified units: MR intensities
        ds.WindowCenter = DSfloat(window_center, auto_format=True)
        ds.WindowWidth = DSfloat(window_width, auto_format=True)
        ds.SmallestImagePixelValue = int(stored[z].min())
        ds.LargestImagePixelValue = int(stored[z].max())
        ds.PixelData = np.ascontiguousarray(stored[z]).tobytes()
        ds.save_as(series_dir / f"MR{z + 1:04d}.dcm", enforce_file_format=True)
        slices.append(ds)

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=str(label_names[k])[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            # No standard code is known for an arbitrary label name: a private ("99") scheme.
            segmented_property_type=hd.sr.CodedConcept(f"L{k}", "99CAREFL", str(label_names[k])[:64]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for k in numbers
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=slices,
            pixel_array=labels,
            segmentation_type=segmentation_type.upper(),
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=2,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="carefl",
            manufacturer_model_name=SOFTWARE,
            software_versions="1",
            device_serial_number="none",
            series_description=f"labels {case_id}",
        )
    except Exception as exc:  # noqa: BLE001
        raise ImagingError(label_nifti, f"could not build the DICOM SEG ({type(exc).__name__})", case_id) from None
    seg.PatientIdentityRemoved = "YES"
    seg.DeidentificationMethod = DEID_METHOD
    seg.save_as(seg_file)
    return series_dir, seg_file


def rescale_for(array: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) mapping [0, 65535] onto the array's range; exact for whole numbers that
    fit, else quantisation error ≤ range / 131070. Both are rounded to what a DS string holds
    first, so the stored values are computed with the exact numbers a reader will apply."""
    low, high = float(array.min()), float(array.max())
    whole = np.array_equal(array, np.round(array))
    if whole and high - low <= MAX_STORED:
        slope, intercept = 1.0, (0.0 if low >= 0 and high <= MAX_STORED else low)
    else:
        slope, intercept = (high - low) / MAX_STORED if high > low else 1.0, low
    return float(DSfloat(slope, auto_format=True)), float(DSfloat(intercept, auto_format=True))


def _mr_slice(case_id: str, study_uid: str, series_uid: str, frame_of_reference: str, z: int) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["DERIVED", "SECONDARY"]
    # Patient: synthetic and obviously fake; type-2 attributes present but empty.
    ds.PatientName = f"CAREFL^SYNTHETIC^{case_id}"
    ds.PatientID = f"CAREFL-FAKE-{case_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEID_METHOD
    # Study / series / equipment.
    ds.StudyInstanceUID = study_uid
    ds.StudyID = case_id[:16]
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"MR {case_id}"
    ds.Modality = "MR"
    ds.Manufacturer = "carefl"
    ds.ManufacturerModelName = SOFTWARE
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = z + 1
    # MR image module (acquisition unknown for converted data).
    ds.ScanningSequence = "RM"  # research mode
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.EchoTime = None
    ds.RepetitionTime = None
    ds.EchoTrainLength = None
    # Pixels: 16-bit unsigned grey-scale.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    return ds
