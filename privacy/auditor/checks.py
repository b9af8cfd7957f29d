"""The content checks on verified records: what a site's own log must show (weights leave only after
an approved train message and a DP round, every DP round within budget, every logged ε recomputable),
and a site's log against the coordinator's (every update the coordinator logged was sent as logged;
every signed head of the site it holds is still in the site's log; every signed head of the coordinator
the site logged from a message is still in the coordinator's log).

Apart from the chain verifier (chain.py) because these read what the records say rather than whether
they are intact, and they work on records that already verified; each problem is a ``Finding``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from privacy.auditor.epsilon import BUDGET_SLACK, DatasetEpsilon, recompute
from privacy.auditor.keys import signature_ok
from privacy.auditor.results import COORDINATOR, Finding, LogReport


def _key(payload: dict) -> tuple[str, object]:
    return str(payload.get("run_id")), payload.get("round")


def _weights_reply(rec: dict) -> bool:
    """A site's reply that carried model weights out."""
    return rec["event"] == "reply" and rec["payload"].get("arrays_sha256") is not None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_site(records: Iterable[dict], epsilon: dict[str, DatasetEpsilon] | None = None,
               actor: str | None = None) -> list[Finding]:
    """What a site's log must show: weights leave only after an approved train message and a DP training
    round (an evaluation release of the same round does not count for them), every DP release within
    budget, and each logged ε recomputable within 1%. A reply the site's egress guard blocked never left:
    it is reported as a warning naming the rule, not judged as weights that left."""
    records = list(records)
    actor = actor or (records[0]["actor"] if records else "site")
    findings: list[Finding] = []

    def add(level: str, check: str, rec: dict, message: str) -> None:
        findings.append(Finding.at(level, check, actor, rec["seq"], message))

    approved: set = set()
    dp_rounds: dict[tuple, list[bool]] = {}
    # replies the site's egress guard stopped (logged after the app's own reply record): they never left
    blocked = {(*_key(r["payload"]), r["payload"].get("message_type")): r["payload"].get("rule")
               for r in records if r["event"] == "egress-blocked"}
    for rec in records:
        p, event = rec["payload"], rec["event"]
        if event == "message" and p.get("approved") is True and p.get("message_type") == "train":
            approved.add(_key(p))
        elif event == "dp-round":
            if str(p.get("mechanism") or "training") == "training":  # what weights need; evaluation is another
                dp_rounds.setdefault(_key(p), []).append(p.get("dp") is True)
            if p.get("dp") is True:
                # the ε the site's policy checks its budget by: under distributed DP it may be the assumed one
                by_assumed = p.get("budget_by") == "assumed"
                after = p.get("epsilon_assumed_after" if by_assumed else "epsilon_after")
                budget = p.get("epsilon_budget")
                if not _number(budget):
                    add("error", "budget", rec, f"dataset '{p.get('dataset')}': no epsilon_budget logged")
                elif not _number(after):
                    add("error", "budget", rec, f"dataset '{p.get('dataset')}': ε after the round is not a "
                                                f"finite number ({after}), budget {budget:g}")
                elif after > budget * (1 + BUDGET_SLACK) + 1e-12:
                    which = " (assuming its honest sites)" if by_assumed else ""
                    add("error", "budget", rec, f"dataset '{p.get('dataset')}': ε={after:.6g}{which} after the round "
                                                f"exceeds its budget {budget:g} (δ={p.get('delta')})")
        elif _weights_reply(rec):
            run, rnd = _key(p)
            what = f"reply with weights (run {run}, round {rnd}, sha256 {str(p.get('arrays_sha256'))[:16]}…)"
            if (run, rnd, p.get("message_type")) in blocked:
                add("warning", "egress", rec, f"{what} was blocked by the site's egress guard (rule "
                                              f"{blocked[run, rnd, p.get('message_type')]}): it never left the site")
                continue
            if p.get("message_type") != "train":
                add("error", "weights", rec, f"{what} answers a '{p.get('message_type')}' message: weights "
                                             f"may only leave with a train reply")
            if (run, rnd) not in approved:
                add("error", "weights", rec, f"{what} without an approved train message for that run and "
                                             f"round before it")
            flags = dp_rounds.get((run, rnd))
            if not flags:
                add("error", "weights", rec, f"{what} without a dp-round for that run and round before it "
                                             f"(weights left without DP accounting)")
            elif not all(flags):
                add("error", "weights", rec, f"{what}: weights left from a non-DP round (dp = false)")
    if epsilon is None:
        epsilon = recompute(records)
    for table in epsilon.values():
        for row in table.rounds:
            if row.status in ("error", "warning"):
                findings.append(Finding.at(row.status, "epsilon", actor, row.seq,
                                           f"dataset '{row.dataset}', run {row.run_id} round {row.round}: "
                                           f"{row.message}"))
    findings.sort(key=lambda f: (f.seq if f.seq is not None else -1))
    return findings


