"""The model registry, the site-side metrics and the coordinator's pooling of them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn

from server.metrics import pooled_evaluate_metrics, pooled_metrics, release_problem, site_figures
from shared_models import metrics
from shared_models.eval_release import binary_layout, binary_vectors
from shared_models.registry import UnknownModelError, build_model, get_spec, model_names


# ---- registry ----

def test_registry_lists_the_ehr_models():
    assert {"ehr-logreg", "ehr-mlp"} <= set(model_names("ehr"))
    assert model_names() == sorted(model_names())
    assert model_names("no-such-task") == []


@pytest.mark.parametrize("name", ["ehr-logreg", "ehr-mlp"])
@pytest.mark.parametrize("batch", [1, 7])
def test_build_model_outputs_one_logit_per_patient(name, batch):
    torch.manual_seed(0)
    model = build_model(name, n_features=13)
    model.eval()
    out = model(torch.randn(batch, 13))
    assert out.shape == (batch,)
    assert torch.isfinite(out).all()
    assert get_spec(name).task == "ehr"


def test_unknown_model_lists_available_names():
    with pytest.raises(UnknownModelError) as info:
        build_model("ehr-transformer", n_features=13)
    message = str(info.value)
    assert "ehr-transformer" in message
    for name in model_names():
        assert name in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", model_names())
def test_no_batchnorm_in_any_registered_model(name):
    model = build_model(name, n_features=13)
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm))]
    assert norms == []


def test_mlp_treats_each_patient_on_its_own():
    """No batch statistics: a patient's logit does not depend on who else is in the batch."""
    torch.manual_seed(1)
    model = build_model("ehr-mlp", n_features=13).train()
    x = torch.randn(6, 13)
    np.testing.assert_allclose(model(x)[:1].detach().numpy(), model(x[:1]).detach().numpy(), rtol=1e-5, atol=1e-6)


# ---- shared_models.metrics ----

def test_auc_equals_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300).astype(float)
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1)
    assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_auc_is_nan_with_one_class(label):
    scores = np.linspace(0, 1, 10)
    assert math.isnan(metrics.auc(scores, np.full(10, label)))


def test_auc_from_histograms_exact_when_scores_are_distinct_bin_centres():
    rng = np.random.default_rng(1)
    bins = metrics.SCORE_BINS
    centres = (np.arange(bins) + 0.5) / bins
    chosen = rng.permutation(bins)  # every bin once: distinct bins, one patient each
    scores = centres[chosen]
    labels = rng.integers(0, 2, len(scores)).astype(float)
    labels[:2] = [0.0, 1.0]
    pos, neg = metrics.score_histograms(scores, labels)
    assert sum(pos) == labels.sum() and sum(neg) == (1 - labels).sum()
    assert metrics.auc_from_histograms(pos, neg) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_from_histograms_close_to_exact_on_random_scores():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 500).astype(float)
    scores = 1 / (1 + np.exp(-rng.normal(1.2 * labels - 0.6, 1.0)))
    exact = roc_auc_score(labels, scores)
    approx = metrics.auc_from_histograms(*metrics.score_histograms(scores, labels))
    assert 0.6 < exact < 0.95  # a non-trivial ranking
    assert abs(approx - exact) < 0.02


def test_auc_from_histograms_is_nan_without_both_classes():
    assert math.isnan(metrics.auc_from_histograms([0, 0, 3], [0, 0, 0]))
    assert math.isnan(metrics.auc_from_histograms([0, 0, 0], [1, 2, 0]))


def test_score_histograms_count_edges():
    scores = np.array([0.0, 1.0, 0.5, 0.01])
    labels = np.array([1.0, 1.0, 0.0, 0.0])
    pos, neg = metrics.score_histograms(scores, labels, bins=10)
    assert pos == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert neg == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]


def test_metrics_from_counts_hand_computed():
    # tp=30 fp=10 tn=50 fn=10: accuracy 80/100, sensitivity 30/40, specificity 50/60, F1 60/80
    m = metrics.metrics_from_counts(tp=30, fp=10, tn=50, fn=10)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(50 / 60)
    assert m["f1"] == pytest.approx(0.75)


def test_metrics_from_counts_nan_on_zero_denominators():
    m = metrics.metrics_from_counts(tp=0, fp=0, tn=5, fn=0)
    assert m["accuracy"] == 1.0
    assert math.isnan(m["sensitivity"])
    assert m["specificity"] == 1.0
    assert math.isnan(m["f1"])


