"""Encoding a validated EHR ``Extract`` into model inputs: one row per patient, or per-patient visit histories.

Kept apart from reading (``ehr_extract.py``) because the normalisation statistics are an input here
(``FeatureStats``), not something read from the file: every site of a study encodes identically with
the shared, federated statistics, and ``local_stats`` is the purely local fallback. The encoded columns
(``feature_names``) depend on the schema alone, so every site has the same ``n_features``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from client.ingest.ehr_extract import Extract
from shared_models.feature_stats import FeatureStats, NumericStats
from shared_models.schema import Feature, Schema, level_text

Z_EPS = 1e-9  # z = (x - mean) / (std + Z_EPS), FLamby's form (client/ingest/heart_disease.py)


def _indices(extract: Extract, rows: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """The chosen row indices, every row by default."""
    return np.arange(len(extract)) if rows is None else np.asarray(rows, dtype=np.int64)


def _columns(cols: list[np.ndarray], n: int) -> np.ndarray:
    """Columns side by side: [n, len(cols)] (a schema without features gives [n, 0])."""
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0))


def local_stats(extract: Extract, rows: Sequence[int] | np.ndarray | None = None) -> FeatureStats:
    """Statistics of this site's own rows (e.g. its train split) — the fallback without federation."""
    schema = extract.schema
    idx = _indices(extract, rows)
    scalar = [f.name for f in schema.features if f.kind != "categorical"]
    numeric: dict[str, NumericStats] = {}
    if scalar:
        m = np.stack([extract.values[name][idx] for name in scalar], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if np.isnan(m).any():
                means, stds = np.nanmean(m, axis=0), np.nanstd(m, axis=0)
            else:  # as FLamby computes them (one axis-0 reduction), so encodings match bit for bit
                means, stds = m.mean(axis=0), m.std(axis=0)
        for name, mean, std in zip(scalar, means, stds):
            observed = bool(np.isfinite(mean))
            numeric[name] = NumericStats(float(mean) if observed else 0.0, float(std) if observed else 1.0)
    categories = {}
    for f in schema.features:
        if f.kind == "categorical":
            v = extract.values[f.name][idx]
            v = v[~np.isnan(v)].astype(np.int64)
            categories[f.name] = tuple(float(c) for c in np.bincount(v, minlength=len(f.values)))
    return FeatureStats(schema.sha256, numeric, categories)


def feature_names(schema: Schema) -> tuple[str, ...]:
    """The encoded columns, fixed by the schema alone (every site has the same ``n_features``)."""
    names: list[str] = []
    for f in schema.features:
        if f.kind == "numeric":
            names.append(f.name)
        elif f.kind == "date":
            names.append(f"{f.name}:years")
        else:
            names += [f"{f.name}={level_text(v)}" for v in _kept_levels(schema, f)[1]]
    if schema.missing.policy == "indicator":
        names += [f"{f.name}:missing" for f in schema.features]
    return tuple(names)


def _kept_levels(schema: Schema, f: Feature) -> tuple[range, tuple]:
    start = 1 if schema.encoding.one_hot == "drop-first" else 0
    return range(start, len(f.values)), f.values[start:]


def raw_matrix(extract: Extract, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Unscaled design matrix (numeric values, one-hot 0/1), NaN where missing, no indicator columns."""
    schema = extract.schema
    idx = _indices(extract, rows)
    cols = []
    for f in schema.features:
        v = extract.values[f.name][idx]
        if f.kind != "categorical":
            cols.append(v)
            continue
        for level in _kept_levels(schema, f)[0]:
            col = (v == level).astype(np.float64)
            col[np.isnan(v)] = np.nan
            cols.append(col)
    return _columns(cols, len(idx))


def encode(extract: Extract, stats: FeatureStats, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Model inputs [rows, len(feature_names)] float32: missing values imputed with the statistics'
    means (one-hot columns: the category frequencies), z-scored, indicator columns appended."""
    schema = extract.schema
    stats.check(schema)
    idx = _indices(extract, rows)
    cols, missing = [], []
    for f in schema.features:
        v = extract.values[f.name][idx]
        absent = np.isnan(v)
        missing.append(absent.astype(np.float64))
        if f.kind != "categorical":
            st = stats.numeric[f.name]
            cols.append((np.where(absent, st.mean, v) - st.mean) / _scale(st.std))
            continue
        counts = np.asarray(stats.categories[f.name], dtype=np.float64)
        freq = counts / counts.sum() if counts.sum() > 0 else np.zeros_like(counts)
        for level in _kept_levels(schema, f)[0]:
            col = np.where(absent, freq[level], (v == level).astype(np.float64))
            if schema.encoding.standardize == "all":
                p = freq[level]
                col = (col - p) / _scale(math.sqrt(p * (1.0 - p)))
            cols.append(col)
    if schema.missing.policy == "indicator":
        cols += missing
    return _columns(cols, len(idx)).astype(np.float32)


def _scale(std: float) -> float:
    """FLamby's ``std + 1e-9``; a constant column (std 0) is only centred, so a value the statistics
    never saw (e.g. a category absent from every site) becomes 1, not 1e9."""
    return std + Z_EPS if std > 0 else 1.0


def tabular(extract: Extract, stats: FeatureStats,
            rows: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One row per patient: (x [N, F] float32, y [N] float32)."""
    if extract.schema.visits is not None:
        raise ValueError(f"schema {extract.schema.name} has visits: use histories(), one sample per patient")
    idx = _indices(extract, rows)
    return encode(extract, stats, idx), extract.labels[idx].astype(np.float32)


def patient_rows(extract: Extract) -> list[np.ndarray]:
    """Per patient (first-appearance order), the row indices of its visits in time order, keeping the
    schema's ``max_visits`` most recent. Split and sample by these: one DP sample is one patient."""
    schema = extract.schema
    if schema.visits is None or extract.patient_ids is None or extract.times is None:
        raise ValueError(f"schema {schema.name} has no [visits]: each row is one patient")
    groups: dict[str, list[int]] = {}
    for index, pid in enumerate(extract.patient_ids):
        groups.setdefault(pid, []).append(index)
    out = []
    for indices in groups.values():
        ordered = np.asarray(indices, dtype=np.int64)[np.argsort(extract.times[indices], kind="stable")]
        if schema.visits.max_visits:
            ordered = ordered[-schema.visits.max_visits:]
        out.append(ordered)
    return out


def histories(extract: Extract, stats: FeatureStats, patients: Sequence[np.ndarray] | None = None
              ) -> tuple[list[np.ndarray], np.ndarray]:
    """Per patient its visits encoded [T_i, F] float32 (time order) and one label: the label of every
    visit (rule ``constant``, validated) or of the last visit (rule ``last-visit``)."""
    groups = patient_rows(extract) if patients is None else list(patients)
    if not groups:
        return [], np.zeros(0, np.float32)
    x = encode(extract, stats, np.concatenate(groups))
    bounds = np.cumsum([0] + [len(g) for g in groups])
    seqs = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    y = np.array([extract.labels[g[-1]] for g in groups], dtype=np.float32)
    return seqs, y
