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
LICENCE = "CC-BY-SA 4.0 (Medical Segmentation Decathlon, Task04 Hippocampus, Vanderbilt University Medical Center)"
PUBLIC_EVERY = 5  # every 5th case (by case number) is the coordinator's public set; the rest go to the sites
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


def public_cases(all_cases: list[HippocampusCase]) -> list[HippocampusCase]:
    """The public set a coordinator pretrains on (52 of 260): never part of any site's data."""
    return all_cases[PUBLIC_EVERY - 1::PUBLIC_EVERY]


def private_cases(all_cases: list[HippocampusCase]) -> list[HippocampusCase]:
    """Everything but the public set (208 of 260): what ``split_sites`` shares out among the sites."""
    return [c for i, c in enumerate(all_cases) if i % PUBLIC_EVERY != PUBLIC_EVERY - 1]


# A fixed acquisition shift per synthetic site, as different scanners and protocols would give: the
# data is single-centre, so without them a public model from the same scanner would need no federation.
SCANNER_SHIFTS = {
    "site-1": "intensity response: contrast curve with gamma 2.5",
    "site-2": "coil bias field: smooth multiplicative field (MONAI RandBiasField, degree 3, coefficients 0.15)",
    "site-3": "thick slices (4 mm along the first axis, re-interpolated) and Gaussian noise at 15 % of the signal",
    # used only to choose fine-tuning settings on public data, never a site's
    "public-tuning": "intensity response with gamma 0.4 and a coil bias field (coefficients 0.12)",
}


def shifted_image(array, site_id: str):
    """The image as site ``site_id``'s scanner would give it (``SCANNER_SHIFTS``); fixed per site."""
    import numpy as np
    import torch
    from monai.transforms import AdjustContrast, RandBiasField

    image = np.asarray(array, dtype=np.float32)
    if site_id == "site-1":
        return np.asarray(AdjustContrast(gamma=2.5)(image[None]))[0]
    if site_id == "site-2":
        field = RandBiasField(degree=3, coeff_range=(0.15, 0.15), prob=1.0)
        field.set_random_state(seed=2)
        return np.asarray(field(image[None]))[0]
    if site_id == "public-tuning":
        field = RandBiasField(degree=3, coeff_range=(0.12, 0.12), prob=1.0)
        field.set_random_state(seed=7)
        return np.asarray(field(AdjustContrast(gamma=0.4)(image[None])))[0]
    if site_id == "site-3":
        thick = torch.from_numpy(image)[None, None]
        size = thick.shape[2:]
        low = torch.nn.functional.interpolate(thick, size=(max(1, round(size[0] / 4)), *size[1:]), mode="area")
        back = torch.nn.functional.interpolate(low, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
        scale = 0.15 * float(image[image > 0].std() or 1.0)
        return back + np.random.default_rng(3).normal(0.0, scale, back.shape).astype(np.float32)
    raise ValueError(f"no acquisition shift defined for '{site_id}'")


def write_shifted_case(case: HippocampusCase, site_id: str, folder: Path) -> HippocampusCase:
    """A copy of the case's image as ``site_id``'s scanner would give it (NIfTI, same grid); label unchanged."""
    import nibabel as nib
    import numpy as np

    source = nib.load(str(case.image))
    out = Path(folder) / case.image.name
    out.parent.mkdir(parents=True, exist_ok=True)
    image = shifted_image(np.asarray(source.dataobj, dtype=np.float32), site_id)
    nib.save(nib.Nifti1Image(image.astype(np.float32), source.affine), str(out))
    return HippocampusCase(case.case_id, out, case.label)


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
    and a site config (require_deidentified, δ = 1e-3). Returns site id → site config path.

    Sites draw only from the private cases (never the public set a coordinator pretrains on), and
    sites 1–3 image them through their scanner's shift (``SCANNER_SHIFTS``). Their policy allows
    full-batch DP steps (``max_sample_rate = 1``), the regime DP fine-tuning uses."""
    import shutil

    from deploy.datasets.dicomize import dicomize_case
    from client.site import write_site_config

    names = {k: v for k, v in LABELS.items() if k}
    configs = {}
    for site_id, site_cases in split_sites(private_cases(cases(data_dir)), n_sites).items():
        rows = []
        scanner = out / site_id / "scanner"  # the shifted NIfTI, only until it is written as DICOM
        for case in site_cases[:cases_per_site or None]:
            source = write_shifted_case(case, site_id, scanner) if site_id in SCANNER_SHIFTS else case
            series, seg = dicomize_case(source.image, case.label, out / site_id / "dicom", case.case_id, names)
            rows.append((case.case_id, series, seg))
            if on_case:
                on_case(site_id, case.case_id)
        shutil.rmtree(scanner, ignore_errors=True)
        manifest = write_manifest(out / site_id / "hippocampus.csv", rows)
        configs[site_id] = write_site_config(out / site_id / "site.toml", site_id, manifest, dataset="hippocampus",
                                             manifest=True, labels=sorted(LABELS), require_deidentified=True,
                                             epsilon_budget=epsilon_budget, delta=1e-3, max_sample_rate=1.0,
                                             max_physical_batch=16)
    return configs
