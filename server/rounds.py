"""Collect each round's replies per site and write them to the run directory.

Fed by ``SiteGrid`` (every batch of replies) and closed by the strategy's per-round
``evaluate_fn`` callback, which Flower calls after the round's evaluation.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord

from server.metrics import pooled_metrics, release_problem, site_figures
from server.sites import NO_REPLY
from server.run_dir import METRICS_FILE, ROUNDS_FILE, RunDirectory
from shared_models.metrics import PERSONAL_PREFIX

log = logging.getLogger("flwr")

# Keys a site's metrics are written under (Flower key → run-directory key).
# A train reply carries no data-derived number besides its weights: its weight is the site's public nominal
# size (never N), and neither the training loss nor the sample rate (B/N) leaves the site.
TRAIN_KEYS = {"num-examples": "weight", "local-steps": "local_steps", "dp": "dp", "epsilon": "epsilon",
              "delta": "delta", "noise-multiplier": "noise_multiplier", "clip-norm": "clip_norm"}
# An evaluation release's own facts; its figures (accuracy, auc, …, dice, … and each one's _std) are derived from
# its sums (server/metrics.py: site_figures). Its ε is the dataset's after the round's evaluation: the latest.
EVAL_KEYS = {"eval-dp": "eval_dp", "noise-std": "eval_noise_std", "epsilon": "epsilon", "delta": "delta",
             "noise-multiplier": "eval_noise_multiplier", "l2-bound": "eval_l2_bound"}


def _pick(record: MetricRecord, keys: dict[str, str]) -> dict:
    return {out: record[key] for key, out in keys.items() if key in record}


class RoundRecorder:
    def __init__(self, run_dir: RunDirectory, site_ids: list[str]) -> None:
        self.run_dir = run_dir
        self.site_ids = site_ids
        self._train: dict[str, dict] = {}
        self._eval: dict[str, dict] = {}
        self._eval_raw: dict[str, dict] = {}
        self._errors: dict[str, str] = {}
        self._agreement: dict[str, dict] = {}  # site → its update's agreement with the round's consensus
        self._consensus: dict = {}             # the round's bound, outliers and newly flagged sites
        self._secure: dict = {}                # under secure aggregation: who is in the round's sum
        self._round_started = time.time()
        self.last_eval: dict[str, dict] = {}  # site → its latest test metrics
        self.last_train: dict[str, dict] = {}  # site → its latest train reply (ε, δ, …)
        self.last_round: dict = {}

    def on_replies(self, message_type: str, server_round: int, replies: list[tuple[str, Message]]) -> None:
        for site, reply in replies:
            if reply.has_error():
                self._errors.setdefault(site, f"{message_type}: {reply.error.reason}")  # its first failure
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            if message_type == MessageType.TRAIN:
                self._train[site] = _pick(metrics, TRAIN_KEYS)
            elif message_type == MessageType.EVALUATE:
                raw = dict(metrics)
                problem = release_problem(raw)
                if problem is not None:
                    self._errors.setdefault(site, f"{message_type}: {problem}")
                    continue
                figures = site_figures(raw)
                if f"{PERSONAL_PREFIX}tp" in raw or f"{PERSONAL_PREFIX}cases" in raw:  # its fine-tuned model's
                    figures.update({f"personal_{k}": v for k, v in site_figures(raw, PERSONAL_PREFIX).items()})
                self._eval[site] = {**_pick(metrics, EVAL_KEYS), **figures}
                self._eval_raw[site] = raw

    def on_consensus(self, agreement: dict, radius: float, flagged: dict[str, str]) -> None:
        self._agreement = {site: a.record() for site, a in agreement.items()}
        self._consensus = {"bound": radius, "outliers": sorted(s for s, a in agreement.items() if a.outlier),
                           "sites": self._agreement, **({"flagged": flagged} if flagged else {})}

    def on_secure_sum(self, record: dict) -> None:
        """The round's secure sum: which sites are in it, which dropped, whose mask was rebuilt."""
        self._secure = record

    def stop_round(self, server_round: int | None, site_errors: dict[str, str], reason: str) -> None:
        """The round the run stopped in: one record for each site that has something to say — its own
        failure, or its train reply (it trained and was charged, but its update was never aggregated)."""
        if server_round is None:
            return
        for site in self.site_ids:
            error = self._errors.get(site) or site_errors.get(site)  # the reply's own words first
            if site in self._train and error is None:
                error = f"round {server_round} did not complete ({reason.split(';')[0]}); update not aggregated"
            if error is None:
                continue
            self.run_dir.append(METRICS_FILE, {"round": server_round, "site": site, **self._train.get(site, {}),
                                               "error": error})
        self._reset()

    def _reset(self) -> None:
        self._train, self._eval, self._eval_raw, self._errors = {}, {}, {}, {}
        self._agreement, self._consensus, self._secure = {}, {}, {}

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower ``evaluate_fn``: called with round 0 before training, then after every round."""
        if server_round == 0:
            self._round_started = time.time()
            return None
        seconds = time.time() - self._round_started
        for site in self.site_ids:
            record = {"round": server_round, "site": site, **self._train.get(site, {}), **self._eval.get(site, {}),
                      **({"consensus": self._agreement[site]} if site in self._agreement else {}),
                      **({"flagged": self._consensus["flagged"][site]} if site in self._consensus.get("flagged", {})
                         else {})}
            if site in self._errors:
                record["error"] = self._errors[site]
            elif site not in self._train or site not in self._eval:
                record["error"] = NO_REPLY  # (SiteGrid records it; a bare Flower grid does not)
            self.run_dir.append(METRICS_FILE, record)
        pooled = pooled_metrics(list(self._eval_raw.values()))
        self.last_round = {"round": server_round, "seconds": round(seconds, 3),
                           "sites_replied": sorted(set(self._train) & set(self._eval)), **pooled,
                           **({"consensus": self._consensus} if self._consensus else {}),
                           **({"secure_aggregation": self._secure} if self._secure else {})}
        self.run_dir.append(ROUNDS_FILE, self.last_round)
        self.last_eval.update(self._eval)
        self.last_train.update(self._train)
        for site, figures in self._eval.items():  # the latest ε is the one after the round's evaluation release
            if site in self.last_train and "epsilon" in figures:
                self.last_train[site] = {**self.last_train[site], "epsilon": figures["epsilon"],
                                         "delta": figures["delta"]}
        headline = {k: v for k, v in pooled.items() if k in ("mean_centre_accuracy", "pooled_auc", "mean_dice",
                                                               "pooled_dice")}
        log.info("round %d: %d/%d sites, %s (%.1fs)", server_round, len(self.last_round["sites_replied"]),
                 len(self.site_ids), ", ".join(f"{k} {v:.3f}" for k, v in headline.items()), seconds)
        self._reset()
        self._round_started = time.time()
        return None
