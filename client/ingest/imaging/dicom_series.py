"""Read one DICOM series (a folder of slices, or multi-frame files) into a (z, y, x) LPS Volume.

Hospitals export series as loose files in any order, sometimes compressed, sometimes as one
enhanced multi-frame file; a silent mistake here (a missing slice, two series mixed, a wrong
slice order) would corrupt training without any visible error, so every such case is refused
with a message that names the file and the reason and never a value read from the file.

Only image objects are read: the SOP class must be a CT, MR or PET image storage class (classic,
enhanced or legacy converted enhanced; ``IMAGE_SOP_CLASSES``), and when the dataset declares its
modalities, the SOP class and Modality must match them. An RT dose grid, a secondary capture or a
SEG has pixel data too, but is refused by name.

pydicom (and highdicom) warn through ``warnings`` and their loggers, quoting header values; every
read here runs inside ``third_party_messages`` (client/ingest/imaging/third_party.py), which turns those into
carefl log records that name only the kind of problem and the DICOM keywords / VRs involved.

(Over 400 lines on purpose: reading a series and refusing each way an export can be wrong — object class,
geometry, slice order, pixel decoding — is one job, and each check sits beside the read it guards.)

Geometry: slices are sorted by ImagePositionPatient projected on the slice normal
n = row cosine × column cosine (ascending), so the affine's columns are
(n · slice gap, column cosine · row spacing, row cosine · column spacing) and its origin is the
first sorted slice's position. Such an affine always has a negative determinant; the NIfTI reader
(``client.ingest.imaging.io``) produces the same handedness so both paths agree voxel for voxel.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import UID, JPEGExtended12Bit

from client.ingest.imaging.third_party import third_party_messages
from client.ingest.imaging.volume import ImagingError, Volume

log = logging.getLogger("carefl.imaging")

# Attributes that identify a patient (or the people and places around the patient), after the
# HIPAA Safe Harbor identifiers and DICOM PS3.15 Annex E. Only their KEYWORDS are ever reported.
# Not listed on purpose: dates/times of the study (quasi-identifiers every image carries), UIDs,
# age and sex; the site's de-identification profile governs those.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientInsurancePlanCodeSequence",
    "MedicalRecordLocator",
    "MilitaryRank",
    "BranchOfService",
    "EthnicGroup",
    "Occupation",
    "PatientReligiousPreference",
    "RegionOfResidence",
    "CountryOfResidence",
    "PatientComments",
    "AdditionalPatientHistory",
    "ResponsiblePerson",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "AccessionNumber",
)

# Which package decodes each compressed transfer syntax (pydicom's own plugin names).
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pillow or pylibjpeg-libjpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg (pillow only for 8-bit)",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg (or python-gdcm)",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg (or python-gdcm)",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg or pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg or pyjpegls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE Lossless
}

# The image storage SOP classes read as volumes, and the Modality each one holds. Anything else with
# pixel data (RT Dose, Secondary Capture, SEG, ultrasound, projection X-ray, ...) is refused.
IMAGE_SOP_CLASSES = {
    dicom_uid.CTImageStorage: "CT",
    dicom_uid.EnhancedCTImageStorage: "CT",
    dicom_uid.LegacyConvertedEnhancedCTImageStorage: "CT",
    dicom_uid.MRImageStorage: "MR",
    dicom_uid.EnhancedMRImageStorage: "MR",
    dicom_uid.LegacyConvertedEnhancedMRImageStorage: "MR",
    dicom_uid.PositronEmissionTomographyImageStorage: "PT",
    dicom_uid.EnhancedPETImageStorage: "PT",
    dicom_uid.LegacyConvertedEnhancedPETImageStorage: "PT",
}
MODALITY_ALIASES = {"PET": "PT"}  # what a site may write in its config → the DICOM Modality code
# DICOM Modality defined terms (PS3.3 C.7.3.1.1.1) that a refusal may name; any other value is not quoted.
KNOWN_MODALITIES = frozenset({
    "AR", "AU", "BDUS", "BI", "BMD", "CR", "CT", "DG", "DOC", "DX", "ECG", "EPS", "ES", "FID", "GM", "HC", "HD",
    "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN", "LS", "MG", "MR", "M3D", "NM", "OAM", "OCT", "OP", "OPM",
    "OPT", "OPV", "OSS", "OT", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE",
    "RTPLAN", "RTRECORD", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF", "STAIN", "TG", "US", "VA", "XA",
    "XC",
})

DUPLICATE_MM = 0.01  # slices closer than this along the normal are the same position
GAP_RTOL, GAP_ATOL_MM = 0.01, 0.01  # a gap may differ from the median by max(1 %, 0.01 mm)
ORIENT_TOL = 1e-4  # direction cosines, unitless
SPACING_RTOL = 1e-4  # pixel spacing between files


@dataclass
class _Frame:
    path: Path
    ds: Dataset
    index: int  # frame number inside the file (0 for single-frame files)
    position: np.ndarray
    row_cos: np.ndarray  # direction of increasing column index
    col_cos: np.ndarray  # direction of increasing row index
    pixel_spacing: np.ndarray  # (between rows, between columns) mm
    slope: float
    intercept: float

    @property
    def where(self) -> str:
        multi = int(self.ds.get("NumberOfFrames", 1) or 1) > 1
        return f"{self.path.name} (frame {self.index + 1})" if multi else self.path.name


# --- reading ---------------------------------------------------------------------------------------

def series_files(folder: Path, case: str | None = None) -> list[Path]:
    """Every file of a series folder, sorted; hidden files and a DICOMDIR index are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImagingError(folder, "not a folder (a DICOM series is read from its folder)", case)
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")
    if not files:
        raise ImagingError(folder, "no DICOM files in the folder", case)
    return files


