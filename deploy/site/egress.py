"""The site's egress rules: what a reply may carry out of the site, decided by site-owned code.

The trust model lets an approved app decide what it computes, not what leaves: the gate
(egress_hook.py) hands every reply the SuperNode is about to send to ``check_reply``, outside the
app, with what the site knows itself — its config and policy, the message the reply answers, and its
own privacy ledger. Allowed per message type (docs/PRIVACY.md, "The egress guard"):

- only the record names and keys of ``RECORDS``; numbers only, finite; lists of bounded length;
  strings only from the site's own vocabulary (its id, dataset, task and model names, hashes);
- arrays only in a train reply, with the names, shapes and dtypes of the model the coordinator sent
  (or the subset the study trains), finite, never more bytes than came in; under secure aggregation
  the masked update instead: uint32 words of the same shapes (its values are masked, so the app bounds the
  update before masking, client/secure_aggregation.py);
- the secure-aggregation exchanges (``query.secagg_*``): only the protocol's keys, public keys of the
  protocol's curve, node ids, and ciphertexts and shares of bounded size (key material, no numbers);
- a reply with weights or any data-derived number must match a charge of this site's ledger for that
  run, round, dataset and kind, with the ε the ledger recorded; exact (non-DP) evaluation only where
  the dataset's policy opts in;
- an error reply keeps its code; its reason leaves only if it is made of the site's vocabulary
  (``reason_vocabulary``), otherwise the fixed reason of its code goes instead.

A reply that breaks a rule is blocked: ``Verdict.reason`` says which rule in fixed words (it names keys
and record names the app chose, never values).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import util as import_util
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from client.site import SiteConfig
from privacy.ledger import PrivacyLedger
from shared_models.eval_release import COUNT_KEYS, HIST_KEYS
from shared_models.metrics import PERSONAL_PREFIX, SCORE_BINS
from shared_models.registry import model_names
from shared_models.tasks import TASKS

BLOCKED = 4006              # error code of a blocked reply, beside the ClientApp's 4001-4004 and the gate's 4005
SITE_CODES = {4001: "site error; details are in the site's log",
              4002: "refused: the request is invalid for this site",
              4003: "internal error at the site; see the site's log",
              4004: "refused by the site's privacy policy or budget; details are in the site's audit log",
              4005: "the app is not approved at this site",
              BLOCKED: "blocked by the site's egress guard; details are in the site's audit log"}
FLOWER_REASON = "the ClientApp failed at the site; details are in the site's log"  # Flower's own codes
CONTENT_BYTES = 256 * 1024  # a reply's bytes beyond the arrays it may return (metrics, heads, names)
MAX_LIST = 4096             # numbers in one metric list (feature-statistics sums are the longest)
MAX_REASON = 600            # characters of an error reason
HEX64 = re.compile(r"[0-9a-f]{64}")
HEAD = "audit-head"         # client/audit.py: the site log's signed head, on every reply with content
TRAIN_METRICS = {"num-examples", "local-steps", "dp", "epsilon", "delta", "noise-multiplier", "clip-norm",
                 "trained-parameters", "epsilon-assumed", "honest-sites"}  # the last two: distributed DP only
EVAL_METRICS = {"eval-dp", "noise-std", "epsilon", "delta", "noise-multiplier", "l2-bound"}
BINARY_COUNTS = {*COUNT_KEYS, *HIST_KEYS, "loss-sum", "loss-bound"}  # the evaluation layouts' keys
SEG_COUNT = re.compile(r"(dice|iou)-sum-\d|cases")
HISTOGRAMS = set(HIST_KEYS)
# message type → record name → (record type, allowed keys or a key pattern)
RECORDS: dict[str, dict[str, tuple[type, object]]] = {
    "query": {"site": (ConfigRecord, {"site-id", "task", "dataset", "models", "schema-sha256"}),
              "counts": (MetricRecord, {"nominal-size", "n-features"})},
    "query.feature_stats": {"statistics": (MetricRecord, {"sum", "l2-bound", "noise-multiplier", "epsilon",
                                                          "delta"})},
    "query.witness": {},
    "train": {"arrays": (ArrayRecord, None), "metrics": (MetricRecord, TRAIN_METRICS)},
    "evaluate": {"metrics": (MetricRecord, "evaluation")},
    "query.secagg_keys": {"secagg": (ConfigRecord, "protocol")},
    "query.secagg_shares": {"secagg": (ConfigRecord, "protocol")},
    "query.secagg_unmask": {"secagg": (ConfigRecord, "protocol")},
}
# secure aggregation (privacy/secure_aggregation.py): per reply, each key → (what it holds, most bytes per value)
PROTOCOL = {"query.secagg_keys": {"share-key": ("point", 49), "mask-key": ("point", 49)},
            "query.secagg_shares": {"to": ("node", 20), "shares": ("bytes", 1024)},
            "query.secagg_unmask": {"nodes": ("node", 20), "shares": ("bytes", 512), "kind": ("word", 4)}}
PROTOCOL_LIST = 1024  # sites of one secure sum, at most
LEDGER_KIND = {"train": "training", "query.feature_stats": "feature-statistics", "evaluate": "evaluation"}


@dataclass(frozen=True)
class Instruction:
    """What the site received, as far as its reply is concerned (recorded by the gate at intake)."""

    message_type: str
    server_round: int | None
    arrays: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name → (shape, dtype)
    arrays_bytes: int = 0
    secure: bool = False  # a train message under secure aggregation: the reply's arrays are masked


@dataclass(frozen=True)
class Reply:
    """The reply as the guard sees it: the inflated message and its size on the wire."""

    message: Message
    size: int


@dataclass(frozen=True)
class Verdict:
    rule: str | None = None     # None: the reply may leave
    reason: str = ""            # fixed words naming the rule and, at most, keys or record names
    reworded: str | None = None  # an error reply whose reason is replaced by this one

    @property
    def blocked(self) -> bool:
        return self.rule is not None and self.reworded is None


ALLOWED = Verdict()


def _block(rule: str, reason: str) -> Verdict:
    return Verdict(rule, reason)


def check_reply(reply: Reply, instruction: Instruction | None, site: SiteConfig, run_config: dict,
                run_id: int) -> Verdict:
    """May ``reply`` leave the site? Reads the site's ledger for the charge a data-derived reply needs."""
    message = reply.message
    if message.has_error():
        return _check_error(message.error.code, message.error.reason or "", site)
    if instruction is None:
        return _block("unknown-instruction", "a reply to a message the gate did not see come in")
    kind = str(message.metadata.message_type)
    if kind != instruction.message_type:
        return _block("message-type", f"a {kind} reply to a {instruction.message_type} message")
    rules = RECORDS.get(kind)
    if rules is None:
        return _block("message-type", f"no reply of type {kind} may leave the site")
    dataset = _dataset(run_config, site)
    content = message.content
    limit = CONTENT_BYTES + (instruction.arrays_bytes if "arrays" in rules else 0)
    if reply.size > limit:
        return _block("size", f"the reply holds {reply.size} bytes, more than the {limit} allowed")
    for name, record in content.items():
        if name == HEAD:
            verdict = _check_head(record)
        elif name not in rules or not isinstance(record, rules[name][0]):
            verdict = _block("record", f"record '{name}' is not allowed in a {kind} reply")
        elif isinstance(record, ArrayRecord):
            verdict = _check_arrays(record, instruction)
        elif isinstance(record, ConfigRecord) and rules[name][1] == "protocol":
            verdict = _check_protocol(record, PROTOCOL[kind])
        elif isinstance(record, ConfigRecord):
            verdict = _check_strings(record, rules[name][1], site, dataset)
        else:
            verdict = _check_numbers(record, rules[name][1], kind, dataset, site)
        if verdict.rule is not None:
            return verdict
    if set(rules) - set(content) - {HEAD}:
        return _block("record", f"a {kind} reply without its record(s) {', '.join(sorted(set(rules) - set(content)))}")
    return _check_release(kind, content, instruction, site, dataset, str(run_id))


