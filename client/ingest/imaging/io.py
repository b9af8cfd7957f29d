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

from client.ingest.imaging.dicom_series import read_dicom_series, read_file, third_party_messages
from client.ingest.imaging.volume import ImagingError, Volume, require_finite, spacing_of

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
ZYX_TO_IJK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
AFFINE_RTOL = 1e-3  # direction × spacing part, relative to the largest voxel size
ORIGIN_ATOL_MM = 0.01
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # SEG, label map SEG


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def read_image(path: Path, *, case: str | None = None, modalities: tuple[str, ...] = ()) -> Volume:
    """A DICOM series folder or a .nii/.nii.gz file as a float32 (z, y, x) LPS Volume.

    Every image passes here, so here a NaN or ±Inf voxel (in the file, or a value beyond float32's
    range after rescaling) refuses the case: it never reaches the cache, statistics or training.
    """
    path = Path(path)
    if path.is_dir():
        volume = read_dicom_series(path, case=case, modalities=modalities or None)
    else:
        if not path.exists():
            raise ImagingError(path, "image not found", case)
        if not is_nifti(path):
            raise ImagingError(path, "unknown image format: expected a DICOM series folder, .nii or .nii.gz", case)
        array, affine = read_nifti(path, case)
        with np.errstate(over="ignore", invalid="ignore"):  # counted just below, as non-finite
            array = array.astype(np.float32)
        volume = Volume(array=array, spacing=spacing_of(affine), affine=affine, modality="")
    require_finite(volume.array, path, "image", case)
    return volume


def read_nifti(path: Path, case: str | None = None, *,
               array: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI data as (z, y, x) in its stored dtype (scaling applied), and its (z, y, x) → LPS affine.

    With ``array`` (data in this file's own array order, nibabel's (x, y, z) as ``get_fdata()``
    returns it: e.g. a .npy mask saved beside the image), only the file's header is read and
    ``array`` is oriented exactly as the file's own data would be.
    """
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj) if array is None else np.asarray(array)
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


def read_mask(path: Path, reference: Volume, labels: set[int], *, case: str | None = None,
              image_file: Path | None = None) -> np.ndarray:
    """A label map (uint8, reference.array's shape) from .nii/.nii.gz, .npy or a DICOM SEG file.

    ``labels`` is the declared set of label codes; 0 (background) is always allowed. NaN/Inf
    voxels are refused (by count, never by value).

    A .npy file carries no geometry, so it must be in the array order of the image it belongs to
    (``image_file``, the manifest row's image, from which ``reference`` was read):

    - beside a NIfTI image: that file's own array order, nibabel's (x, y, z) — exactly what
      ``nib.load(image).get_fdata()`` returns, so ``np.save(mask_npy, nib.load(mask).get_fdata())``
      gives a valid .npy mask. It is then placed on the grid with the image's affine, like a NIfTI
      mask (including the row flip ``read_nifti`` applies to some files);
    - beside a DICOM series, or without ``image_file``: carefl's (z, y, x) order of
      ``reference.array`` (slices ascending along the slice normal, then rows, then columns).

    A .npy of any other shape is refused, naming the expected order and the found vs expected shape.
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
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        zyx = tuple(int(n) for n in reference.array.shape)
        nibabel_order = image_file is not None and is_nifti(Path(image_file))
        if nibabel_order:
            expected, other = zyx[::-1], zyx
            order = ("nibabel's (x, y, z) array order of its NIfTI image (as nib.load(image).get_fdata() "
                     "returns it)")
            looks = "carefl's (z, y, x) order: save the array untransposed, in the NIfTI file's own order"
        else:
            expected, other = zyx, zyx[::-1]
            order = "carefl's (z, y, x) order (slice, row, column) of the image"
            looks = "(x, y, z) order: transpose it to (z, y, x)"
        found = tuple(int(n) for n in data.shape)
        if found != expected:
            hint = f"; the found shape looks like {looks}" if found == other and other != expected else ""
            raise ImagingError(path, f"shape mismatch: a .npy mask must be in {order}: found shape {found}, "
                                     f"expected {expected}{hint}", case)
        data = _integral(path, data, case)
        if nibabel_order:
            data, affine = read_nifti(Path(image_file), case, array=data)
            data, _ = _onto_reference(path, data, affine, reference, case)
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
    require_finite(data, path, "label file", case)
    if not np.array_equal(data, np.round(data)):
        raise ImagingError(path, "non-integral values in a label file (a probability map or an "
                                 "interpolated mask?); label maps hold whole label codes", case)
    return data.astype(np.int64)


def _check_labels(path: Path, data: np.ndarray, declared: set[int], case: str | None) -> None:
    unexpected = sorted(set(np.unique(data).tolist()) - declared - {0})
    if len(unexpected) > 16:  # not a label map (an image in the mask column?): no values, only a count
        raise ImagingError(path, f"labels outside the declared set: {len(unexpected)} unexpected label codes "
                                 f"(declared {sorted(declared)}); is this an image rather than a label map?", case)
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

    The SEG must reference the image's series (ReferencedSeriesSequence) and share its
    FrameOfReferenceUID when the image carries them (a DICOM series; not NIfTI, not blanked UIDs).
    Each stored frame is then placed on the reference slice at its PlanePositionSequence position
    (the Volume carries no SOP Instance UIDs, so slices are matched geometrically, which also proves
    the SEG was drawn on this grid). Frames absent from the SEG are empty slices. pydicom's and
    highdicom's warnings become value-free log records (``third_party_messages``).
    """
    import highdicom as hd

    with third_party_messages(case, path):
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
        # The SEG must say it was made on this series, in this frame of reference (UIDs are compared,
        # never printed). An image read from NIfTI, or with blanked UIDs, has none: geometry alone decides.
        if reference.series_instance_uid:
            referenced = {str(item.get("SeriesInstanceUID", "") or "").strip()
                          for item in seg.get("ReferencedSeriesSequence") or []} - {""}
            if not referenced:
                raise ImagingError(path, "the SEG does not say which series it was made on (no "
                                         "ReferencedSeriesSequence); it cannot be matched to the image series", case)
            if reference.series_instance_uid not in referenced:
                raise ImagingError(path, "the SEG references another series: it was made on another image series "
                                         "than this case's (ReferencedSeriesSequence), even if the grids agree", case)
        seg_frame_of_reference = str(seg.get("FrameOfReferenceUID", "") or "").strip()
        if reference.frame_of_reference_uid and seg_frame_of_reference \
                and seg_frame_of_reference != reference.frame_of_reference_uid:
            raise ImagingError(path, "the SEG lies in another frame of reference than the image series "
                                     "(FrameOfReferenceUID differs): its positions do not refer to this image", case)
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
                try:  # per frame, or shared when every frame shows the same (e.g. the only) segment
                    segment = int(_seg_item(group, shared, "SegmentIdentificationSequence").ReferencedSegmentNumber)
                except (AttributeError, TypeError, ValueError):
                    raise ImagingError(path, f"SEG frame {i + 1}: no ReferencedSegmentNumber (which segment the "
                                             f"frame shows)", case) from None
                frame = np.where(frame != 0, segment, 0)
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
