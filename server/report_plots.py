"""The run report's plots: federation metrics, per-site metrics (a band when sites are many) and ε per
site over rounds, each an inline PNG (shared_models/report_html.py). A figure from DP evaluation releases is
drawn with a shaded band of ± one noise std (the ``_std`` beside it)."""

from __future__ import annotations

import math

from server.report_data import (FEDERATION_METRICS, MEAN_OVER_SITES, PERSONALISED, STD, RunData, metric_label,
                                number)
from shared_models.report_html import PALETTE, e, figure_img, new_figure


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _site_style(sites: list[str], site: str) -> dict:
    """Colour and marker of a site; earlier sites get larger markers, so equal values stay visible."""
    i = sites.index(site)
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
            "markersize": max(3.0, 8.0 - 1.2 * i), "linewidth": max(1.0, 2.4 - 0.35 * i)}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of one key; a round without a finite value is a gap (NaN) in the line."""
    by_round = {}
    for r in records:
        if "round" in r:
            v = number(r.get(key))
            by_round[int(r["round"])] = v if v is not None and math.isfinite(v) else math.nan
    xs = sorted(by_round)
    return xs, [by_round[x] for x in xs]


def _noise_band(ax, records: list[dict], key: str, color: str, alpha: float = 0.15):
    """Shade ± one noise std around the series of ``key`` where its records state one; None if none does."""
    xs, ys = _series(records, key)
    _, stds = _series(records, key + STD)
    if not any(s > 0 for s in stds if math.isfinite(s)):
        return None
    low = [y - s if math.isfinite(s) else math.nan for y, s in zip(ys, stds)]
    high = [y + s if math.isfinite(s) else math.nan for y, s in zip(ys, stds)]
    return ax.fill_between(xs, low, high, color=color, alpha=alpha, linewidth=0)


def _style_rounds_axis(ax, run: RunData) -> None:
    from matplotlib.ticker import MaxNLocator

    last = max(run.rounds_done, run.rounds_planned or 0, 1)
    if last <= 15:
        ax.set_xticks(range(1, last + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, last + 0.5)
    ax.set_xlabel("round")
    ax.grid(True, alpha=0.3)


def _on_unit_scale(ax, key: str) -> None:
    """Dice, accuracy, AUC, F1 … are drawn on their natural 0–1 scale, so a rise from 0.01 to 0.03 looks as
    small as it is; losses keep an automatic scale."""
    if "loss" not in key:
        ax.set_ylim(0, 1.02)


def _baseline_lines(ax, baselines: dict, key: str, task: str, color: str = "#555") -> list:
    """Each baseline of ``key`` as a horizontal line (one dash style per baseline)."""
    styles = ((0, (6, 3)), (0, (6, 2, 1, 2)), (0, (1, 2)), (0, (10, 4)))
    drawn = []
    for i, (label, metrics) in enumerate(baselines.items()):
        if key in metrics:
            drawn.append(ax.axhline(metrics[key], color=color, linestyle=styles[i % len(styles)], linewidth=1.3,
                                    label=f"baseline {label}: {metric_label(key, task)} {metrics[key]:.3f}"))
    return drawn


def plot_federation(run: RunData) -> str:
    task = run.task
    keys = [(k, label) for k, label in FEDERATION_METRICS[task][:4]
            if any(number(r.get(k)) is not None for r in run.rounds)]
    if not keys:
        return '<p class="muted">no round has finished with a federation metric yet</p>'
    fig = new_figure(9, 3.8)
    ax = fig.subplots()
    for i, (key, label) in enumerate(keys):
        xs, ys = _series(run.rounds, key)
        ax.plot(xs, ys, marker="o", markersize=4, color=PALETTE[i % len(PALETTE)], label=label)
        _noise_band(ax, run.rounds, key, PALETTE[i % len(PALETTE)])
        if any(PERSONALISED + key in r for r in run.rounds):
            xs, ys = _series(run.rounds, PERSONALISED + key)
            ax.plot(xs, ys, marker="^", markersize=4, linestyle=":", color=PALETTE[i % len(PALETTE)],
                    label=f"{label}, fine-tuned at each site")
        _baseline_lines(ax, run.baselines, key, task, color=PALETTE[i % len(PALETTE)])
    _on_unit_scale(ax, keys[0][0])
    _style_rounds_axis(ax, run)
    noisy = any(number(r.get(k + STD)) for k, _ in keys for r in run.rounds)
    ax.set_title("federation metrics per round (from the sites' released test counts"
                 + ("; shaded: ± one noise std of the DP evaluation)" if noisy else ")"), fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return figure_img(fig, "federation metrics per round")


MAX_SITE_LINES = 12  # beyond this a per-site panel shows the sites' min–max band instead of one line each


def _site_band(ax, run: RunData, key: str):
    """Shade the range of ``key`` over all sites per round; returns a legend handle (None if no data)."""
    by_round: dict[int, list[float]] = {}
    for r in run.metrics:
        value = number(r.get(key))
        if value is not None and "round" in r:
            by_round.setdefault(int(r["round"]), []).append(value)
    if not by_round:
        return None
    rounds = sorted(by_round)
    return ax.fill_between(rounds, [min(by_round[x]) for x in rounds], [max(by_round[x]) for x in rounds],
                           color="#1f77b4", alpha=0.25, linewidth=0)


def plot_sites(run: RunData, keys: list[str], title: str, alt: str, federation: bool = True) -> str:
    """One panel per metric, one line per site; the federation's mean over sites dashed in black."""
    task, sites = run.task, run.sites
    keys = [k for k in keys if any(number(r.get(k)) is not None for r in run.metrics)]
    if not keys:
        return f'<p class="muted">no site has reported {e(alt)} yet</p>'
    cols = len(keys) if len(keys) <= 3 else 2
    rows = math.ceil(len(keys) / cols)
    fig = new_figure({1: 8, 2: 9.5, 3: 11}[cols], 0.6 + 2.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    handles = {}
    for ax, key in zip(axes, keys):
        if len(sites) > MAX_SITE_LINES:  # hundreds of simulated sites: their spread, not one line each
            line = _site_band(ax, run, key)
            if line is not None:
                handles.setdefault(f"range over {len(sites)} sites", line)
        for site in sites if len(sites) <= MAX_SITE_LINES else ():
            mine = [r for r in run.metrics if r.get("site") == site]
            xs, ys = _series(mine, key)
            (line,) = ax.plot(xs, ys, label=site, **_site_style(sites, site))
            handles.setdefault(site, line)
            band = _noise_band(ax, mine, key, _site_style(sites, site)["color"], alpha=0.12)
            if band is not None:
                handles.setdefault("± one noise std (DP evaluation)", band)
        mean_key = MEAN_OVER_SITES.get(key)
        if federation and mean_key and any(mean_key in r for r in run.rounds):
            xs, ys = _series(run.rounds, mean_key)
            (line,) = ax.plot(xs, ys, color="black", linestyle="--", linewidth=1.5, label="mean over sites")
            handles.setdefault("mean over sites", line)
        for line in _baseline_lines(ax, run.baselines, key, task):
            handles.setdefault(line.get_label(), line)
        if len(keys) > 1:
            ax.set_title(metric_label(key, task), fontsize=10)
        else:
            ax.set_ylabel(metric_label(key, task))
        _on_unit_scale(ax, key)
        _style_rounds_axis(ax, run)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(handles) / 5), 1, 1))
    return figure_img(fig, alt)


