"""Reading and validating a site's tabular EHR extract against the study schema → ``Extract``.

A hospital points its agent at its own extract and the study's schema (``shared_models/schema.py``)
instead of hand-editing a loader. Validation never stops at the first problem: every header problem
and every (column, reason) with its row count and ALL its row numbers (for the site's own staff) goes
into ONE ``ValidationReport``. No cell value and no patient id ever appears in it: reasons are built
from the schema (names, ranges, allowed values), and header cells outside the schema are named by
position, since a headerless file puts patient data there. Only ``ValidationReport.counts()`` may be
logged centrally or sent; rows that fail are excluded and counted.

One reader, one verdict. ``read_extract`` is the only function that reads an EHR file: ``carefl site
validate``, ``carefl data validate-extract``, the training loaders (``load_extract``: task ``ehr-seq``,
and ``client/ingest/heart_disease.py`` for task ``ehr``) and ``carefl site start``'s pre-flight all call
it, and it applies the one rule for refusing a file as a whole (``FileRule``, chosen per schema by
``file_rule``) so they cannot disagree. A row is *damaged* when it fails a check; a row left out only
because a value is missing under the schema's ``drop-row`` policy is excluded but not damaged.

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
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from client.errors import DataFormatError, DataNotFoundError
from shared_models.schema import ExtractFormat, Feature, Schema, level_text

ROW = "(row)"  # the "column" of problems that concern a whole row
HEADER = "(header)"
DROP_ROW = "missing value (policy drop-row)"  # the one reason that excludes a row without it being damaged
PARQUET_SUFFIXES = (".parquet", ".pq")
_EPOCH = dt.datetime(1970, 1, 1)
_SECONDS_PER_YEAR = 365.25 * 86400.0

log = logging.getLogger("carefl.site")  # the site's own log: row numbers may appear here, never a value


@dataclass(frozen=True)
class FileRule:
    """When a file is refused as a whole — the one rule of ``carefl site validate``, the training loaders and
    ``carefl site start``. A file is refused if it cannot be read as its schema says (``fatal``), if more of
    its data rows are damaged than ``max_damaged`` (a fraction of the rows read), or if fewer than
    ``min_rows`` rows are kept. Otherwise its damaged rows are excluded, named and counted, and the rest is used.
    """

    max_damaged: float = 0.5       # more than half the rows damaged: the wrong file or a wrong export, not typos
    min_rows: int = 1              # rows that must be kept (at least one)
    encoding: str = "utf-8-sig"    # how the text must be encoded: "utf-8-sig" (UTF-8, optional BOM) or "ascii"
    why: str = "a file mostly failing its schema is the wrong file or a wrong export"  # said when it refuses
    min_rows_why: str = ""         # said when too few rows are kept (min_rows > 1)


# The study schemas whose files follow a stricter rule than ``FileRule()``. heart-disease: the UCI files are
# fixed, checksummed public data read exactly as FLamby does (client/ingest/heart_disease.py), so one damaged
# row means a damaged copy, and FLamby's per-centre 66/34 split needs at least 4 rows.
FILE_RULES = {
    "heart-disease": FileRule(
        max_damaged=0.0, min_rows=4, encoding="ascii",
        why="its files are fixed public data (UCI, checksummed): a damaged row means a damaged copy; fetch it "
            "again with `carefl data fetch heart-disease`",
        min_rows_why="too few to split into train and test"),
}


def file_rule(schema: Schema) -> FileRule:
    """The rule that refuses a file of ``schema`` as a whole (``FILE_RULES``, else ``FileRule()``)."""
    return FILE_RULES.get(schema.name, FileRule())


class ExtractRejected(DataFormatError):
    """The extract is refused as a whole (``FileRule``): file or header problems, too many damaged rows, or
    too few rows kept. The message names every damaged row's line and problem, never a value."""

    def __init__(self, report: "ValidationReport") -> None:
        self.report = report
        super().__init__("\n".join(report.refusal_lines()))


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
    examples: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # → every row number, in order
    by_row: dict[int, list[tuple[str, str, str]]] = field(default_factory=dict)  # row → (column, reason, text)
    rule: FileRule = field(default_factory=FileRule)
    refusal: list[str] = field(default_factory=list)  # why the file is refused as a whole (``FileRule``); no rows

    @property
    def rows_excluded(self) -> int:
        return self.rows_read - self.rows_kept

    @property
    def damaged_rows(self) -> list[int]:
        """Row numbers of the rows that failed a check (not only a missing value under ``drop-row``)."""
        return sorted(r for r, found in self.by_row.items() if any(reason != DROP_ROW for _, reason, _ in found))

    @property
    def excluded_rows(self) -> list[int]:
        """Row numbers of the rows excluded for a problem of their own (every row, if the file is refused
        for a file-level problem, is excluded too, but not listed here)."""
        return sorted(self.by_row)

    @property
    def ok(self) -> bool:
        """Usable: the rule refuses nothing (some rows may still be excluded)."""
        return not self.refusal

    def add(self, column: str, reason: str, row: int, text: str = "") -> None:
        """One problem of one row; ``text`` is a more precise wording for that row (default: ``reason``).
        Neither may hold a cell value."""
        key = (column, reason)
        self.problems[key] = self.problems.get(key, 0) + 1
        self.examples.setdefault(key, []).append(row)
        self.by_row.setdefault(row, []).append((column, reason, text or reason))

    def decide(self) -> None:
        """Apply the rule (``FileRule``): fill ``refusal``, empty when the file is usable."""
        rule, damaged = self.rule, len(self.damaged_rows)
        self.refusal = []
        if self.fatal:
            self.refusal.append("the file cannot be read as the schema describes (errors above)")
            return
        if damaged > rule.max_damaged * self.rows_read:
            limit = ("allows none" if rule.max_damaged == 0 else
                     f"allows at most {rule.max_damaged:.0%} of the rows read")
            self.refusal.append(f"{damaged} of {self.rows_read} rows damaged; schema {self.schema} {limit} "
                                f"({rule.why})")
        if self.rows_kept < rule.min_rows:
            self.refusal.append("no row passed" if rule.min_rows <= 1 else
                                f"only {self.rows_kept} usable row(s), {rule.min_rows_why or 'too few'} "
                                f"(at least {rule.min_rows})")

    def counts(self) -> dict:
        """Counts only — what may be logged or sent (no file name, no row numbers, no values)."""
        return {"schema": self.schema, "schema_sha256": self.schema_sha256, "rows_read": self.rows_read,
                "rows_kept": self.rows_kept, "rows_excluded": self.rows_excluded,
                "rows_damaged": len(self.damaged_rows), "fatal": list(self.fatal), "refused": list(self.refusal),
                "problems": {_key_text(k): n for k, n in sorted(self.problems.items())}}

    def verdict(self) -> str:
        """The one-line verdict with every excluded and every damaged row named: what ``carefl site validate``
        ends with, what a refused file's error ends with, and what a loader logs when it excludes rows."""
        text = f"rows: {self.rows_read} read, {self.rows_kept} kept, {self.rows_excluded} excluded"
        excluded, damaged = self.excluded_rows, self.damaged_rows
        if excluded and not self.fatal:
            text += f" (lines {row_list(excluded)})"
        if damaged and damaged == excluded and not self.fatal:
            text += ", all damaged"
        elif damaged:
            text += f", {len(damaged)} damaged (lines {row_list(damaged)})"
        elif excluded:
            text += ", none damaged"
        return text + (f" — refused: {'; '.join(self.refusal)}" if self.refusal else " — usable")

    def lines(self) -> list[str]:
        """``carefl site validate``-style lines: errors, then excluded rows per (column, reason), then the verdict."""
        out = [f"extract {self.file_name or '<extract>'} against schema {self.schema} "
               f"(sha256 {self.schema_sha256[:12]}…); rows are numbered as in a spreadsheet, the first line is row 1"]
        out += [f"error     {p}" for p in self.fatal]
        out += [f"hint      {h}" for h in self.hints]
        for key, n in sorted(self.problems.items()):
            out.append(f"excluded  {_key_text(key)}: {n} row(s): {row_list(self.examples.get(key, []))}")
        out.append(self.verdict())
        return out

    def problem_lines(self) -> list[str]:
        """Every problem of every damaged row, one line each, in file order: ``<file> line 7, column 'chol':
        not a number``."""
        name = self.file_name or "<extract>"
        return [f"{name} line {row}" + ("" if column in (ROW, HEADER) else f", column '{column}'") + f": {text}"
                for row in self.damaged_rows for column, _, text in self.by_row[row]]

    def refusal_lines(self) -> list[str]:
        """A refused file's error: its file problems, every damaged row's problems, the verdict."""
        name = self.file_name or "<extract>"
        return ([f"{name}: {p}" for p in self.fatal] + [f"{name}: hint: {h}" for h in self.hints]
                + self.problem_lines() + [f"{name}: {self.verdict()}"])

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _key_text(key: tuple[str, str]) -> str:
    column, reason = key
    return reason if column in (ROW, HEADER) else f"column '{column}': {reason}"


