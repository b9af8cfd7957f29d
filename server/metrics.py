"""Turn the sites' evaluation replies into federation-level metrics.

Sites send confusion counts and per-class score histograms (never per-patient scores), so the
pooled accuracy is exact and the pooled AUC is exact up to ties inside a histogram bin.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import MetricRecord, RecordDict

from shared_models.metrics import PERSONAL_PREFIX, auc_from_histograms, metrics_from_counts
from shared_models.seg_metrics import pooled_dice

COUNT_KEYS = ("tp", "fp", "tn", "fn")


def pooled_metrics(site_reports: list[dict]) -> dict[str, float]:
    """Pooled (union of test sets) and mean-centre (each site weighs the same) metrics; with
    personalisation also the same figures over each site's fine-tuned model (``personalised_*``)."""
    if not site_reports:
        return {}
    result = _pooled(site_reports)
    if all(f"{PERSONAL_PREFIX}accuracy" in r or f"{PERSONAL_PREFIX}mean-dice" in r for r in site_reports):
        personal = [{k[len(PERSONAL_PREFIX):]: v for k, v in r.items() if k.startswith(PERSONAL_PREFIX)}
                    for r in site_reports]
        result.update({f"personalised_{k}": v for k, v in _pooled(personal).items()})
    return result


def _pooled(site_reports: list[dict]) -> dict[str, float]:
    if "dice-num-1" in site_reports[0]:
        return pooled_segmentation(site_reports)
    totals = {k: sum(int(r[k]) for r in site_reports) for k in COUNT_KEYS}
    pooled = metrics_from_counts(**totals)
    pos = np.sum([r["score-hist-pos"] for r in site_reports], axis=0)
    neg = np.sum([r["score-hist-neg"] for r in site_reports], axis=0)
    site_aucs = [r["auc"] for r in site_reports if not math.isnan(r["auc"])]
    return {
        "mean_centre_accuracy": float(np.mean([r["accuracy"] for r in site_reports])),
        "mean_centre_auc": float(np.mean(site_aucs)) if site_aucs else math.nan,
        "pooled_accuracy": pooled["accuracy"],
        "pooled_auc": auc_from_histograms(pos, neg),
        "pooled_sensitivity": pooled["sensitivity"],
        "pooled_specificity": pooled["specificity"],
        "pooled_f1": pooled["f1"],
    }


def pooled_segmentation(site_reports: list[dict]) -> dict[str, float]:
    """Mean over sites of each site's mean foreground Dice, and Dice of all test cases pooled."""
    classes = sorted(int(k.rsplit("-", 1)[1]) for k in site_reports[0] if k.startswith("dice-num-"))
    counts = [{"num": [r[f"dice-num-{c}"] for c in classes], "den": [r[f"dice-den-{c}"] for c in classes]}
              for r in site_reports]
    pooled = pooled_dice(counts)
    result = {"mean_dice": float(np.mean([r["mean-dice"] for r in site_reports])),
              "pooled_dice": float(np.mean(pooled[1:]))}
    result.update({f"pooled_dice_{c}": pooled[i] for i, c in enumerate(classes) if c})
    return result


def pooled_evaluate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower ``evaluate_metrics_aggr_fn``: pool the sites' reports of one round."""
    reports = [dict(next(iter(r.metric_records.values()))) for r in records]
    return MetricRecord(pooled_metrics(reports))
