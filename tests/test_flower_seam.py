"""The two Flower seams (server/flower_seam.py for the apps, deploy/site/flower_seam.py for the site
runtime): they load against the installed Flower, each function works on a tiny real input, a
different Flower version is refused loudly, naming both versions and the file to review, and no other
file of server/, client/, shared_models/, privacy/ or deploy/ imports anything but Flower's public API."""

from __future__ import annotations

import ast
import importlib
import io
import re
import zipfile
from pathlib import Path

import flwr
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from deploy.site import flower_seam as site_seam
from server import flower_seam as app_seam

ROOT = Path(__file__).resolve().parents[1]
SEAMS = [(app_seam, "server/flower_seam.py"), (site_seam, "deploy/site/flower_seam.py")]


def _locked_flwr() -> str:
    text = (ROOT / "requirements.lock.txt").read_text()
    return re.search(r"^flwr==(\S+)", text, re.M).group(1)


@pytest.mark.parametrize("seam,path", SEAMS)
def test_each_seam_is_written_against_the_installed_and_locked_flower(seam, path):
    assert seam.FLOWER_LOCKED == _locked_flwr()
    assert seam.FLOWER_LOCKED.startswith(seam.FLOWER_SERIES + ".")
    seam.check_flower_version(flwr.__version__)  # holds for the installed Flower (else the import failed)
    seam.check_flower_version(seam.FLOWER_SERIES + ".7")  # a patch release of the same series passes
    assert seam.SEAM_FILE == path and (ROOT / path).is_file()


@pytest.mark.parametrize("seam,path", SEAMS)
@pytest.mark.parametrize("other", ["1.42.0", "2.0.0", "1.4.1"])
def test_another_flower_version_is_refused_loudly(seam, path, other):
    with pytest.raises(ImportError) as info:
        seam.check_flower_version(other)
    assert isinstance(info.value, seam.FlowerVersionError)
    message = str(info.value)
    assert other in message and seam.FLOWER_SERIES in message and seam.FLOWER_LOCKED in message
    assert path in message and "requirements.lock.txt" in message


# -- nothing outside the seams imports Flower's internals ---------------------------------------------
# Flower's public API as carefl uses it: the packages Flower documents and re-exports for apps (each
# name imported from one must be in its __all__). Anything else goes through one of the two seams.
PUBLIC_FLOWER = ("flwr.app", "flwr.clientapp", "flwr.common", "flwr.serverapp", "flwr.serverapp.strategy")
SCANNED = ("server", "client", "shared_models", "privacy", "deploy")


def flower_imports(source: str) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every import of flwr in ``source`` (name None for ``import flwr.x``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "flwr"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "flwr":
            found += [(node.lineno, node.module, a.name) for a in node.names]
    return sorted(found, key=lambda found_import: found_import[0])


def non_public(module: str, name: str | None) -> str | None:
    """Why importing ``name`` from ``module`` is not Flower's public API (None if it is)."""
    if module not in PUBLIC_FLOWER:
        return f"module {module}"
    if name is not None and name not in getattr(importlib.import_module(module), "__all__", ()):
        return f"{module}.{name} (not in {module}.__all__)"
    return None


def test_only_the_seams_import_flowers_internals():
    seams = {path for _, path in SEAMS}
    files = sorted(f for package in SCANNED for f in (ROOT / package).rglob("*.py")
                   if f.relative_to(ROOT).as_posix() not in seams)
    assert ROOT / "server" / "strategies.py" in files and ROOT / "privacy" / "secure_aggregation.py" in files
    leaks = [f"{f.relative_to(ROOT).as_posix()}:{line} imports {why}"
             for f in files for line, module, name in flower_imports(f.read_text(encoding="utf-8"))
             if (why := non_public(module, name)) is not None]
    assert not leaks, ("Flower internals outside server/flower_seam.py and deploy/site/flower_seam.py (import "
                       "them in the seam, probed, and use them from there):\n" + "\n".join(leaks))


def test_the_import_check_tells_public_api_from_internals():
    source = ("from flwr.app import ArrayRecord\nfrom flwr.serverapp import strategy as s, Grid\n"
              "import flwr.clientapp\ndef f():\n    from flwr.common.secure_aggregation.quantization import quantize\n"
              "from flwr.serverapp.exception import AggregationError\nfrom flwr.common import logger\nimport flwr\n")
    why = [non_public(module, name) for _, module, name in flower_imports(source)]
    assert why == [None, None, None, None, "module flwr.common.secure_aggregation.quantization",
                   "module flwr.serverapp.exception", "flwr.common.logger (not in flwr.common.__all__)", "module flwr"]


# -- server/flower_seam.py ----------------------------------------------------------------------------
def _reply(values: list[float], n: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord([np.array(values, dtype=np.float32)]),
                       "metrics": MetricRecord({"num-examples": n})})