def _dataset(run_config: dict, site: SiteConfig):
    """The site's dataset the run's task reads (None: the task or the dataset is unknown here)."""
    task = TASKS.get(str(run_config.get("task", "ehr")))
    name = task.dataset_name(str(run_config.get("schema", ""))) if task is not None else ""
    return site.datasets.get(name)


def _check_head(record) -> Verdict:
    ok = (isinstance(record, ConfigRecord) and set(record) == {"seq", "hash", "sig"}
          and isinstance(record["seq"], int) and HEX64.fullmatch(str(record["hash"]))
          and re.fullmatch(r"[0-9A-Za-z+/=_-]{0,200}", str(record["sig"])))
    return ALLOWED if ok else _block("record", f"record '{HEAD}' is not a signed log head")


def _check_arrays(record: ArrayRecord, instruction: Instruction) -> Verdict:
    sent = instruction.arrays
    if not sent:
        return _block("arrays", "arrays in a reply to a message that carried no model")
    for name, array in record.items():
        if name not in sent:
            return _block("arrays", f"array '{name}' is not a parameter of the model the coordinator sent")
        shape, dtype = sent[name]
        dtype = "uint32" if instruction.secure else dtype  # a masked update: one uint32 word per parameter
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            return _block("arrays", f"array '{name}' is {array.dtype}{list(array.shape)}, the model's is "
                                    f"{dtype}{list(shape)}")
        values = array.numpy()
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return _block("arrays", f"array '{name}' holds NaN or infinite values")
    return ALLOWED


