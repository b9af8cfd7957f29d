"""Reading and validating a site's tabular EHR extract against the study schema → ``Extract``.

A hospital points its agent at its own extract and the study's schema (``shared_models/schema.py``)
instead of hand-editing a loader. Validation never stops at the first problem: every header problem
and every (column, reason) with its row count — and up to ``max_rows_shown`` row numbers, for the
site's own staff — goes into ONE ``ValidationReport``. No cell value and no patient id ever appears
in it: reasons are built from the schema (names, ranges, allowed values), and header cells outside
the schema are named by position, since a headerless file puts patient data there. Only
``ValidationReport.counts()`` may be logged or sent; rows that fail are excluded and counted.

Kept apart from encoding (``ehr_encode.py``), and whole though over 400 lines: it is all that ``carefl site
validate`` and ``carefl data validate-extract`` run, and its rule — the report never carries a value — is
easiest to audit in one file.

CSV only (any delimiter, UTF-8, optional BOM): carefl installs no Parquet reader (pyarrow is not in
``requirements.lock.txt``), so a Parquet extract is refused with that reason — export it as CSV.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from client.errors import DataFormatError, DataNotFoundError
from shared_models.schema import ExtractFormat, Feature, Schema, level_text

MAX_ROWS_SHOWN = 10
ROW = "(row)"  # the "column" of problems that concern a whole row
HEADER = "(header)"
PARQUET_SUFFIXES = (".parquet", ".pq")
_EPOCH = dt.datetime(1970, 1, 1)
_SECONDS_PER_YEAR = 365.25 * 86400.0


class ExtractRejected(DataFormatError):
    """Nothing of the extract can be used (header problems, empty file, or no row passed)."""

    def __init__(self, report: "ValidationReport") -> None:
        self.report = report
        super().__init__("\n".join(report.lines()))


@dataclass
class ValidationReport:
    """Every problem of one extract. ``lines()`` is for the site's staff (row numbers, never values);
    ``counts()`` is all that may leave the site or go to a shared log."""

    schema: str                  # "<name> v<version>"
    schema_sha256: str
    file_name: str = ""          # local display only: a path can identify a patient
    rows_read: int = 0
    rows_kept: int = 0
    fatal: list[str] = field(default_factory=list)    # file/header problems: nothing can be used
    hints: list[str] = field(default_factory=list)    # how to fix a fatal problem
    problems: dict[tuple[str, str], int] = field(default_factory=dict)      # (column, reason) → rows
    examples: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # → first row numbers
    max_rows_shown: int = MAX_ROWS_SHOWN

    @property
    def rows_excluded(self) -> int:
        return self.rows_read - self.rows_kept

    @property
    def ok(self) -> bool:
        """Usable: no fatal problem and at least one row kept (some rows may still be excluded)."""
        return not self.fatal and self.rows_kept > 0

    def add(self, column: str, reason: str, row: int) -> None:
        key = (column, reason)
        self.problems[key] = self.problems.get(key, 0) + 1
        shown = self.examples.setdefault(key, [])
        if len(shown) < self.max_rows_shown:
            shown.append(row)

    def counts(self) -> dict:
        """Counts only — what may be logged or sent (no file name, no row numbers, no values)."""
        return {"schema": self.schema, "schema_sha256": self.schema_sha256, "rows_read": self.rows_read,
                "rows_kept": self.rows_kept, "rows_excluded": self.rows_excluded, "fatal": list(self.fatal),
                "problems": {_key_text(k): n for k, n in sorted(self.problems.items())}}

    def lines(self) -> list[str]:
        """``carefl site validate``-style lines: errors, then excluded rows per (column, reason)."""
        out = [f"extract {self.file_name or '<extract>'} against schema {self.schema} "
               f"(sha256 {self.schema_sha256[:12]}…); rows are numbered as in a spreadsheet, the first line is row 1"]
        out += [f"error     {p}" for p in self.fatal]
        out += [f"hint      {h}" for h in self.hints]
        for key, n in sorted(self.problems.items()):
            rows = self.examples.get(key, [])
            more = f", … ({n - len(rows)} more)" if n > len(rows) else ""
            out.append(f"excluded  {_key_text(key)}: {n} row(s): {', '.join(map(str, rows))}{more}")
        verdict = ("nothing can be used" if self.fatal else
                   "no row passed" if self.rows_kept == 0 else "usable")
        out.append(f"rows: {self.rows_read} read, {self.rows_kept} kept, {self.rows_excluded} excluded — {verdict}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _key_text(key: tuple[str, str]) -> str:
    column, reason = key
    return reason if column in (ROW, HEADER) else f"column '{column}': {reason}"


# ---------------------------------------------------------------------------------------------------
# the validated rows


@dataclass(frozen=True)
class Extract:
    """The rows that passed validation, typed, in file order. Patient ids stay in memory at the site."""

    schema: Schema
    report: ValidationReport
    values: Mapping[str, np.ndarray]  # per feature, float64, NaN = missing: numeric value; date in years
                                      # since 1970; categorical: index of the level in the schema's values
    labels: np.ndarray                # float64, 1.0 = a positive value
    rows: np.ndarray                  # row numbers of the kept rows (site-local, for the staff)
    patient_ids: tuple[str, ...] | None = None
    times: np.ndarray | None = None   # visit time, seconds since 1970 (float64)

    def __len__(self) -> int:
        return len(self.labels)


def read_extract(path: Path | str, schema: Schema, fmt: ExtractFormat | None = None,
                 max_rows_shown: int = MAX_ROWS_SHOWN) -> Extract:
    """Validate the whole extract; never raises for bad content — the report says everything.

    ``fmt`` overrides how the file is written (header, delimiter), never what the study means.
    """
    path = Path(path)
    fmt = fmt or schema.extract
    report = ValidationReport(f"{schema.name} v{schema.version}", schema.sha256, path.name,
                              max_rows_shown=max_rows_shown)
    records = _records(path, fmt, report)
    columns, width = _header(records, schema, fmt, report)
    parsed = _rows(records, schema, columns, width, report)
    return _assemble(schema, report, parsed)


def load_extract(path: Path | str, schema: Schema, fmt: ExtractFormat | None = None) -> Extract:
    """``read_extract``, refusing (``ExtractRejected``) an extract of which nothing can be used."""
    extract = read_extract(path, schema, fmt)
    if not extract.report.ok:
        raise ExtractRejected(extract.report)
    return extract


def _records(path: Path, fmt: ExtractFormat, report: ValidationReport) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise DataNotFoundError(f"extract not found: {path}")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        report.fatal.append("Parquet extracts are not supported: carefl installs no Parquet reader "
                            "(pyarrow); export the extract as CSV")
        return []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        report.fatal.append(f"not UTF-8 text (first undecodable byte at offset {exc.start})")
        return []
    records, number = [], 0
    try:
        for number, fields in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter=fmt.delimiter,
                                                   strict=True), start=1):
            if fields and any(f.strip() for f in fields):
                records.append((number, fields))
    except csv.Error:
        report.fatal.append(f"row {number + 1}: malformed CSV (e.g. an unclosed quote); the rest cannot be read")
    if not records and not report.fatal:
        report.fatal.append("empty file: no header and no rows" if fmt.header else "empty file: no rows")
    return records


def _header(records: list, schema: Schema, fmt: ExtractFormat,
            report: ValidationReport) -> tuple[dict[str, int], int]:
    """(schema column → field index, fields per row); header problems go to ``report.fatal``.

    Consumes the header record.
    """
    if not records:
        return {}, 0
    if not fmt.header:
        absent = [c for c in schema.columns if c not in fmt.columns]
        if absent:
            report.fatal.append(f"the extract's column list lacks {', '.join(repr(c) for c in absent)}")
        first = [cell.strip() for cell in records[0][1]]
        if sum(cell in schema.columns for cell in first) * 2 >= len(first):
            report.hints.append("row 1 looks like a header: if the file has one, set [extract] header = true")
        return {c: i for i, c in enumerate(fmt.columns) if c in schema.columns}, len(fmt.columns)
    _, names = records.pop(0)
    names = [n.strip() for n in names]
    known = set(schema.columns) | set(fmt.ignore)
    columns: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in known:
            if name in columns:
                report.fatal.append(f"column '{name}' appears twice in the header")
            columns.setdefault(name, i)
        else:
            report.fatal.append(f"header column {i + 1} is not in the schema (header cells outside the "
                                f"schema are not shown: a headerless file would put patient data there)")
            near = [c for c in schema.columns if c.casefold() == name.casefold().replace(" ", "")]
            if near:
                report.hints.append(f"header column {i + 1} matches '{near[0]}' except for case or spaces")
    for column in schema.columns:
        if column not in columns:
            report.fatal.append(f"column '{column}' is missing from the header")
    if not records:
        report.fatal.append("no data rows after the header")
    if names and sum(_looks_like_data(n) for n in names) * 2 >= len(names):
        report.hints.append("the first row looks like data: if the file has no header, set "
                            "[extract] header = false and list its columns")
    return {c: i for c, i in columns.items() if c in schema.columns}, len(names)


def _looks_like_data(text: str) -> bool:
    return text in ("", "?") or _number(text) is not None or _parse_time(text) is not None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_time(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _seconds(when: dt.datetime) -> float:
    """Seconds since 1970 of a naive (UTC) date-time."""
    return (when - _EPOCH).total_seconds()


@dataclass
class _Parsed:
    rows: list[int] = field(default_factory=list)
    bad: set[int] = field(default_factory=set)          # indices into ``rows``
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    labels: list[float] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


def _rows(records: list, schema: Schema, columns: dict[str, int], width: int,
          report: ValidationReport) -> _Parsed:
    out = _Parsed()
    markers = set(schema.missing.markers)
    drop_row = "missing value (policy drop-row)" if schema.missing.policy == "drop-row" else None
    for index, (number, fields) in enumerate(records):
        out.rows.append(number)
        if len(fields) != width:  # shifted cells would only produce misleading reasons: not parsed
            report.add(ROW, f"wrong number of fields (expected {width})", number)
            out.bad.add(index)
            out.ids.append(None)
            out.times.append(math.nan)
            out.labels.append(math.nan)
            for feature in schema.features:
                out.values[feature.name].append(math.nan)
            continue
        problems: list[tuple[str, str]] = []

        def cell(column: str, missing: str | None = None) -> str | None:
            """The cell's text; None if absent or a missing marker, then ``missing`` is the reason to
            report if the file has the column."""
            i = columns.get(column)
            text = fields[i].strip() if i is not None and i < len(fields) else None
            if text is None or text in markers:
                if missing and column in columns:
                    problems.append((column, missing))
                return None
            return text

        if schema.patient_id:
            out.ids.append(cell(schema.patient_id, "missing patient id"))
        if schema.visits:
            when = cell(schema.visits.time, "missing visit time")
            parsed = _parse_time(when) if when is not None else None
            if when is not None and parsed is None:
                problems.append((schema.visits.time, "not a date or date-time (ISO 8601, e.g. 2024-03-31)"))
            out.times.append(_seconds(parsed) if parsed else math.nan)
        label_text = cell(schema.label.column, "missing label")
        if label_text is None:
            out.labels.append(math.nan)
        else:
            level = _level(label_text, schema.label.values)
            if level is None:
                problems.append((schema.label.column, _not_allowed(schema.label.values)))
                out.labels.append(math.nan)
            else:
                out.labels.append(1.0 if schema.label.values[level] in schema.label.positive else 0.0)
        for feature in schema.features:
            text = cell(feature.name, drop_row)
            value, reason = (math.nan, None) if text is None else _feature_value(feature, text)
            if reason:
                problems.append((feature.name, reason))
            out.values[feature.name].append(value)
        for column, reason in problems:
            report.add(column, reason, number)
        if problems:
            out.bad.add(index)
    _check_patients(schema, out, report)
    report.rows_read = len(out.rows)
    return out


def _level(text: str, values: tuple) -> int | None:
    """Index of ``text`` among the schema's values (numeric levels compare as numbers)."""
    key = _number(text) if values and isinstance(values[0], float) else text
    return None if key is None else next((i for i, v in enumerate(values) if v == key), None)