def test_app_seam_aggregates_two_arrayrecords_as_flowers_weighted_mean():
    out = app_seam.aggregate_arrayrecords([_reply([0.0, 4.0], 1), _reply([4.0, 0.0], 3)], "num-examples")
    np.testing.assert_allclose(next(iter(out.values())).numpy(), [3.0, 1.0])


def test_app_seam_trim_mean_drops_the_extremes():
    stacked = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    np.testing.assert_allclose(app_seam.trim_mean(stacked, 0.2), [2.0])


def test_app_seam_filters_error_replies_like_fedavg():
    site_seam.set_task_identity(task_id=1, run_id=1, node_id=0)
    sent = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    good = Message(_reply([1.0], 2), reply_to=sent)
    bad = Message(Error(0, "lost"), reply_to=sent)
    valid, errors = app_seam.check_and_log_replies(flwr_strategy.FedAvg(), [good, bad], is_train=True)
    assert valid == [good] and errors == [bad]


def test_app_seam_replaces_a_replys_content_with_an_error():
    site_seam.set_task_identity(task_id=1, run_id=1, node_id=0)
    sent = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    reply = app_seam.replace_content_with_error(Message(_reply([1.0], 2), reply_to=sent), Error(4100, "no"))
    assert not reply.has_content() and reply.error.code == 4100 and reply.error.reason == "no"


def test_app_seam_reads_array_bytes_and_sizes():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    image = app_seam.array_bytes(Array(values))
    np.testing.assert_array_equal(np.load(io.BytesIO(image)), values)
    record = ArrayRecord([values, np.zeros(5, dtype=np.int64)])
    assert app_seam.serialized_size(record) == len(image) + len(app_seam.array_bytes(record[list(record)[1]]))
    assert app_seam.serialized_size(record) > values.nbytes + 5 * 8  # the np.save headers
    assert isinstance(app_seam.NODE_UNAVAILABLE, int) and isinstance(app_seam.REPLY_MESSAGE_UNAVAILABLE, int)


def test_app_seam_finds_every_internal_it_uses():
    assert app_seam._problems() == []
    assert app_seam.AggregationError is importlib.import_module("flwr.serverapp.exception").AggregationError


@pytest.mark.parametrize("cls", [flwr_strategy.FedAdam, flwr_strategy.FedYogi])
def test_app_seam_saves_and_restores_a_server_optimisers_moments(cls):
    before = cls()
    assert app_seam.strategy_state(before) == {}  # no moments before the first aggregation
    before.m_t, before.v_t = {"w": np.array([0.5, -1.0])}, {"w": np.array([0.25, 1.0])}
    state = app_seam.strategy_state(before)
    assert set(state) == set(app_seam.OPTIMISER_STATE) == {"m_t", "v_t"}
    after = cls()
    app_seam.restore_strategy_state(after, state)
    np.testing.assert_array_equal(after.m_t["w"], [0.5, -1.0])
    np.testing.assert_array_equal(after.v_t["w"], [0.25, 1.0])
    assert after.m_t["w"] is not before.m_t["w"]
    assert app_seam.strategy_state(flwr_strategy.FedAvg()) == {}  # no server optimiser, nothing to keep


def test_app_seam_numbers_a_resumed_runs_rounds_on():
    strategy, seen = flwr_strategy.FedAvg(), []
    for name in app_seam.ROUND_METHODS:
        setattr(strategy, name, lambda server_round, *args, _n=name: seen.append((_n, server_round, args)))
    app_seam.number_rounds_from(strategy, 5)
    strategy.configure_train(1, "arrays", "config", "grid")
    strategy.aggregate_train(2, "replies")
    strategy.configure_evaluate(1, "arrays", "config", "grid")
    strategy.aggregate_evaluate(3, "replies")
    assert seen == [("configure_train", 6, ("arrays", "config", "grid")), ("aggregate_train", 7, ("replies",)),
                    ("configure_evaluate", 6, ("arrays", "config", "grid")), ("aggregate_evaluate", 8, ("replies",))]