def _held_head(holder: LogReport, owner: LogReport, owner_name: str, head: dict, add) -> None:
    """A signed head of ``owner``'s log that ``holder`` logged: signed by the owner, and still a record of
    the owner's log with that hash (a log that ends before it was truncated; another hash: rewritten)."""
    seq, digest, sig = head.get("seq"), head.get("hash"), head.get("sig")
    name = f"{owner_name}'s signed head seq {seq} (hash {str(digest)[:16]}…)"
    entries = owner.entries
    if owner.public_key is None:
        add(f"{name} cannot be checked: no public key for {owner_name}")
    elif not isinstance(digest, str) or not signature_ok(owner.public_key, digest, sig):
        add(f"{name} is not signed by {owner_name}'s key")
        return
    if type(seq) is not int or seq < 0:
        add(f"{name}: seq is not a record number")
    elif seq >= len(entries):
        cut = ("ends at seq " + str(len(entries) - 1)) if entries else "has no records"
        why = (" beyond its first failure" if not owner.ok else "")
        add(f"{holder.actor or 'the other log'} holds {name}, but {owner_name}'s log {cut}{why}: "
            f"{owner_name}'s log was truncated after that head was sent")
    elif entries[seq]["hash"] != digest:
        add(f"{holder.actor or 'the other log'} holds {name}, but {owner_name}'s record seq {seq} has hash "
            f"{entries[seq]['hash'][:16]}…: {owner_name}'s log was rewritten after that head was sent")


def check_against(site_report: LogReport, coordinator_report: LogReport, site_id: str) -> list[Finding]:
    """The site's log against the coordinator's: every update the coordinator logged for ``site_id``
    was sent, as logged, by the site; every signed head of the site the coordinator holds verifies
    under the site's key and is a record of the site's log (a shorter log was truncated); and every
    signed head of the coordinator's log that came with a message to the site, as the site logged it,
    is a record of the coordinator's log (the sites are the coordinator's witnesses)."""
    findings: list[Finding] = []
    for who, report, whose in ((COORDINATOR, coordinator_report, "the coordinator's"),
                               (site_id, site_report, "the site's")):
        if not report.ok:
            findings.append(Finding.at("error", "against", who, None,
                                       f"{whose} log does not verify ({report.failure}); only its first "
                                       f"{report.records} records were compared"))
    replies: dict[tuple, dict] = {}
    for rec in site_report.entries:
        if _weights_reply(rec):
            p = rec["payload"]
            replies.setdefault((*_key(p), p["arrays_sha256"]), rec)
    for rec in coordinator_report.entries:
        p = rec["payload"]
        if p.get("site") != site_id:
            continue

        def add(message: str, rec: dict = rec) -> None:
            findings.append(Finding.at("error", "against", COORDINATOR, rec["seq"], message))

        if rec["event"] == "update":
            run, rnd = _key(p)
            sent = replies.get((run, rnd, p.get("arrays_sha256")))
            if sent is None:
                add(f"update from {site_id} (run {run}, round {rnd}, sha256 {p.get('arrays_sha256')}) has no "
                    f"reply with that hash in the site's log: the site never sent it")
                continue
            sp = sent["payload"]
            if sp.get("arrays_bytes") != p.get("arrays_bytes"):
                add(f"update from {site_id} (run {run}, round {rnd}) has {p.get('arrays_bytes')} bytes, the "
                    f"site's reply (line {sent['seq'] + 1}) {sp.get('arrays_bytes')}")
            if sp.get("metrics") != p.get("metrics"):
                add(f"update from {site_id} (run {run}, round {rnd}) carries other metrics than the site's "
                    f"reply (line {sent['seq'] + 1})")
        elif rec["event"] == "site-head":
            _held_head(coordinator_report, site_report, site_id, p, add)
    for rec in site_report.entries:
        if "coordinator_head" not in rec["payload"]:
            continue

        def witness(message: str, rec: dict = rec) -> None:  # the evidence is this record of the site's log
            findings.append(Finding.at("error", "against", site_id, rec["seq"], message))

        head = rec["payload"]["coordinator_head"]
        if not isinstance(head, dict):
            witness(f"{site_id} logged a malformed coordinator head (its line {rec['seq'] + 1})")
            continue
        _held_head(site_report, coordinator_report, COORDINATOR, head, witness)
    return findings
