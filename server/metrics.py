"""Turn the sites' evaluation releases into figures, each with its noise scale.

A site's evaluate reply holds sums — confusion counts, per-class score histograms and the summed test
loss, or per-class Σ Dice, Σ IoU and the case count (shared_models/eval_release.py) — with Gaussian noise
of std ``noise-std`` on each released coordinate (0 for a site in exact mode). Every figure is derived from
those sums alone (shared_models/metrics.py, seg_metrics.py): per site, pooled (the sites' sums added: the
union of their test sets) and mean over sites (each site weighs the same). Its std is estimated by
re-adding the noise: DRAWS draws of N(0, noise-std²) on each site's released coordinates (fixed seed), the
figure recomputed on each; the std over the draws is written beside it as ``<figure>_std``.
"""

from __future__ import annotations

import warnings

import numpy as np
from flwr.app import MetricRecord, RecordDict

from shared_models.eval_release import COUNT_KEYS, HIST_KEYS, LOSS_BOUND, Layout, layout_of
from shared_models.metrics import PERSONAL_PREFIX, binary_figures
from shared_models.seg_metrics import seg_figures
from shared_models.tasks import BINARY

DRAWS = 300  # re-noised draws per figure: the std's own relative error is about 1/√(2·DRAWS) ≈ 4 %
SEED = 20240517


def _figures(layout: Layout, coords: np.ndarray) -> dict[str, np.ndarray]:
    """The figures of sums given as coordinates [draws, size], one array over the draws per figure."""
    release = layout.columns(coords)
    return binary_figures(release) if layout.family == BINARY else seg_figures(release)