def read_file(path: Path, case: str | None = None, *, header_only: bool = False) -> Dataset:
    """One DICOM file; a non-DICOM or unreadable file becomes an ImagingError naming it. pydicom
    converts values when they are first used: callers keep later use inside ``third_party_messages``."""
    try:
        with third_party_messages(case, path):
            return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        raise ImagingError(path, "not a DICOM file (no DICOM preamble / file meta header)", case) from None
    except Exception as exc:  # noqa: BLE001 - pydicom's messages may quote values; keep only the type
        raise ImagingError(path, f"unreadable DICOM file ({type(exc).__name__})", case) from None


def read_dicom_series(folder: Path, *, case: str | None = None,
                      modalities: Iterable[str] | None = None) -> Volume:
    """All files of ``folder`` as one float32 (z, y, x) Volume, rescaled (HU for CT), carrying the
    series' SeriesInstanceUID and FrameOfReferenceUID (None when blank, e.g. anonymised).

    ``modalities``: what the dataset declares (e.g. ``{"MR"}``; "PET" means "PT"); every file's
    SOP class and Modality must match. Without it, any CT / MR / PET image storage class is read.
    """
    folder = Path(folder)
    with third_party_messages(case, folder):
        return _read_series(folder, case, _declared(folder, modalities, case))


def _declared(folder: Path, modalities: Iterable[str] | None, case: str | None) -> frozenset[str]:
    if modalities is None:
        return frozenset()
    if isinstance(modalities, str):
        modalities = [modalities]
    declared = frozenset(MODALITY_ALIASES.get(m.strip().upper(), m.strip().upper()) for m in modalities)
    unknown = sorted(declared - set(IMAGE_SOP_CLASSES.values()))
    if not declared or unknown:
        raise ImagingError(folder, f"the dataset declares modalities {sorted(declared)}; carefl reads CT, MR and "
                                   f"PT (PET) image series", case)
    return declared


def _modality_named(modality: str) -> str:
    return modality if modality in KNOWN_MODALITIES else ("none" if not modality else "an unrecognised value")


def _check_image_object(path: Path, ds: Dataset, declared: frozenset[str], case: str | None) -> None:
    """Refuse what is not an image of the declared modalities: by SOP class, then by Modality."""
    sop = str(ds.get("SOPClassUID", "") or "").strip()
    meta = getattr(ds, "file_meta", None)
    if not sop and meta is not None:  # some anonymisers blank the dataset's copy; the file meta keeps it
        sop = str(meta.get("MediaStorageSOPClassUID", "") or "").strip()
    if not sop:
        raise ImagingError(path, "no SOPClassUID (nor MediaStorageSOPClassUID): cannot tell an image from "
                                 "another DICOM object", case)
    name = UID(sop).name
    name = name if name != sop else "an unrecognised SOP class"
    wanted = [m if m != "PT" else "PET" for m in sorted(declared or set(IMAGE_SOP_CLASSES.values()))]
    wanted_text = wanted[0] if len(wanted) == 1 else f"{', '.join(wanted[:-1])} or {wanted[-1]}"
    expected = f"{wanted_text} image storage (classic, enhanced or legacy converted enhanced)"
    kind = IMAGE_SOP_CLASSES.get(sop)
    if kind is None:
        raise ImagingError(path, f"not an image series: SOP class {name}; expected {expected}", case)
    if declared and kind not in declared:
        raise ImagingError(path, f"SOP class {name}, but the dataset declares {', '.join(sorted(declared))}: "
                                 f"expected {expected}", case)
    if declared:
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if modality not in declared:
            raise ImagingError(path, f"Modality is {_modality_named(modality)}, but the dataset declares "
                                     f"{', '.join(sorted(declared))}", case)


