"""The heart-disease loader on the real UCI files (FLamby's Fed-Heart-Disease protocol).

The data directory is $CAREFL_DATA (default /work/shared/data); the tests that need the real
files skip when its ``uci_heart_disease`` folder is absent (and fail when $CI is true). Bad-input tests
write real files (real lines, then corrupted) to ``tmp_path``.
"""

from __future__ import annotations

import math
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sklearn.model_selection import train_test_split

from client.ingest import heart_disease
from client.errors import DataFormatError, DataNotFoundError, SiteError

# FLamby's documented per-centre split sizes (train, test) and rows dropped for a missing value.
FLAMBY_SIZES = {"cleveland": (199, 104), "hungarian": (172, 89), "switzerland": (30, 16), "va": (85, 45)}
ROWS_INCOMPLETE = {"cleveland": 0, "hungarian": 33, "switzerland": 77, "va": 70}


@pytest.fixture(scope="module")
def loaded(data_dir):
    return {c: heart_disease.load_centre(heart_disease.centre_file(data_dir, c)) for c in heart_disease.CENTRES}


# ---- an independent reference pipeline (plain Python parsing + sklearn), for comparison ----

def _reference(path: Path):
    """Raw encoded features (unscaled), labels and the FLamby split, computed independently."""
    raw = []
    for line in path.read_text().splitlines():
        if line.strip():
            raw.append([math.nan if f.strip() == "?" else float(f) for f in line.split(",")])
    raw = np.array(raw)
    assert raw.shape[1] == 14
    kept = [i for i in range(14) if i not in (10, 11, 12)]  # slope, ca, thal dropped
    rows = raw[~np.isnan(raw[:, kept]).any(axis=1)]
    age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak = (rows[:, i] for i in range(10))
    x = np.stack([age, sex, trestbps, chol, fbs, thalach, exang, oldpeak,
                  cp == 2, cp == 3, cp == 4, restecg == 1, restecg == 2], axis=1).astype(float)
    y = (rows[:, 13] > 0).astype(float)
    _, counts = np.unique(y, return_counts=True)
    stratify = y if len(counts) == 2 and (counts > 2).all() else None
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=1 - 0.66, train_size=0.66,
                                           random_state=43, stratify=stratify)
    return x, y, train_idx, test_idx, len(raw)


def _zscore(x_train_raw: np.ndarray, x_raw: np.ndarray) -> np.ndarray:
    mean, std = x_train_raw.mean(axis=0), x_train_raw.std(axis=0)
    return (x_raw - mean) / np.where(std > 0, std, 1.0)


# ---- the real data ----

@pytest.mark.parametrize("centre", heart_disease.CENTRES)
def test_split_sizes_match_flamby(loaded, centre):
    data = loaded[centre]
    assert (len(data.y_train), len(data.y_test)) == FLAMBY_SIZES[centre]
    assert data.x_train.shape == (FLAMBY_SIZES[centre][0], 13)
    assert data.x_test.shape == (FLAMBY_SIZES[centre][1], 13)
    assert data.name == centre


@pytest.mark.parametrize("centre", heart_disease.CENTRES)
def test_rows_incomplete_and_read(loaded, centre):
    data = loaded[centre]
    assert data.rows_incomplete == ROWS_INCOMPLETE[centre]
    assert data.rows_read == sum(FLAMBY_SIZES[centre]) + ROWS_INCOMPLETE[centre]


def test_thirteen_named_features(loaded):
    assert len(heart_disease.FEATURES) == 13
    assert heart_disease.FEATURES == ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
                                      "cp=2", "cp=3", "cp=4", "restecg=1", "restecg=2")
    for data in loaded.values():
        assert data.n_features == 13


@pytest.mark.parametrize("centre", heart_disease.CENTRES)
def test_train_features_are_z_scored(loaded, centre):
    x = loaded[centre].x_train.astype(np.float64)
    assert x.dtype == np.float64 and loaded[centre].x_train.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    std = x.std(axis=0)
    # every column has unit variance except a column that is constant in the centre (std 0)
    assert np.all((np.abs(std - 1.0) < 1e-4) | (std < 1e-6))
    assert (np.abs(std - 1.0) < 1e-4).sum() >= 12
    labels = np.concatenate([loaded[centre].y_train, loaded[centre].y_test])
    assert set(np.unique(labels)) <= {0.0, 1.0}


