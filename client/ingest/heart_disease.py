"""UCI Heart Disease, one hospital per site, preprocessed exactly as FLamby's Fed-Heart-Disease.

FLamby protocol (owkin/FLamby, flamby/datasets/fed_heart_disease): drop slope/ca/thal, drop rows
with a missing value, one-hot ``cp`` and ``restecg`` with the first level dropped (13 features),
label = ``num > 0``, per-centre 66/34 split with ``random_state=43`` (stratified when both
classes have more than 2 members), z-score with the centre's own train mean/std.

A site reads only its own centre's file, through the study schema ``shared_models/schemas/heart-disease.toml``
and ``client/ingest/ehr_extract.py`` — the reader ``carefl site validate`` runs, so both give one verdict
(``FILE_RULES["heart-disease"]``: a file with any damaged row is refused, naming every one; rows with a
missing value are left out as FLamby does). Errors name the file, line and column, never a value.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.errors import DataFormatError, DataNotFoundError
from client.ingest import ehr_encode
from client.ingest.ehr_extract import Extract, load_extract
from shared_models.schema import Schema, builtin_schema

SCHEMA = "heart-disease"  # the study schema of these files (shared_models/schemas/heart-disease.toml)

FOLDER = "uci_heart_disease"
CENTRES = ("cleveland", "hungarian", "switzerland", "va")
# Training rows per centre as the FLamby paper publishes them (Table 1): a public size each demo hospital may
# declare as its `nominal_size`, so FedAvg weighs the centres as FLamby does without any N leaving a site.
PUBLISHED_TRAIN_SIZES = {"cleveland": 199, "hungarian": 172, "switzerland": 30, "va": 85}
MD5 = {
    "cleveland": "2d91a8ff69cfd9616aa47b59d6f843db",
    "hungarian": "22e96bee155b5973568101c93b3705f6",
    "switzerland": "9a87f7577310b3917730d06ba9349e20",
    "va": "4249d03ca7711e84f4444768c9426170",
}
SOURCE_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/"

COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
           "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num")
DROPPED = ("slope", "ca", "thal")  # mostly missing outside Cleveland
CATEGORICAL = {"cp": (1, 2, 3, 4), "restecg": (0, 1, 2)}  # one-hot, first level dropped
NUMERIC = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak")
FEATURES = NUMERIC + tuple(f"{c}={v}" for c, levels in CATEGORICAL.items() for v in levels[1:])
ALLOWED = {"sex": (0, 1), "fbs": (0, 1), "exang": (0, 1), "num": (0, 1, 2, 3, 4), **CATEGORICAL}
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43
Z_EPS = 1e-9
MIN_SHARD_ROWS = 8  # simulation: a site's share of a centre's training rows is at least one batch


def centre_file(data_dir: Path, centre: str) -> Path:
    if centre not in CENTRES:
        raise DataNotFoundError(f"unknown heart-disease centre '{centre}'; one of: {', '.join(CENTRES)}")
    return data_dir / FOLDER / f"processed.{centre}.data"


def centre_of(path: Path) -> str:
    """Centre name from a UCI file name (``processed.<centre>.data``), or the file stem."""
    parts = path.name.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "processed" else path.stem


@functools.lru_cache(maxsize=1)
def schema() -> Schema:
    """The study schema the centre files are read with."""
    return builtin_schema(SCHEMA)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataNotFoundError(
            f"heart-disease file not found: {path}. Fetch the data with "
            f"`carefl data fetch heart-disease` or point --data-dir / $CAREFL_DATA at it."
        )


def read_centre(path: Path) -> Extract:
    """The kept rows of one centre file, validated by the study schema — the one reader of these files for
    training and for ``carefl site validate`` (``ehr_extract.load_extract``). Raises ``ExtractRejected`` (a
    DataFormatError) naming every damaged line where the file is refused."""
    path = Path(path)
    _require_file(path)
    return load_extract(path, schema())


def read_rows(path: Path) -> np.ndarray:
    """All 14 raw columns of a UCI ``processed.*.data`` file as floats (NaN for '?'), every row: an
    independent reference for tests and tools, not the loader (``read_centre`` is).

    Raises DataFormatError naming file, line and column of every malformed row at once.
    """
    path = Path(path)
    _require_file(path)
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not a plain-text (ASCII) UCI data file") from None
    rows, problems = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(",")
        if len(fields) != len(COLUMNS):
            problems.append(f"{path.name} line {line_no}: {len(fields)} columns, expected {len(COLUMNS)} "
                            f"({', '.join(COLUMNS)})")
            continue
        row = []
        for col, cell in zip(COLUMNS, fields):
            cell = cell.strip()
            value = math.nan
            if cell != "?":
                try:
                    value = float(cell)
                except ValueError:
                    problems.append(f"{path.name} line {line_no}, column '{col}': not a number and not '?'")
                    continue
                if not math.isfinite(value):
                    problems.append(f"{path.name} line {line_no}, column '{col}': not a finite number")
                elif col in ALLOWED and value not in ALLOWED[col]:
                    problems.append(f"{path.name} line {line_no}, column '{col}': outside the allowed codes "
                                    f"{ALLOWED[col]}")
            row.append(value)
        rows.append(row)
    if problems:
        raise DataFormatError("\n".join(problems))
    if not rows:
        raise DataFormatError(f"{path.name}: no data rows")
    return np.asarray(rows, dtype=np.float64)


def encode(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Complete rows → (13 features, binary label), FLamby's encoding."""
    col = {name: rows[:, i] for i, name in enumerate(COLUMNS)}
    parts = [col[name] for name in NUMERIC]
    for name, levels in CATEGORICAL.items():
        parts += [(col[name] == level).astype(np.float64) for level in levels[1:]]
    return np.stack(parts, axis=1), (col["num"] > 0).astype(np.float64)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's per-centre split: 66/34, seed 43, stratified if both classes have >2 members."""
    levels, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(levels) > 1 and all(counts > 2) else None
    from sklearn.model_selection import train_test_split  # here: scikit-learn costs a second to import

    return train_test_split(
        np.arange(len(labels)),
        test_size=1.0 - TRAIN_FRACTION,
        train_size=TRAIN_FRACTION,
        random_state=SPLIT_SEED,
        shuffle=True,
        stratify=stratify,
    )