def _read_series(folder: Path, case: str | None, declared: frozenset[str]) -> Volume:
    datasets = [(p, read_file(p, case)) for p in series_files(folder, case)]
    for path, ds in datasets:
        _check_image_object(path, ds, declared, case)

    # Some anonymisers blank SeriesInstanceUID; such files count as one series of their own
    # (the geometry checks below still catch two stacks mixed in one folder).
    series: dict[str, list[Path]] = {}
    for path, ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        series.setdefault(uid, []).append(path)
    if "" in series and len(series) == 1:
        log.info("%s: no SeriesInstanceUID in the files (anonymised?); reading the folder as one series", folder)
    if len(series) > 1:
        raise ImagingError(folder, f"mixed series: {len(series)} series in one folder "
                                   f"(export one series per folder)", case)

    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "") or "").strip() for _, ds in datasets} - {""}
    if len(frames_of_reference) > 1:
        raise ImagingError(folder, f"files of one series lie in {len(frames_of_reference)} frames of reference "
                                   f"(FrameOfReferenceUID differs): their positions cannot be compared", case)

    frames = [frame for path, ds in datasets for frame in _frames_of(path, ds, case)]
    _check_consistent(frames, case)
    first = frames[0]
    normal = np.cross(first.row_cos, first.col_cos)
    frames, gap = _sorted_along(frames, normal, case)

    rows, cols = int(first.ds.Rows), int(first.ds.Columns)
    array = np.empty((len(frames), rows, cols), dtype=np.float32)
    pixels: dict[Path, np.ndarray] = {}
    for z, frame in enumerate(frames):
        if frame.path not in pixels:
            pixels[frame.path] = _decode(frame.path, frame.ds, case)
        stored = pixels[frame.path][frame.index]
        array[z] = (stored.astype(np.float64) * frame.slope + frame.intercept).astype(np.float32)

    row_spacing, col_spacing = (float(v) for v in first.pixel_spacing)
    affine = np.eye(4)
    affine[:3, 0] = normal * gap
    affine[:3, 1] = first.col_cos * row_spacing
    affine[:3, 2] = first.row_cos * col_spacing
    affine[:3, 3] = frames[0].position
    modality = str(first.ds.get("Modality", "") or "").strip().upper()
    series_uid = next(iter(series))
    return Volume(array=array, spacing=(float(gap), row_spacing, col_spacing), affine=affine,
                  modality=modality, series_instance_uid=series_uid or None,
                  frame_of_reference_uid=next(iter(frames_of_reference), None))


def _frames_of(path: Path, ds: Dataset, case: str | None) -> list[_Frame]:
    """The geometry of every frame of one file (classic: one frame; enhanced: functional groups)."""
    if not any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImagingError(path, "no pixel data (not an image, or the file is truncated)", case)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImagingError(path, "colour image (SamplesPerPixel > 1); a grey-scale CT/MR series is expected", case)
    for kw in ("Rows", "Columns"):
        if not ds.get(kw):
            raise ImagingError(path, f"no {kw}", case)
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ImagingError(path, "NumberOfFrames is not an integer", case) from None
    if n_frames > 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        raise ImagingError(path, "multi-frame file without PerFrameFunctionalGroupsSequence: "
                                 "no position per frame", case)
    if "PerFrameFunctionalGroupsSequence" in ds and len(ds.PerFrameFunctionalGroupsSequence) != n_frames:
        raise ImagingError(path, "PerFrameFunctionalGroupsSequence does not have one item per frame", case)

    frames = []
    for i in range(n_frames):
        get = functools.partial(_functional, ds, i)  # (sequence, keyword) → value for frame i
        position = _numbers(path, get("PlanePositionSequence", "ImagePositionPatient"), 3,
                            "ImagePositionPatient", case)
        orientation = _numbers(path, get("PlaneOrientationSequence", "ImageOrientationPatient"), 6,
                               "ImageOrientationPatient", case)
        spacing = _numbers(path, get("PixelMeasuresSequence", "PixelSpacing"), 2, "PixelSpacing", case)
        if np.any(spacing <= 0):
            raise ImagingError(path, "PixelSpacing is not positive", case)
        row_cos, col_cos = orientation[:3], orientation[3:]
        if (abs(np.linalg.norm(row_cos) - 1) > 1e-3 or abs(np.linalg.norm(col_cos) - 1) > 1e-3
                or abs(float(row_cos @ col_cos)) > 1e-3):
            raise ImagingError(path, "ImageOrientationPatient is not two orthogonal unit vectors", case)
        slope = get("PixelValueTransformationSequence", "RescaleSlope")
        intercept = get("PixelValueTransformationSequence", "RescaleIntercept")
        try:
            slope = 1.0 if slope in (None, "") else float(slope)
            intercept = 0.0 if intercept in (None, "") else float(intercept)
        except (TypeError, ValueError):
            raise ImagingError(path, "RescaleSlope / RescaleIntercept is not a number", case) from None
        frames.append(_Frame(path, ds, i, position, row_cos / np.linalg.norm(row_cos),
                             col_cos / np.linalg.norm(col_cos), spacing, slope, intercept))
    return frames