@pytest.mark.parametrize("centre", heart_disease.CENTRES)
def test_split_equals_reference_train_test_split(data_dir, loaded, centre):
    x_raw, y, train_idx, test_idx, n_read = _reference(heart_disease.centre_file(data_dir, centre))
    data = loaded[centre]
    assert data.rows_read == n_read
    np.testing.assert_array_equal(data.y_train, y[train_idx])
    np.testing.assert_array_equal(data.y_test, y[test_idx])
    z = _zscore(x_raw[train_idx], x_raw)
    np.testing.assert_allclose(data.x_train, z[train_idx], atol=1e-4)
    np.testing.assert_allclose(data.x_test, z[test_idx], atol=1e-4)


def test_load_is_reproducible(data_dir, loaded):
    for centre in heart_disease.CENTRES:
        again = heart_disease.load_centre(heart_disease.centre_file(data_dir, centre))
        first = loaded[centre]
        for field in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
        assert (again.rows_read, again.rows_incomplete) == (first.rows_read, first.rows_incomplete)


# ---- partitions for simulation ----

def test_partition_for_round_robin_two_shards_each():
    seen = []
    for pid in range(8):
        centre, shard, num_shards = heart_disease.partition_for(pid, 8)
        assert centre == heart_disease.CENTRES[pid % 4]
        assert num_shards == 2
        seen.append((centre, shard))
    assert sorted(seen) == sorted((c, s) for c in heart_disease.CENTRES for s in (0, 1))


def test_partition_for_uneven_counts():
    # 6 partitions over 4 centres: the first two centres are split in two, the others not
    shards = {}
    for pid in range(6):
        centre, shard, num_shards = heart_disease.partition_for(pid, 6)
        shards.setdefault(centre, set()).add((shard, num_shards))
    assert shards == {"cleveland": {(0, 2), (1, 2)}, "hungarian": {(0, 2), (1, 2)},
                      "switzerland": {(0, 1)}, "va": {(0, 1)}}


def _unscale(shard_data, x_test_raw):
    """Recover the raw train rows of a shard: test rows are known raw, scaled by the same affine map."""
    raw = np.empty(shard_data.x_train.shape)
    usable = []
    for j in range(shard_data.x_train.shape[1]):
        z_test = shard_data.x_test[:, j].astype(np.float64)
        if np.ptp(z_test) < 1e-6 or np.ptp(x_test_raw[:, j]) == 0:
            continue  # constant column: carries no identity
        slope, intercept = np.polyfit(z_test, x_test_raw[:, j], 1)
        np.testing.assert_allclose(z_test * slope + intercept, x_test_raw[:, j], atol=1e-3)
        raw[:, j] = shard_data.x_train[:, j] * slope + intercept
        usable.append(j)
    return np.round(raw[:, usable], 1), usable


@pytest.mark.parametrize("centre", ["cleveland", "hungarian", "va"])
def test_shards_split_train_rows_disjointly_and_completely(data_dir, loaded, centre):
    path = heart_disease.centre_file(data_dir, centre)
    x_raw, _, train_idx, test_idx, _ = _reference(path)
    full = loaded[centre]
    shards = [heart_disease.load_centre(path, shard=s, num_shards=2) for s in (0, 1)]

    sizes = [len(s.y_train) for s in shards]
    assert sum(sizes) == len(full.y_train) and abs(sizes[0] - sizes[1]) <= 1
    for s in shards:
        np.testing.assert_array_equal(s.y_test, full.y_test)  # the whole test split, always
        np.testing.assert_allclose(s.x_train.mean(axis=0), 0.0, atol=1e-5)  # scaled by its own rows

    recovered, cols = [], None
    for s in shards:
        rows, cols_s = _unscale(s, x_raw[test_idx])
        cols = cols_s if cols is None else [c for c in cols if c in cols_s]
        recovered.append((rows, cols_s))
    assert len(cols) >= 10
    as_rows = [Counter(map(tuple, r[:, [cs.index(c) for c in cols]])) for r, cs in recovered]
    expected = Counter(map(tuple, np.round(x_raw[train_idx][:, cols], 1)))
    # as multisets: every train row lands in exactly one shard, and nothing else does
    assert as_rows[0] + as_rows[1] == expected


# ---- errors: missing data ----

def _assert_fetch_hint(exc: SiteError, path: Path) -> None:
    message = str(exc)
    assert str(path) in message
    assert "carefl data fetch" in message


def test_missing_directory(tmp_path):
    path = heart_disease.centre_file(tmp_path / "no-such-dir", "cleveland")
    with pytest.raises(DataNotFoundError) as info:
        heart_disease.load_centre(path)
    _assert_fetch_hint(info.value, path)


