"""Binary classification metrics a coordinator can derive from counts, without pooling patients.

A site releases its confusion counts, a coarse per-class histogram of scores and its summed (clipped)
test loss — with Gaussian noise unless its policy opts out (``shared_models/eval_release.py``). Every
figure here is a function of such counts, so it works alike on exact and on noisy ones: a negative noisy
count counts as 0 where a ratio needs it. Summed over sites they give pooled accuracy (exact on exact
counts) and pooled AUC up to ties within a bin. No per-patient score ever leaves a site. The figure
functions take numbers, or arrays whose leading axis is the coordinator's re-noised draws.
"""

from __future__ import annotations

import math

import numpy as np

# Score histogram resolution for pooled AUC: pairs whose scores fall in the same bin count 1/2. Ten bins: each
# DP release adds noise to every bin, and the clipped-at-0 noise of many sparse bins pulls the pooled AUC
# towards 0.5 (on the heart-disease demo at σ_eval = 5: 50 bins −0.24, ten −0.07; ties cost ten bins at most
# 0.008 without noise; docs/BENCHMARKS.md, "DP evaluation releases").
SCORE_BINS = 10
# Metric keys of a site's locally fine-tuned model (personalisation) carry this prefix.
PERSONAL_PREFIX = "personal-"


def confusion_counts(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, int]:
    pred = scores > threshold
    truth = labels.astype(bool)
    return {
        "tp": int(np.sum(pred & truth)),
        "fp": int(np.sum(pred & ~truth)),
        "tn": int(np.sum(~pred & ~truth)),
        "fn": int(np.sum(~pred & truth)),
    }


def _plain(value: np.ndarray):
    """A 0-d result as a Python float, else the array."""
    return float(value) if np.ndim(value) == 0 else value


def ratio(num, den):
    """num / den where den > 0, NaN elsewhere (numbers or arrays)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _plain(np.where(den > 0, num / np.where(den > 0, den, 1.0), math.nan))


def metrics_from_counts(tp, fp, tn, fn) -> dict:
    """Accuracy, sensitivity, specificity, F1 from (possibly noisy) counts, each clipped at 0 first; NaN where a
    denominator is zero."""
    tp, fp, tn, fn = (np.maximum(np.asarray(c, dtype=np.float64), 0.0) for c in (tp, fp, tn, fn))
    return {
        "accuracy": ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC; NaN when the test set holds only one class (no AUC is defined)."""
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        return math.nan
    from sklearn.metrics import roc_auc_score  # here, not at import: scikit-learn costs a second to import

    return float(roc_auc_score(labels, scores))


def score_bins(scores: np.ndarray, bins: int = SCORE_BINS) -> np.ndarray:
    """The bin of each score on [0, 1] in ``bins`` equal bins, [a, b) except the last, [a, 1]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.searchsorted(edges, np.clip(scores, 0.0, 1.0), side="right") - 1, 0, bins - 1)


def score_histograms(scores: np.ndarray, labels: np.ndarray, bins: int = SCORE_BINS) -> tuple[list[int], list[int]]:
    """Counts of positive and of negative patients per score bin on [0, 1]."""
    labels = labels.astype(bool)
    pos = np.bincount(score_bins(scores[labels], bins), minlength=bins)
    neg = np.bincount(score_bins(scores[~labels], bins), minlength=bins)
    return pos.astype(int).tolist(), neg.astype(int).tolist()


def auc_from_histograms(pos_hist, neg_hist):
    """AUC from per-class score histograms (noisy bins clipped at 0): P(score_pos > score_neg) with in-bin ties
    as 1/2; the last axis is the bins."""
    pos = np.maximum(np.asarray(pos_hist, dtype=np.float64), 0.0)
    neg = np.maximum(np.asarray(neg_hist, dtype=np.float64), 0.0)
    neg_below = np.cumsum(neg, axis=-1) - neg  # negatives in strictly lower bins
    return ratio((pos * (neg_below + 0.5 * neg)).sum(axis=-1), pos.sum(axis=-1) * neg.sum(axis=-1))


def binary_figures(release) -> dict:
    """Every figure of one (or a pooled) binary release — the keys of ``eval_release.binary_layout`` — under the
    run directory's names: accuracy, sensitivity, specificity, F1, AUC, mean test loss, test patients."""
    counts = {k: release[k] for k in ("tp", "fp", "tn", "fn")}
    n = sum(np.maximum(np.asarray(c, dtype=np.float64), 0.0) for c in counts.values())
    loss = np.clip(ratio(release["loss-sum"], n), 0.0, float(release["loss-bound"]))  # NaN stays NaN
    return {**metrics_from_counts(**counts), "auc": auc_from_histograms(release["score-hist-pos"],
                                                                       release["score-hist-neg"]),
            "test_loss": _plain(loss), "num_test": _plain(n)}


def binary_report(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """A site's own exact figures of one evaluation (its local tools); what leaves the site is the release."""
    counts = confusion_counts(scores, labels)
    report: dict[str, float] = {**metrics_from_counts(**counts), "auc": auc(scores, labels)}
    report.update({k: float(v) for k, v in counts.items()})
    return report
