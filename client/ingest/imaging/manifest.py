"""A site's imaging manifest (CSV) and its validation: every problem of every case, at once.

Columns: ``case_id,image,mask[,split]`` — image is a DICOM series folder or a NIfTI file, mask a
NIfTI, ``.npy`` or DICOM SEG file; relative paths are relative to the manifest. ``split`` is
``train`` or ``test`` (empty: assigned deterministically from the case id).

De-identification: the names (never the values) of identifying DICOM attributes present are
reported; with ``require_deidentified`` a case is refused unless its series declares
PatientIdentityRemoved = YES (what remains is then a pseudonym, as in our synthetic DICOM).

Validation never stops at the first bad case: a site gets the complete list, and training uses
only the valid cases. Problems name the case, the file and the reason — never a DICOM value.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from client.errors import SiteError
from client.ingest.imaging.dicom_series import declares_deidentified, phi_attributes
from client.ingest.imaging.io import read_image, read_mask
from client.ingest.imaging.volume import ImagingError

REQUIRED = ("case_id", "image", "mask")
SPLITS = ("train", "test", "")
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    mask: Path
    split: str  # "train" or "test"


@dataclass(frozen=True)
class Problem:
    case_id: str
    file: str
    reason: str

    def __str__(self) -> str:
        return f"case {self.case_id}: {self.file}: {self.reason}"


@dataclass
class ValidationReport:
    valid: list[Case] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)   # the case is excluded
    warnings: list[Problem] = field(default_factory=list)   # reported, the case is kept

    @property
    def excluded(self) -> int:
        return len({p.case_id for p in self.problems})

    def summary(self) -> str:
        return f"{len(self.valid)} valid case(s), {self.excluded} excluded"


def default_split(case_id: str) -> str:
    """A stable train/test assignment from the case id alone (no data involved)."""
    bucket = int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < TEST_FRACTION else "train"


def read_manifest(path: Path) -> list[Case]:
    """Parse the manifest; structural problems (columns, duplicates, bad split) are one SiteError."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []
    except FileNotFoundError:
        raise SiteError(f"manifest {path} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiteError(f"manifest {path} cannot be read: {exc}") from None
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise SiteError(f"manifest {path}: missing column(s) {', '.join(missing)} (need {', '.join(REQUIRED)}[,split])")
    if not rows:
        raise SiteError(f"manifest {path}: no cases")
    problems, cases, seen = [], [], set()
    for line_no, row in enumerate(rows, start=2):
        case_id = (row.get("case_id") or "").strip()
        split = (row.get("split") or "").strip().lower()
        if not case_id:
            problems.append(f"line {line_no}: empty case_id")
            continue
        if case_id in seen:
            problems.append(f"line {line_no}: case_id '{case_id}' appears twice")
        if split not in SPLITS:
            problems.append(f"line {line_no}: split must be train, test or empty")
        if not (row.get("image") or "").strip() or not (row.get("mask") or "").strip():
            problems.append(f"line {line_no}: case '{case_id}' lacks an image or a mask path")
            continue
        seen.add(case_id)
        cases.append(Case(case_id, (path.parent / row["image"].strip()).resolve(),
                          (path.parent / row["mask"].strip()).resolve(), split or default_split(case_id)))
    if problems:
        raise SiteError(f"manifest {path}: " + "; ".join(problems))
    return cases


def validate(cases: list[Case], labels: set[int], require_deidentified: bool) -> ValidationReport:
    """Read every case fully; collect every problem; keep the cases that pass."""
    report = ValidationReport()
    for case in cases:
        case_problems: list[Problem] = []
        try:
            image = read_image(case.image, case=case.case_id)
        except ImagingError as exc:
            report.problems.append(Problem(case.case_id, str(case.image), str(exc)))
            continue
        phi = phi_attributes(case.image) if case.image.is_dir() else []
        if phi:
            pseudonymised = declares_deidentified(case.image)
            finding = Problem(case.case_id, str(case.image), f"identifying attributes present: {', '.join(phi)}"
                              + (" (series declares PatientIdentityRemoved = YES)" if pseudonymised else ""))
            if require_deidentified and not pseudonymised:
                case_problems.append(Problem(finding.case_id, finding.file,
                                             finding.reason + "; refused: site policy require_deidentified = true"))
            else:
                report.warnings.append(finding)
        try:
            read_mask(case.mask, image, labels, case=case.case_id)
        except ImagingError as exc:
            case_problems.append(Problem(case.case_id, str(case.mask), str(exc)))
        if case_problems:
            report.problems.extend(case_problems)
        else:
            report.valid.append(case)
    return report