@dataclass(frozen=True)
class SiteData:
    """One site's preprocessed train and test split (features already z-scored)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    rows_read: int
    rows_incomplete: int  # excluded for a missing value in a kept column (a file with a damaged row is refused)
    exclusions: dict = field(default_factory=dict)  # reason → rows excluded for it: counts only, no row numbers
    verdict: str = ""  # the reader's verdict line, every excluded line named (site-local: never sent or audited)

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def load_centre(path: Path, shard: int = 0, num_shards: int = 1) -> SiteData:
    """Load one centre file; optionally keep only shard ``shard`` of ``num_shards`` of its train rows
    (simulation of more sites than centres). The test split is always the centre's whole test split.

    A shard keeps at least ``MIN_SHARD_ROWS`` rows: with more sites than that allows (Switzerland has
    30 training rows, so at most 3 shards), the rows are split into as many shards as fit and site
    ``shard`` uses shard ``shard mod that number`` — several virtual sites then train on the same rows.
    """
    rows_read, rows_incomplete, exclusions, verdict, x, y, train_idx, test_idx = _parsed(Path(path))
    if num_shards > 1:
        usable = max(1, min(num_shards, len(train_idx) // MIN_SHARD_ROWS))
        train_idx = np.array_split(np.sort(train_idx), usable)[shard % usable]
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    x = (x - mean) / (std + Z_EPS)
    return SiteData(
        name=centre_of(path),
        x_train=x[train_idx].astype(np.float32),
        y_train=y[train_idx].astype(np.float32),
        x_test=x[test_idx].astype(np.float32),
        y_test=y[test_idx].astype(np.float32),
        rows_read=rows_read,
        rows_incomplete=rows_incomplete,
        exclusions=dict(exclusions),
        verdict=verdict,
    )


def _parsed(path: Path) -> tuple[int, int, dict, str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows read, rows excluded, reason → rows, verdict, features, labels, train indices, test indices) of a
    centre file.

    Remembered per process while the file is unchanged (same size and modification time): a simulation
    actor serves many virtual sites of the same centre, each message parsing the file and re-running the
    split cost ~5 ms. A deployment's ClientApp process handles one message and parses once either way.
    """
    try:
        stat = path.stat()
    except OSError:
        return _parse(path)  # read_centre says what is wrong
    return _parse_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _parse_cached(path: Path, size: int, mtime_ns: int):
    parsed = _parse(path)
    for array in parsed[4:]:
        array.setflags(write=False)  # shared by every caller: never changed in place
    return parsed


def _parse(path: Path) -> tuple[int, int, dict, str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    extract = read_centre(path)  # refuses (naming every damaged line) a file with fewer than 4 rows kept, too
    report = extract.report
    # the schema's encoding equals ``encode`` (13 columns, same order, unscaled): tests/test_ehr_schema.py
    x, y = ehr_encode.raw_matrix(extract), extract.labels
    train_idx, test_idx = split_indices(y)
    return (report.rows_read, report.rows_excluded, report.counts()["problems"], report.verdict(), x, y,
            train_idx, test_idx)


def partition_for(partition_id: int, num_partitions: int) -> tuple[str, int, int]:
    """Simulation: partition → (centre, shard, number of shards of that centre), round-robin: partition i
    is centre i mod 4; a centre's partitions split its training rows (``load_centre``: shards of at least
    ``MIN_SHARD_ROWS`` rows, shared by several partitions beyond that). 4 partitions = the 4 hospitals."""
    centre_idx = partition_id % len(CENTRES)
    num_shards = len(range(centre_idx, num_partitions, len(CENTRES)))
    return CENTRES[centre_idx], partition_id // len(CENTRES), num_shards
