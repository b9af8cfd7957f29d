"""A site's imaging manifest (CSV) and its validation: every problem of every case, at once.

Columns: ``case_id,image,mask[,split]`` — image is a DICOM series folder or a NIfTI file, mask a
NIfTI, ``.npy`` or DICOM SEG file; relative paths are relative to the manifest. ``split`` is
``train`` or ``test`` (empty: assigned deterministically from the case id).

A ``.npy`` mask has no geometry, so it is read in its image's own array order: beside a NIfTI image,
nibabel's (x, y, z) order, exactly as ``nib.load(image).get_fdata()`` returns it; beside a DICOM
series, carefl's (z, y, x) = (slice, row, column) order (``io.read_mask``).

Every problem names its manifest line. Structural problems (columns, empty or duplicate case ids, a
bad split, a missing path) make the manifest unusable: ``read_manifest`` raises one error listing
all of them, files that do not exist included. Otherwise a missing or unusable file only excludes
its case, reported by ``validate`` with the line.

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
    line: int = field(default=0, compare=False)  # the manifest line (0: not from a manifest)


@dataclass(frozen=True)
class Problem:
    case_id: str
    file: str
    reason: str
    line: int = 0  # the manifest line of the case (0: unknown)

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}case {self.case_id}: {self.file}: {self.reason}"


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
    """Parse the manifest; structural problems (columns, duplicates, bad split, missing paths) are one
    SiteError that lists every problem with its line, files that do not exist included."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = [(reader.line_num, row) for row in reader]  # line_num: physical line, blank lines counted
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
    problems: list[tuple[int, str]] = []   # structural: the manifest cannot be used
    not_found: list[tuple[int, str]] = []  # files that do not exist: only their case is excluded
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for line_no, row in rows:
        case_id = (row.get("case_id") or "").strip()
        split = (row.get("split") or "").strip().lower()
        image_text, mask_text = (row.get("image") or "").strip(), (row.get("mask") or "").strip()
        who = f"case '{case_id}'" if case_id else "row without case_id"
        for kind, text in (("image", image_text), ("mask", mask_text)):
            if text and not (path.parent / text).exists():
                not_found.append((line_no, f"{who}: {kind} {text} not found"))
        if not case_id:
            problems.append((line_no, "empty case_id"))
            continue
        if case_id in seen:
            problems.append((line_no, f"case_id '{case_id}' appears twice (first on line {seen[case_id]})"))
        if split not in SPLITS:
            problems.append((line_no, "split must be train, test or empty"))
        if not image_text or not mask_text:
            problems.append((line_no, f"case '{case_id}' lacks an image or a mask path"))
            continue
        seen.setdefault(case_id, line_no)
        cases.append(Case(case_id, (path.parent / image_text).resolve(), (path.parent / mask_text).resolve(),
                          split or default_split(case_id), line=line_no))
    if problems:  # the manifest is unusable: list everything to fix at once, missing files too, by line
        every = sorted(problems + not_found, key=lambda item: item[0])
        raise SiteError(f"manifest {path}: {len(every)} problem(s): "
                        + "; ".join(f"line {line}: {text}" for line, text in every))
    return cases  # a missing file only excludes its case: validate() reports it with its line


def validate(cases: list[Case], labels: set[int], require_deidentified: bool,
             modalities: tuple[str, ...] = ()) -> ValidationReport:
    """Read every case fully; collect every problem; keep the cases that pass. ``modalities``: what the
    dataset declares (site.toml ``modality``); its DICOM images must be of them."""
    report = ValidationReport()
    for case in cases:
        case_problems: list[Problem] = []
        try:
            image = read_image(case.image, case=case.case_id, modalities=modalities)
        except ImagingError as exc:
            report.problems.append(Problem(case.case_id, str(exc.path), exc.reason, case.line))
            if not case.mask.is_file():  # the mask cannot be checked without its image, but its absence can
                report.problems.append(Problem(case.case_id, str(case.mask), "mask file not found", case.line))
            continue
        phi = phi_attributes(case.image) if case.image.is_dir() else []
        if phi:
            pseudonymised = declares_deidentified(case.image)
            finding = Problem(case.case_id, str(case.image), f"identifying attributes present: {', '.join(phi)}"
                              + (" (series declares PatientIdentityRemoved = YES)" if pseudonymised else ""),
                              case.line)
            if require_deidentified and not pseudonymised:
                case_problems.append(Problem(finding.case_id, finding.file,
                                             finding.reason + "; refused: site policy require_deidentified = true",
                                             case.line))
            else:
                report.warnings.append(finding)
        try:
            read_mask(case.mask, image, labels, case=case.case_id, image_file=case.image)
        except ImagingError as exc:
            case_problems.append(Problem(case.case_id, str(exc.path), exc.reason, case.line))
        if case_problems:
            report.problems.extend(case_problems)
        else:
            report.valid.append(case)
    return report
