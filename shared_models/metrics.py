"""Binary classification metrics that can be pooled across sites without pooling patients.

A site reports its confusion counts and a coarse per-class histogram of scores; summing
those over sites gives pooled accuracy exactly and pooled AUC up to ties within a bin.
No per-patient score ever leaves a site.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

# Score histogram resolution for pooled AUC: pairs whose scores fall in the same bin count 1/2.
SCORE_BINS = 50
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


def metrics_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, F1; NaN where a denominator is zero."""

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

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
    return float(roc_auc_score(labels, scores))


def score_histograms(scores: np.ndarray, labels: np.ndarray, bins: int = SCORE_BINS) -> tuple[list[int], list[int]]:
    """Counts of positive and of negative patients per score bin on [0, 1]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    labels = labels.astype(bool)
    pos, _ = np.histogram(np.clip(scores[labels], 0.0, 1.0), bins=edges)
    neg, _ = np.histogram(np.clip(scores[~labels], 0.0, 1.0), bins=edges)
    return pos.astype(int).tolist(), neg.astype(int).tolist()


def auc_from_histograms(pos_hist: list[int] | np.ndarray, neg_hist: list[int] | np.ndarray) -> float:
    """AUC from per-class score histograms: P(score_pos > score_neg) with in-bin ties as 1/2."""
    pos = np.asarray(pos_hist, dtype=float)
    neg = np.asarray(neg_hist, dtype=float)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def binary_report(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Everything a site reports about one evaluation, as plain numbers."""
    counts = confusion_counts(scores, labels)
    report: dict[str, float] = {**metrics_from_counts(**counts), "auc": auc(scores, labels)}
    report.update({k: float(v) for k, v in counts.items()})
    return report