def row_list(rows: list[int]) -> str:
    """Every row number, runs written as ranges: ``2, 5-7, 12``."""
    runs: list[list[int]] = []
    for row in sorted(rows):
        if runs and row == runs[-1][1] + 1:
            runs[-1][1] = row
        else:
            runs.append([row, row])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


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


def read_extract(path: Path | str, schema: Schema, fmt: ExtractFormat | None = None) -> Extract:
    """Validate the whole extract and decide on it (``file_rule(schema)``); never raises for bad content —
    the report says everything: every problem with its row, and ``refusal`` (empty: usable).

    ``fmt`` overrides how the file is written (header, delimiter), never what the study means.
    """
    path = Path(path)
    fmt = fmt or schema.extract
    report = ValidationReport(f"{schema.name} v{schema.version}", schema.sha256, path.name, rule=file_rule(schema))
    records = _records(path, fmt, report)
    columns, width = _header(records, schema, fmt, report)
    parsed = _rows(records, schema, columns, width, report)
    extract = _assemble(schema, report, parsed)
    report.decide()
    return extract


def load_extract(path: Path | str, schema: Schema, fmt: ExtractFormat | None = None) -> Extract:
    """The loader of every EHR task: ``read_extract``, raising ``ExtractRejected`` (every damaged row named)
    where its verdict refuses the file; otherwise the kept rows, the excluded ones logged at the site by
    count and row numbers (``ValidationReport.verdict``)."""
    extract = read_extract(path, schema, fmt)
    report = extract.report
    if not report.ok:
        raise ExtractRejected(report)
    if report.rows_excluded:
        log.log(logging.WARNING if report.damaged_rows else logging.INFO, "%s: %s", report.file_name,
                report.verdict())
    return extract


