"""Images and masks from any of the formats sites hold (DICOM series, NIfTI, .npy, DICOM SEG),
always as (z, y, x) arrays on the image's own grid, so a mask can never be silently misaligned.

NIfTI → our convention: nibabel's affine maps (i, j, k) to RAS; we negate x and y to get LPS,
store the array as (k, j, i) = (z, y, x), and, when the result's handedness differs from what a
DICOM series gives (det of the 3×3 part > 0), flip the row (y) axis. That is exactly the flip
dcm2niix applies when it writes a series, so a converted series and its DICOM original load
voxel for voxel the same, and a NIfTI round-trips through ``dicomize_case`` unchanged.

A mask is put on the reference grid only by axis permutations and flips that its affine says
are exact; anything else (other spacing, rotation, offset, size) is refused, never resampled.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from client.ingest.imaging.dicom_series import read_dicom_series, read_file
from client.ingest.imaging.volume import ImagingError, Volume, spacing_of

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
ZYX_TO_IJK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
AFFINE_RTOL = 1e-3  # direction × spacing part, relative to the largest voxel size
ORIGIN_ATOL_MM = 0.01
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # SEG, label map SEG


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def read_image(path: Path, *, case: str | None = None) -> Volume:
    """A DICOM series folder or a .nii/.nii.gz file as a float32 (z, y, x) LPS Volume."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, case=case)
    if not path.exists():
        raise ImagingError(path, "image not found", case)
    if not is_nifti(path):
        raise ImagingError(path, "unknown image format: expected a DICOM series folder, .nii or .nii.gz", case)
    array, affine = read_nifti(path, case)
    return Volume(array=array.astype(np.float32), spacing=spacing_of(affine), affine=affine, modality="")


