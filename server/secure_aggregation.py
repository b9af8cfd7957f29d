"""The coordinator's side of a secure-aggregation round (the protocol: privacy/secure_aggregation.py).

``secure_round`` wraps one round's train messages in the four exchanges of SecAgg+ (keys, shares, the
masked train replies, unmask) and returns the weighted average of the updates that arrived, unmasked only
as a sum. The coordinator never holds one site's update: it forwards encrypted shares it cannot read, and
it asks for a site's mask-seed shares only if that site's masked update arrived, for its mask-key shares
only if it did not. A site that drops after sending its masked update is still in the sum (its own mask
is rebuilt from the others' shares); one that drops before is left out (the masks it agreed with the
others are rebuilt and removed). A round under secure aggregation is not re-sent: its masks are its own.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from privacy import secure_aggregation as sa
from server.validation import as_ndarray

log = logging.getLogger("flwr")

RECORD = "secagg"     # client/secure_aggregation.py: the record each protocol message carries
STAGES = {"keys": f"{MessageType.QUERY}.secagg_keys", "shares": f"{MessageType.QUERY}.secagg_shares",
          "unmask": f"{MessageType.QUERY}.secagg_unmask"}
STAGE_TIMEOUT = 120.0  # one protocol exchange (a site starts a ClientApp process for it)

Exchange = Callable[..., list[Message]]  # (messages, timeout, enough=None) → replies


@dataclass
class SecureSum:
    """What one secure round gave: the average of the updates that arrived, and who is in it."""

    arrays: ArrayRecord | None = None    # global + Σ α_i Δ_i / Σ α_i over ``summed`` (None: no sum)
    summed: list[str] = field(default_factory=list)     # sites whose masked update is in the sum
    dropped: list[str] = field(default_factory=list)    # of the group, sent no (valid) masked update
    recovered: list[str] = field(default_factory=list)  # in the sum, silent at unmasking: own mask rebuilt
    failures: dict[str, str] = field(default_factory=dict)  # site → why it left the round
    sum_sha256: str = ""                 # hash of the unmasked integer sum (the audit log's record of it)
    problem: str = ""                    # why no sum could be formed ("" when one was)

    def record(self) -> dict:
        return {"summed": self.summed, "dropped": self.dropped, "recovered": self.recovered,
                "sum_sha256": self.sum_sha256, "saw": "masked updates and their unmasked sum only",
                **({"problem": self.problem} if self.problem else {})}


def _ask(stage: str, node: int, server_round: int, record: dict | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    if record is not None:
        content[RECORD] = ConfigRecord(record)
    return Message(content, dst_node_id=node, message_type=STAGES[stage], group_id=str(server_round),
                   ttl=STAGE_TIMEOUT)


class SecureRound:
    """One round's protocol. ``exchange`` is the grid's send-and-receive, ``site_of`` names a reply's site."""

    def __init__(self, exchange: Exchange, site_of: Callable[[Message], str], names: dict[int, str],
                 weights: dict[str, int], equal_weights: bool = False, max_update_norm: float = 0.0) -> None:
        self._exchange, self._site, self._names = exchange, site_of, names
        self._weights, self._equal, self._max_norm = weights, equal_weights, max_update_norm
        self.outcome = SecureSum()
        self.group: list[int] = []    # nodes that sent keys (the shares' threshold is counted on it)
        self.members: list[int] = []  # of those, the nodes that sent their shares: the round's group
        self.mask_keys: dict[int, bytes] = {}

    def _fail(self, site: str, reason: str) -> None:
        self.outcome.failures.setdefault(site, reason)

    def _answers(self, messages: list[Message], enough: Callable[[list[Message]], bool] | None = None
                 ) -> dict[int, Message]:
        """Replies by node; a site that errs or stays silent has left the round."""
        asked = {m.metadata.dst_node_id for m in messages}
        out = {}
        for reply in self._exchange(messages, STAGE_TIMEOUT, enough):
            if reply.has_error():
                self._fail(self._site(reply), f"secure aggregation: {reply.error.reason}")
            elif RECORD in reply.content.config_records:
                out[reply.metadata.src_node_id] = reply
            else:
                self._fail(self._site(reply), "secure aggregation: its protocol reply is malformed")
        return {n: r for n, r in out.items() if n in asked}

    def prepare(self, messages: list[Message], server_round: int) -> list[Message]:
        """Stages 1 and 2 (keys, shares); returns the train messages of the sites still in, each carrying the
        shares addressed to it, its weight in the sum and the study's update bound."""
        names = {m.metadata.dst_node_id: m for m in messages}
        keys = {}
        for node, reply in self._answers([_ask("keys", n, server_round) for n in names]).items():
            record = reply.content[RECORD]
            keys[node] = (bytes(record["share-key"]), bytes(record["mask-key"]))
        self.group = sorted(keys)
        self.mask_keys = {n: keys[n][1] for n in self.group}
        if len(self.group) < 2:
            self.outcome.problem = f"{len(self.group)} site(s) sent keys; a secure sum needs at least 2"
            return []
        group = {"nodes": [str(n) for n in self.group], "share-keys": [keys[n][0] for n in self.group],
                 "mask-keys": [keys[n][1] for n in self.group]}
        inbox: dict[int, dict[int, bytes]] = {n: {} for n in self.group}
        sent = self._answers([_ask("shares", n, server_round, group) for n in self.group])
        for src, reply in sent.items():
            record = reply.content[RECORD]
            for dst, ciphertext in zip(record["to"], record["shares"]):
                if int(dst) in inbox and int(dst) != src:
                    inbox[int(dst)][src] = bytes(ciphertext)
        members = sorted(src for src, reply in sent.items()
                         if set(inbox) - {src} <= {int(d) for d in reply.content[RECORD]["to"]})
        self.members = members
        if len(members) < sa.threshold_for(len(self.group)):
            self.outcome.problem = (f"{len(members)} of {len(self.group)} sites sent their shares; "
                                    f"{sa.threshold_for(len(self.group))} are needed to unmask a sum")
            return []
        total = sum(self._weight(n) for n in members)
        out = []
        for node in members:
            message = names[node]
            senders = [s for s in members if s != node]
            content = RecordDict(dict(message.content.items()))  # the strategy's messages share one content
            content[RECORD] = ConfigRecord({
                "group": [str(n) for n in members], "from": [str(s) for s in senders],
                "shares": [inbox[node][s] for s in senders],
                "weight": 1.0 / len(members) if self._equal else self._weight(node) / total,
                "max-update-norm": float(self._max_norm)})
            out.append(Message(content, dst_node_id=node, message_type=message.metadata.message_type,
                               group_id=message.metadata.group_id, ttl=message.metadata.ttl))
        return out

    def _weight(self, node: int) -> float:
        """A site's public weight (its disclosed nominal size, or 1)."""
        return float(self._weights.get(self._site_name(node), 1))

    def _site_name(self, node: int) -> str:
        return self._names.get(node, "?")

    def masked_problem(self, reply: Message, reference: ArrayRecord) -> str | None:
        """Why a train reply is not a masked update of the study's arrays (None: it is one)."""
        arrays = list(reply.content.array_records.values())
        if len(arrays) != 1 or list(arrays[0].keys()) != list(reference.keys()):
            return "a masked update must hold exactly the trained arrays"
        for name, array in arrays[0].items():
            if array.dtype != "uint32" or tuple(array.shape) != tuple(reference[name].shape):
                return f"masked array '{name}' must be uint32 with the trained array's shape"
        return None

    def unmask(self, accepted: dict[int, Message], reference: ArrayRecord, global_arrays: ArrayRecord,
               server_round: int) -> SecureSum:
        """Stage 4 and the sum: Σ masked − the masks that did not cancel, dequantised, over Σ weights."""
        outcome = self.outcome
        survivors = sorted(accepted)
        dropped = [n for n in self.members if n not in accepted]
        outcome.summed = sorted(self._site_name(n) for n in survivors)
        outcome.dropped = sorted(self._site_name(n) for n in dropped)
        if len(survivors) < sa.threshold_for(len(self.group)):  # the sites would refuse to unmask it
            outcome.problem = (f"only {len(survivors)} masked update(s) arrived; the sites unmask a sum of at "
                               f"least {sa.threshold_for(len(self.group))} of the round's {len(self.group)}")
            return outcome
        request = {"survivors": [str(n) for n in survivors], "dropped": [str(n) for n in dropped]}
        answers = self._answers([_ask("unmask", n, server_round, request) for n in survivors],
                                enough=lambda replies: self._rebuildable(self._shares(replies, survivors, dropped)))
        outcome.recovered = sorted(self._site_name(n) for n in survivors if n not in answers)
        seeds, keys = self._shares(list(answers.values()), survivors, dropped)
        size = sum(int(np.prod(a.shape)) for a in reference.values())
        total = np.zeros(size, dtype=sa.MASKED_DTYPE)
        try:
            for node in survivors:
                arrays = next(iter(accepted[node].content.array_records.values()))
                total += np.concatenate([as_ndarray(arrays[k]).reshape(-1) for k in reference.keys()])
                total -= sa.mask_stream(sa.rebuild(seeds[node], len(self.group)), size)
            for gone in dropped:
                private = sa.load_private(sa.rebuild(keys[gone], len(self.group)))
                for node in survivors:
                    stream = sa.mask_stream(sa.pair_seed(private, self.mask_keys[node]), size)
                    if sa.pair_sign(node, gone) > 0:  # what the survivor added for the pair, taken away
                        total -= stream
                    else:
                        total += stream
            weighted = sa.dequantised_sum(total, len(survivors))
        except sa.SecureAggregationError as exc:
            outcome.problem = f"the secure sum of round {server_round} could not be unmasked: {exc}"
            return outcome
        outcome.sum_sha256 = hashlib.sha256(total.tobytes()).hexdigest()
        mean = weighted / self._summed_weight(survivors)
        out, start = ArrayRecord(), 0
        for name, array in global_arrays.items():
            base = as_ndarray(array)
            if name in reference:
                n = base.size
                value = base.astype(np.float64) + mean[start:start + n].reshape(base.shape)
                out[name] = Array(value.astype(base.dtype))
                start += n
            else:
                out[name] = array
        outcome.arrays = out
        return outcome

    @staticmethod
    def _shares(replies: list[Message], survivors: list[int], dropped: list[int]
                ) -> tuple[dict[int, list[bytes]], dict[int, list[bytes]]]:
        """From unmask replies: the shares of each survivor's mask seed and of each dropped site's mask key."""
        seeds: dict[int, list[bytes]] = {n: [] for n in survivors}
        keys: dict[int, list[bytes]] = {n: [] for n in dropped}
        for reply in replies:
            if reply.has_error() or RECORD not in reply.content.config_records:
                continue
            record = reply.content[RECORD]
            for node, share, kind in zip(record["nodes"], record["shares"], record["kind"]):
                bucket = seeds if kind == "seed" else keys
                if int(node) in bucket:
                    bucket[int(node)].append(bytes(share))
        return seeds, keys

    def _rebuildable(self, shares: tuple[dict[int, list[bytes]], dict[int, list[bytes]]]) -> bool:
        """Enough shares arrived to rebuild every secret the sum needs: no reason to wait for the rest."""
        need = sa.threshold_for(len(self.group))
        return all(len(v) >= need for bucket in shares for v in bucket.values())

    def _summed_weight(self, survivors: list[int]) -> float:
        """Σ α_i over the sites in the sum (each α_i as ``prepare`` sent it)."""
        if self._equal:
            return len(survivors) / len(self.members)
        return sum(self._weight(n) for n in survivors) / sum(self._weight(n) for n in self.members)

