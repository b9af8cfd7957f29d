"""Which Flower node is which hospital, and a Grid that only talks to the chosen sites.

Flower knows nodes by number only. At the start of a run the coordinator sends every connected
node a ``query`` and learns its site id; from then on work goes only to the sites of this run,
never to whatever else happens to be connected.

(Over 400 lines on purpose: ``SiteGrid`` is one object whose every kind of round — plain, re-sent or
secure — reads and updates the same per-round state (where each message went, who failed, whose update
was refused); the secure round's protocol itself is server/secure_aggregation.py.)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.consensus import MIN_UPDATES, Agreement, ConsensusRule, bound
from server.flower_seam import NODE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, replace_content_with_error
from server.metrics import release_problem
from server.secure_aggregation import SecureRound, SecureSum
from server.validation import UpdateValidator, as_ndarray, exact_gram, to_array

log = logging.getLogger("flwr")

CODE_REJECTED = 4100  # an update the coordinator refused to aggregate
CODE_PROTOCOL = 4101  # a site that left a secure-aggregation round before its masked update (its reason kept)
CODE_NO_REPLY = 4102  # a site that sent nothing before the round deadline (Flower reported no loss either)
NO_REPLY = "no reply before the round deadline"
QUERY_TIMEOUT = 120.0  # one query round trip; a ClientApp process has to start at the site
PULL_INTERVAL = 1.0    # seconds between pulls of an exchange's replies (Flower's own loop: 3 s)
GRACE = 10.0           # ... and how long it still waits for the others once the replies suffice


class SiteSelectionError(RuntimeError):
    """The sites this run needs did not all answer, or a round cannot reach its quorum."""

    def __init__(self, message: str, server_round: int | None = None,
                 site_errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.server_round = server_round    # the round that could not complete (None: before any round)
        self.site_errors = site_errors or {}  # site → its own (first) failure in that round


# Flower's own replies for a site that is gone, in words an operator can act on.
TRANSPORT_ERRORS = {
    NODE_UNAVAILABLE: "site lost: its SuperNode sent no heartbeat for 2 × 30 s (stopped, crashed or "
                                "cut off from the coordinator)",
    REPLY_MESSAGE_UNAVAILABLE: "site lost: its reply expired before it reached the coordinator",
}


@dataclass
class SiteInfo:
    site_id: str
    node_id: int
    weight: int        # the dataset's public nominal size, or 1 (equal weights): never its exact N
    n_features: int
    models: list[str] = field(default_factory=list)
    schema_sha256: str = ""  # schema-driven tasks: the study schema the site reads


def _query(grid: Grid, node_ids: list[int], study: dict | None = None) -> tuple[list[SiteInfo], dict[int, str]]:
    # A query not answered in time expires (ttl) rather than wait at the SuperLink: the node is asked anew.
    content = RecordDict({"study": ConfigRecord(study)}) if study else RecordDict()
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY, ttl=QUERY_TIMEOUT)
                for n in node_ids]
    answered, failed = [], {}
    for reply in grid.send_and_receive(messages, timeout=QUERY_TIMEOUT):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed[node] = reply.error.reason or "no reason given"
            continue
        try:
            answered.append(_site_info(reply, node))
        except (KeyError, TypeError, ValueError):  # a broken reply is that site's failure, never a traceback
            failed[node] = ("its handshake reply is malformed (it must carry the site's id, nominal size and "
                            "feature count: is the site running this app version?)")
    return answered, failed


def _site_info(reply: Message, node: int) -> SiteInfo:
    info, counts = reply.content["site"], reply.content["counts"]
    return SiteInfo(str(info["site-id"]), node, int(counts["nominal-size"]), int(counts["n-features"]),
                    list(info.get("models", [])), str(info.get("schema-sha256", "")))


WITNESS_TIMEOUT = 30.0  # the run-end witness: a site that does not answer by then is not waited for


def witness_run_end(grid: Grid, sites: list[SiteInfo]) -> list[str]:
    """Send each site the run's last message, ``query.witness``: through the ``WitnessedGrid`` it carries
    the coordinator log's head after its run-end record, which the site logs (docs/AUDIT.md). The replies
    are not logged here (that would leave a new unwitnessed tail). Returns the sites that answered."""
    messages = [Message(RecordDict(), dst_node_id=s.node_id, message_type=f"{MessageType.QUERY}.witness",
                        ttl=WITNESS_TIMEOUT) for s in sites]
    names = {s.node_id: s.site_id for s in sites}
    try:
        replies = grid.send_and_receive(messages, timeout=WITNESS_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - the run has ended already; the auditor sees the unwitnessed tail
        log.warning("the run-end witness could not be sent (%s); the log's last records have no witness",
                    type(exc).__name__)
        return []
    return sorted(names[r.metadata.src_node_id] for r in replies if not r.has_error())


def discover_sites(grid: Grid, wanted: tuple[str, ...], min_sites: int, wait: float,
                   poll: float = 1.0, study: dict | None = None) -> list[SiteInfo]:
    """Query connected nodes until the wanted sites (or, if none named, ``min_sites``) answered.

    A node that does not answer within ``QUERY_TIMEOUT`` (a site still starting; one of a thousand
    simulated sites queued behind the others) is asked again at the next poll while sites are missing.
    ``study`` (the rounds still to run) lets each site check, before anyone trains, that its policy and
    remaining budget can take the whole study; a named site that refuses stops the run at once.
    """
    found: dict[str, SiteInfo] = {}
    asked: set[int] = set()
    silent: set[int] = set()  # asked, no answer in time
    failures: dict[int, str] = {}
    deadline = time.monotonic() + wait
    while True:
        nodes = list(grid.get_node_ids())
        new = [n for n in nodes if n not in asked]
        missing = not all(s in found for s in wanted) if wanted else len(found) < min_sites
        again = [n for n in nodes if n in silent] if missing else []
        if new or again:
            asked.update(new)
            answered, failed = _query(grid, new + again, study)
            failures.update(failed)
            silent = (silent - set(again)) | (set(new + again) - set(failed) - {i.node_id for i in answered})
            for info in answered:
                if info.site_id in found:
                    raise SiteSelectionError(f"two nodes claim site id '{info.site_id}'")
                found[info.site_id] = info
        if wanted and all(s in found for s in wanted):
            return [found[s] for s in wanted]
        if wanted and failures and len(failures) >= len([s for s in wanted if s not in found]) \
                and not [n for n in nodes if n not in failures and n not in {i.node_id for i in found.values()}]:
            # every connected node that is not a found site refused: waiting cannot change their answers
            raise SiteSelectionError("the study cannot start, no site trained: " + "; ".join(
                f"node {n}: {r}" for n, r in failures.items()))
        if not wanted and len(found) >= min_sites and (not new or time.monotonic() > deadline):
            return sorted(found.values(), key=lambda s: s.site_id)
        if time.monotonic() > deadline:
            missing = [s for s in wanted if s not in found] if wanted else []
            detail = "; ".join(f"node {n}: {r}" for n, r in failures.items())
            need = f"sites {', '.join(missing)} did not answer" if missing else (
                f"only {len(found)} site(s) answered, {min_sites} needed")
            raise SiteSelectionError(f"{need} within {wait:.0f}s" + (f" (errors: {detail})" if detail else ""))
        time.sleep(poll)


RepliesHook = Callable[[str, int, list[tuple[str, Message]]], None]
ConsensusHook = Callable[[int, dict[str, Agreement], float], None]  # round, agreement per site, the bound
SecureHook = Callable[[int, SecureSum], None]  # round, what its secure sum held


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation for a run's train rounds (server/secure_aggregation.py): the sum's weights are equal
    under distributed DP; updates longer than ``max_update_norm`` are refused by the sites themselves."""

    equal_weights: bool = False
    max_update_norm: float = 0.0
    on_sum: SecureHook | None = None