def _records(path: Path, fmt: ExtractFormat, report: ValidationReport) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise DataNotFoundError(f"extract not found: {path}")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        report.fatal.append("Parquet extracts are not supported: carefl installs no Parquet reader "
                            "(pyarrow); export the extract as CSV")
        return []
    try:
        text = path.read_bytes().decode(report.rule.encoding)
    except UnicodeDecodeError as exc:
        report.fatal.append(f"not UTF-8 text (first undecodable byte at offset {exc.start})"
                            if report.rule.encoding.startswith("utf") else
                            f"not a plain-text ({report.rule.encoding.upper()}) file (first byte that is not "
                            f"{report.rule.encoding.upper()} at offset {exc.start})")
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
        report.fatal.append("empty file: no header and no rows" if fmt.header else "no data rows (the file is empty)")
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
    drop_row = DROP_ROW if schema.missing.policy == "drop-row" else None
    for index, (number, fields) in enumerate(records):
        out.rows.append(number)
        if len(fields) != width:  # shifted cells would only produce misleading reasons: not parsed
            report.add(ROW, f"wrong number of fields (expected {width})", number,
                       f"{len(fields)} columns, expected {width}")
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
    """Numeric levels are codes (``cp`` 1-4, a 0/1 label), text levels are values."""
    kind = "codes" if values and isinstance(values[0], float) else "values"
    return f"not one of the allowed {kind} ({', '.join(level_text(v) for v in values)})"


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