def _check_protocol(record: ConfigRecord, allowed: dict[str, tuple[str, int]]) -> Verdict:
    """A secure-aggregation reply: its keys, and values of the protocol's forms and sizes only."""
    if set(record) != set(allowed):
        return _block("keys", "a secure-aggregation reply with other keys than the protocol's")
    for key, value in record.items():
        form, most = allowed[key]
        values = value if isinstance(value, list) else [value]
        if len(values) > PROTOCOL_LIST:
            return _block("numbers", f"'{key}' holds {len(values)} values")
        for v in values:
            ok = {"point": lambda x: isinstance(x, bytes) and len(x) == most and x[:1] in (b"\x02", b"\x03"),
                  "bytes": lambda x: isinstance(x, bytes) and len(x) <= most,
                  "node": lambda x: isinstance(x, str) and x.isdigit() and len(x) <= most,
                  "word": lambda x: x in ("seed", "key")}[form](v)
            if not ok:
                return _block("record", f"'{key}' holds a value that is not the protocol's")
    return ALLOWED


def _check_strings(record: ConfigRecord, allowed: set, site: SiteConfig, dataset) -> Verdict:
    vocabulary = {"site-id": {site.site_id}, "task": set(TASKS), "dataset": {dataset.name} if dataset else set(),
                  "models": set(model_names())}
    for key, value in record.items():
        if key not in allowed:
            return _block("keys", f"key '{key}' is not allowed in record of site identity")
        values = value if isinstance(value, list) else [value]
        for v in values:
            ok = HEX64.fullmatch(str(v)) if key == "schema-sha256" else v in vocabulary.get(key, set())
            if not isinstance(v, str) or not ok:
                return _block("strings", f"the value of '{key}' is not in the site's vocabulary")
    return ALLOWED


def _check_numbers(record: MetricRecord, allowed, kind: str, dataset, site: SiteConfig) -> Verdict:
    for key, value in record.items():
        if not _metric_key_allowed(key, allowed, dataset):
            return _block("keys", f"metric '{key}' is not allowed in a {kind} reply")
        values = value if isinstance(value, list) else [value]
        if len(values) > MAX_LIST or (key.removeprefix(PERSONAL_PREFIX) in HISTOGRAMS and len(values) != SCORE_BINS):
            return _block("numbers", f"metric '{key}' holds {len(values)} numbers")
        unbounded = key == "epsilon" and values == [math.inf]  # a non-DP release states ε = ∞ (checked: ledger)
        if not unbounded and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                     for v in values):
            return _block("numbers", f"metric '{key}' holds a value that is not a finite number")
    if kind in ("query", "train") and dataset is not None:
        weight = record.get("nominal-size", record.get("num-examples"))
        if weight is not None and weight != dataset.weight:
            return _block("weight", "the weight is not the nominal size the site discloses (docs/PRIVACY.md)")
    return ALLOWED


def _metric_key_allowed(key: str, allowed, dataset) -> bool:
    if allowed != "evaluation":
        return key in allowed
    if key.startswith(PERSONAL_PREFIX):  # a fine-tuned model's test counts: a non-DP release by design
        base = key[len(PERSONAL_PREFIX):]
        return dataset is not None and dataset.policy.allow_non_dp and (base in BINARY_COUNTS
                                                                      or bool(SEG_COUNT.fullmatch(base)))
    return key in EVAL_METRICS or key in BINARY_COUNTS or bool(SEG_COUNT.fullmatch(key))


