"""Simulations with many virtual sites (benchmarks/scale.py: 1000): shards of a centre's rows, and a
handshake in which sites answer late."""

from __future__ import annotations

import shutil

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.ingest import heart_disease
from server import sites
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


class SlowSites:
    """A Grid whose nodes answer a query only on their ``patience``-th ask (queued behind the others)."""

    def __init__(self, patience: dict[int, int]) -> None:
        self.patience, self.asks = patience, {n: 0 for n in patience}

    def get_node_ids(self):
        return list(self.patience)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asks[node] += 1
            assert msg.metadata.ttl == sites.QUERY_TIMEOUT  # an unanswered query expires, it does not pile up
            if self.asks[node] >= self.patience[node]:
                content = RecordDict({"site": ConfigRecord({"site-id": f"s{node}", "models": ["ehr-logreg"]}),
                                      "counts": MetricRecord({"nominal-size": 10, "n-features": 13})})
                replies.append(Message(content, reply_to=msg))
        return replies


def test_sites_that_miss_the_query_deadline_are_asked_again_while_sites_are_missing():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    grid = SlowSites({1: 1, 2: 2, 3: 3, 4: 10**6})
    found = sites.discover_sites(grid, wanted=(), min_sites=3, wait=60, poll=0)
    assert [s.site_id for s in found] == ["s1", "s2", "s3"]
    assert grid.asks == {1: 1, 2: 2, 3: 3, 4: 3}  # once enough sites answered, a silent one is not waited for
    named = SlowSites({1: 1, 2: 4})
    assert [s.site_id for s in sites.discover_sites(named, wanted=("s2",), min_sites=1, wait=60, poll=0)] == ["s2"]