def read_nifti(path: Path, case: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI data as (z, y, x) in its stored dtype (scaling applied), and its (z, y, x) → LPS affine."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        ras = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel's messages can quote header fields
        raise ImagingError(path, f"unreadable NIfTI file ({type(exc).__name__}); truncated or not NIfTI?",
                           case) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImagingError(path, f"not a 3-D image ({data.ndim} dimensions)", case)
    affine = RAS_TO_LPS @ ras @ ZYX_TO_IJK
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImagingError(path, "the NIfTI affine (sform/qform) is missing or singular", case)
    array = data.transpose(2, 1, 0)
    if np.linalg.det(affine[:3, :3]) > 0:
        array, affine = array[:, ::-1, :], _flip_axis(affine, 1, array.shape[1])
    return np.ascontiguousarray(array), affine


def _flip_axis(affine: np.ndarray, axis: int, size: int) -> np.ndarray:
    flipped = affine.copy()
    flipped[:3, 3] = affine[:3, 3] + affine[:3, axis] * (size - 1)
    flipped[:3, axis] = -affine[:3, axis]
    return flipped


def read_mask(path: Path, reference: Volume, labels: set[int], *, case: str | None = None) -> np.ndarray:
    """A label map (uint8, reference.array's shape) from .nii/.nii.gz, .npy or a DICOM SEG file.

    ``labels`` is the declared set of label codes; 0 (background) is always allowed. A .npy file
    carries no geometry: it must already be (z, y, x) on the reference grid.
    """
    path = Path(path)
    declared = {int(v) for v in labels}
    if any(not 0 <= v <= 255 for v in declared):
        raise ImagingError(path, "declared label codes must lie in 0..255 (uint8 masks)", case)
    if not path.is_file():
        raise ImagingError(path, "mask file not found", case)
    if is_nifti(path):
        data, affine = read_nifti(path, case)
        data = _integral(path, data, case)
        data, affine = _onto_reference(path, data, affine, reference, case)
    elif path.name.lower().endswith(".npy"):
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise ImagingError(path, f"unreadable .npy file ({type(exc).__name__})", case) from None
        if data.shape != reference.array.shape:
            raise ImagingError(path, f"shape mismatch: mask {tuple(data.shape)} (z, y, x) vs image "
                                     f"{tuple(reference.array.shape)}", case)
        data = _integral(path, data, case)
    else:
        data = _read_seg(path, reference, case)
    _check_labels(path, data, declared, case)
    return np.ascontiguousarray(data.astype(np.uint8))


def _integral(path: Path, data: np.ndarray, case: str | None) -> np.ndarray:
    """Label values as int64; floats are fine when they are whole numbers (some tools save floats)."""
    if data.dtype == bool or np.issubdtype(data.dtype, np.integer):
        return data.astype(np.int64)
    if not np.issubdtype(data.dtype, np.floating):
        raise ImagingError(path, f"label data of type {data.dtype} is not numeric", case)
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise ImagingError(path, "non-integral values in a label file (a probability map or an "
                                 "interpolated mask?); label maps hold whole label codes", case)
    return data.astype(np.int64)


def _check_labels(path: Path, data: np.ndarray, declared: set[int], case: str | None) -> None:
    unexpected = sorted(set(np.unique(data).tolist()) - declared - {0})
    if unexpected:
        raise ImagingError(path, f"labels outside the declared set: unexpected label codes {unexpected} "
                                 f"(declared {sorted(declared)})", case)


def _onto_reference(path: Path, data: np.ndarray, affine: np.ndarray, reference: Volume,
                    case: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Permute / flip the mask's axes onto the reference grid when its affine says so; then
    refuse any remaining difference in size ("shape mismatch") or position ("geometry differs")."""
    to_reference = np.linalg.inv(reference.affine) @ affine  # mask index → reference index
    rotation = to_reference[:3, :3]
    signed_perm = np.round(rotation)
    if (np.abs(rotation - signed_perm).max() < 1e-2 and np.all(np.abs(signed_perm).sum(axis=0) == 1)
            and np.all(np.abs(signed_perm).sum(axis=1) == 1)):
        source_axis = np.abs(signed_perm).argmax(axis=1)  # for each reference axis
        data = data.transpose(source_axis)
        index_map = np.zeros((4, 4))  # new index → old index
        index_map[3, 3] = 1
        for axis, src in enumerate(source_axis):
            index_map[src, axis] = 1
        affine = affine @ index_map
        for axis, src in enumerate(source_axis):
            if signed_perm[axis, src] < 0:
                data = np.flip(data, axis)
                affine = _flip_axis(affine, axis, data.shape[axis])
    if data.shape != reference.array.shape:
        raise ImagingError(path, f"shape mismatch: mask {tuple(data.shape)} vs image "
                                 f"{tuple(reference.array.shape)} (z, y, x)", case)
    if not same_geometry(affine, reference.affine):
        raise ImagingError(path, "geometry differs: the mask's affine does not match the image's "
                                 f"(beyond {AFFINE_RTOL:g} relative / {ORIGIN_ATOL_MM} mm); "
                                 "it was made on another grid or another image", case)
    return data, affine


def same_geometry(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal grids: 3×3 parts within AFFINE_RTOL of the voxel size, origins within ORIGIN_ATOL_MM."""
    scale = np.abs(b[:3, :3]).max()
    return (np.abs(a[:3, :3] - b[:3, :3]).max() <= AFFINE_RTOL * scale
            and np.abs(a[:3, 3] - b[:3, 3]).max() <= ORIGIN_ATOL_MM)


def _read_seg(path: Path, reference: Volume, case: str | None) -> np.ndarray:
    """A DICOM SEG as a label map on the reference grid: segment number k → label k.

    Each stored frame is placed on the reference slice at its PlanePositionSequence position
    (the Volume carries no SOP Instance UIDs, so matching is geometric, which also proves the
    SEG was drawn on this grid). Frames absent from the SEG are empty slices.
    """
    import highdicom as hd

    header = read_file(path, case, header_only=True)
    if str(header.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
        raise ImagingError(path, "not a DICOM Segmentation (SEG) object and not .nii/.nii.gz/.npy", case)
    try:
        seg = hd.seg.segread(path)
        frames = np.asarray(seg.pixel_array)
    except Exception as exc:  # noqa: BLE001 - keep only the type: messages can quote header values
        raise ImagingError(path, f"unreadable DICOM SEG ({type(exc).__name__})", case) from None
    seg_type = str(seg.SegmentationType).upper()
    if seg_type == "FRACTIONAL":
        raise ImagingError(path, "FRACTIONAL segmentation (probabilities); a BINARY or LABELMAP SEG is "
                                 "needed for a label map", case)
    n_frames = int(seg.get("NumberOfFrames", 1) or 1)
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    _, rows, cols = reference.array.shape
    if frames.shape[1:] != (rows, cols):
        raise ImagingError(path, f"shape mismatch: SEG frames are {frames.shape[1:]} (rows, columns), "
                                 f"image slices are {(rows, cols)}", case)
    inverse = np.linalg.inv(reference.affine)
    spacing = np.array(reference.spacing[1:])
    row_cos = reference.affine[:3, 2] / reference.spacing[2]
    col_cos = reference.affine[:3, 1] / reference.spacing[1]
    out = np.zeros(reference.array.shape, dtype=np.int64)
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    for i in range(n_frames):
        group = seg.PerFrameFunctionalGroupsSequence[i]
        try:
            position = np.array([float(v) for v in _seg_item(group, shared, "PlanePositionSequence")
                                 .ImagePositionPatient])
            orientation = np.array([float(v) for v in _seg_item(group, shared, "PlaneOrientationSequence")
                                    .ImageOrientationPatient])
            pixel_spacing = np.array([float(v) for v in _seg_item(group, shared, "PixelMeasuresSequence")
                                      .PixelSpacing])
        except (AttributeError, TypeError, ValueError):
            raise ImagingError(path, f"SEG frame {i + 1}: position, orientation or pixel spacing is "
                                     f"missing or not numeric", case) from None
        index = inverse @ np.append(position, 1.0)
        z = int(np.rint(index[0]))
        on_slice = (0 <= z < out.shape[0]
                    and np.abs(reference.affine @ np.array([z, 0, 0, 1.0]) - np.append(position, 1)).max()
                    <= ORIGIN_ATOL_MM)
        if (not on_slice or np.abs(orientation - np.concatenate([row_cos, col_cos])).max() > AFFINE_RTOL
                or np.abs(pixel_spacing - spacing).max() > AFFINE_RTOL * spacing.max()):
            raise ImagingError(path, f"geometry differs: SEG frame {i + 1} does not lie on a slice of the "
                                     f"image grid (another series, or resampled)", case)
        frame = frames[i].astype(np.int64)
        if seg_type != "LABELMAP":  # BINARY: one frame per segment and slice
            frame = np.where(frame != 0, int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber), 0)
        if np.any((frame != 0) & (out[z] != 0) & (out[z] != frame)):
            raise ImagingError(path, f"segments overlap on slice {z}: a label map needs disjoint segments", case)
        out[z] = np.where(frame != 0, frame, out[z])
    return out


def _seg_item(group, shared, sequence: str):
    """The first item of a functional-group sequence: the frame's own, else the shared one."""
    for source in (group, shared):
        if source is not None and sequence in source and len(source[sequence].value):
            return source[sequence].value[0]
    raise AttributeError(sequence)
