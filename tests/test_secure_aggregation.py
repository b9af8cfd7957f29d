"""Secure aggregation (SecAgg+): the protocol's arithmetic, and real studies of the four heart-disease
hospitals through the real ServerApp and ClientApps in this process (deploy/demo/inprocess.py): what the
coordinator receives, what it can unmask, sites that drop before and after masking, and what a site's
policy and the run config refuse. tests/test_fault_injection.py runs it over real processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict

from client import secure_aggregation as site_side
from privacy import secure_aggregation as sa
from server.settings import RunConfigError, RunSettings
from tests.helpers import default_run_config, site_config

CENTRES = ("cleveland", "hungarian", "switzerland", "va")
# Each summand is stochastically rounded to within one step 2·8/2²² (3.8e-6); four of them, divided by the
# sum's share of the weights (at least half here), then float32: the unmasked average may differ by this.
TOLERANCE = 4 * 2 * sa.CLIP_RANGE / sa.QUANT_RANGE / 0.5 + 1e-6


def test_masks_cancel_in_the_sum_and_a_lone_masked_vector_is_uniform():
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.05, 10_000) for _ in range(3)]
    keys = {n: sa.new_private_key() for n in (5, 7, 9)}
    publics = {n: sa.public_bytes(k) for n, k in keys.items()}
    seeds = {n: sa.new_seed() for n in keys}
    masked = []
    for node, update in zip(keys, updates):
        pairs = {o: sa.pair_seed(keys[node], publics[o]) for o in keys if o != node}
        masked.append(sa.masked(sa.quantise(update, 1 / 3).values, seeds[node], pairs, node))
    total = sum(masked[1:], masked[0].copy())
    for node in keys:
        total -= sa.mask_stream(seeds[node], total.size)
    mean = sa.dequantised_sum(total, 3)
    assert np.abs(mean - sum(updates) / 3).max() < 3 * 2 * sa.CLIP_RANGE / sa.QUANT_RANGE
    alone = masked[0].astype(np.float64) / 2 ** 32  # one site's reply: uniform words, nothing of its update
    assert abs(alone.mean() - 0.5) < 0.02 and abs(np.corrcoef(alone, updates[0])[0, 1]) < 0.05
    total[0] = 3 * sa.QUANT_RANGE + 1  # a summand outside the protocol
    with pytest.raises(sa.SecureAggregationError, match="out of range"):
        sa.dequantised_sum(total, 3)


def test_shares_rebuild_with_a_majority_and_a_swapped_share_is_caught():
    group = [3, 4, 8, 11]
    share_keys = {n: sa.new_private_key() for n in group}
    publics = {n: sa.public_bytes(k) for n, k in share_keys.items()}
    seed, mask_key = sa.new_seed(), sa.new_private_key()
    out, own = sa.make_shares(3, group, publics, share_keys[3], seed, mask_key)
    opened = {n: sa.open_share(n, 3, out[n], share_keys[n], publics[3]) for n in (4, 8, 11)}
    assert sa.threshold_for(4) == 3
    assert sa.rebuild([own[0], opened[4][0], opened[8][0]], 4) == seed
    assert sa.private_bytes(sa.load_private(sa.rebuild([opened[n][1] for n in (4, 8, 11)], 4))) == \
        sa.private_bytes(mask_key)
    with pytest.raises(sa.SecureAggregationError, match="3 are needed"):
        sa.rebuild([own[0], opened[4][0]], 4)
    with pytest.raises(sa.SecureAggregationError, match="do not decrypt"):  # 4's shares handed to 8
        sa.open_share(8, 3, out[4], share_keys[8], publics[3])


class Recorder:
    """The sites' ClientApp, recording each site's plain update just before it is masked (in this process
    only: the replies are the real ones) and, per ``drop`` ((stage, round) → node), answering one protocol
    stage of one round with an error."""

    def __init__(self, drop: dict[tuple[str, int], int] | None = None) -> None:
        from client.client_app import app
        self.app, self.drop = app, drop or {}
        self.plain: dict[tuple[int, int], np.ndarray] = {}
        self.globals: dict[int, dict] = {}
        self.replies: list[Message] = []
        original = site_side.masked_update

        def recording(msg, context, trained, names):
            r = int(msg.content["config"]["server-round"])
            self.globals[r] = {n: msg.content["arrays"][n].numpy().copy() for n in names}
            self.plain[(r, context.node_id)] = np.concatenate(
                [trained[n].numpy().astype(np.float64).ravel() - self.globals[r][n].astype(np.float64).ravel()
                 for n in names])
            return original(msg, context, trained, names)
        self.recording = recording

    def __call__(self, msg: Message, context: Context) -> Message:
        stage = msg.metadata.message_type
        config = msg.content.config_records.get("config", {})
        if self.drop.get((stage, int(config.get("server-round", 0)))) == context.node_id:
            return Message(Error(4003, "internal error at the site; see the site's log"), reply_to=msg)
        reply = self.app(msg, context)
        if stage == MessageType.TRAIN:
            self.replies.append(reply)
        return reply


def _study(folder: Path, monkeypatch, recorder: Recorder, rounds: int = 2, **overrides) -> dict:
    from deploy.demo.inprocess import InProcessGrid
    from server.server_app import app as server_app

    monkeypatch.setattr(site_side, "masked_update", recorder.recording)
    nodes = {10 + i: {"site-config": str(site_config(folder / "sites", c, evaluation="exact", accountant="rdp"))}
             for i, c in enumerate(CENTRES)}
    config = default_run_config(**{"num-server-rounds": rounds, "out-dir": str(folder / "run"), "round-timeout": 5,
                                   "local-steps": 3, "secure-aggregation": True, **overrides})
    grid = InProcessGrid(recorder, nodes, config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    summary = json.loads((folder / "run" / "summary.json").read_text())
    return {"summary": summary, "grid": grid, "config": config, "folder": folder,
            "rounds": [json.loads(x) for x in (folder / "run" / "rounds.jsonl").read_text().splitlines()]}


def _final(folder: Path) -> np.ndarray:
    state = torch.load(folder / "run" / "final_model.pt", weights_only=False)
    state = state.get("state_dict", state)
    return np.concatenate([v.numpy().astype(np.float64).ravel() for v in state.values()])


def test_the_unmasked_sum_is_fedavg_of_the_same_updates_and_the_coordinator_sees_no_update(tmp_path, monkeypatch):
    recorder = Recorder()
    study = _study(tmp_path, monkeypatch, recorder)
    weights = {10 + i: study["summary"]["per_site"][c]["weight"] for i, c in enumerate(CENTRES)}
    last = max(r for r, _ in recorder.plain)
    base = np.concatenate([a.astype(np.float64).ravel() for a in recorder.globals[last].values()])
    fedavg = base + sum(weights[n] * recorder.plain[(last, n)] for n in weights) / sum(weights.values())
    assert np.abs(_final(tmp_path) - fedavg).max() < TOLERANCE
    assert study["rounds"][-1]["secure_aggregation"]["summed"] == list(CENTRES)
    assert study["summary"]["secure_aggregation"] == {"enabled": True, "distributed_dp": False}
    # every train reply the coordinator received: uint32 words, as far from its site's update as noise is
    for reply in recorder.replies:
        arrays = next(iter(reply.content.array_records.values()))
        words = np.concatenate([a.numpy().ravel() for a in arrays.values()])
        assert words.dtype == np.uint32
        alone = sa.dequantised_sum(words.astype(np.int64) % (sa.QUANT_RANGE + 1), 1)  # read as one site's update
        r = int(reply.metadata.group_id)
        plain = recorder.plain[(r, reply.metadata.src_node_id)]
        assert np.abs(alone - plain).mean() > 20 * np.abs(plain).mean()  # words spread over ±8, updates ~0.05
    audit = [json.loads(x) for x in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    sums = [r["payload"] for r in audit if r["event"] == "secure-aggregation"]
    assert len(sums) == 2 and all(s["saw"] == "masked updates and their unmasked sum only" for s in sums)


def test_sites_that_drop_before_and_after_masking_leave_a_sum_of_the_others(tmp_path, monkeypatch):
    """Round 1: va fails the shares stage and is left out of the round. Round 2: hungarian does not answer the
    unmask stage after its masked update arrived; its own mask is rebuilt from the others' shares."""
    shares, unmask = f"{MessageType.QUERY}.secagg_shares", f"{MessageType.QUERY}.secagg_unmask"
    recorder = Recorder(drop={(shares, 1): 13, (unmask, 2): 11})
    study = _study(tmp_path, monkeypatch, recorder)
    first, second = (r["secure_aggregation"] for r in study["rounds"])
    assert first["summed"] == ["cleveland", "hungarian", "switzerland"] and first["recovered"] == []
    assert second["summed"] == list(CENTRES) and second["recovered"] == ["hungarian"]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    va = next(r for r in metrics if r.get("site") == "va" and r["round"] == 1)
    assert va["error"] == "train: secure aggregation: internal error at the site; see the site's log"  # its own words
    weights = {10 + i: study["summary"]["per_site"][c]["weight"] for i, c in enumerate(CENTRES)}
    base = np.concatenate([a.astype(np.float64).ravel() for a in recorder.globals[2].values()])
    fedavg = base + sum(weights[n] * recorder.plain[(2, n)] for n in weights) / sum(weights.values())
    assert np.abs(_final(tmp_path) - fedavg).max() < TOLERANCE


