"""Synthetic longitudinal diabetes extracts, one CSV per site, matching ``shared_models/schemas/diabetes-visits.toml``.

No real data has visit histories we may ship, so the sequence model is demonstrated and tested on
these. Sites differ the way hospitals do: in age mix, sex and smoking mix, lab assay drift (HbA1c and
blood-pressure offsets added to every measurement) and prevalence (a site-level risk shift). The
outcome — a diabetes complication within the horizon — depends on the *trajectory* (mean and slope of
the true HbA1c) as well as on age, BMI, blood pressure, smoking and sex, so the order of visits
matters. Deterministic by seed; rows are written in visit-date order, as an encounter export would be.

``write_violation_extract`` writes a small extract with every kind of problem validation must report
(tests and ``carefl data synth-ehr --violations``). Every identifier is synthetic.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("patient_id", "visit_date", "age", "sex", "bmi", "hba1c", "sbp", "smoker", "complication")
SMOKER = ("never", "former", "current")
START, END = dt.date(2015, 1, 1), dt.date(2019, 12, 31)  # first visits fall in these years
MAX_VISITS = 16


@dataclass(frozen=True)
class SiteProfile:
    name: str
    patients: int
    age_mean: float
    age_sd: float
    female: float                          # fraction of women
    smoker_mix: tuple[float, float, float]  # never, former, current
    hba1c_offset: float                    # assay drift, %-points added to every HbA1c result
    sbp_offset: float                      # cuff calibration drift, mmHg
    risk_shift: float                      # log-odds added to every patient's risk (prevalence)
    visits_mean: float                     # mean number of visits per patient


PROFILES = (
    SiteProfile("metro", 400, 54.0, 11.0, 0.50, (0.55, 0.25, 0.20), 0.0, 0.0, -0.4, 6.0),
    SiteProfile("rural", 250, 66.0, 9.0, 0.45, (0.40, 0.30, 0.30), 0.0, 4.0, 0.4, 4.0),
    SiteProfile("coastal", 300, 60.0, 12.0, 0.55, (0.60, 0.28, 0.12), 0.4, -3.0, 0.0, 5.0),
)


def profiles(sites: int, seed: int = 0) -> list[SiteProfile]:
    """The three hand-made profiles, then further ones drawn (deterministically) around them."""
    out = list(PROFILES[:sites])
    rng = np.random.default_rng([seed, 7919])
    for i in range(len(out), sites):
        mix = rng.dirichlet((6.0, 3.0, 2.0))
        out.append(SiteProfile(f"site{i + 1}", int(rng.integers(150, 400)), float(rng.uniform(50, 68)),
                               float(rng.uniform(8, 13)), float(rng.uniform(0.4, 0.6)),
                               (float(mix[0]), float(mix[1]), float(mix[2])),
                               float(rng.normal(0, 0.25)), float(rng.normal(0, 3)), float(rng.normal(0, 0.4)),
                               float(rng.uniform(3.5, 7.0))))
    return out


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def site_rows(profile: SiteProfile, seed: int, site_index: int, patients: int = 0) -> list[dict[str, str]]:
    """One site's visits as CSV cells (strings; '' = not measured), sorted by visit date."""
    rng = np.random.default_rng([seed, site_index])
    rows: list[tuple[dt.date, int, dict[str, str]]] = []
    span = (END - START).days
    for p in range(patients or profile.patients):
        pid = f"{profile.name[:3].upper()}-{p + 1:05d}"
        age0 = float(np.clip(rng.normal(profile.age_mean, profile.age_sd), 25, 92))
        sex = "F" if rng.random() < profile.female else "M"
        smoker = SMOKER[int(rng.choice(3, p=profile.smoker_mix))]
        bmi0 = float(np.clip(rng.normal(31.0, 5.0), 17, 60))
        a1c0 = float(np.clip(rng.normal(7.4, 1.1), 5.0, 13.0))
        a1c_slope = float(rng.normal(0.05, 0.35))          # %-points per year
        sbp0 = float(rng.normal(132.0, 14.0) + 0.3 * (age0 - 60))
        visits = int(min(MAX_VISITS, 1 + rng.poisson(profile.visits_mean - 1)))
        first = day = START + dt.timedelta(days=int(rng.integers(0, span)))
        for v in range(visits):
            if v:
                day += dt.timedelta(days=int(30 + rng.exponential(90)))
            t = (day - first).days / 365.25
            a1c = float(np.clip(a1c0 + a1c_slope * t + rng.normal(0, 0.25), 4.0, 16.0))
            bmi = float(np.clip(bmi0 + rng.normal(0, 0.6) + 0.2 * t, 15, 70))
            sbp = float(np.clip(sbp0 + rng.normal(0, 8), 85, 230))
            rows.append((day, len(rows), {
                "patient_id": pid, "visit_date": day.isoformat(), "age": f"{age0 + t:.0f}", "sex": sex,
                "bmi": "" if rng.random() < 0.03 else f"{bmi:.1f}",
                "hba1c": f"{a1c + profile.hba1c_offset:.1f}",
                "sbp": "" if rng.random() < 0.03 else f"{sbp + profile.sbp_offset:.0f}",
                "smoker": "" if rng.random() < 0.02 else smoker,
            }))
        # the outcome follows the true (assay-free) trajectory: its current level and its slope
        current = a1c0 + a1c_slope * (day - first).days / 365.25
        z = (profile.risk_shift - 1.3 + 0.9 * (current - 7.5) + 0.8 * float(np.clip(a1c_slope, -2, 2))
             + 0.04 * (age0 - 60) + 0.05 * (bmi0 - 31) + 0.015 * (sbp0 - 132)
             + {"never": 0.0, "former": 0.25, "current": 0.6}[smoker] + (0.3 if sex == "M" else 0.0))
        label = "1" if rng.random() < _sigmoid(z) else "0"
        for _, _, cells in rows[-visits:]:
            cells["complication"] = label
    rows.sort(key=lambda r: (r[0], r[1]))
    return [cells for _, _, cells in rows]