def plot_epsilon(run: RunData) -> str:
    sites = run.sites
    dp_records = [r for r in run.metrics if number(r.get("dp")) == 1.0]
    finite = [r for r in dp_records if number(r.get("epsilon")) is not None and math.isfinite(r["epsilon"])]
    if not finite:
        return ""
    fig = new_figure(9, 3.8)
    ax = fig.subplots()
    top = 0.0
    if len(sites) > MAX_SITE_LINES:
        _site_band(ax, run, "epsilon").set_label(f"range over {len(sites)} sites")
        top = max(r["epsilon"] for r in finite)
    for site in sites if len(sites) <= MAX_SITE_LINES else ():
        mine = [r for r in finite if r.get("site") == site]
        if not mine:
            continue
        xs, ys = _series(mine, "epsilon")
        deltas = sorted({r["delta"] for r in mine if number(r.get("delta")) is not None})
        label = f"{site} (δ={', '.join(f'{d:g}' for d in deltas)})" if deltas else site
        ax.plot(xs, ys, label=label, **_site_style(sites, site))
        top = max([top, *ys])
        budgets = sorted({r["epsilon_budget"] for r in mine if number(r.get("epsilon_budget")) is not None})
        for budget in budgets:  # a site's own lifetime budget, when its replies carry it
            ax.axhline(budget, color=_site_style(sites, site)["color"], linestyle=":", linewidth=1.2, label=f"{site} budget ε={budget:g}")
            top = max(top, budget)
    target = number(run.config.get("target-epsilon"))
    if run.config.get("dp", True) and target and target > 0:
        ax.axhline(target, color="#b00020", linestyle="--", linewidth=1.5,
                   label=f"study target ε={target:g} (each site sized σ for it)")
        top = max(top, target)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_ylabel("cumulative ε (site's lifetime)")
    ax.set_title("ε per site after each round, as each site's ledger reported it", fontsize=10)
    _style_rounds_axis(ax, run)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return figure_img(fig, "epsilon per site per round")