def test_a_site_dropping_after_the_group_is_fixed_is_unmasked_from_its_key_shares(tmp_path, monkeypatch):
    """switzerland sent its shares, then fails its training: its pairwise masks sit in the others' updates and
    are rebuilt from its mask-key shares; the sum is the other three's."""
    recorder = Recorder(drop={(MessageType.TRAIN, 1): 12})
    study = _study(tmp_path, monkeypatch, recorder, rounds=1)
    record = study["rounds"][-1]["secure_aggregation"]
    assert record["dropped"] == ["switzerland"] and record["summed"] == ["cleveland", "hungarian", "va"]
    weights = {n: study["summary"]["per_site"][c]["weight"] for n, c in ((10, "cleveland"), (11, "hungarian"),
                                                                         (13, "va"))}
    base = np.concatenate([a.astype(np.float64).ravel() for a in recorder.globals[1].values()])
    fedavg = base + sum(weights[n] * recorder.plain[(1, n)] for n in weights) / sum(weights.values())
    assert np.abs(_final(tmp_path) - fedavg).max() < TOLERANCE


def test_the_run_config_refuses_what_secure_aggregation_cannot_do():
    for strategy in ("fedmedian", "fedtrimmedavg", "krum", "multikrum"):
        with pytest.raises(RunConfigError, match=f"strategy '{strategy}' needs every site's own update"):
            RunSettings.from_run_config(default_run_config(**{"secure-aggregation": True, "strategy": strategy}))
    with pytest.raises(RunConfigError, match="'distributed-dp' needs secure-aggregation = true"):
        RunSettings.from_run_config(default_run_config(**{"distributed-dp": True, "local-steps": 1}))
    with pytest.raises(RunConfigError, match="local-steps = 1"):
        RunSettings.from_run_config(default_run_config(**{"distributed-dp": True, "secure-aggregation": True}))


