"""Feature statistics every site normalises and encodes with, and how sites pool them privately.

Why: z-scoring each site with its own statistics (FLamby's heart-disease protocol) gives the same
input value a different meaning at each hospital. Instead, before training, each site releases one
noisy sum of bounded per-patient vectors (``privacy/gaussian.py``); the coordinator adds the sites'
sums and decodes them into one ``FeatureStats`` that every site then uses.

One patient contributes one vector, whatever their number of visits: per scalar feature the share of
their visits where it is present, and the mean of its range-scaled value u and of u² over those visits;
per categorical feature the share of their visits in each level; plus 1 for the patient count. Every
coordinate is in [0, 1] and a categorical block sums to ≤ 1, so the vector's L2 norm is at most
``sqrt(1 + 3·scalars + categoricals)`` — the sensitivity the Gaussian noise is scaled to. Values are
clipped to the schema's plausible range before scaling (validation already refuses values outside it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from shared_models.schema import Feature, Schema, level_text

_EPOCH = np.datetime64("1970-01-01")


@dataclass(frozen=True)
class NumericStats:
    mean: float
    std: float  # population standard deviation (ddof = 0)


@dataclass(frozen=True)
class FeatureStats:
    """What normalisation and encoding need: per numeric/date feature mean and std, per categorical
    feature a count (any non-negative weight) for each of its schema values, in schema order.
    Federated statistics supply these shared by all sites; ``client.ingest.ehr_encode.local_stats``
    computes them from one site's rows."""

    schema_sha256: str
    numeric: Mapping[str, NumericStats]
    categories: Mapping[str, tuple[float, ...]]

    def check(self, schema: Schema) -> None:
        """Refuse statistics made for another schema or missing a feature (names only, no values)."""
        problems = [] if self.schema_sha256 == schema.sha256 else ["they were computed for another schema"]
        for f in schema.features:
            if f.kind == "categorical":
                counts = self.categories.get(f.name)
                if counts is None or len(counts) != len(f.values):
                    problems.append(f"feature '{f.name}' needs one count per allowed value ({len(f.values)})")
                elif any(not math.isfinite(c) or c < 0 for c in counts):
                    problems.append(f"feature '{f.name}': counts must be finite and >= 0")
            else:
                st = self.numeric.get(f.name)
                if st is None:
                    problems.append(f"feature '{f.name}' has no mean/std")
                elif not (math.isfinite(st.mean) and math.isfinite(st.std) and st.std >= 0):
                    problems.append(f"feature '{f.name}': mean/std must be finite, std >= 0")
        if problems:
            raise ValueError("feature statistics do not fit schema "
                             f"{schema.name} v{schema.version}: " + "; ".join(problems))

    def to_json(self) -> str:
        return json.dumps({"schema_sha256": self.schema_sha256,
                           "numeric": {k: [v.mean, v.std] for k, v in self.numeric.items()},
                           "categories": {k: list(v) for k, v in self.categories.items()}}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FeatureStats":
        try:
            raw = json.loads(text)
            return cls(str(raw["schema_sha256"]),
                       {k: NumericStats(float(m), float(s)) for k, (m, s) in raw["numeric"].items()},
                       {k: tuple(float(c) for c in v) for k, v in raw["categories"].items()})
        except (ValueError, KeyError, TypeError):
            raise ValueError("feature statistics in the message are malformed") from None


# ---- the per-patient vectors a site sums, and what the coordinator decodes from their sum ----

def _scalar(schema: Schema) -> list[Feature]:
    return [f for f in schema.features if f.kind != "categorical"]


def _range(f: Feature) -> tuple[float, float]:
    """The plausible range of a scalar feature, in the units of the ingested values."""
    if f.kind == "numeric":
        return float(f.min), float(f.max)
    if f.earliest is None or f.latest is None:  # dates are years since 1970 once ingested
        raise ValueError(f"date feature '{f.name}' needs earliest and latest in the schema for "
                         "federated statistics (they bound each patient's contribution)")
    years = [float((np.datetime64(d) - _EPOCH) / np.timedelta64(1, "D")) / 365.25 for d in (f.earliest, f.latest)]
    return years[0], years[1]


def layout(schema: Schema) -> list[str]:
    """The coordinate names of a statistics vector (fixed by the schema alone)."""
    names = ["patients"]
    for f in _scalar(schema):
        names += [f"{f.name}:present", f"{f.name}:mean", f"{f.name}:mean-square"]
    for f in schema.features:
        if f.kind == "categorical":
            names += [f"{f.name}={level_text(v)}" for v in f.values]
    return names


def l2_bound(schema: Schema) -> float:
    """Largest L2 norm of one patient's vector: its add/remove sensitivity."""
    scalars = len(_scalar(schema))
    return math.sqrt(1 + 3 * scalars + (len(schema.features) - scalars))


def patient_vectors(schema: Schema, values: Mapping[str, np.ndarray], patients: Sequence[np.ndarray]) -> np.ndarray:
    """[patients, len(layout)] float64; ``values`` as ingested (NaN = missing), ``patients`` the row
    indices of each patient's visits (one row each for one-row-per-patient studies)."""
    out = np.zeros((len(patients), len(layout(schema))))
    if not len(patients):
        return out
    out[:, 0] = 1.0
    col = 1
    for f in _scalar(schema):
        low, high = _range(f)
        u_all = (np.clip(values[f.name], low, high) - low) / (high - low)
        for i, rows in enumerate(patients):
            u = u_all[rows]
            u = u[~np.isnan(u)]
            if len(u):
                out[i, col:col + 3] = (len(u) / len(rows), u.mean(), (u * u).mean())
        col += 3
    for f in schema.features:
        if f.kind != "categorical":
            continue
        levels = values[f.name]
        for i, rows in enumerate(patients):
            v = levels[rows]
            v = v[~np.isnan(v)].astype(np.int64)
            out[i, col:col + len(f.values)] = np.bincount(v, minlength=len(f.values)) / len(rows)
        col += len(f.values)
    return out


# The standard deviation, as a share of a feature's plausible range, taken where the release cannot resolve the
# variance: the range read as ± 3 standard deviations (the "range rule").
UNRESOLVED_STD = 1.0 / 6.0


def decode(schema: Schema, total: np.ndarray, noise_std: float = 0.0) -> FeatureStats:
    """Shared statistics from the (noisy) sum of every site's vectors.

    Noise can push a sum below zero or a variance negative: counts are floored at 0, a mean is kept
    inside the plausible range, and a standard deviation inside (0, half the range].

    ``noise_std`` is the standard deviation of the Gaussian noise on each coordinate of ``total`` (0: an
    exact sum). A variance below twice its standard error under that noise is not resolved by the release
    (with a few hundred patients at the default σ the noise on the mean of u² is ten times a typical
    variance) and its standard deviation becomes ``UNRESOLVED_STD`` of the range instead of the floor:
    the floor (0.1 % of the range) scaled inputs up a thousandfold and broke training (docs/RESULTS.md,
    "The same levers for EHR"). Post-processing of the release: it costs no ε.
    """
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (len(layout(schema)),) or not np.isfinite(total).all():
        raise ValueError(f"a statistics vector for schema {schema.name} has {len(layout(schema))} finite values")
    numeric, categories, col = {}, {}, 1
    for f in _scalar(schema):
        low, high = _range(f)
        present, s1, s2 = total[col:col + 3]
        weight = max(present, 1.0)
        mean_u = min(max(s1 / weight, 0.0), 1.0)
        var_u = s2 / weight - mean_u * mean_u
        # its standard error: the noise on s2 / weight, and on mean_u², through mean_u
        if noise_std > 0 and var_u < 2.0 * noise_std / weight * math.sqrt(1.0 + 4.0 * mean_u * mean_u):
            var_u = UNRESOLVED_STD ** 2
        var_u = min(max(var_u, 1e-6), 0.25)
        numeric[f.name] = NumericStats(low + mean_u * (high - low), math.sqrt(var_u) * (high - low))
        col += 3
    for f in schema.features:
        if f.kind == "categorical":
            categories[f.name] = tuple(float(max(c, 0.0)) for c in total[col:col + len(f.values)])
            col += len(f.values)
    return FeatureStats(schema.sha256, numeric, categories)
