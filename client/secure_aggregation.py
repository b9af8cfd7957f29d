"""A site's side of secure aggregation (privacy/secure_aggregation.py has the protocol and its maths).

The round's secrets (two private keys, the seed of the site's own mask, the shares it holds for other
sites) live in the run's context state at the site and never leave it except as the shares the protocol
sends; they are kept for one round only. Messages carry node ids as strings (Flower's ids are unsigned
64-bit, a ConfigRecord integer is signed).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from privacy import secure_aggregation as sa

STATE = "carefl-secagg"   # the context state's record of the current round's secrets
RECORD = "secagg"         # the record each protocol message and reply carries


def _round(msg: Message) -> int:
    return int(msg.content["config"]["server-round"])


def _state(context: Context, server_round: int, fresh: bool = False) -> ConfigRecord:
    state = context.state.config_records.get(STATE)
    if fresh or state is None:
        state = context.state.config_records[STATE] = ConfigRecord({"round": server_round})
    elif int(state.get("round", -1)) != server_round:
        raise ValueError(f"secure aggregation: no keys of round {server_round} at this site (the round's "
                         f"protocol was not followed from its start)")
    return state


def keys(msg: Message, context: Context) -> RecordDict:
    """Stage 1: two fresh key pairs for the round; the public halves go out."""
    state = _state(context, _round(msg), fresh=True)
    share_key, mask_key = sa.new_private_key(), sa.new_private_key()
    state["share-private"], state["mask-private"] = sa.private_bytes(share_key), sa.private_bytes(mask_key)
    return RecordDict({RECORD: ConfigRecord({"share-key": sa.public_bytes(share_key),
                                             "mask-key": sa.public_bytes(mask_key)})})


def shares(msg: Message, context: Context) -> RecordDict:
    """Stage 2: the group's public keys come in; shares of this round's mask seed and mask key go out,
    each encrypted for the site that will hold it."""
    state = _state(context, _round(msg))
    group = msg.content[RECORD]
    nodes = [int(n) for n in group["nodes"]]
    me = int(context.node_id)
    if me not in nodes or len(set(nodes)) != len(nodes) or len(nodes) < 2:
        raise ValueError("secure aggregation: the group must hold this site and at least one other, once each")
    share_keys = dict(zip(nodes, [bytes(k) for k in group["share-keys"]]))
    mask_keys = [bytes(k) for k in group["mask-keys"]]
    if share_keys[me] != sa.public_bytes(sa.load_private(bytes(state["share-private"]))):
        raise ValueError("secure aggregation: the group lists another key for this site")
    seed = sa.new_seed()
    out, (own_b, own_key) = sa.make_shares(me, nodes, share_keys, sa.load_private(bytes(state["share-private"])),
                                           seed, sa.load_private(bytes(state["mask-private"])))
    state.update({"seed": seed, "group": [str(n) for n in nodes], "share-keys": [share_keys[n] for n in nodes],
                  "mask-keys": mask_keys, "held-from": [str(me)], "held-b": [own_b], "held-key": [own_key]})
    return RecordDict({RECORD: ConfigRecord({"to": [str(n) for n in out], "shares": list(out.values())})})


def open_shares(msg: Message, context: Context) -> list[int]:
    """Stage 3, before training: keep the shares the other sites of the round's group sent this site.
    Returns the group (every site whose masked update may enter the sum). A site of the group that sent
    no share, or a share that does not decrypt, refuses the round before anything is charged."""
    state = _state(context, _round(msg))
    record = msg.content[RECORD]
    me, known = int(context.node_id), [int(n) for n in state["group"]]
    group = [int(n) for n in record["group"]]
    senders = [int(n) for n in record["from"]]
    if me not in group or not set(group) <= set(known) or sorted(senders) != sorted(set(group) - {me}):
        raise ValueError("secure aggregation: the round's group does not match the shares this site received")
    share_keys = dict(zip(known, [bytes(k) for k in state["share-keys"]]))
    share_private = sa.load_private(bytes(state["share-private"]))
    held_from, held_b, held_key = list(state["held-from"]), list(state["held-b"]), list(state["held-key"])
    for src, ciphertext in zip(senders, record["shares"]):
        b_share, key_share = sa.open_share(me, src, bytes(ciphertext), share_private, share_keys[src])
        held_from.append(str(src))
        held_b.append(b_share)
        held_key.append(key_share)
    state.update({"held-from": held_from, "held-b": held_b, "held-key": held_key,
                  "summed": [str(n) for n in group]})
    return group


def masked_update(msg: Message, context: Context, trained: dict, names: list[str]) -> tuple[ArrayRecord, int]:
    """Stage 3, after training: ``weight × (trained − global)`` over ``names``, bounded, quantised and masked.
    Returns the masked arrays (uint32, the shapes of the trained arrays) and how many coordinates the
    protocol's clip range cut. An update that is not finite or longer than the study's bound never leaves."""
    state = _state(context, _round(msg))
    record = msg.content[RECORD]
    global_arrays = msg.content["arrays"]
    deltas = [np.asarray(trained[n].detach().cpu().numpy(), dtype=np.float64)
              - global_arrays[n].numpy().astype(np.float64) for n in names]
    flat = np.concatenate([d.reshape(-1) for d in deltas]) if deltas else np.zeros(0)
    if not np.all(np.isfinite(flat)):
        raise ValueError("secure aggregation: the trained update is not finite; nothing was sent")
    bound = float(record.get("max-update-norm", 0.0))
    norm = float(np.linalg.norm(flat))
    if bound > 0 and norm > bound:
        raise ValueError(f"secure aggregation: the update's norm exceeds the study's max-update-norm {bound:g}; "
                         f"nothing was sent")
    weight = float(record["weight"])
    if not 0 < weight <= 1 or not math.isfinite(weight):
        raise ValueError("secure aggregation: the round's weight must be in (0, 1]")
    quantised = sa.quantise(flat, weight)
    me = int(context.node_id)
    mask_private = sa.load_private(bytes(state["mask-private"]))
    mask_keys = dict(zip([int(n) for n in state["group"]], [bytes(k) for k in state["mask-keys"]]))
    pairs = {n: sa.pair_seed(mask_private, mask_keys[n]) for n in (int(x) for x in state["summed"]) if n != me}
    vector = sa.masked(quantised.values, bytes(state["seed"]), pairs, me)
    out, start = ArrayRecord(), 0
    for name, delta in zip(names, deltas):
        out[name] = Array(vector[start:start + delta.size].reshape(delta.shape))
        start += delta.size
    return out, quantised.clipped


def unmask(msg: Message, context: Context) -> RecordDict:
    """Stage 4: this site's shares of the mask seeds of the sites whose update arrived, and of the mask keys of
    those whose update did not. The two lists must not share a site: both secrets of one site would reveal its
    update."""
    state = _state(context, _round(msg))
    record = msg.content[RECORD]
    survivors, dropped = [str(n) for n in record["survivors"]], [str(n) for n in record["dropped"]]
    summed = set(state.get("summed", []))
    if set(survivors) & set(dropped) or not set(survivors) | set(dropped) <= summed:
        raise ValueError("secure aggregation: the unmask request names a site both as arrived and as dropped, or a "
                         "site outside the round's group")
    if len(survivors) < sa.threshold_for(len(state["group"])):  # a sum of too few updates is too close to one
        raise ValueError(f"secure aggregation: the coordinator would unmask a sum of {len(survivors)} update(s); "
                         f"this site reveals shares only for a sum of at least {sa.threshold_for(len(state['group']))}")
    held = dict(zip(state["held-from"], zip(state["held-b"], state["held-key"])))
    nodes, values = [], []
    for node in survivors + dropped:
        if node in held:
            nodes.append(node)
            values.append(held[node][0] if node in survivors else held[node][1])
    del context.state[STATE]  # the round's secrets end with it
    return RecordDict({RECORD: ConfigRecord({"nodes": nodes, "shares": values,
                                             "kind": ["seed" if n in survivors else "key" for n in nodes]})})
