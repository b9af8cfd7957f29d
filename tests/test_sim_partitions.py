"""Simulation with more virtual sites than a centre has rows for (benchmarks/scale.py: 1000 sites)."""

from __future__ import annotations

import shutil

import numpy as np

from client import heart_disease
from tests.helpers import data_dir


def test_shards_never_fall_below_a_batch_and_are_shared_beyond_that():
    path = heart_disease.centre_file(data_dir(), "switzerland")  # 30 training rows: at most 3 shards of ≥ 8
    whole = heart_disease.load_centre(path)
    shards = [heart_disease.load_centre(path, shard=s, num_shards=250) for s in range(6)]
    assert all(len(s.y_train) >= heart_disease.MIN_SHARD_ROWS for s in shards)
    assert sum(len(s.y_train) for s in shards[:3]) == len(whole.y_train)
    for s in range(3):  # site 3 + s trains on the rows of site s
        np.testing.assert_array_equal(shards[s].x_train, shards[s + 3].x_train)
    assert all(np.array_equal(s.x_test.shape, whole.x_test.shape) for s in shards)
    # four sites are the four hospitals, unsplit; a few sites still split every centre
    assert heart_disease.partition_for(2, 4) == ("switzerland", 0, 1)
    assert [len(heart_disease.load_centre(path, s, 2).y_train) for s in (0, 1)] == [15, 15]


def test_a_changed_centre_file_is_read_again(tmp_path):
    source = heart_disease.centre_file(data_dir(), "cleveland")
    copy = tmp_path / source.name
    shutil.copy(source, copy)
    first = heart_disease.load_centre(copy)
    assert heart_disease.load_centre(copy).rows_read == first.rows_read  # remembered
    lines = copy.read_text().splitlines(keepends=True)
    copy.write_text("".join(lines[:200]))
    assert heart_disease.load_centre(copy).rows_read == 200
