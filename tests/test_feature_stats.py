"""Federated feature statistics: bounded per-patient vectors, the Gaussian release, decoding, a
real ehr-seq study whose sites release them (charged as round 0) before training on them, and the
auditor recomputing the ε a site's ledger charged for its release."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import DEFAULT_TTL, ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message import make_message

from client import client_app as handlers
from client.ingest import ehr_encode, ehr_extract
from client.client_app import app as client_app
from client.site import write_site_config
from deploy.datasets.synthetic_ehr import synthesize
from deploy.demo.inprocess import InProcessGrid
from privacy.accounting import epsilon, plan_noise, sample_rate
from privacy.auditor.verify import audit_logs
from privacy.gaussian import noisy_sum
from privacy.ledger import PrivacyLedger
from server.feature_stats import MESSAGE_TYPE, STATS_FILE
from server.server_app import app as server_app
from shared_models.feature_stats import FeatureStats, decode, l2_bound, layout, patient_vectors
from shared_models.schema import builtin_schema
from tests.helpers import data_dir, default_run_config


@pytest.fixture(scope="module")
def heart_extract():
    from client.ingest.heart_disease import centre_file
    return ehr_extract.load_extract(centre_file(data_dir(), "cleveland"), builtin_schema("heart-disease"))


def test_exact_sum_decodes_to_the_pooled_statistics(heart_extract):
    schema = heart_extract.schema
    rows = [np.array([i]) for i in range(len(heart_extract))]  # one row is one patient here
    vectors = patient_vectors(schema, heart_extract.values, rows)
    assert vectors.shape == (len(rows), len(layout(schema)))
    assert (np.linalg.norm(vectors, axis=1) <= l2_bound(schema) + 1e-9).all()
    shared, local = decode(schema, vectors.sum(axis=0)), ehr_encode.local_stats(heart_extract)
    for name, st in local.numeric.items():
        assert shared.numeric[name].mean == pytest.approx(st.mean, rel=1e-9, abs=1e-9)
        assert shared.numeric[name].std == pytest.approx(st.std, rel=1e-6)
    assert {k: pytest.approx(v) for k, v in shared.categories.items()} == local.categories
    assert FeatureStats.from_json(shared.to_json()) == shared


def test_a_variance_the_noise_cannot_resolve_falls_back_to_the_range_rule():
    """At the demo's σ = 10 over ~660 patients the noise on the mean of u² is ten times a typical variance: the
    std must not collapse to the floor (0.1 % of the range, inputs scaled up a thousandfold) but take range / 6."""
    schema = builtin_schema("diabetes-visits")
    rng = np.random.default_rng(0)
    n = 660
    values = {"age": rng.normal(60, 11, n), "bmi": rng.normal(31, 5, n), "hba1c": rng.normal(7.4, 1.1, n),
              "sbp": rng.normal(132, 15, n), "sex": rng.integers(0, 2, n).astype(float),
              "smoker": rng.integers(0, 3, n).astype(float)}
    exact = patient_vectors(schema, values, [np.array([i]) for i in range(n)]).sum(axis=0)
    noise_std = 10.0 * l2_bound(schema) * np.sqrt(3)  # three sites at σ = 10
    assert decode(schema, exact, noise_std=0.0).numeric["hba1c"].std == pytest.approx(1.1, rel=0.1)  # resolved
    low = exact.copy()
    hba1c = layout(schema).index("hba1c:mean-square")
    low[hba1c] -= 2 * noise_std  # a draw of the noise that would have made the variance negative
    assert decode(schema, low).numeric["hba1c"].std == pytest.approx(17 * 1e-3)  # without noise_std: the old floor
    stats = decode(schema, low, noise_std=noise_std)
    assert stats.numeric["hba1c"].std == pytest.approx((20 - 3) / 6)
    for _ in range(20):  # every noisy draw: a std between the range rule and half the range, never the floor
        noisy = decode(schema, exact + rng.normal(0, noise_std, exact.shape), noise_std=noise_std)
        for f in ("age", "bmi", "hba1c", "sbp"):
            st, (lo, hi) = noisy.numeric[f].std, next((g.min, g.max) for g in schema.features if g.name == f)
            assert (hi - lo) / 6 - 1e-9 <= st <= (hi - lo) / 2 + 1e-9
    # a small noise resolves the variance: the estimate is kept
    assert decode(schema, exact + rng.normal(0, 0.01, exact.shape), noise_std=0.01).numeric["hba1c"].std == \
        pytest.approx(1.1, rel=0.1)


def test_a_history_counts_once_whatever_its_number_of_visits():
    schema = builtin_schema("diabetes-visits")
    values = {f.name: np.full(30, 1.0) for f in schema.features}
    values["age"] = np.linspace(18, 110, 30)
    vectors = patient_vectors(schema, values, [np.arange(30), np.arange(2)])
    assert (np.linalg.norm(vectors, axis=1) <= l2_bound(schema) + 1e-9).all()
    assert vectors[:, 0].tolist() == [1.0, 1.0]  # the patient count


def test_gaussian_release_clips_each_patient_and_adds_noise_of_the_stated_scale():
    big = np.zeros((1, 4000))
    big[0, 0] = 100.0  # norm 100, clipped to the bound 2
    out = noisy_sum(big, l2_bound=2.0, noise_multiplier=0.5)  # noise std 1.0 per coordinate
    assert abs(out[0] - 2.0) < 6.0
    assert np.std(out[1:]) == pytest.approx(1.0, rel=0.08)
    with pytest.raises(ValueError):
        noisy_sum(big, l2_bound=2.0, noise_multiplier=0.0)


def test_noise_planned_after_a_prior_release_keeps_the_study_within_its_target():
    prior = [(10.0, 1.0, 1)]
    sigma = plan_noise(2.0, 1e-4, 300, 32, 30, "rdp", prior)
    total = epsilon(prior + [(sigma, sample_rate(300, 32), 30)], 1e-4, "rdp")
    assert 1.95 < total <= 2.0
    assert sigma > plan_noise(2.0, 1e-4, 300, 32, 30, "rdp")  # the release costs part of the budget
    with pytest.raises(ValueError, match="already cost"):
        plan_noise(0.1, 1e-4, 300, 32, 30, "rdp", [(1.0, 1.0, 1)])


def _study(tmp_path, strict_site: str = ""):
    files = synthesize(tmp_path / "data", sites=3, seed=1, patients=60)
    nodes = {}
    for i, (site, path) in enumerate(files.items()):
        policy = {"min_noise_multiplier": 50.0} if site == strict_site else {}
        cfg = write_site_config(tmp_path / "sites" / site / "site.toml", site, path, device="cpu",
                                dataset="diabetes-visits", epsilon_budget=50.0, delta=1e-4, accountant="rdp", **policy)
        nodes[10 + i] = {"site-config": str(cfg)}
    cfg = default_run_config(**{
        "task": "ehr-seq", "model": "ehr-gru-attn", "schema": "diabetes-visits", "num-server-rounds": 1,
        "local-steps": 3, "batch-size": 8, "optimizer": "adam", "lr": 0.01, "dp": True, "noise-multiplier": 1.0,
        "target-epsilon": 0.0, "stats-noise-multiplier": 5.0, "min-sites": 3, "round-timeout": 60,
        "out-dir": str(tmp_path / "run")})
    server_app(InProcessGrid(client_app, nodes, cfg),
               Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    return files, tmp_path / "run"


def test_an_ehr_seq_study_pools_private_statistics_then_trains_on_them(tmp_path):
    files, run = _study(tmp_path)
    pooled = json.loads((run / STATS_FILE).read_text())
    assert sorted(pooled["sites"]) == sorted(files) and pooled["schema"] == "diabetes-visits"
    stats = FeatureStats.from_json(pooled["stats"])
    assert 18 <= stats.numeric["age"].mean <= 110 and stats.numeric["hba1c"].std > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "diabetes-visits" and summary["rounds_completed"] == 1
    for site in files:
        assert 0.0 <= summary["per_site"][site]["auc"] <= 1.0
        charged = PrivacyLedger(tmp_path / "sites" / site / "privacy-ledger.sqlite").rounds("diabetes-visits")
        assert [(r["round"], r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in charged][0] == (0, 5.0, 1.0, 1)
        # the statistics release, then the training round and its evaluation release, one ledger
        assert [(r["round"], r["kind"]) for r in charged] == [(0, "feature-statistics"), (1, "training"),
                                                              (1, "evaluation")]
        log = (tmp_path / "sites" / site / "audit.jsonl").read_text()
        assert '"mechanism":"feature-statistics"' in log.replace(" ", "")


def test_a_site_whose_policy_refuses_the_release_stops_the_study_with_its_reason(tmp_path):
    # refused at the handshake, before any release: the study's statistics, evaluation and training σ, all named
    with pytest.raises(Exception, match=r"site rural cannot take this study: statistics noise multiplier 5 is "
                                        r"below the site minimum 50; evaluation noise multiplier 5 is below the "
                                        r"site minimum 50; noise multiplier 1 is below"):
        _study(tmp_path, strict_site="rural")
    assert not (tmp_path / "run" / STATS_FILE).exists()


def test_the_auditor_recomputes_the_ledgers_epsilon_of_a_feature_statistics_release(tmp_path):
    """One ehr-seq site's round-0 release through the real handler, with a signed audit log: ``carefl audit
    verify``'s own path (privacy/auditor/verify.py: audit_logs) recomputes the ε the site's ledger charged."""
    path = synthesize(tmp_path / "data", sites=1, seed=2, patients=60)
    site_toml = write_site_config(tmp_path / "site" / "site.toml", "solo", next(iter(path.values())), device="cpu",
                                  dataset="diabetes-visits", epsilon_budget=50.0, delta=1e-4)  # PRV at the site
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "audit.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    schema = builtin_schema("diabetes-visits")
    metadata = Metadata(run_id=5, message_id="stats-1", src_node_id=1, dst_node_id=42, reply_to_message_id="",
                        group_id="0", created_at=time.time(), ttl=DEFAULT_TTL, message_type=MESSAGE_TYPE)
    msg = make_message(metadata=metadata, content=RecordDict({"config": ConfigRecord(
        {"schema-sha256": schema.sha256, "stats-noise-multiplier": 5.0})}))
    context = Context(run_id=5, node_id=42, state=RecordDict(),
                      node_config={"site-config": str(site_toml), "audit-key": str(tmp_path / "audit.pem")},
                      run_config={"task": "ehr-seq", "schema": "diabetes-visits"})
    reply = handlers.feature_stats(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""

    ledger = PrivacyLedger(tmp_path / "site" / "privacy-ledger.sqlite")
    [charged] = ledger.rounds("diabetes-visits")
    assert (charged["round"], charged["kind"], charged["noise_multiplier"], charged["sample_rate"],
            charged["steps"]) == (0, "feature-statistics", 5.0, 1.0, 1)
    assert reply.content["statistics"]["epsilon"] == charged["epsilon_after"]  # what left is what was charged

    summary = audit_logs(tmp_path / "site" / "audit.jsonl", key.public_key())
    [site] = summary.actors
    assert summary.ok and not site.errors, summary.first_problem()
    [row] = site.epsilon["diabetes-visits"].rounds
    assert (row.mechanism, row.round, row.status, row.charged) == ("feature-statistics", 0, "ok", True)
    assert row.logged_after == charged["epsilon_after"]
    spent = ledger.spent("diabetes-visits", 1e-4, "prv")  # Opacus's PRV at the site …
    assert row.recomputed_after == pytest.approx(spent, rel=0.01)  # … dp-accounting's PLD at the auditor
    assert site.epsilon["diabetes-visits"].by_mechanism()["feature-statistics"] == pytest.approx(
        ledger.spent_by_kind("diabetes-visits", 1e-4, "prv")["feature-statistics"], rel=0.01)