def write_rows(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
    return path


def synthesize(out: Path, sites: int = 3, seed: int = 0, patients: int = 0) -> dict[str, Path]:
    """Write ``<out>/<site>.csv`` for ``sites`` sites; returns site name → extract path."""
    if sites < 1:
        raise ValueError("sites must be at least 1")
    return {profile.name: write_rows(Path(out) / f"{profile.name}.csv", site_rows(profile, seed, i, patients))
            for i, profile in enumerate(profiles(sites, seed))}


# ---------------------------------------------------------------------------------------------------
# an extract with every kind of violation (what validation must report, completely, without a crash)

ROW_VIOLATIONS = (
    "not a number", "not a finite number", "out of range", "not one of the allowed values", "not a date",
    "duplicate visit", "missing label", "missing patient id", "missing visit time",
    "label differs between visits", "wrong number of fields",
)


def violation_rows(seed: int = 0, patients: int = 12) -> tuple[tuple[str, ...], list[list[str]]]:
    """A small metro-like extract (header + rows of cells) with every row-level violation injected."""
    rows = site_rows(PROFILES[0], seed, 0, patients)
    by_patient: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_patient.setdefault(r["patient_id"], []).append(i)
    rows[0]["hba1c"] = "high"                         # wrong type
    rows[1]["bmi"] = "inf"                            # not finite
    rows[2]["bmi"] = "95.3"                           # out of range
    rows[3]["smoker"] = "sometimes"                   # unknown category
    rows[4]["visit_date"] = "2021-13-45"              # unparseable date
    rows[5]["complication"] = ""                      # missing label
    rows[6]["complication"] = "2"                     # label not an allowed value
    rows[7]["patient_id"] = ""                        # missing patient id
    rows[8]["visit_date"] = ""                        # missing visit time
    rows.append(dict(rows[9], hba1c="9.9"))           # duplicate visit: same patient, same date
    untouched = [idx for pid, idx in by_patient.items()
                 if len(idx) >= 2 and min(idx) > 10 and pid != rows[9]["patient_id"]]
    flip = untouched[0][-1]                           # one visit disagrees with the patient's others
    rows[flip]["complication"] = "1" if rows[flip]["complication"] == "0" else "0"
    cells = [[r[c] for c in COLUMNS] for r in rows]
    cells[10] = cells[10] + ["stray"]                 # wrong number of fields
    return COLUMNS, cells


def write_violation_extract(path: Path, seed: int = 0, header_problems: bool = True) -> Path:
    """Write the violation extract; with ``header_problems`` also an unknown and a missing column
    (which make the whole extract unusable, yet every row problem is still reported)."""
    columns, cells = violation_rows(seed)
    if header_problems:
        drop = columns.index("sbp")
        columns = columns[:drop] + columns[drop + 1:] + ("notes",)
        cells = [c[:drop] + c[drop + 1:] + ["called back"] for c in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(cells)
    return path