def _not_allowed(values: tuple) -> str:
    return f"not one of the allowed values ({', '.join(level_text(v) for v in values)})"


def _feature_value(feature: Feature, text: str) -> tuple[float, str | None]:
    if feature.kind == "numeric":
        value = _number(text)
        if value is None:
            return math.nan, "not a number"
        if not math.isfinite(value):
            return math.nan, "not a finite number"
        if not feature.min <= value <= feature.max:
            return math.nan, f"out of range {feature.range_text()}"
        return value, None
    if feature.kind == "categorical":
        level = _level(text, feature.values)
        return (math.nan, _not_allowed(feature.values)) if level is None else (float(level), None)
    when = _parse_time(text)
    if when is None:
        return math.nan, "not a date (ISO 8601, e.g. 2024-03-31)"
    if (feature.earliest and when.date() < feature.earliest) or (feature.latest and when.date() > feature.latest):
        return math.nan, f"date out of range {feature.range_text()}"
    return _seconds(when) / _SECONDS_PER_YEAR, None


def _check_patients(schema: Schema, out: _Parsed, report: ValidationReport) -> None:
    """Duplicates (one row per patient: the id; visits: id + time) and the per-patient label rule."""
    if not schema.patient_id:
        return
    groups: dict[object, list[int]] = defaultdict(list)
    for index, pid in enumerate(out.ids):
        if pid is None:
            continue
        if schema.visits is None:
            groups[pid].append(index)
        elif not math.isnan(out.times[index]):
            groups[(pid, out.times[index])].append(index)
    reason = "duplicate patient id" if schema.visits is None else "duplicate visit (same patient, same time)"
    for indices in groups.values():
        if len(indices) > 1:
            for index in indices:
                report.add(schema.patient_id, reason, out.rows[index])
                out.bad.add(index)
    if schema.visits is None or schema.visits.label_rule != "constant":
        return
    labels: dict[str, set[float]] = defaultdict(set)
    members: dict[str, list[int]] = defaultdict(list)
    for index, pid in enumerate(out.ids):
        if index not in out.bad and pid is not None and not math.isnan(out.labels[index]):
            labels[pid].add(out.labels[index])
            members[pid].append(index)
    for pid, seen in labels.items():
        if len(seen) > 1:
            for index in members[pid]:
                report.add(schema.label.column, "label differs between visits of one patient", out.rows[index])
                out.bad.add(index)


def _assemble(schema: Schema, report: ValidationReport, out: _Parsed) -> Extract:
    keep = np.array([i not in out.bad for i in range(len(out.rows))], dtype=bool) if not report.fatal \
        else np.zeros(len(out.rows), dtype=bool)
    report.rows_kept = int(keep.sum())
    idx = np.flatnonzero(keep)

    def kept(items: list, dtype=np.float64) -> np.ndarray:  # [] (nothing read) gives an empty array
        return np.asarray(items, dtype=dtype).reshape(-1)[idx]

    return Extract(
        schema=schema, report=report, values={f.name: kept(out.values[f.name]) for f in schema.features},
        labels=kept(out.labels), rows=kept(out.rows, np.int64),
        patient_ids=tuple(out.ids[i] for i in idx) if schema.patient_id else None,
        times=kept(out.times) if schema.visits else None,
    )