# -- deploy/site/flower_seam.py -----------------------------------------------------------------------
def test_site_seam_finds_every_internal_it_hooks():
    assert site_seam.WARM_PROBLEMS == ()
    site_seam.require_warm_executor_seam()
    module, intake = site_seam.message_intake()
    assert intake is module._pull_and_store_message


def test_site_seam_wraps_and_restores_flower_functions():
    module, intake = site_seam.message_intake()
    seen = []
    try:
        site_seam.wrap_message_intake(lambda original: seen.append(original) or (lambda *a: "wrapped"))
        assert seen == [intake] and site_seam.message_intake()[1]() == "wrapped"
    finally:
        module._pull_and_store_message = intake


def test_site_seam_task_identity_and_transport_round_trip():
    site_seam.set_task_identity(task_id=3, run_id=7, node_id=0)
    msg = Message(RecordDict({"c": ConfigRecord({"k": 1})}), dst_node_id=2, message_type=MessageType.QUERY)
    assert msg.metadata.run_id == 7
    record = RecordDict({"arrays": ArrayRecord([np.arange(4, dtype=np.float32)])})
    back = site_seam.as_transported(record)
    assert back is not record and back.object_id == record.object_id
    np.testing.assert_array_equal(back["arrays"].to_numpy_ndarrays()[0], np.arange(4, dtype=np.float32))


def test_site_seam_builds_the_fab_whose_hash_sites_approve(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "tiny"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "t"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tiny:s"\nclientapp = "tiny:c"\n')
    (tmp_path / "tiny.py").write_text("s = c = None\n")
    with zipfile.ZipFile(io.BytesIO(site_seam.build_fab_from_disk(tmp_path))) as fab:
        assert "tiny.py" in fab.namelist()
    app_dir = site_seam.installed_app_dir("t/tiny", "1.0.0", "ab" * 32)
    assert isinstance(app_dir, Path) and app_dir.name.endswith("abababab")


def test_site_seam_puts_a_checked_reply_or_its_replacement_through_flowers_own_push():
    """The egress guard's place in the SuperNode: Flower's reply push, on Flower's own state and object
    store, sends what the check returns — the reply read whole from the store, or an error in its place."""
    from flwr.app import Error
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    module, _ = site_seam.message_intake()
    push = module._push_messages
    objects = ObjectStoreFactory()
    state, store = NodeStateFactory(objects).state(), objects.store()
    site_seam.set_task_identity(task_id=3, run_id=7, node_id=0)
    instruction = Message(RecordDict({"c": ConfigRecord({"k": 1})}), dst_node_id=2, message_type=MessageType.TRAIN)
    site_seam.insert_reply(instruction, state, store)  # stored as the intake stores a pulled message
    reply = Message(RecordDict({"arrays": ArrayRecord([np.arange(3, dtype=np.float32)])}), reply_to=instruction)
    site_seam.insert_reply(reply, state, store)  # … and as the ClientApp's push leaves its reply
    seen, sent = [], []

    def check(message, state_, store_):
        whole, size = site_seam.reply_with_content(message, store_, timeout=5)
        seen.append((whole.content["arrays"].to_numpy_ndarrays()[0].tolist(), size > 0))
        return site_seam.replace_reply(message, Error(4006, "blocked"), state_, store_)

    def send(message, tree, runtime):
        sent.append(message)
        return set(), "session"

    try:
        site_seam.check_replies_before_push(check)
        module._push_messages(state, store, send, lambda *a: None)
    finally:
        module._push_messages = push
    assert seen == [([0.0, 1.0, 2.0], True)]
    assert len(sent) == 1 and sent[0].has_error() and sent[0].error.code == 4006
    assert sent[0].metadata.reply_to_message_id == instruction.metadata.message_id
    assert sent[0].metadata.group_id == reply.metadata.group_id and store.get(reply.metadata.message_id) is None
