"""Preprocessing to a training cache at the site, keyed by content hash.

Flower starts a new ClientApp process for every message, so a round must not re-read DICOM and
re-resample every volume: each case is preprocessed once (resample to a target spacing, intensity
normalisation per modality, centre crop/pad — MONAI transforms) and stored as ``<sha256>.npz``,
where the hash covers the input files' bytes and the preprocessing settings. Changed data or
settings give a new key; unchanged data is a file read. Hashing a file's bytes is itself skipped
while its (size, mtime) are unchanged, via a small memo in the cache folder.

Nothing non-finite is ever cached or served: ``read_image`` / ``read_mask`` refuse NaN/Inf input, the
preprocessed arrays are checked again before they are written, and a cached entry holding NaN/Inf
(written before this check existed) is discarded and preprocessed anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResizeWithPadOrCrop, Spacing

from client.ingest.imaging.io import read_image, read_mask
from client.ingest.imaging.manifest import Case
from client.ingest.imaging.volume import Volume, count_nonfinite, require_finite

CT_WINDOW = (-1000.0, 1000.0)


@dataclass(frozen=True)
class PreprocessSpec:
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm, (z, y, x)
    shape: tuple[int, int, int] = (48, 64, 48)             # voxels after centre crop/pad
    version: int = 1                                        # bump when the code below changes

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def normalise(array: np.ndarray, modality: str) -> np.ndarray:
    """CT: clip to [−1000, 1000] HU and scale to [−1, 1]; otherwise z-score over the non-zero voxels."""
    if modality == "CT":
        low, high = CT_WINDOW
        return ((np.clip(array, low, high) - low) / (high - low) * 2 - 1).astype(np.float32)
    body = array[array != 0]
    ref = body if body.size else array.ravel()
    return ((array - ref.mean()) / (ref.std() + 1e-8)).astype(np.float32)


def on_model_grid(array: np.ndarray, affine: np.ndarray, spec: PreprocessSpec, mode: str) -> MetaTensor:
    """A (z, y, x) array resampled to the spec's spacing (``mode``: bilinear for images, nearest for labels),
    then centre-cropped/padded to its shape: [1, z, y, x], its affine the grid's in patient space."""
    volume = MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None],
                        affine=torch.as_tensor(affine, dtype=torch.float64))
    return ResizeWithPadOrCrop(spatial_size=spec.shape)(Spacing(pixdim=spec.spacing, mode=mode)(volume))


def preprocess(image: Volume, mask: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """→ image [1, z, y, x] float32 and label map [z, y, x] uint8, on the target grid and shape."""
    img = on_model_grid(image.array, image.affine, spec, "bilinear").numpy()
    lab = on_model_grid(mask, image.affine, spec, "nearest").numpy()[0]
    return normalise(img, image.modality), np.rint(lab).astype(np.uint8)


def _file_digest(path: Path, memo: dict) -> str:
    stat = path.stat()
    signature = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    if signature not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        memo[signature] = digest.hexdigest()
    return memo[signature]


class PreprocessCache:
    def __init__(self, folder: Path, spec: PreprocessSpec, labels: set[int]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.labels = labels
        self._memo_path = self.folder / "file-digests.json"
        try:
            self._memo = json.loads(self._memo_path.read_text())
        except (OSError, ValueError):
            self._memo = {}
        self.hits = 0
        self.misses = 0

    def key(self, case: Case) -> str:
        """SHA-256 over every input file's bytes (in a stable order) and the preprocessing settings."""
        files = sorted(p for p in case.image.rglob("*") if p.is_file()) if case.image.is_dir() else [case.image]
        digest = hashlib.sha256(self.spec.key().encode())
        digest.update(json.dumps(sorted(self.labels)).encode())
        for path in files + [case.mask]:
            digest.update(_file_digest(path, self._memo).encode())
        return digest.hexdigest()

    def load(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        target = self.folder / f"{self.key(case)}.npz"
        if target.exists():
            with np.load(target) as data:
                x, y = data["image"], data["label"]
            if count_nonfinite(x) == 0 and count_nonfinite(y) == 0:
                self.hits += 1
                return x, y
            target.unlink(missing_ok=True)  # NaN/Inf cached by an older version: never serve it
        self.misses += 1
        image = read_image(case.image, case=case.case_id)  # refuses NaN/Inf voxels
        mask = read_mask(case.mask, image, self.labels, case=case.case_id, image_file=case.image)
        x, y = preprocess(image, mask, self.spec)
        require_finite(x, case.image, "preprocessed image (nothing cached)", case.case_id)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, image=x, label=y)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return x, y

    def save_memo(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".json.tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self._memo, fh)
        os.replace(tmp, self._memo_path)