def _functional(ds: Dataset, frame: int, sequence: str, keyword: str):
    """An attribute from the frame's functional group, else the shared group, else the top level."""
    groups = []
    if "PerFrameFunctionalGroupsSequence" in ds:
        groups.append(ds.PerFrameFunctionalGroupsSequence[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)


def _numbers(path: Path, value, count: int, keyword: str, case: str | None) -> np.ndarray:
    if value is None or value == "":
        raise ImagingError(path, f"no {keyword}", case)
    try:
        numbers = np.array([float(v) for v in (value if count > 1 else [value])], dtype=np.float64)
    except (TypeError, ValueError):
        raise ImagingError(path, f"{keyword} is not numeric", case) from None
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise ImagingError(path, f"{keyword} does not hold {count} finite numbers", case)
    return numbers


def _check_consistent(frames: list[_Frame], case: str | None) -> None:
    first = frames[0]
    for frame in frames[1:]:
        if (int(frame.ds.Rows), int(frame.ds.Columns)) != (int(first.ds.Rows), int(first.ds.Columns)):
            raise ImagingError(frame.path, f"Rows/Columns differ from {first.path.name} in the same series", case)
        if (np.abs(frame.row_cos - first.row_cos).max() > ORIENT_TOL
                or np.abs(frame.col_cos - first.col_cos).max() > ORIENT_TOL):
            raise ImagingError(frame.path, f"ImageOrientationPatient differs from {first.path.name} "
                                           f"in the same series", case)
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=SPACING_RTOL, atol=0):
            raise ImagingError(frame.path, f"PixelSpacing differs from {first.path.name} in the same series", case)


def _sorted_along(frames: list[_Frame], normal: np.ndarray, case: str | None) -> tuple[list[_Frame], float]:
    """Frames sorted along the normal, and the slice gap; refuses duplicates, gaps and shear."""
    distance = np.array([f.position @ normal for f in frames])
    order = np.argsort(distance, kind="stable")
    frames = [frames[i] for i in order]
    distance = distance[order]
    folder = frames[0].path.parent
    if len(frames) == 1:
        return frames, _single_slice_gap(frames[0])
    gaps = np.diff(distance)
    for k in np.flatnonzero(gaps < DUPLICATE_MM):
        raise ImagingError(folder, f"duplicate slice position: {frames[k].where} and {frames[k + 1].where} "
                                   f"lie at the same place on the slice normal", case)
    median = float(np.median(gaps))
    for k in np.flatnonzero(np.abs(gaps - median) > max(GAP_RTOL * median, GAP_ATOL_MM)):
        raise ImagingError(folder, f"inconsistent slice spacing: the gap between {frames[k].where} and "
                                   f"{frames[k + 1].where} is {gaps[k] / median:.2f}× the median gap "
                                   f"(a missing slice, or slices of different spacing)", case)
    steps = np.diff(np.stack([f.position for f in frames]), axis=0)
    in_plane = steps - np.outer(gaps, normal)
    if np.linalg.norm(in_plane, axis=1).max() > max(GAP_RTOL * median, GAP_ATOL_MM):
        raise ImagingError(folder, "slices are not stacked along the slice normal (gantry tilt or "
                                   "sheared acquisition); resample the series first", case)
    return frames, float(distance[-1] - distance[0]) / (len(frames) - 1)


