"""The study schema: what every site's extract must contain, shipped with the run, identical everywhere.

(Over 400 lines on purpose: one format — its parser, every-problem-at-once validation and canonical hash
must agree line for line, so they stay in one file.)

Hospitals do not hand-edit a loader per study: the schema says which column is the label (and its
positive values), which identifies the patient, which orders a patient's visits, and which columns
are features — numeric (unit, plausible range), categorical (allowed values) or date — plus how a
missing value is handled and how features are encoded. ``client/ingest/ehr_extract.py`` reads an extract
with it; docs/EHR.md is the format reference.

Coordinator and sites prove they hold the same schema by ``Schema.sha256``: sha256 over a canonical
JSON form, so comments, key order, TOML vs YAML, or ``18`` vs ``18.0`` do not change it, while any
change of meaning (a range, a level, the order of features) does.

Pure (no client/server imports). Parsing lists every problem of a schema at once (``SchemaError``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

FORMAT = 1  # version of this schema format (part of the hash)
KINDS = ("numeric", "categorical", "date")
MISSING_POLICIES = ("drop-row", "impute-mean", "indicator")
LABEL_RULES = ("constant", "last-visit")
ONE_HOT = ("full", "drop-first")
STANDARDIZE = ("numeric", "all")
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"  # shipped in the app bundle (fab-include)

Level = str | float  # a categorical level: all strings, or all numbers (kept as float)


class SchemaError(ValueError):
    """A schema file that cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, list(problems)
        super().__init__(f"schema {source}: " + "; ".join(self.problems))


@dataclass(frozen=True)
class Feature:
    """One model input column. Numeric: ``unit``, ``min``/``max``; categorical: ``values``; date:
    optional ``earliest``/``latest``."""

    name: str
    kind: str
    unit: str = ""
    min: float | None = None
    max: float | None = None
    values: tuple[Level, ...] = ()
    earliest: dt.date | None = None
    latest: dt.date | None = None
    description: str = ""

    def range_text(self) -> str:
        """The plausible range as a reason names it, e.g. ``[3, 20] %`` (schema text, never data)."""
        if self.kind == "numeric":
            return f"[{level_text(self.min)}, {level_text(self.max)}] {self.unit}"
        return f"[{self.earliest or '…'}, {self.latest or '…'}]"


@dataclass(frozen=True)
class Label:
    column: str
    values: tuple[Level, ...]    # every allowed value; anything else is an error, not a negative
    positive: tuple[Level, ...]  # the values that mean "positive class", in ``values`` order


@dataclass(frozen=True)
class Visits:
    """Longitudinal extracts: one row per visit, ordered by ``time`` within a patient."""

    time: str
    label_rule: str = "constant"  # constant: every visit carries the patient's label; last-visit: the last one counts
    max_visits: int = 0           # keep only the most recent visits (0: all); bounds a history's length


@dataclass(frozen=True)
class Missing:
    policy: str = "drop-row"         # drop-row | impute-mean | indicator (docs/EHR.md)
    markers: tuple[str, ...] = ("",)  # cell texts that mean "missing"


@dataclass(frozen=True)
class Encoding:
    one_hot: str = "full"           # full | drop-first (the first allowed value gets no column)
    standardize: str = "numeric"    # numeric: z-score numeric and date columns; all: one-hot columns too


@dataclass(frozen=True)
class ExtractFormat:
    """How the extract file is written: header or the column names in order, delimiter, ignored columns."""

    header: bool = True
    delimiter: str = ","
    columns: tuple[str, ...] = ()  # only when header = false: the file's columns in order
    ignore: tuple[str, ...] = ()   # columns present in the file that the study does not use


