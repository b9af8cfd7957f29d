"""The one in-memory form of an image at a site, and the error every imaging reader raises.

Convention (used by every reader so masks and images line up without guessing):
array axes are (z, y, x) = (slice, row, column); ``affine`` maps a voxel index (z, y, x, 1) to
patient LPS millimetres (DICOM's patient coordinate system), so column 0 is the slice step,
column 1 the step between rows, column 2 the step between columns, column 3 the first voxel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.errors import SiteError


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays is ambiguous; compare fields explicitly
class Volume:
    """A 3-D scalar image: float32 (z, y, x) array, spacing in mm (z, y, x), index → LPS affine."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str = ""  # DICOM Modality ("CT", "MR", ...), or "" if unknown (NIfTI does not record it)
    series_instance_uid: str | None = None  # DICOM series read: its SeriesInstanceUID (None: blank, or NIfTI)
    frame_of_reference_uid: str | None = None  # DICOM series read: its FrameOfReferenceUID (None: blank, or NIfTI)

    def __post_init__(self) -> None:
        if self.array.ndim != 3 or np.asarray(self.affine).shape != (4, 4) or len(self.spacing) != 3:
            raise ValueError("Volume needs a 3-D array, a 4x4 affine and 3 spacings")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)


class ImagingError(SiteError):
    """An image or mask the site cannot use. The message names the case (if known), the file and
    the reason; it never carries a DICOM attribute value or a pixel value. It stays at the site
    (log, CLI); the coordinator gets only ``public``. ``case``, ``path`` and ``reason`` are kept separately so
    a caller can forward less (e.g. only the reason) when paths themselves are sensitive."""

    public = "an image or mask at the site is unusable"

    def __init__(self, path: Path | str, reason: str, case: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.case = case
        prefix = f"case {case}: " if case else ""
        super().__init__(f"{prefix}{self.path}: {reason}")


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along (z, y, x): the lengths of the affine's first three columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def count_nonfinite(array: np.ndarray) -> int:
    """How many entries of ``array`` are NaN or ±Inf (always 0 for integer and bool arrays)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def require_finite(array: np.ndarray, path: Path | str, what: str, case: str | None = None) -> None:
    """Refuse an image or mask holding NaN or ±Inf voxels: one such voxel turns the normalisation
    statistics, and with them the whole cached volume, training and the update, into NaN. The
    message gives only how many voxels are affected, never a value or where they are."""
    n = count_nonfinite(array)
    if n:
        raise ImagingError(path, f"{n} non-finite voxel{'s' if n != 1 else ''} (NaN/Inf) in the {what}; "
                                 f"refused: they would make the cached volume and training NaN", case)
