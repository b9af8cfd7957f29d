"""Download public data sets into the site's data directory, verified by checksum.

Files are written to a temporary name and renamed only once the checksum matches, so an
interrupted or corrupted download never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from client.ingest import heart_disease
from client.errors import DataFormatError, SiteError


@dataclass(frozen=True)
class RemoteFile:
    url: str
    relpath: str  # inside the data directory
    md5: str


def heart_disease_files() -> list[RemoteFile]:
    return [
        RemoteFile(
            url=f"{heart_disease.SOURCE_URL}processed.{centre}.data",
            relpath=f"{heart_disease.FOLDER}/processed.{centre}.data",
            md5=md5sum,
        )
        for centre, md5sum in heart_disease.MD5.items()
    ]


DATASETS: dict[str, Callable[[], list[RemoteFile]]] = {"heart-disease": heart_disease_files}
ARCHIVES = ("hippocampus",)  # fetched as one checksum-verified archive (MONAI's Decathlon download)


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected_md5: str) -> None:
    """Raise DataFormatError if ``path`` does not have the expected checksum."""
    actual = md5_of(path)
    if actual != expected_md5:
        raise DataFormatError(f"{path}: checksum mismatch (md5 {actual}, expected {expected_md5})")


def fetch(dataset: str, data_dir: Path, opener=urllib.request.urlopen, timeout: float = 60) -> list[Path]:
    """Fetch ``dataset`` into ``data_dir``; files already present with the right checksum are kept."""
    if dataset == "hippocampus":
        return fetch_hippocampus(data_dir)
    if dataset not in DATASETS:
        raise SiteError(f"unknown data set '{dataset}'; available: {', '.join((*DATASETS, *ARCHIVES))}")
    written = []
    for remote in DATASETS[dataset]():
        target = data_dir / remote.relpath
        if target.is_file() and md5_of(target) == remote.md5:
            written.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with opener(remote.url, timeout=timeout) as response:
                        out.write(response.read())
                except OSError as exc:
                    raise SiteError(f"could not download {remote.url}: {exc}") from None
            verify(tmp, remote.md5)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(target)
    return written


def fetch_hippocampus(data_dir: Path, download_and_extract=None) -> list[Path]:
    """MSD Task04 Hippocampus via MONAI's Decathlon download (md5-checked), into ``msd_hippocampus/``.

    The archive is extracted beside the target and only then moved into place, so an interrupted
    download never leaves a half-filled data folder.
    """
    from deploy.datasets import hippocampus

    if download_and_extract is None:
        from monai.apps import download_and_extract
    target = data_dir / hippocampus.FOLDER
    if (target / "imagesTr").is_dir() and (target / "labelsTr").is_dir():
        return sorted((target / "imagesTr").glob("*.nii.gz"))
    work = Path(tempfile.mkdtemp(dir=data_dir if data_dir.is_dir() else None, prefix=".hippocampus-"))
    try:
        try:
            download_and_extract(hippocampus.SOURCE_URL, filepath=str(work / "Task04_Hippocampus.tar"),
                                 output_dir=str(work), hash_val=hippocampus.SOURCE_MD5, hash_type="md5")
        except (OSError, RuntimeError, ValueError) as exc:
            raise SiteError(f"could not fetch the hippocampus archive from {hippocampus.SOURCE_URL}: {exc}") from None
        source = work / "Task04_Hippocampus"
        staged = work / hippocampus.FOLDER
        for part in ("imagesTr", "labelsTr"):
            files = [p for p in (source / part).glob("*.nii.gz") if not p.name.startswith(".")]
            if not files:
                raise DataFormatError(f"the hippocampus archive has no {part}/*.nii.gz")
            (staged / part).mkdir(parents=True)
            for path in files:
                os.replace(path, staged / part / path.name)
        data_dir.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return sorted((target / "imagesTr").glob("*.nii.gz"))