@dataclass(frozen=True)
class Schema:
    name: str
    version: str
    label: Label
    features: tuple[Feature, ...]
    patient_id: str | None = None   # None: no id column, each row is one patient (no duplicate check)
    visits: Visits | None = None
    missing: Missing = Missing()
    encoding: Encoding = Encoding()
    extract: ExtractFormat = ExtractFormat()
    description: str = ""
    source: str = field(default="<dict>", compare=False)  # where it was read from; not part of the hash

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the study reads: patient id, visit time, label, features (in that order)."""
        head = tuple(c for c in (self.patient_id, self.visits.time if self.visits else None) if c)
        return head + (self.label.column,) + tuple(f.name for f in self.features)

    def feature(self, name: str) -> Feature:
        return next(f for f in self.features if f.name == name)

    def canonical(self) -> dict[str, Any]:
        """The schema's meaning as plain JSON types; what ``sha256`` hashes."""
        def feat(f: Feature) -> dict[str, Any]:
            d: dict[str, Any] = {"name": f.name, "kind": f.kind, "description": f.description}
            if f.kind == "numeric":
                d.update(unit=f.unit, min=f.min, max=f.max)
            elif f.kind == "categorical":
                d["values"] = list(f.values)
            else:
                d.update(earliest=_iso(f.earliest), latest=_iso(f.latest))
            return d

        return {
            "format": FORMAT,
            "study": {"name": self.name, "version": self.version, "description": self.description},
            "patient": {"id": self.patient_id},
            "visits": None if self.visits is None else {
                "time": self.visits.time, "label": self.visits.label_rule, "max_visits": self.visits.max_visits},
            "label": {"column": self.label.column, "values": list(self.label.values),
                      "positive": list(self.label.positive)},
            "features": [feat(f) for f in self.features],
            "missing": {"policy": self.missing.policy, "markers": list(self.missing.markers)},
            "encoding": {"one_hot": self.encoding.one_hot, "standardize": self.encoding.standardize},
            "extract": {"header": self.extract.header, "delimiter": self.extract.delimiter,
                        "columns": list(self.extract.columns), "ignore": list(self.extract.ignore)},
        }

    @property
    def sha256(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
        return hashlib.sha256(text.encode("ascii")).hexdigest()


def level_text(value: Level | None) -> str:
    """A level or bound as written in a schema: ``2`` not ``2.0``, strings as they are."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _iso(d: dt.date | None) -> str | None:
    return None if d is None else d.isoformat()


# ---------------------------------------------------------------------------------------------------
# parsing: one pass that collects every problem


_TOP = {"study", "patient", "visits", "label", "features", "missing", "encoding", "extract"}
_FEATURE_KEYS = {"numeric": {"unit", "min", "max"}, "categorical": {"values"}, "date": {"earliest", "latest"}}


class _Problems(list):
    def table(self, raw: dict, key: str, required: bool, allowed: set[str]) -> dict:
        value = raw.get(key)
        if value is None:
            if required:
                self.append(f"[{key}] is missing")
            return {}
        if not isinstance(value, dict):
            self.append(f"[{key}] must be a table")
            return {}
        for extra in sorted(set(value) - allowed):
            self.append(f"[{key}]: unknown key '{extra}' (allowed: {', '.join(sorted(allowed))})")
        return value

    def text(self, where: str, value: Any, required: bool = True, default: str = "") -> str:
        if value is None:
            if required:
                self.append(f"{where} is missing")
            return default
        if not isinstance(value, str) or (required and not value.strip()):
            self.append(f"{where} must be a non-empty string")
            return default
        return value

    def choice(self, where: str, value: Any, choices: tuple[str, ...], default: str) -> str:
        if value is None:
            return default
        if value not in choices:
            self.append(f"{where} must be one of {', '.join(choices)}")
            return default
        return value

    def number(self, where: str, value: Any) -> float | None:
        if value is None:
            self.append(f"{where} is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.append(f"{where} must be a finite number")
            return None
        return float(value)

    def date(self, where: str, value: Any) -> dt.date | None:
        if value is None:
            return None
        if isinstance(value, dt.datetime):
            return value.date()
        if isinstance(value, dt.date):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                pass
        self.append(f"{where} must be a date (YYYY-MM-DD)")
        return None

    def levels(self, where: str, value: Any, minimum: int) -> tuple[Level, ...]:
        if not isinstance(value, list) or len(value) < minimum:
            self.append(f"{where} must be a list of at least {minimum} value(s)")
            return ()
        if all(isinstance(v, str) for v in value):
            levels: tuple[Level, ...] = tuple(value)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            levels = tuple(float(v) for v in value)
        else:
            self.append(f"{where} must be all strings or all numbers")
            return ()
        if len(set(levels)) != len(levels):
            self.append(f"{where} lists a value twice")
        return levels

    def names(self, where: str, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.append(f"{where} must be a list of column names")
            return ()
        return tuple(value)


def parse_schema(raw: dict, source: str = "<dict>") -> Schema:
    """Build a Schema from parsed TOML/YAML; every problem is listed in one SchemaError."""
    p = _Problems()
    if not isinstance(raw, dict):
        raise SchemaError(source, ["the top level must be a table"])
    for extra in sorted(set(raw) - _TOP):
        p.append(f"unknown table '{extra}' (allowed: {', '.join(sorted(_TOP))})")

    study = p.table(raw, "study", True, {"name", "version", "description"})
    name = p.text("[study] name", study.get("name")) if study else ""
    version = study.get("version")
    if study and (version is None or isinstance(version, bool) or not isinstance(version, (str, int))
                  or str(version).strip() == ""):
        p.append("[study] version must be a string or an integer")
    description = p.text("[study] description", study.get("description"), required=False)

    patient = p.table(raw, "patient", False, {"id"})
    patient_id = p.text("[patient] id", patient.get("id")) if "patient" in raw else None

    visits = None
    if "visits" in raw:
        v = p.table(raw, "visits", False, {"time", "label", "max_visits"})
        max_visits = v.get("max_visits", 0)
        if isinstance(max_visits, bool) or not isinstance(max_visits, int) or max_visits < 0:
            p.append("[visits] max_visits must be an integer >= 0 (0: all visits)")
            max_visits = 0
        visits = Visits(time=p.text("[visits] time", v.get("time")),
                        label_rule=p.choice("[visits] label", v.get("label"), LABEL_RULES, "constant"),
                        max_visits=max_visits)
        if patient_id is None:
            p.append("[visits] needs [patient] id: visits are grouped by patient")

    lab = p.table(raw, "label", True, {"column", "values", "positive"})
    label_values = p.levels("[label] values", lab.get("values"), 2) if lab else ()
    positive = p.levels("[label] positive", lab.get("positive"), 1) if lab else ()
    if label_values and positive:
        if set(positive) - set(label_values):
            p.append("[label] positive must be among [label] values")
        elif set(positive) == set(label_values):
            p.append("[label] positive must leave at least one negative value")
    label = Label(column=p.text("[label] column", lab.get("column")) if lab else "",
                  values=label_values, positive=tuple(v for v in label_values if v in set(positive)))

    features = _features(p, raw.get("features"))

    miss = p.table(raw, "missing", False, {"policy", "markers"})
    markers = miss.get("markers", [""])
    if not isinstance(markers, list) or not all(isinstance(m, str) for m in markers) or not markers:
        p.append("[missing] markers must be a non-empty list of strings (cell texts meaning 'missing')")
        markers = [""]
    missing = Missing(policy=p.choice("[missing] policy", miss.get("policy"), MISSING_POLICIES, "drop-row"),
                      markers=tuple(dict.fromkeys(m.strip() for m in markers)))

    enc = p.table(raw, "encoding", False, {"one_hot", "standardize"})
    encoding = Encoding(one_hot=p.choice("[encoding] one_hot", enc.get("one_hot"), ONE_HOT, "full"),
                        standardize=p.choice("[encoding] standardize", enc.get("standardize"), STANDARDIZE,
                                             "numeric"))

    ext = p.table(raw, "extract", False, {"header", "delimiter", "columns", "ignore"})
    header = ext.get("header", True)
    if not isinstance(header, bool):
        p.append("[extract] header must be true or false")
        header = True
    delimiter = ext.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '"\r\n':
        p.append("[extract] delimiter must be one character (not a quote or newline)")
        delimiter = ","
    extract = ExtractFormat(header=header, delimiter=delimiter,
                            columns=p.names("[extract] columns", ext.get("columns")),
                            ignore=p.names("[extract] ignore", ext.get("ignore")))

    schema = Schema(name=name, version=str(version) if version is not None else "", label=label,
                    features=features, patient_id=patient_id, visits=visits, missing=missing,
                    encoding=encoding, extract=extract, description=description, source=source)
    _check_columns(p, schema)
    if p:
        raise SchemaError(source, p)
    return schema


def _features(p: _Problems, raw: Any) -> tuple[Feature, ...]:
    if not isinstance(raw, list) or not raw:
        p.append("[[features]] is missing: the study needs at least one feature")
        return ()
    features = []
    for i, f in enumerate(raw, start=1):
        where = f"[[features]] #{i}"
        if not isinstance(f, dict):
            p.append(f"{where} must be a table")
            continue
        name = p.text(f"{where} name", f.get("name"))
        where = f"feature '{name}'" if name else where
        kind = f.get("kind")
        if kind not in KINDS:
            p.append(f"{where}: kind must be one of {', '.join(KINDS)}")
            continue
        for extra in sorted(set(f) - {"name", "kind", "description"} - _FEATURE_KEYS[kind]):
            p.append(f"{where}: key '{extra}' does not apply to a {kind} feature "
                     f"(allowed: {', '.join(sorted(_FEATURE_KEYS[kind]))})")
        description = p.text(f"{where} description", f.get("description"), required=False)
        if kind == "numeric":
            unit = p.text(f"{where} unit", f.get("unit"))
            low, high = p.number(f"{where} min", f.get("min")), p.number(f"{where} max", f.get("max"))
            if low is not None and high is not None and not low < high:
                p.append(f"{where}: min must be below max")
            features.append(Feature(name, kind, unit=unit, min=low, max=high, description=description))
        elif kind == "categorical":
            features.append(Feature(name, kind, values=p.levels(f"{where} values", f.get("values"), 2),
                                    description=description))
        else:
            early = p.date(f"{where} earliest", f.get("earliest"))
            late = p.date(f"{where} latest", f.get("latest"))
            if early and late and not early < late:
                p.append(f"{where}: earliest must be before latest")
            features.append(Feature(name, kind, earliest=early, latest=late, description=description))
    return tuple(features)


def _check_columns(p: _Problems, s: Schema) -> None:
    roles = [(c, r) for c, r in ((s.patient_id, "patient id"), (s.visits.time if s.visits else None, "visit time"),
                                 (s.label.column, "label")) if c]
    roles += [(f.name, "feature") for f in s.features if f.name]
    roles += [(c, "ignored column") for c in s.extract.ignore]
    seen: dict[str, str] = {}
    for column, role in roles:
        if column in seen:
            p.append(f"column '{column}' is named twice (as {seen[column]} and as {role})")
        seen.setdefault(column, role)
    if s.extract.header and s.extract.columns:
        p.append("[extract] columns is only for header = false (the header names the columns)")
    if not s.extract.header:
        if not s.extract.columns:
            p.append("[extract] header = false needs columns: the file's column names in order")
        elif len(set(s.extract.columns)) != len(s.extract.columns):
            p.append("[extract] columns names a column twice")
        else:
            absent = [c for c in seen if c not in s.extract.columns]
            if absent:
                p.append(f"[extract] columns lacks {', '.join(repr(c) for c in absent)}")
            unused = [c for c in s.extract.columns if c not in seen]
            if unused:
                p.append(f"[extract] columns has {', '.join(repr(c) for c in unused)}, "
                         f"which the schema neither uses nor ignores")


def load_schema(path: Path | str) -> Schema:
    """Read a schema file: ``.toml``, or ``.yaml``/``.yml`` (PyYAML, which Flower already installs)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(str(path), [f"cannot be read ({type(exc).__name__})"]) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SchemaError(str(path), [f"not valid YAML ({getattr(exc, 'problem', None) or 'syntax'})"]) from None
    elif path.suffix.lower() == ".toml":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SchemaError(str(path), [f"not valid TOML ({exc})"]) from None
    else:
        raise SchemaError(str(path), ["must end in .toml, .yaml or .yml"])
    return parse_schema(raw, str(path))


def builtin_schema(name: str) -> Schema:
    """A schema shipped in ``shared_models/schemas/``, by file stem (``heart-disease``, ``diabetes-visits``)."""
    path = SCHEMA_DIR / f"{name}.toml"
    if not path.is_file():
        shipped = sorted(q.stem for q in SCHEMA_DIR.glob("*.toml"))
        raise SchemaError(name, [f"no such shipped schema; available: {', '.join(shipped)}"])
    return load_schema(path)