def test_distributed_dp_sites_add_their_share_of_the_noise_and_record_both_epsilons(tmp_path, monkeypatch):
    """Every site opts in, assuming all four honest (σ/2 each, budgeted by the assumed ε); the run asks for the sum's
    σ = 2. Each site's ledger and reply state both ε; a site assuming more honest sites than the sum holds refuses."""
    from privacy.ledger import PrivacyLedger

    policy = {"distributed_dp_honest_sites": 4, "distributed_dp_budget": "assumed"}
    plain_site = site_config
    monkeypatch.setattr("tests.test_secure_aggregation.site_config",
                        lambda folder, centre, **kw: plain_site(folder, centre, **kw, **policy))
    study = _study(tmp_path, monkeypatch, Recorder(), rounds=1, **{
        "distributed-dp": True, "noise-multiplier": 2.0, "target-epsilon": 0.0, "local-steps": 1})
    for centre in CENTRES:
        row = PrivacyLedger(tmp_path / "sites" / centre / "privacy-ledger.sqlite").rounds("heart-disease")[0]
        assert row["noise_multiplier"] == 1.0 and row["honest_sites"] == 4
        assert row["epsilon_assumed_after"] < row["epsilon_after"]
    assert study["rounds"][0]["secure_aggregation"]["summed"] == list(CENTRES)

    policy["distributed_dp_honest_sites"] = 5  # more than the four sites of the sum
    with pytest.raises(Exception, match="assumes 5 honest sites in the sum"):
        _study(tmp_path / "again", monkeypatch, Recorder(), rounds=1, **{
            "distributed-dp": True, "noise-multiplier": 2.0, "target-epsilon": 0.0, "local-steps": 1,
            "round-retries": 0})

    policy["distributed_dp_honest_sites"] = 4  # ... and a sum that lost a site before masking is not unmasked
    with pytest.raises(Exception, match=r"only 3 masked update\(s\) arrived and cleveland assumed 4 honest sites"):
        _study(tmp_path / "short", monkeypatch, Recorder(drop={(MessageType.TRAIN, 1): 12}), rounds=1, **{
            "distributed-dp": True, "noise-multiplier": 2.0, "target-epsilon": 0.0, "local-steps": 1})