class ValidatedReplies(list):
    """The accepted train replies of a round; ``average`` is (weight key, FedAvg's average of exactly
    these replies, in this order) when the validation pass computed it (``SiteGrid.fuse_average``)."""

    average: tuple[str, ArrayRecord] | None = None


class SiteGrid:
    """A Grid restricted to the selected sites that checks and reports every reply.

    Flower's strategies sample from ``get_node_ids()``; giving them only our sites' nodes is
    what keeps work away from nodes that are connected but not part of this run. Train replies are
    validated (``server/validation.py``) and an invalid update never reaches the strategy; a round
    with fewer than ``quorum`` valid updates is re-sent to the sites that failed, at most
    ``retries`` times, and then the run stops with the reasons. The accepted updates of a round are then
    bounded against their consensus (``server/consensus.py``) before any strategy sees them, and each
    site's agreement with it goes to ``on_consensus``.
    """

    def __init__(self, grid: Grid, sites: list[SiteInfo], on_replies: RepliesHook,
                 validator: UpdateValidator | None = None, quorum: int = 1, retries: int = 0,
                 wait_for_sites: float = 600.0, trained: list[str] | None = None,
                 rule: ConsensusRule | None = None, on_consensus: ConsensusHook | None = None,
                 secure: SecureAggregation | None = None) -> None:
        self._grid = grid
        self._secure = secure
        self._rule = rule or ConsensusRule()
        self._on_consensus = on_consensus
        self._excluded: dict[str, str] = {}  # site → why it gets no more work in this run
        self._refused: dict[str, bool] = {}
        self._trained = trained  # None: sites send every array; else only these (the rest stay frozen)
        self._site_of = {s.node_id: s.site_id for s in sites}
        self._weight = {s.site_id: s.weight for s in sites}
        self._on_replies = on_replies
        self._validator = validator
        self._quorum = quorum
        self._retries = retries
        self._wait_for_sites = wait_for_sites
        self._short_since: float | None = None  # since when fewer than ``quorum`` of our sites are online
        self._last_round = 0
        self._sent_to: dict[str, int] = {}  # message id → the node it went to (Flower's own error replies
        self._average_by: str | None = None  # come from the SuperLink, not from the node)

    def fuse_average(self, weighted_by_key: str) -> None:
        """Called by a FedAvg-family strategy (``server/strategies.py``): compute its weighted average in
        the validation pass, which reads every update anyway; the strategy uses it if every update passed."""
        self._average_by = weighted_by_key

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def site_of(self, node_id: int) -> str:
        return self._site_of[node_id]

    def exclude(self, site: str, reason: str) -> None:
        """Send ``site`` no more work in this run (its agreement records say why)."""
        self._excluded[site] = reason
        log.warning("site %s excluded from the rest of the run: %s", site, reason)

    def get_node_ids(self) -> Iterable[int]:
        """Our sites that are online. Flower's strategies wait (polling this every second) until ``quorum``
        of them are; if that takes longer than ``wait_for_sites`` the run stops before the round is sent,
        so no site is charged for a round that could not reach its quorum."""
        connected = set(self._grid.get_node_ids())
        ours = [n for n in self._site_of if n in connected and self._site_of[n] not in self._excluded]
        if len(self._site_of) - len(self._excluded) < self._quorum:
            raise SiteSelectionError(
                f"round {self._last_round + 1} not started: {len(self._excluded)} of {len(self._site_of)} sites are "
                f"excluded ({'; '.join(f'{s}: {r}' for s, r in sorted(self._excluded.items()))}), min-sites is "
                f"{self._quorum}", self._last_round + 1)
        if len(ours) >= self._quorum:
            self._short_since = None
            return ours
        now = time.monotonic()
        offline = sorted(self._site_of[n] for n in self._site_of if n not in connected)
        if self._short_since is None:
            self._short_since = now
            log.warning("round %d waits for sites: %d of %d online, min-sites is %d (offline: %s)",
                        self._last_round + 1, len(ours), len(self._site_of), self._quorum, ", ".join(offline))
        elif now - self._short_since > self._wait_for_sites:
            raise SiteSelectionError(
                f"round {self._last_round + 1} not started: only {len(ours)} of {len(self._site_of)} sites online "
                f"for {self._wait_for_sites:.0f} s (offline: {', '.join(offline)}), min-sites is {self._quorum}; "
                f"no site was sent the round, so none was charged for it",
                self._last_round + 1, {site: "offline before the round started" for site in offline})
        return ours

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stray = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self._site_of]
        if stray:
            raise SiteSelectionError(f"refusing to send to nodes outside this run: {stray}")
        if not messages:
            return []
        first = messages[0]
        message_type = first.metadata.message_type
        server_round = int(first.content.config_records.get("config", {}).get("server-round", 0))
        for m in messages:  # Flower leaves group_id empty; sites log (and gate) messages by round
            m.metadata.group_id = str(server_round)
        if message_type == MessageType.TRAIN:
            self._last_round = server_round
        if message_type != MessageType.TRAIN or self._validator is None:
            replies = self._exchange(messages, timeout)
            if message_type == MessageType.EVALUATE:  # a release whose sums contradict each other is not believed
                sigma = first.content.config_records.get("config", {}).get("eval-noise-multiplier")
                replies = [self._checked_release(r, sigma) for r in replies]
            self._on_replies(message_type, server_round,
                             [(self._site(r), r) for r in replies] + self._silent(messages, replies))
            return replies

        global_arrays = next(iter(first.content.array_records.values()))
        reference = global_arrays if self._trained is None else ArrayRecord(
            {name: global_arrays[name] for name in self._trained})  # what a valid reply holds
        if self._secure is not None:
            return self._secure_round(messages, timeout, server_round, reference, global_arrays)
        accepted: dict[str, Message] = {}
        norms: dict[str, float] = {}  # accepted updates' distances to the global model
        failures: dict[str, str] = {}  # site → its first failure this round (a re-send's refusal is not news)
        order: list[str] = []          # sites in the order they failed
        pending, retried, grams = messages, 0, []
        self._refused: dict[str, bool] = {}  # sites whose update this coordinator refused this round
        for attempt in range(self._retries + 1):
            replies = self._exchange(pending, timeout)
            checked, average, gram = self._check(replies, reference, norms)  # (the replies, their FedAvg) or None
            grams.append(gram)
            checked += self._silent(pending, replies)
            self._on_replies(message_type, server_round, checked)
            lost = [(site, reply.error.reason) for site, reply in checked if reply.has_error()]
            for site, reason in lost:
                if site not in failures:
                    failures[site] = reason
                    order.append(site)
            accepted.update({site: reply for site, reply in checked if not reply.has_error()})
            if len(accepted) >= self._quorum or attempt == self._retries:
                break
            online = set(self._grid.get_node_ids())
            pending = [_resend(m) for m in messages if self._site_of[m.metadata.dst_node_id] not in accepted
                       and m.metadata.dst_node_id in online]
            if len(accepted) + len(pending) < self._quorum:
                break  # the sites that failed are offline: a re-send cannot reach the quorum
            retried += 1
            log.warning("round %d: %d valid update(s), %d needed; re-sending to %s", server_round, len(accepted),
                        self._quorum, ", ".join(sorted(self._site_of[m.metadata.dst_node_id] for m in pending)))
        if len(accepted) < self._quorum:
            failed = [s for s in order if s not in accepted] or ["?"]
            raise SiteSelectionError(
                f"round {server_round}: only {len(accepted)} valid update(s), min-sites is {self._quorum} "
                f"(re-sent {retried} time(s)); {failed[0]} failed first: {failures.get(failed[0], 'unknown')}"
                + "".join(f"; {s}: {failures[s]}" for s in failed[1:]),
                server_round, {s: failures[s] for s in failed if s in failures})
        result = ValidatedReplies(accepted.values())
        rejected = [site for site, _ in failures.items() if site not in accepted and self._refused.get(site)]
        if self._bound(server_round, accepted, grams, reference, rejected):
            average = None  # the strategy averages the bounded updates itself
        if average is not None and len(average[0]) == len(result) and all(a is b for a, b in zip(average[0], result)):
            result.average = (self._average_by, self._with_frozen(average[1], global_arrays))
        if self._trained is not None:  # after the audit hashed what the sites sent
            for reply in result:
                key = next(iter(reply.content.array_records))
                reply.content[key] = self._with_frozen(reply.content.array_records[key], global_arrays)
        return result

    def _secure_round(self, messages: list[Message], timeout: float | None, server_round: int,
                      reference: ArrayRecord, global_arrays: ArrayRecord) -> "ValidatedReplies":
        """One round under secure aggregation: the protocol around the train messages; the strategy then gets one
        reply holding the unmasked average (weight 1), so every FedAvg-family strategy works on it unchanged.
        Per-update checks and the consensus bound cannot see a masked update: the sites bound their own updates
        before masking and the sum is refused whole if it is out of range."""
        secure = self._secure
        protocol = SecureRound(self._exchange, self._site, self._site_of, self._weight, secure.equal_weights,
                               secure.max_update_norm)
        train = protocol.prepare(messages, server_round)
        replies = self._exchange(train, timeout) if train else []
        self._refused = {}
        checked, accepted = [], {}
        by_site = {self._site_of[m.metadata.dst_node_id]: m for m in messages}
        for site, reason in sorted(protocol.outcome.failures.items()):  # left before training: on record as such
            if site in by_site:
                checked.append((site, Message(Error(CODE_PROTOCOL, reason), reply_to=by_site[site])))
        for reply in replies:
            site = self._site(reply)
            problem = None if reply.has_error() else protocol.masked_problem(reply, reference)
            if problem is not None:
                reply = _rejected(reply, problem)
                self._refused[site] = True
            elif not reply.has_error():
                accepted[reply.metadata.src_node_id] = reply
            checked.append((site, reply))
        self._on_replies(MessageType.TRAIN, server_round, checked)
        failures = dict(protocol.outcome.failures)
        failures.update({site: reply.error.reason for site, reply in checked if reply.has_error()})
        failures.update({site: reply.error.reason for site, reply in self._silent(train, replies)})
        if len(accepted) < max(self._quorum, 2) or protocol.outcome.problem:
            problem = protocol.outcome.problem or (f"only {len(accepted)} masked update(s) arrived, min-sites is "
                                                   f"{self._quorum} and a secure sum needs 2")
            raise SiteSelectionError(f"round {server_round} (secure aggregation): {problem}"
                                     + "".join(f"; {s}: {r}" for s, r in sorted(failures.items())),
                                     server_round, failures)
        assumed = {self._site(r): int(_metric(r, "honest-sites", 1)) for r in accepted.values()}
        short = {site: t for site, t in assumed.items() if t > len(accepted)}
        if short:  # distributed DP: fewer updates in the sum than a site counted on, so less noise than it assumed
            raise SiteSelectionError(
                f"round {server_round} (distributed DP): only {len(accepted)} masked update(s) arrived and "
                + ", ".join(f"{s} assumed {t} honest sites in the sum" for s, t in sorted(short.items()))
                + "; the sum would carry less noise than they counted on, so it is not unmasked", server_round,
                failures)
        outcome = protocol.unmask(accepted, reference, global_arrays, server_round)
        if secure.on_sum is not None:
            secure.on_sum(server_round, outcome)
        if outcome.arrays is None:
            raise SiteSelectionError(f"round {server_round}: {outcome.problem}", server_round, failures)
        if outcome.recovered:
            log.warning("round %d: %s sent a masked update and then left; its mask was rebuilt from the others' "
                        "shares", server_round, ", ".join(outcome.recovered))
        key = self._average_by or "num-examples"
        summed = Message(RecordDict({"arrays": outcome.arrays, "metrics": MetricRecord({key: 1})}), reply_to=train[0])
        return ValidatedReplies([summed])

    @staticmethod
    def _with_frozen(trained: ArrayRecord, global_arrays: ArrayRecord) -> ArrayRecord:
        """A whole model: the trained arrays, and the global model's own for every frozen one."""
        return ArrayRecord({name: trained[name] if name in trained else array
                            for name, array in global_arrays.items()})

    def _bound(self, server_round: int, accepted: dict[str, Message], grams: list[tuple[dict[int, int], np.ndarray]],
               reference: ArrayRecord, rejected: list[str]) -> bool:
        """Bound the accepted updates against their consensus (after the audit hashed what the sites sent):
        an update out of bounds is replaced by its bounded version. True if any was. ``rejected``: sites whose
        update this coordinator refused this round, outliers of the round as well."""
        sites, replies = list(accepted), list(accepted.values())
        refused = {site: Agreement(0.0, 0.0, 0.0, "rejected") for site in rejected}
        if len(replies) < MIN_UPDATES:  # no majority to agree with: nothing bounded, only refusals on record
            if refused and self._on_consensus is not None:
                self._on_consensus(server_round, refused, 0.0)
            return False
        home = [next((k for k, (row_of, _) in enumerate(grams) if id(r) in row_of), None) for r in replies]
        if len(set(home)) == 1 and home[0] is not None:  # the usual round: one batch, its pass's Gram matrix
            row_of, full = grams[home[0]]
            rows = [row_of[id(r)] for r in replies]
            gram = full[np.ix_(rows, rows)]
        else:  # accepted over re-sends: one more pass
            gram = sum(exact_gram([as_ndarray(next(iter(r.content.array_records.values()))[name]) for r in replies],
                                  as_ndarray(array)) for name, array in reference.items())
        bounded = bound(np.asarray(gram, dtype=np.float64), self._rule)
        if self._on_consensus is not None:
            self._on_consensus(server_round, {**dict(zip(sites, bounded.agreement)), **refused}, bounded.radius)
        combined = {i: _combined(bounded.coefficients[i], replies, reference) for i in bounded.changed}
        for i, arrays in combined.items():  # all computed from the updates as sent, then put in place
            replies[i].content[next(iter(replies[i].content.array_records))] = arrays
            log.warning("round %d: update of site %s bounded (× %.3g: %.3g times the median update's length)",
                        server_round, sites[i], bounded.agreement[i].scale, bounded.agreement[i].norm_ratio)
        return bool(bounded.changed)

    @staticmethod
    def _checked_release(reply: Message, noise_multiplier) -> Message:
        if reply.has_error():
            return reply
        records = list(reply.content.metric_records.values())
        problem = ("reply must hold exactly one metric record" if len(records) != 1 else
                   release_problem(dict(records[0]), None if noise_multiplier is None else float(noise_multiplier)))
        return reply if problem is None else _rejected(reply, problem, "evaluation")

    def _exchange(self, messages: list[Message], timeout: float | None,
                  enough: Callable[[list[Message]], bool] | None = None) -> list[Message]:
        """Flower's send_and_receive (its push-then-pull loop, ``_until``, where the grid offers one); its own
        error replies for a lost site are put in words. With ``enough`` the exchange ends soon after the replies
        so far suffice, instead of waiting for the last site (one that died would hold the round until its
        message expires)."""
        if hasattr(self._grid, "pull_messages"):
            replies = self._until(messages, timeout, enough)
        else:  # a grid without Flower's push and pull (the in-process one)
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        for reply in replies:
            if reply.has_error() and reply.error.code in TRANSPORT_ERRORS:
                log.warning("site %s: %s", self._site(reply), TRANSPORT_ERRORS[reply.error.code])
                reply.error = Error(reply.error.code, TRANSPORT_ERRORS[reply.error.code])
        return replies

    def _until(self, messages: list[Message], timeout: float | None,
               enough: Callable[[list[Message]], bool] | None = None) -> list[Message]:
        """Flower's push-then-pull loop (every reply, or the timeout; None: no limit), pulling every
        ``PULL_INTERVAL`` instead of Flower's 3 s; with ``enough``, ending ``GRACE`` seconds after
        ``enough(replies)`` (the others' replies are welcome but not needed)."""
        waiting = set(self._grid.push_messages(messages))
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and time.monotonic() < deadline:
            got = list(self._grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting and enough is not None and enough(replies):
                deadline = min(deadline, time.monotonic() + GRACE)
            if waiting:
                time.sleep(PULL_INTERVAL)
        return replies

    def _silent(self, sent: list[Message], replies: list[Message]) -> list[tuple[str, Message]]:
        """A site whose message got no reply at all before the deadline, with an error reply that says so: the
        round's records and the coordinator's audit log name it and the cause, like any other failure."""
        answered = {self._site(r) for r in replies}
        return [(self._site_of[m.metadata.dst_node_id], Message(Error(CODE_NO_REPLY, NO_REPLY), reply_to=m))
                for m in sent if self._site_of[m.metadata.dst_node_id] not in answered]

    def _site(self, reply: Message) -> str:
        """The site a reply is about: its sender, or (for Flower's replies on a lost node's behalf, which come
        from the SuperLink) the node the message it answers was sent to."""
        node = reply.metadata.src_node_id
        if node not in self._site_of:
            node = self._sent_to.get(reply.metadata.reply_to_message_id, node)
        return self._site_of.get(node, "?")

    def _check(self, replies: list[Message], global_arrays, norms: dict[str, float]):
        """Each reply with its site; an invalid update is replaced by an error reply saying why.
        ``norms`` (accepted updates' distances, this round) gains the newly accepted ones. Second: the
        replies with content and their FedAvg average, if requested and all of them were accepted. Third:
        (row of each well-formed reply, by ``id``; the Gram matrix of their deltas)."""
        updates = [r for r in replies if not r.has_error()]
        round_check = self._validator.check_all(
            [r.content for r in updates], global_arrays, [self._weight.get(self._site(r), 0) for r in updates],
            average_by=self._average_by)
        results, average = round_check.results, round_check.average
        verdict = {id(r): result for r, result in zip(updates, results)}
        out, new = [], {}
        for reply in replies:
            site = self._site(reply)
            if not reply.has_error():
                reason, norm = verdict[id(reply)]
                if reason is None:
                    new[site] = norm
                else:
                    reply = _rejected(reply, reason)
                    self._refused[site] = True
            out.append((site, reply))
        outliers = self._validator.outliers({**norms, **new})
        checked = []
        for site, reply in out:
            if site in outliers and site in new:
                reply = _rejected(reply, outliers[site])
                self._refused[site] = True
            elif site in new:
                norms[site] = new[site]
            checked.append((site, reply))
        if average is not None and any(site in outliers for site in new):
            average = None
        row_of = {id(updates[k]): row for row, k in enumerate(round_check.rows)}
        return checked, (updates, average) if average is not None else None, (row_of, round_check.gram)


def _metric(reply: Message, key: str, default: float) -> float:
    """A number of the reply's metric record (``default`` when it has none)."""
    record = next(iter(reply.content.metric_records.values()), None)
    return float(record.get(key, default)) if record is not None else default


def _combined(coefficients: np.ndarray, replies: list[Message], reference: ArrayRecord) -> ArrayRecord:
    """g + Σ_j c_j·(x_j − g) for every array (float64 maths, the replies' dtype)."""
    out = ArrayRecord()
    for name, array in reference.items():
        base = as_ndarray(array).astype(np.float64)
        xs = [as_ndarray(next(iter(r.content.array_records.values()))[name]) for r in replies]
        value = base * (1.0 - float(coefficients.sum()))
        for c, x in zip(coefficients, xs):
            if c != 0.0:
                value += c * x.astype(np.float64)
        out[name] = to_array(value.astype(xs[0].dtype))
    return out


def _rejected(reply: Message, reason: str, what: str = "update") -> Message:
    """The reply with its content replaced by an error: it is reported and logged, never aggregated."""
    log.warning("rejected %s from node %s: %s", what, reply.metadata.src_node_id, reason)
    return replace_content_with_error(reply, Error(CODE_REJECTED, f"{what} rejected by the coordinator: {reason}"))


def _resend(message: Message) -> Message:
    return Message(message.content, dst_node_id=message.metadata.dst_node_id,
                   message_type=message.metadata.message_type, group_id=message.metadata.group_id)
