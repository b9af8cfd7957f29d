"""Public pretraining and DP fine-tuning of few parameters: provenance, frozen parameters, audit, ε.

Real U-Nets, the real DP engine, the real ServerApp and ClientApps (in-process transport), real
MSD hippocampus files on tiny crops.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, RecordDict

from client import training
from client.client_app import app as client_app
from deploy.datasets import hippocampus
from client.ingest.imaging.manifest import Case
from client.segmentation import PatientVolumes
from deploy.demo.inprocess import InProcessGrid
from deploy.coordinator.pretrain import PretrainSettings, pretrain
from privacy.auditor.epsilon import recompute
from privacy.ledger import PrivacyLedger
from privacy.policy import DPRequest
from server.run_dir import read_jsonl
from server.server_app import app as server_app
from server.settings import RunConfigError, RunSettings
from shared_models import public_checkpoint
from shared_models.registry import build_model
from shared_models.seg_losses import DiceCE
from shared_models.trainable import TRAINABLE, freeze_except, trained_names, trained_size
from tests.helpers import default_run_config, hippocampus_site

SHAPE = (24, 32, 24)


@pytest.fixture(scope="module")
def public_model(tmp_path_factory, cases):
    """A public checkpoint from 6 public cases, 1 epoch (what matters here is the file, not its Dice)."""
    folder = tmp_path_factory.mktemp("public")
    chosen = [Case(c.case_id, c.image, c.label, "test" if i == 5 else "train")  # one held-out case
              for i, c in enumerate(hippocampus.public_cases(cases)[:6])]
    digest = pretrain(chosen, set(hippocampus.LABELS), PretrainSettings(epochs=1, shape=SHAPE), folder / "public.pt",
                      folder / "cache", "MSD Task04 Hippocampus (public set)", hippocampus.LICENCE)
    return folder / "public.pt", digest, chosen


def test_public_and_private_cases_never_overlap(cases):
    public, private = hippocampus.public_cases(cases), hippocampus.private_cases(cases)
    assert len(public) == 52 and len(private) == 208
    assert not {c.case_id for c in public} & {c.case_id for c in private}
    sites = hippocampus.split_sites(private, 3)
    assert sum(len(v) for v in sites.values()) == 208


def test_pretrain_writes_provenance_and_the_hash_sites_will_log(public_model):
    path, digest, chosen = public_model
    loaded = public_checkpoint.load(path)
    assert loaded.sha256 == digest == loaded.array_record().object_id
    p = loaded.provenance
    assert p["public"] is True and p["licence"].startswith("CC-BY-SA 4.0") and p["dataset"].startswith("MSD")
    assert p["case_ids"] == sorted(c.case_id for c in chosen)
    assert p["cases_sha256"] == public_checkpoint.cases_sha256([c.case_id for c in chosen])
    assert p["train_cases"] == 5 and p["held_out_cases"] == 1 and 0.0 <= p["held_out_mean_dice"] <= 1.0
    assert p["training"]["dp"] is False and p["seed"] == 0 and p["preprocessing"]["shape"] == list(SHAPE)
    assert json.loads(path.with_suffix(".json").read_text())["weights_sha256"] == digest
    # the model is the registry's architecture: it loads into a freshly built seg-unet3d
    build_model(loaded.model, **loaded.model_kwargs).load_state_dict(loaded.state_dict)


def test_a_changed_or_foreign_checkpoint_is_refused_with_the_reason(public_model, tmp_path):
    path, _, _ = public_model
    payload = torch.load(path, weights_only=True)
    payload["state_dict"][next(iter(payload["state_dict"]))] += 1.0
    torch.save(payload, tmp_path / "changed.pt")
    with pytest.raises(public_checkpoint.PublicCheckpointError, match="do not match the hash"):
        public_checkpoint.load(tmp_path / "changed.pt")
    torch.save(build_model("seg-unet3d").state_dict(), tmp_path / "plain.pt")
    with pytest.raises(public_checkpoint.PublicCheckpointError, match="not a carefl public checkpoint"):
        public_checkpoint.load(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(public_checkpoint.PublicCheckpointError, match="cannot be read"):
        public_checkpoint.load(tmp_path / "junk.pt")
    with pytest.raises(public_checkpoint.PublicCheckpointError, match="does not exist"):
        public_checkpoint.load(tmp_path / "missing.pt")


def test_trained_subsets_of_the_unet():
    model = build_model("seg-unet3d")
    names = {t: trained_names(model, t) for t in TRAINABLE}
    assert len(names["all"]) == len(model.state_dict())
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 9
    assert all(f"{n}.weight" in names["norms-head"] and f"{n}.bias" in names["norms-head"] for n in norms)
    head = names["all"][-2:]  # the output convolution's weight and bias
    assert all(h in names["norms-head"] and h in names["decoder"] for h in head)
    assert set(names["norms-head"]) < set(names["all"]) and set(names["decoder"]) < set(names["all"])
    assert trained_size(model, "norms-head") < 1_000 < trained_size(model, "decoder") < trained_size(model, "all")
    with pytest.raises(ValueError, match="needs a U-Net"):
        trained_names(build_model("ehr-logreg", n_features=13), "decoder")
    with pytest.raises(ValueError, match="train-params must be one of"):
        trained_names(model, "encoder")


@pytest.mark.parametrize("engine", ["fast", "opacus"])
def test_dp_leaves_frozen_parameters_untouched_and_noises_only_the_trained(engine, monkeypatch, cases):
    """Frozen parameters come out bit-identical (no gradient, no noise); the trained ones move even on an
    all-empty Poisson batch sequence, i.e. they get the noise."""
    monkeypatch.setenv("CAREFL_DP_ENGINE", engine)
    torch.manual_seed(0)
    x = torch.randn(4, 1, *SHAPE)
    y = torch.randint(0, 3, (4, 1, *SHAPE))
    model = build_model("seg-unet3d")
    trained = set(freeze_except(model, "norms-head"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = training.TrainSettings(local_steps=3, local_epochs=1, batch_size=2, optimizer="sgd", lr=0.5)
    training.train_dataset(model, PatientVolumes([(x[i].numpy(), y[i, 0].numpy()) for i in range(4)]), settings,
                           torch.device("cpu"), DiceCE().per_sample,
                           DPRequest(enabled=True, noise_multiplier=1.0, clip_norm=0.5), max_physical_batch=2)
    after = model.state_dict()
    for name, value in after.items():
        if name in trained:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name


def test_run_settings_check_train_params():
    base = default_run_config(task="seg", model="seg-unet3d")
    assert RunSettings.from_run_config({**base, "train-params": "norms-head"}).train_config()["train-params"] == "norms-head"
    with pytest.raises(RunConfigError, match="'train-params' must be one of"):
        RunSettings.from_run_config({**base, "train-params": "encoder"})
    with pytest.raises(RunConfigError, match="needs a U-Net"):
        RunSettings.from_run_config({**default_run_config(), "train-params": "decoder"})


def _site(folder, site_id, site_cases):
    return hippocampus_site(folder, site_id, site_cases, max_sample_rate=1.0)


def test_dp_fine_tuning_from_a_public_checkpoint(tmp_path, cases, public_model):
    """Two rounds from the public model, norms + head trained under DP: sites send only those arrays,
    frozen arrays of the final model equal the checkpoint's, every log names the initial model, and
    the auditor's ε agrees with the ledger's."""
    path, digest, _ = public_model
    split = hippocampus.split_sites(hippocampus.private_cases(cases)[:18], 3)  # 4 train, 2 test per site
    nodes = {20 + i: {"site-config": str(_site(tmp_path / "sites", s, c))} for i, (s, c) in enumerate(split.items())}
    cfg = default_run_config(**{
        "task": "seg", "model": "seg-unet3d", "num-server-rounds": 2, "local-epochs": 1, "local-steps": 2,
        "batch-size": 8, "optimizer": "sgd", "lr": 1.0, "target-epsilon": 8.0, "clip-norm": 0.2,
        "train-params": "norms-head", "init-checkpoint": str(path), "seg-shape": ",".join(map(str, SHAPE)),
        "out-dir": str(tmp_path / "run"), "round-timeout": 5})
    grid = InProcessGrid(client_app, nodes, cfg)
    server_app(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["train_params"] == "norms-head"
    assert summary["init_model"]["weights_sha256"] == digest and "case_ids" not in summary["init_model"]
    assert summary["init_model"]["licence"].startswith("CC-BY-SA")
    # round 1 went out as the public model itself
    first = [m for m in grid.sent if m.metadata.message_type == "train"][0]
    assert first.content["arrays"].object_id == digest
    # the final model: frozen arrays are the checkpoint's, bit for bit; the trained ones moved
    public = public_checkpoint.load(path).state_dict
    final = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)
    final = final.get("state_dict", final)
    trained = set(trained_names(build_model("seg-unet3d"), "norms-head"))
    for name, value in public.items():
        assert torch.equal(final[name], value) == (name not in trained), name
    d = trained_size(build_model("seg-unet3d"), "norms-head")
    audit_records = {}
    for site in summary["sites"]:
        log = tmp_path / "sites" / site / "audit.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        audit_records[site] = records
        rounds = [r["payload"] for r in records if r["event"] == "dp-round" and r["payload"]["mechanism"] == "training"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert rounds[0]["model_in_sha256"] == digest and all(r["init_checkpoint_sha256"] == digest for r in rounds)
        assert all(r["train_params"] == "norms-head" and r["trained_parameters"] == d for r in rounds)
        replies = [r["payload"] for r in records if r["event"] == "reply" and r["payload"].get("arrays_sha256")]
        assert len(replies) == 2 and all(r["arrays_bytes"] < 4 * d + 4096 for r in replies)  # only d numbers left
        ledger = PrivacyLedger(tmp_path / "sites" / site / "privacy-ledger.sqlite").rounds("hippocampus")
        assert [r["trained_parameters"] for r in ledger if r["kind"] == "training"] == [d, d]
        # the auditor recomputes ε from the log and agrees with the ledger
        table = recompute(records)["hippocampus"]
        assert [row.mechanism for row in table.rounds] == ["training", "evaluation"] * 2  # each round's two releases
        assert all(row.status not in ("error", "warning") for row in table.rounds)
        assert summary["per_site"][site]["epsilon"] == pytest.approx(ledger[-1]["epsilon_after"])
    run_start = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()][0]
    assert run_start["event"] == "run-start" and run_start["payload"]["init_model"]["weights_sha256"] == digest
    assert all("error" not in r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl"))


def test_a_study_refuses_a_checkpoint_of_another_model(tmp_path, cases):
    other = build_model("seg-unet2d").state_dict()
    public_checkpoint.save(tmp_path / "other.pt", "seg-unet2d", {}, other, {"dataset": "x"})
    split = hippocampus.split_sites(hippocampus.private_cases(cases)[:9], 3)
    nodes = {20 + i: {"site-config": str(_site(tmp_path / "sites", s, c))} for i, (s, c) in enumerate(split.items())}
    cfg = default_run_config(**{"task": "seg", "model": "seg-unet3d", "init-checkpoint": str(tmp_path / "other.pt"),
                                "seg-shape": ",".join(map(str, SHAPE)), "out-dir": str(tmp_path / "run"),
                                "round-timeout": 5})
    with pytest.raises(Exception, match="is for model 'seg-unet2d'"):
        server_app(InProcessGrid(client_app, nodes, cfg),
                   Context(run_id=8, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    stops = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "stopped"]
    assert len(stops) == 1 and "is for model 'seg-unet2d'" in stops[0]["reason"]


def test_coordinator_pretrain_command(tmp_path, cases):
    from tests.helpers import run_carefl

    out = tmp_path / "models" / "public.pt"
    done = run_carefl(["coordinator", "pretrain", "--epochs", "1", "--out", str(out)], tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    loaded = public_checkpoint.load(out)
    assert f"sha256:{loaded.sha256}" in done.stdout.replace("\n", "")
    assert loaded.provenance["case_ids"] == sorted(c.case_id for c in hippocampus.public_cases(cases))
    assert loaded.provenance["train_cases"] + loaded.provenance["held_out_cases"] == 52
    # public data of one's own needs its name and licence on record
    bad = run_carefl(["coordinator", "pretrain", "--manifest", str(tmp_path / "x.csv"), "--out",
                      str(tmp_path / "y.pt")], tmp_path, timeout=60)
    assert bad.returncode == 2 and "--dataset-name and --licence" in bad.stdout and "Traceback" not in bad.stderr