def _draws(record: dict, layout: Layout, prefix: str, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Row 0: the sums as released; then ``draws`` rows with the release's noise added again."""
    coords = layout.pack(record, prefix)
    std = 0.0 if prefix else float(record.get("noise-std", 0.0))  # the personal- counts are exact
    noise = rng.normal(0.0, std, (draws, coords.size)) if std > 0 else np.zeros((draws, coords.size))
    return np.vstack([coords, coords + noise])


def _with_std(figures: dict[str, np.ndarray], prefix: str = "") -> dict[str, float]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN figure (no positives ...) has NaN std
        for key, values in figures.items():
            values = np.atleast_1d(np.asarray(values, dtype=np.float64))
            out[prefix + key] = float(values[0])
            out[prefix + key + "_std"] = float(np.nanstd(values[1:])) if len(values) > 1 else 0.0
    return out


def _noisy(records: list[dict], prefix: str) -> bool:
    return not prefix and any(float(r.get("noise-std", 0.0)) > 0 for r in records)


def site_figures(record: dict, prefix: str = "") -> dict[str, float]:
    """One site's figures from its release (``prefix``: its ``personal-`` counts), under the run directory's
    names (accuracy, auc, …, dice, dice_1, …, num_test) with ``_std`` beside each."""
    layout = layout_of(record, prefix)
    draws = DRAWS if _noisy([record], prefix) else 0
    return _with_std(_figures(layout, _draws(record, layout, prefix, draws, np.random.default_rng(SEED))))


def pooled_metrics(site_reports: list[dict]) -> dict[str, float]:
    """Pooled (union of test sets) and mean-centre (each site weighs the same) figures with their std; with
    personalisation also the same figures over each site's fine-tuned model (``personalised_*``)."""
    if not site_reports:
        return {}
    result = _pooled(site_reports, "")
    if all(f"{PERSONAL_PREFIX}tp" in r or f"{PERSONAL_PREFIX}cases" in r for r in site_reports):
        result.update({f"personalised_{k}": v for k, v in _pooled(site_reports, PERSONAL_PREFIX).items()})
    return result


def _pooled(site_reports: list[dict], prefix: str) -> dict[str, float]:
    layout = layout_of(site_reports[0], prefix)
    rng = np.random.default_rng(SEED)
    draws = DRAWS if _noisy(site_reports, prefix) else 0
    total, per_site = None, []
    for record in site_reports:  # one site's draws at a time: a thousand simulated sites stay small
        coords = _draws(record, layout, prefix, draws, rng)
        total = coords if total is None else total + coords
        per_site.append(_figures(layout, coords))
    pooled = _figures(layout, total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a site without a defined figure is left out
        mean = {k: np.nanmean([np.atleast_1d(f[k]) for f in per_site], axis=0) for k in per_site[0]}
    if layout.family == BINARY:
        figures = {"mean_centre_accuracy": mean["accuracy"], "mean_centre_auc": mean["auc"],
                   **{f"pooled_{k}": pooled[k] for k in ("accuracy", "auc", "sensitivity", "specificity", "f1",
                                                         "test_loss")}}
    else:
        classes = [k for k in pooled if k.startswith("dice_") and k != "dice_0"]
        figures = {"mean_dice": mean["dice"], "pooled_dice": pooled["dice"],
                   **{f"pooled_{k}": pooled[k] for k in classes}}
    return _with_std(figures)


RELEASE_FACTS = ("eval-dp", "noise-std", "epsilon", "delta", "noise-multiplier", "l2-bound")
TOLERANCE = 6.0  # noisy sums that should agree may differ by this many std of their difference


def release_problem(record: dict, noise_multiplier: float | None = None) -> str | None:
    """Why a site's evaluate reply cannot be read as an evaluation release (None: it can).

    Beyond its form (the layout's keys and nothing else, finite numbers), its sums must agree with each
    other as the sums of one test set do: every count ≥ 0, the confusion counts and the score histograms
    count the same patients (and the same positives), the loss sum lies within [0, loss bound × patients]
    — exactly for an exact release, within ``TOLERANCE`` std of the noise for a noisy one; and its noise
    must be the study's (``noise_multiplier``: the σ the coordinator asked for) or none (exact mode)."""
    try:
        layout = layout_of(record)
        coords = layout.pack(record)
        std = float(record.get("noise-std", 0.0))
    except (KeyError, TypeError, ValueError) as exc:
        return f"not an evaluation release ({exc})"
    expected = {f.key for f in layout.fields} | {k for k, _ in layout.constants} | set(RELEASE_FACTS)
    personal = {k for k in record if k.startswith(PERSONAL_PREFIX)}
    unknown = sorted(set(record) - expected - personal)
    if unknown:
        return f"an evaluation release with keys no release has: {', '.join(unknown[:5])}"
    if not np.isfinite(coords).all() or not (np.isfinite(std) and std >= 0):
        return "an evaluation release with non-finite sums or noise std"
    if std > 0 and noise_multiplier is not None and not np.isclose(std, noise_multiplier * layout.l2_bound):
        return (f"its noise std {std:.4g} is not the study's (σ {noise_multiplier:g} × bound {layout.l2_bound:.4g}) "
                f"nor 0 (exact)")
    counts = coords[:-1]  # binary: every coordinate but the loss is a count
    if std == 0 and layout.family == BINARY and not np.array_equal(counts, np.round(counts)):
        return "an exact release whose counts are not whole numbers"
    return _inconsistency(layout, layout.columns(coords[None, :]), std)


def _inconsistency(layout: Layout, sums: dict, std: float) -> str | None:
    """Which of the release's sums contradict each other (None: none, within the noise)."""
    def off(difference: float, terms: int) -> bool:
        return abs(difference) > TOLERANCE * std * np.sqrt(terms) + 1e-9

    if layout.family == BINARY:
        counts = {k: float(sums[k][0]) for k in COUNT_KEYS}
        positives, negatives = (np.asarray(sums[k][0]) for k in HIST_KEYS)
        bins = len(positives)
        if any(v < -TOLERANCE * std - 1e-9 for v in [*counts.values(), *positives, *negatives]):
            return "an evaluation release with negative counts"
        patients = sum(counts.values())
        if off(patients - positives.sum() - negatives.sum(), 4 + 2 * bins):
            return "its confusion counts and score histograms count different numbers of patients"
        if off(counts["tp"] + counts["fn"] - positives.sum(), 2 + bins):
            return "its confusion counts and score histograms count different numbers of positives"
        loss = float(sums["loss-sum"][0]) / LOSS_BOUND  # in patients: each adds at most 1
        if loss < -TOLERANCE * std - 1e-9 or (loss > patients and off(loss - patients, 5)):
            return "its loss sum is outside [0, loss bound × patients]"
        return None
    cases = float(sums["cases"][0])
    for key, values in sums.items():
        if key.startswith(("dice-sum-", "iou-sum-")):
            value = float(np.asarray(values)[0])
            if value < -TOLERANCE * std - 1e-9 or (value > cases and off(value - cases, 2)):
                return f"its '{key}' is outside [0, cases]"
    if cases < -TOLERANCE * std - 1e-9:
        return "an evaluation release with a negative case count"
    return None


def pooled_evaluate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower ``evaluate_metrics_aggr_fn``: pool the sites' readable releases of one round."""
    reports = [dict(next(iter(r.metric_records.values()))) for r in records if len(r.metric_records) == 1]
    return MetricRecord(pooled_metrics([r for r in reports if release_problem(r) is None]))