def test_missing_file(tmp_path):
    (tmp_path / heart_disease.FOLDER).mkdir()
    path = heart_disease.centre_file(tmp_path, "va")
    with pytest.raises(DataNotFoundError) as info:
        heart_disease.load_centre(path)
    _assert_fetch_hint(info.value, path)


def test_unknown_centre_is_data_not_found(tmp_path):
    with pytest.raises(DataNotFoundError, match="unknown heart-disease centre 'mars'"):
        heart_disease.centre_file(tmp_path, "mars")


# ---- errors: malformed files built from real lines ----

@pytest.fixture
def real_lines(data_dir) -> list[str]:
    lines = heart_disease.centre_file(data_dir, "hungarian").read_text().splitlines()
    return [line for line in lines if line.strip()][:12]


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "processed.hungarian.data"
    path.write_text("\n".join(lines) + "\n")
    return path


def _full_report(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_real_lines_copy_loads(tmp_path, real_lines):
    data = heart_disease.load_centre(_write(tmp_path, real_lines))
    assert data.rows_read == len(real_lines)
    assert data.name == "hungarian"


def test_wrong_column_count(tmp_path, real_lines):
    real_lines[4] = real_lines[4] + ",1"
    path = _write(tmp_path, real_lines)
    with pytest.raises(DataFormatError) as info:
        heart_disease.load_centre(path)
    message = str(info.value)
    assert path.name in message
    assert "line 5" in message
    assert "15 columns" in message


def test_line_numbers_count_blank_lines(tmp_path, real_lines):
    real_lines[3] = real_lines[3] + ",0"
    lines = real_lines[:2] + ["", "   "] + real_lines[2:]  # the bad row is now on line 6
    with pytest.raises(DataFormatError, match=r"line 6: 15 columns"):
        heart_disease.load_centre(_write(tmp_path, lines))


def test_missing_columns(tmp_path, real_lines):
    real_lines[2] = ",".join(real_lines[2].split(",")[:10])
    path = _write(tmp_path, real_lines)
    with pytest.raises(DataFormatError, match=r"processed\.hungarian\.data line 3: 10 columns"):
        heart_disease.load_centre(path)


def test_non_numeric_field_never_echoes_the_value(tmp_path, real_lines):
    fields = real_lines[6].split(",")
    fields[4] = "XYZZY123"  # chol
    real_lines[6] = ",".join(fields)
    path = _write(tmp_path, real_lines)
    with pytest.raises(DataFormatError) as info:
        heart_disease.load_centre(path)
    message = str(info.value)
    assert path.name in message
    assert "line 7" in message
    assert "'chol'" in message
    assert "XYZZY123" not in message
    assert "XYZZY123" not in _full_report(info.value)  # nor in a logged traceback


def test_non_finite_field_is_rejected(tmp_path, real_lines):
    fields = real_lines[1].split(",")
    fields[7] = "inf"  # thalach
    real_lines[1] = ",".join(fields)
    with pytest.raises(DataFormatError, match=r"line 2, column 'thalach'"):
        heart_disease.load_centre(_write(tmp_path, real_lines))


def test_out_of_range_categorical_code(tmp_path, real_lines):
    fields = real_lines[3].split(",")
    fields[2] = "7"  # cp must be 1..4
    real_lines[3] = ",".join(fields)
    path = _write(tmp_path, real_lines)
    with pytest.raises(DataFormatError) as info:
        heart_disease.load_centre(path)
    message = str(info.value)
    assert path.name in message and "line 4" in message and "'cp'" in message
    assert "allowed codes" in message


def test_out_of_range_label(tmp_path, real_lines):
    fields = real_lines[0].split(",")
    fields[13] = "9"  # num must be 0..4
    real_lines[0] = ",".join(fields)
    with pytest.raises(DataFormatError, match=r"line 1, column 'num'"):
        heart_disease.load_centre(_write(tmp_path, real_lines))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "processed.va.data"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=r"processed\.va\.data: no data rows"):
        heart_disease.load_centre(path)


def test_non_ascii_file(tmp_path, real_lines):
    path = _write(tmp_path, real_lines)
    path.write_bytes(path.read_bytes() + "Zürich\n".encode("utf-8"))
    with pytest.raises(DataFormatError, match="not a plain-text"):
        heart_disease.load_centre(path)


def test_too_few_complete_rows(tmp_path, real_lines):
    fields = real_lines[0].split(",")
    fields[4] = "?"
    lines = [",".join(fields)] * 5 + real_lines[1:3]
    with pytest.raises(DataFormatError, match="too few to split"):
        heart_disease.load_centre(_write(tmp_path, lines))
