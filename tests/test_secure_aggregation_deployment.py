"""Secure aggregation on a real loopback consortium (kits, TLS, node auth, four heart-disease site agents
behind their code gates and egress guards): a study whose sites mask their updates, one of which dies
after its masked update arrived; what the coordinator received, what it could unmask, and what sites and
the run config refuse. The app every site approves is this repository's with two recorders compiled in
(each site writes its plain update before masking, the coordinator writes the replies it received), so
the test can compare what left a site with what the coordinator held."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.attacks import patched_app
from deploy import processes
from deploy.site.approval import app_hash, approve
from privacy import secure_aggregation as sa
from server.run_dir import read_jsonl
from tests.helpers import default_run_config, running_consortium, wait_online, wait_run

SITES = {"cleveland": "cleveland", "hungarian": "hungarian", "switzerland": "switzerland", "va": "va"}
DIES = ("va", 2)  # this site kills its own SuperNode when asked to unmask that round: after its update arrived
# Each summand is stochastically rounded to within one step 2·8/2²² (3.8e-6); four of them, divided by the
# sum's share of the weights (at least half here), then float32: the unmasked average may differ by this.
TOLERANCE = 4 * 2 * sa.CLIP_RANGE / sa.QUANT_RANGE / 0.5 + 1e-6

SITE_RECORDER = '''

# ---- tests/test_secure_aggregation_deployment.py: record the plain update; one site dies at unmasking ----
import os as _os  # noqa: E402
import signal as _signal  # noqa: E402

import numpy as _np  # noqa: E402

_DUMPS = {dumps!r}
_masked_update = secagg.masked_update


def _recording(msg, context, trained, names):
    r = int(msg.content["config"]["server-round"])
    base = _np.concatenate([msg.content["arrays"][n].numpy().astype(_np.float64).ravel() for n in names])
    plain = _np.concatenate([trained[n].numpy().astype(_np.float64).ravel() for n in names]) - base
    _np.savez(f"{{_DUMPS}}/site-{{context.node_id}}-round-{{r}}.npz", base=base, plain=plain)
    return _masked_update(msg, context, trained, names)


secagg.masked_update = _recording
_unmask = secagg.unmask


def _dying(msg, context):
    site = site_from_configs(context.node_config, context.run_config).site_id
    if (site, int(msg.content["config"]["server-round"])) == {dies!r}:
        _os.killpg(_os.getpgid(0), _signal.SIGKILL)  # the gate, its executor and this ClientApp
    return _unmask(msg, context)


secagg.unmask = _dying
'''

SERVER_RECORDER = '''

# ---- tests/test_secure_aggregation_deployment.py: what the coordinator received ----
_exchange = SiteGrid._exchange


def _recording_exchange(self, messages, timeout, *rest):
    replies = _exchange(self, messages, timeout, *rest)
    import numpy as _np
    for reply in replies:
        if reply.metadata.message_type == "train" and not reply.has_error():
            arrays = next(iter(reply.content.array_records.values()))
            _np.save(f"{dumps}/received-{{reply.metadata.src_node_id}}-round-{{reply.metadata.group_id}}.npy",
                     _np.concatenate([a.numpy().ravel() for a in arrays.values()]))
    return replies


SiteGrid._exchange = _recording_exchange
'''


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    with running_consortium(root, SITES) as c:
        dumps = root / "dumps"
        dumps.mkdir()
        app = patched_app(root, {}, SITE_RECORDER.format(dumps=str(dumps), dies=DIES))
        sites_py = app / "server" / "sites.py"
        sites_py.write_text(sites_py.read_text() + SERVER_RECORDER.format(dumps=str(dumps)))
        for site in SITES:
            approve(c["kits"] / site / "site.toml", app_hash(app))
        c["coord"].app_dir = app
        yield {**c, "dumps": dumps}


@pytest.fixture(scope="module")
def secure_study(consortium):
    coord, root = consortium["coord"], consortium["root"]
    out = root / "secure-run"
    config = default_run_config(**{"num-server-rounds": 2, "local-steps": 5, "min-sites": 3, "round-timeout": 90,
                                   "sites": "", "out-dir": str(out), "secure-aggregation": True})
    run_id = coord.submit(config)
    status = wait_run(coord, run_id, timeout=400)
    return {**consortium, "out": out, "status": status, "run_log": coord.run_log(run_id)}


def test_the_study_completes_on_the_unmasked_sum_with_a_site_that_died_after_masking(secure_study):
    out, nodes = secure_study["out"], secure_study["coord"].site_nodes()
    assert secure_study["status"] == "finished:completed", secure_study["run_log"][-3000:]
    first, second = (r["secure_aggregation"] for r in read_jsonl(out / "rounds.jsonl"))
    assert first["summed"] == sorted(SITES) and first["recovered"] == []
    assert second["summed"] == sorted(SITES) and second["recovered"] == [DIES[0]]  # in the sum, mask rebuilt
    # the unmasked sum is FedAvg of the very updates the sites computed (their public weights)
    weights = json.loads((out / "summary.json").read_text())["per_site"]
    dumps = {site: np.load(secure_study["dumps"] / f"site-{nodes[site]}-round-2.npz") for site in SITES}
    total = sum(weights[s]["weight"] for s in SITES)
    fedavg = dumps["cleveland"]["base"] + sum(weights[s]["weight"] * dumps[s]["plain"] for s in SITES) / total
    state = torch.load(out / "final_model.pt", weights_only=False)
    state = state.get("state_dict", state)
    final = np.concatenate([v.numpy().astype(np.float64).ravel() for v in state.values()])
    assert np.abs(final - fedavg).max() < TOLERANCE


def test_what_the_coordinator_received_holds_no_site_update(secure_study):
    dumps, nodes = secure_study["dumps"], secure_study["coord"].site_nodes()
    received = sorted(dumps.glob("received-*.npy"))
    assert len(received) == 2 * len(SITES)
    for site in SITES:
        for server_round in (1, 2):
            words = np.load(dumps / f"received-{nodes[site]}-round-{server_round}.npy")
            plain = np.load(dumps / f"site-{nodes[site]}-round-{server_round}.npz")["plain"]
            assert words.dtype == np.uint32 and words.size == plain.size
            alone = sa.dequantised_sum(words.astype(np.int64) % (sa.QUANT_RANGE + 1), 1)  # read as one update
            assert np.abs(alone - plain).mean() > 20 * np.abs(plain).mean()
    # each site logged the hash of the masked reply it sent; the coordinator logged the same hash received
    audit = [json.loads(x) for x in (secure_study["out"] / "audit.jsonl").read_text().splitlines()]
    received_hashes = {(r["payload"]["site"], r["payload"]["round"]): r["payload"]["arrays_sha256"]
                       for r in audit if r["event"] == "update"}
    for site in SITES:
        site_log = [json.loads(x) for x in (secure_study["kits"] / site / "audit.jsonl").read_text().splitlines()]
        sent = {r["payload"]["round"]: r["payload"]["arrays_sha256"] for r in site_log
                if r["event"] == "reply" and r["payload"].get("message_type") == "train"
                and r["payload"].get("arrays_sha256")}
        assert all(sent[rnd] == received_hashes[(site, rnd)] for rnd in (1, 2) if rnd in sent)
        assert 1 in sent
    sums = [r["payload"] for r in audit if r["event"] == "secure-aggregation"]
    assert [s["recovered"] for s in sums] == [[], [DIES[0]]]


def test_a_site_requiring_secure_aggregation_refuses_a_plain_run_and_a_robust_strategy_is_refused(secure_study):
    coord, kits, root = secure_study["coord"], secure_study["kits"], secure_study["root"]
    with (kits / "cleveland" / "site.toml").open("a") as fh:  # the dataset's section is the file's last
        fh.write("require_secure_aggregation = true\n")
    wait_online(coord, ["cleveland", "hungarian"], timeout=120)
    plain = default_run_config(**{"num-server-rounds": 1, "min-sites": 2, "round-timeout": 60,
                                  "sites": "cleveland,hungarian", "out-dir": str(root / "plain-run")})
    run_id = coord.submit(plain)
    assert wait_run(coord, run_id, timeout=200) != "finished:completed"
    stop = read_jsonl(root / "plain-run" / "metrics.jsonl")[-1]
    assert "requires secure aggregation" in stop["reason"] and "cleveland" in stop["reason"]
    assert not (root / "plain-run" / "checkpoint.pt").exists()

    # the operator's command refuses a robust strategy under secure aggregation before anything is submitted
    done = subprocess.run([processes.tool("carefl"), "coordinator", "run", "--kit", str(kits / "coordinator"),
                           "--state-dir", str(root / "state"), "--sites", "cleveland,hungarian", "--rounds", "1",
                           "--strategy", "fedmedian", "--secure-aggregation", "--out", str(root / "robust-run")],
                          capture_output=True, text=True, env={**processes.flower_env(root / "cli"), "COLUMNS": "300"},
                          timeout=120, stdin=subprocess.DEVNULL)
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and "strategy 'fedmedian' needs every site's own update" in text, text
    assert "Traceback" not in text and not (root / "robust-run").exists()