def _single_slice_gap(frame: _Frame) -> float:
    """One slice has no neighbour: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _functional(frame.ds, frame.index, "PixelMeasuresSequence", keyword)
        try:
            if value not in (None, "") and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            pass
    return 1.0


def _decode(path: Path, ds: Dataset, case: str | None) -> np.ndarray:
    """Stored pixel values as (frames, rows, cols); names the package when no decoder is installed."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise ImagingError(path, "no TransferSyntaxUID in the file meta header", case)
    ts = UID(str(ts))
    label = f"transfer syntax {ts.name} ({ts})" if ts.name != ts else f"transfer syntax {ts}"
    if ts.is_compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise ImagingError(path, f"unsupported {label}: no pydicom pixel decoder exists for it", case) from None
        if not decoder.is_available:
            package = _DECODER_PACKAGES.get(str(ts)) or "; ".join(decoder.missing_dependencies)
            raise ImagingError(path, f"cannot decode {label}: no pixel decoder installed; "
                                     f"install {package}", case)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    with third_party_messages(case, path) as heard:
        start = len(heard.records)
        try:
            array = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - keep only the type: messages can quote header values
            # pydicom logs each plugin's exception; NotImplementedError is how a plugin says "not supported"
            failed = [r.exc_info[0] for r in heard.records[start:] if r.exc_info and r.exc_info[0]]
            heard.records[start:] = [r for r in heard.records[start:] if not r.exc_info]  # reported below instead
            _undecodable(path, ds, ts, label, failed, exc, case)
    array = np.asarray(array)
    if n_frames == 1 and array.ndim == 2:
        array = array[np.newaxis]
    if array.shape != (n_frames, int(ds.Rows), int(ds.Columns)):
        raise ImagingError(path, "decoded pixel data does not have Rows × Columns × frames samples", case)
    return array


def _undecodable(path: Path, ds: Dataset, ts: UID, label: str, failed: list[type], exc: Exception,
                 case: str | None) -> None:
    """The ImagingError for pixel data that did not decode: unsupported by every installed plugin
    (e.g. 12-bit JPEG Extended with only Pillow), else truncated or corrupt."""
    if ts.is_compressed and failed and all(issubclass(t, NotImplementedError) for t in failed):
        decoder = get_decoder(ts)
        installed = ", ".join(decoder.available_plugins) or "none"
        package = _DECODER_PACKAGES.get(str(ts)) or "; ".join(decoder.missing_dependencies) or "another decoder"
        what = "this file's pixel data"
        try:
            if ts == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8:
                what, package = ("JPEG Extended with more than 8 bits per sample",
                                 "pylibjpeg and pylibjpeg-libjpeg (pydicom's Pillow and GDCM plugins decode 8-bit "
                                 "JPEG Extended only)")
        except (TypeError, ValueError):
            pass
        raise ImagingError(path, f"cannot decode {label}: no installed decoder handles {what} (installed pydicom "
                                 f"plugin(s): {installed}, which do not support it); install {package}",
                           case) from None
    if not ts.is_compressed:
        raise ImagingError(path, f"pixel data is shorter or longer than Rows × Columns × frames "
                                 f"needs (file truncated?) ({type(exc).__name__})", case) from None
    raise ImagingError(path, f"pixel data could not be decoded as {label}; the file may be truncated "
                             f"or corrupt ({type(exc).__name__})", case) from None


def _header_datasets(source: Path | Dataset, case: str | None = None) -> list[Dataset]:
    if isinstance(source, Dataset):
        return [source]
    source = Path(source)
    files = [source] if source.is_file() else series_files(source, case)
    return [read_file(p, case, header_only=True) for p in files]


def _non_empty(value) -> bool:
    if value is None:
        return False
    if isinstance(value, Sequence):
        return len(value) > 0
    if isinstance(value, (list, tuple, MultiValue)):
        return any(_non_empty(v) for v in value)
    if isinstance(value, bytes):
        return value.strip(b"\x00 ") != b""
    return str(value).strip("\x00 ^=") != ""  # a PersonName of only separators is empty


def phi_attributes(folder_or_dataset: Path | Dataset, *, case: str | None = None) -> list[str]:
    """Sorted KEYWORDS of PHI_KEYWORDS attributes with a non-empty value anywhere (nested sequences
    included) in any file of the folder, the file, or the dataset. Never returns a value."""
    found = set()
    where = None if isinstance(folder_or_dataset, Dataset) else Path(folder_or_dataset)
    with third_party_messages(case, where):  # iterall converts every value: pydicom warns about invalid ones
        for ds in _header_datasets(folder_or_dataset, case):
            for element in ds.iterall():
                if element.keyword in PHI_KEYWORDS and _non_empty(element.value):
                    found.add(element.keyword)
    return sorted(found)


def declares_deidentified(folder_or_dataset: Path | Dataset, *, case: str | None = None) -> bool:
    """True when every file says PatientIdentityRemoved = YES (a claim, checked by phi_attributes)."""
    where = None if isinstance(folder_or_dataset, Dataset) else Path(folder_or_dataset)
    with third_party_messages(case, where):
        return all(str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES"
                   for ds in _header_datasets(folder_or_dataset, case))