def plot_agreement(run: RunData) -> str:
    """Each site's agreement with the round's consensus (server/consensus.py): the cosine, and its
    update's length over the median site's; rounds where it was an outlier marked. A hostile or broken site is
    the line that stays apart."""
    records = [{"round": r["round"], "site": r["site"], **r["consensus"]} for r in run.metrics
               if isinstance(r.get("consensus"), dict) and "round" in r]
    if not records:
        return ""
    sites = run.sites
    fig = new_figure(11, 3.6)
    cos_ax, norm_ax = fig.subplots(1, 2)
    for site in sites if len(sites) <= MAX_SITE_LINES else ():
        mine = [r for r in records if r["site"] == site]
        style = _site_style(sites, site)
        for ax, key in ((cos_ax, "cosine"), (norm_ax, "norm_ratio")):
            xs, ys = _series(mine, key)
            ax.plot(xs, ys, label=site, **style)
            bad = [(r["round"], r[key]) for r in mine if r.get("outlier") and number(r.get(key)) is not None]
            if bad:
                ax.scatter(*zip(*bad), s=90, facecolors="none", edgecolors="#b00020", linewidths=1.6, zorder=5)
    if len(sites) > MAX_SITE_LINES:
        for ax, key in ((cos_ax, "cosine"), (norm_ax, "norm_ratio")):
            for site in sites:
                xs, ys = _series([r for r in records if r["site"] == site], key)
                ax.plot(xs, ys, color="#888", linewidth=0.6, alpha=0.5)
    cos_ax.axhline(number(run.config.get("min-cosine")) or 0.0, color="#b00020", linestyle=":", linewidth=1.2)
    cos_ax.set_ylim(-1.05, 1.05)
    cos_ax.set_title("cosine with the round's consensus (below the red line: opposed)", fontsize=10)
    norm_ax.set_yscale("log")
    factor = number(run.config.get("bound-factor"))
    if factor:
        norm_ax.axhline(factor, color="#b00020", linestyle=":", linewidth=1.2)
    norm_ax.set_title("update length ÷ the median update's (above the red line: bounded)", fontsize=10)
    for ax in (cos_ax, norm_ax):
        _style_rounds_axis(ax, run)
    handles, labels = cos_ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    return figure_img(fig, "agreement of each site's update with the others, per round; outliers circled in red")