def _check_release(kind: str, content, instruction: Instruction, site: SiteConfig, dataset, run_id: str) -> Verdict:
    """Data-derived numbers leave only with the ledger charge that pays for them, recorded before."""
    ledger_kind = LEDGER_KIND.get(kind)
    if ledger_kind is None:
        return ALLOWED  # query, witness: identity and public sizes only
    if dataset is None:
        return _block("ledger", "the run's dataset is not configured at this site")
    metrics = next((r for r in content.values() if isinstance(r, MetricRecord)), MetricRecord())
    rows = [r for r in PrivacyLedger(site.ledger_path).rounds(dataset.name) if r["run_id"] == run_id]
    if kind == "evaluate" and metrics.get("eval-dp") == 0.0:
        return _exact_evaluation(dataset, metrics, rows)
    server_round = 0 if kind == "query.feature_stats" else instruction.server_round
    if kind == "train" and not float(metrics.get("dp", 1.0)):  # non-DP training: the policy must allow it
        if not dataset.policy.allow_non_dp:
            return _block("ledger", f"weights trained without DP on dataset '{dataset.name}'")
    charged = [r for r in rows if r["round"] == server_round and r.get("kind", "training") == ledger_kind]
    if not charged:
        return _block("ledger", f"no {ledger_kind} charge of dataset '{dataset.name}' for run {run_id}, round "
                                f"{server_round} in the site's ledger")
    logged = metrics.get("epsilon")
    if logged is not None and not math.isclose(float(logged), charged[-1]["epsilon_after"], rel_tol=1e-9):
        return _block("ledger", "the ε the reply states is not the one the site's ledger charged")
    return ALLOWED


def _exact_evaluation(dataset, metrics, rows: list[dict]) -> Verdict:
    """Exact (non-DP) evaluation counts leave only where the site opted in (``evaluation = "exact"``), or in a
    study this site already trains without DP (``allow_non_dp`` and a σ = 0 training charge of this run:
    the dataset's ε is unbounded from then on, so a charge for the counts could state nothing)."""
    if metrics.get("noise-std") not in (0, 0.0):
        return _block("numbers", "an exact evaluation that states a noise scale")
    if getattr(dataset.policy, "evaluation", "dp") == "exact":
        return ALLOWED
    non_dp_study = dataset.policy.allow_non_dp and any(
        r.get("kind", "training") == "training" and r["noise_multiplier"] == 0 for r in rows)
    if non_dp_study:
        return ALLOWED
    return _block("ledger", f"exact evaluation of dataset '{dataset.name}' without the site's opt-in "
                            "(policy evaluation = \"exact\")")


# -- error replies ------------------------------------------------------------------------------------
def _check_error(code: int, reason: str, site: SiteConfig) -> Verdict:
    """An error's code always leaves; its reason only when made of the site's own words and names."""
    fixed = SITE_CODES.get(code, FLOWER_REASON)
    if _reason_in_vocabulary(reason, site):
        return ALLOWED
    return Verdict("reason", "an error reason with words outside the site's vocabulary", reworded=fixed)


def _reason_in_vocabulary(reason: str, site: SiteConfig) -> bool:
    if len(reason) > MAX_REASON or not reason.isprintable():
        return False
    names = {site.site_id, *site.datasets, *TASKS, *model_names()}
    text = re.sub(r"[0-9a-f]{16,}", " ", reason)  # hashes (app, schema, arrays)
    for name in sorted(names, key=len, reverse=True):
        text = text.replace(name, " ")
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", text)}
    return words <= reason_vocabulary()


REASON_SOURCES = ("client", "privacy", "shared_models", "deploy.site", "flwr.clientapp", "flwr.supernode")


@lru_cache(maxsize=1)
def reason_vocabulary() -> frozenset[str]:
    """Every word of the string literals (docstrings aside) in the site's own installed code — its ClientApp,
    privacy core, shared models, gate, and Flower's site side: what a reason may be written in. The
    site's installed copy, not the app bundle under judgement, so an app cannot widen it."""
    words: set[str] = set()
    for package in REASON_SOURCES:
        spec = import_util.find_spec(package)
        folders = (spec.submodule_search_locations or []) if spec is not None else []
        for path in (p for folder in folders for p in Path(folder).rglob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, UnicodeDecodeError):
                continue
            docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    words.update(w.lower() for w in re.findall(r"[A-Za-z]+", node.value))
    return frozenset(words)
