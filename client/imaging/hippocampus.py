"""MSD Task04 Hippocampus split into synthetic sites, and its manifests.

The data is single-centre (Vanderbilt): any federation built from it is a synthetic split, and
every result must say so. Cases are assigned round-robin by case number, so the split is
deterministic and independent of the data's content.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from client.errors import DataNotFoundError

FOLDER = "msd_hippocampus"
LABELS = {0: "background", 1: "anterior hippocampus", 2: "posterior hippocampus"}
# MONAI's Decathlon download (monai.apps.DecathlonDataset resource for Task04_Hippocampus)
SOURCE_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar"
SOURCE_MD5 = "9d24dba78a72977dbd1d2e110310f31b"


@dataclass(frozen=True)
class HippocampusCase:
    case_id: str
    image: Path
    label: Path


def cases(data_dir: Path) -> list[HippocampusCase]:
    """Every image with its label, sorted by case number."""
    root = Path(data_dir) / FOLDER
    images = root / "imagesTr"
    if not images.is_dir():
        raise DataNotFoundError(f"hippocampus images not found in {images}; fetch them with "
                                f"`carefl data fetch hippocampus` or point --data-dir / $CAREFL_DATA at them")
    found = []
    for image in sorted(images.glob("hippocampus_*.nii.gz")):
        label = root / "labelsTr" / image.name
        if label.is_file():
            found.append(HippocampusCase(image.name.removesuffix(".nii.gz"), image, label))
    if not found:
        raise DataNotFoundError(f"no hippocampus_*.nii.gz image/label pairs in {root}")
    return found


def split_sites(all_cases: list[HippocampusCase], n_sites: int = 3) -> dict[str, list[HippocampusCase]]:
    """Round-robin by case number into ``site-1`` … ``site-N``."""
    return {f"site-{i + 1}": all_cases[i::n_sites] for i in range(n_sites)}


def write_manifest(path: Path, rows: list[tuple]) -> Path:
    """A site manifest (``case_id,image,mask,split``) with paths relative to the manifest.

    Rows are ``(case_id, image, mask)`` or ``(case_id, image, mask, split)``; no split means the
    default assignment from the case id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "image", "mask", "split"])
        for case_id, image, mask, *split in rows:
            writer.writerow([case_id, _relative(image, path.parent), _relative(mask, path.parent),
                             split[0] if split else ""])
    return path


def _relative(target: Path, base: Path) -> str:
    try:
        return str(Path(target).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(Path(target).resolve())


def dicomize_sites(data_dir: Path, out: Path, n_sites: int = 3, cases_per_site: int = 0,
                   epsilon_budget: float = 10.0, on_case=None) -> dict[str, Path]:
    """Synthetic DICOM sites from the NIfTI data: per site its DICOM series + SEG files, a manifest
    and a site config (require_deidentified, δ = 1e-3). Returns site id → site config path."""
    from client.imaging.dicomize import dicomize_case
    from client.site import write_site_config

    names = {k: v for k, v in LABELS.items() if k}
    configs = {}
    for site_id, site_cases in split_sites(cases(data_dir), n_sites).items():
        rows = []
        for case in site_cases[:cases_per_site or None]:
            series, seg = dicomize_case(case.image, case.label, out / site_id / "dicom", case.case_id, names)
            rows.append((case.case_id, series, seg))
            if on_case:
                on_case(site_id, case.case_id)
        manifest = write_manifest(out / site_id / "hippocampus.csv", rows)
        configs[site_id] = write_site_config(out / site_id / "site.toml", site_id, manifest, dataset="hippocampus",
                                             manifest=True, labels=sorted(LABELS), require_deidentified=True,
                                             epsilon_budget=epsilon_budget, delta=1e-3)
    return configs