def test_binary_report_matches_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 120).astype(float)
    scores = rng.random(120)
    report = metrics.binary_report(scores, labels)
    pred = scores > 0.5
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert report["f1"] == pytest.approx(f1_score(labels, pred))
    assert report["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert report["tp"] + report["fp"] + report["tn"] + report["fn"] == 120
    assert report["tp"] == float(np.sum(pred & (labels == 1)))


# ---- server.metrics: figures from the sites' releases ----

def _site_report(rng, n: int, shift: float, noise_std: float = 0.0) -> tuple[dict, np.ndarray, np.ndarray]:
    """A site's evaluation release as the ClientApp builds it (exact, or with the given noise std)."""
    labels = rng.integers(0, 2, n).astype(float)
    scores = 1 / (1 + np.exp(-rng.normal(shift * (labels - 0.5), 1.0)))
    losses = -np.log(np.where(labels == 1, scores, 1 - scores))
    layout = binary_layout()
    total = binary_vectors(scores, labels, losses).sum(axis=0) + rng.normal(0, noise_std, layout.size)
    report = {**layout.unpack(total), "eval-dp": float(noise_std > 0), "noise-std": noise_std}
    return report, scores, labels


def test_pooled_metrics_pool_counts_and_average_centres():
    rng = np.random.default_rng(4)
    sites = [_site_report(rng, n, shift) for n, shift in ((200, 3.0), (40, 0.2), (90, 1.0))]
    reports = [s[0] for s in sites]
    all_scores = np.concatenate([s[1] for s in sites])
    all_labels = np.concatenate([s[2] for s in sites])

    pooled = pooled_metrics(reports)
    pooled_acc = accuracy_score(all_labels, all_scores > 0.5)
    site_accs = [accuracy_score(s[2], s[1] > 0.5) for s in sites]
    assert pooled["pooled_accuracy"] == pytest.approx(pooled_acc, abs=1e-12)
    assert pooled["mean_centre_accuracy"] == pytest.approx(np.mean(site_accs), abs=1e-12)
    # the two differ here (sites of unequal size and skill), so each is what it claims to be
    assert abs(pooled["mean_centre_accuracy"] - pooled_acc) > 0.01
    site_aucs = [metrics.auc_from_histograms(r["score-hist-pos"], r["score-hist-neg"]) for r in reports]
    assert pooled["mean_centre_auc"] == pytest.approx(np.mean(site_aucs))
    assert abs(pooled["pooled_auc"] - roc_auc_score(all_labels, all_scores)) < 0.02
    tp = np.sum((all_scores > 0.5) & (all_labels == 1))
    assert pooled["pooled_sensitivity"] == pytest.approx(tp / all_labels.sum())
    assert all(pooled[k] == 0.0 for k in pooled if k.endswith("_std"))  # exact releases: no noise to state


def test_pooled_metrics_skip_nan_site_auc():
    rng = np.random.default_rng(5)
    good, scores, labels = _site_report(rng, 50, 2.0)
    layout = binary_layout()
    one_class = {**layout.unpack(binary_vectors(np.array([0.7, 0.8, 0.2]), np.ones(3), np.zeros(3)).sum(axis=0)),
                 "eval-dp": 0.0, "noise-std": 0.0}
    pooled = pooled_metrics([good, one_class])
    assert pooled["mean_centre_auc"] == pytest.approx(metrics.auc_from_histograms(good["score-hist-pos"],
                                                                                  good["score-hist-neg"]))
    assert pooled["mean_centre_accuracy"] == pytest.approx((accuracy_score(labels, scores > 0.5) + 2 / 3) / 2)


def test_figures_from_noisy_counts_clip_at_zero_and_state_their_noise():
    exact = [_site_report(np.random.default_rng(i), n, 2.0) for i, n in enumerate((120, 80, 60))]
    noisy = [_site_report(np.random.default_rng(i), n, 2.0, noise_std=4.0)[0] for i, n in enumerate((120, 80, 60))]
    truth, pooled = pooled_metrics([e[0] for e in exact]), pooled_metrics(noisy)
    for key in ("pooled_accuracy", "pooled_auc", "mean_centre_accuracy"):
        assert 0.0 <= pooled[key] <= 1.0 and 0.0 < pooled[f"{key}_std"] < 0.2
        assert abs(pooled[key] - truth[key]) < 5 * pooled[f"{key}_std"]
    site = site_figures(noisy[0])
    assert 0.0 <= site["accuracy"] <= 1.0 and site["accuracy_std"] > pooled["pooled_accuracy_std"] * 0.5
    assert site["num_test"] == pytest.approx(120, abs=5 * 2 * 4.0)
    hopeless = {**noisy[2], "tp": -3.0, "fp": -1.0, "tn": -2.0, "fn": -4.0}  # noise pushed every count below 0
    assert math.isnan(site_figures(hopeless)["accuracy"]) and site_figures(hopeless)["num_test"] == 0.0
    assert pooled_metrics(noisy) == pooled  # the std is re-noised with a fixed seed: the same figures again


def test_pooled_metrics_empty():
    assert pooled_metrics([]) == {}


def test_pooled_evaluate_metrics_reads_metric_records_and_leaves_out_unreadable_ones():
    from flwr.app import MetricRecord, RecordDict

    rng = np.random.default_rng(6)
    reports = [_site_report(rng, n, 1.5)[0] for n in (30, 60)]
    records = [RecordDict({"metrics": MetricRecord(r)}) for r in reports]
    broken = RecordDict({"metrics": MetricRecord({"accuracy": 0.9})})  # the old reply format: no counts
    out = pooled_evaluate_metrics(records + [broken], "num-examples")
    assert isinstance(out, MetricRecord)
    assert out["pooled_accuracy"] == pytest.approx(pooled_metrics(reports)["pooled_accuracy"])
    assert release_problem({"accuracy": 0.9}).startswith("not an evaluation release")
