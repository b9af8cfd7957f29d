"""Audit logs: the writer under crashes and concurrency, the verifier against every kind of edit
(hypothesis), the site's DP rules, the cross-check with the coordinator, ε recomputed with
dp-accounting against the site's Opacus numbers, the CLI and the report.

Nothing under test is mocked: logs are written by AuditLog with real Ed25519 keys, ε of the
"site" comes from privacy.accounting (Opacus), kits for --run-dir come from deploy.coordinator.provision.
(Over 400 lines on purpose: writer, verifier and auditor share the fixtures that write real signed logs.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import re
import tempfile
from functools import cache
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from deploy.cli.audit import audit_app
from privacy.accounting import epsilon as opacus_epsilon
from privacy.audit import AuditLog, canonical, record_hash
from privacy.auditor.epsilon import Composition, recompute
from privacy.auditor.epsilon import epsilon as audit_epsilon
from privacy.audit.log import GENESIS, sign
from privacy.auditor.chain import verify_log
from privacy.auditor.checks import check_against, check_site
from privacy.auditor.keys import load_public_key
from privacy.auditor.results import AuditError
from privacy.auditor.verify import audit_logs

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers ------------------------------------------------------------------------------------

def new_key(folder: Path, name: str = "audit-signing") -> tuple[Path, Path]:
    """An Ed25519 key pair as `carefl provision` writes it: PEM PKCS8 private, OpenSSH public."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def private_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def forge(records: list[dict], key, path: Path) -> None:
    """Rewrite a log consistently (seq, prev, hash, sig) as someone holding ``key`` could."""
    prev, lines = GENESIS, []
    for seq, rec in enumerate(records):
        rec = {**rec, "seq": seq, "prev": prev}
        rec["hash"] = record_hash(rec)
        rec["sig"] = sign(key, rec["hash"]) if key is not None else None
        prev = rec["hash"]
        lines.append(canonical(rec) + b"\n")
    path.write_bytes(b"".join(lines))


@cache
def site_epsilon(history: tuple, delta: float, accountant: str) -> float:
    return opacus_epsilon(list(history), delta, accountant)


def digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def build_deployment(root: Path, sites=("alpha", "beta"), runs=1, rounds=3, accountant="prv", sigma=1.0, q=0.05,
                     steps=20, delta=1e-4, budget=10.0, keys: dict | None = None) -> dict:
    """Site and coordinator logs of a demo-like consortium, written the way the running system does."""
    keys = keys or {a: new_key(root / "kits" / a) for a in ("coordinator", *sites)}
    logs = {a: AuditLog(root / ("coordinator" if a == "coordinator" else f"sites/{a}") / "audit.jsonl", a,
                        keys[a][0]) for a in ("coordinator", *sites)}
    history = {s: [] for s in sites}
    coordinator = logs["coordinator"]
    for s in sites:
        logs[s].append("agent-start", {"config_sha256": digest(s), "approved_apps": [digest("app")],
                                       "policies": {"heart-disease": {"epsilon_budget": budget, "delta": delta,
                                                                      "accountant": accountant}}})
    for run in range(1, runs + 1):
        run_id = str(1000 + run)
        coordinator.append("run-start", {"run_id": run_id, "app_sha256": digest("app"),
                                         "config": {"num-server-rounds": rounds}, "sites": list(sites)})
        for rnd in range(1, rounds + 1):
            for s in sites:
                log = logs[s]
                log.append("message", {"run_id": run_id, "round": rnd, "message_type": "train",
                                       "app_sha256": digest("app"), "approved": True})
                if rnd == 1:
                    log.append("data-exclusions", {"run_id": run_id, "dataset": "heart-disease", "excluded": 2,
                                                   "reasons": {"missing label": 2}})
                before = site_epsilon(tuple(history[s]), delta, accountant) if history[s] else 0.0
                history[s].append((sigma, q, steps))
                after = site_epsilon(tuple(history[s]), delta, accountant)
                log.append("dp-round", {"run_id": run_id, "round": rnd, "dataset": "heart-disease",
                                        "dataset_fingerprint": digest(s, "data"), "dp": True, "noise_multiplier": sigma,
                                        "clip_norm": 1.0, "sample_rate": q, "steps": steps, "accountant": accountant,
                                        "delta": delta, "epsilon_before": before, "epsilon_after": after,
                                        "epsilon_budget": budget, "budget_left": budget - after, "n": 200})
                arrays = digest(s, run_id, rnd)
                metrics = {"train_loss": 0.5 / rnd, "num-examples": 200, "epsilon": after}
                witnessed = coordinator.head()  # what the train message carried (server/audit.py: WitnessedGrid)
                reply = log.append("reply", {"run_id": run_id, "round": rnd, "message_type": "train",
                                             "coordinator_head": {k: witnessed[k] for k in ("seq", "hash", "sig")},
                                             "arrays_sha256": arrays, "arrays_bytes": 1234, "metrics": metrics})
                coordinator.append("update", {"run_id": run_id, "round": rnd, "site": s, "arrays_sha256": arrays,
                                              "arrays_bytes": 1234, "metrics": metrics})
                coordinator.append("site-head", {"site": s, "seq": reply["seq"], "hash": reply["hash"],
                                                 "sig": reply["sig"]})
            coordinator.append("aggregate", {"run_id": run_id, "round": rnd, "arrays_sha256": digest("agg", rnd)})
            for s in sites:
                logs[s].append("message", {"run_id": run_id, "round": rnd, "message_type": "evaluate",
                                           "app_sha256": digest("app"), "approved": True})
                reply = logs[s].append("reply", {"run_id": run_id, "round": rnd, "message_type": "evaluate",
                                                 "arrays_sha256": None, "arrays_bytes": 0,
                                                 "metrics": {"accuracy": 0.8, "auc": float("nan")}})
                coordinator.append("site-head", {"site": s, "seq": reply["seq"], "hash": reply["hash"],
                                                 "sig": reply["sig"]})
        coordinator.append("checkpoint", {"run_id": run_id, "round": rounds, "path": "final_model.pt",
                                          "sha256": digest("ckpt")})
        coordinator.append("run-end", {"run_id": run_id, "status": "completed"})
    for s in sites:
        logs[s].append("agent-stop", {"reason": "SIGTERM"})
    return {"keys": keys, "logs": {a: log.path for a, log in logs.items()}}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> dict:
    return build_deployment(tmp_path_factory.mktemp("deployment"))


def verify_site(dep: dict, site: str, log: Path | None = None):
    return audit_logs(log or dep["logs"][site], dep["keys"][site][1], dep["logs"]["coordinator"],
                      dep["keys"]["coordinator"][1])


# -- writer ------------------------------------------------------------------------------------

def test_append_head_and_record_format(tmp_path):
    key, pub = new_key(tmp_path)
    log = AuditLog(tmp_path / "a.jsonl", "alpha", key)
    assert log.head() is None
    first = log.append("agent-start", {"x": 1, "nan": float("nan"), "inf": float("-inf"), 3: (1, 2)})
    second = log.append("agent-stop", {"reason": "test"})
    assert first["seq"] == 0 and first["prev"] == "0" * 64 and second["prev"] == first["hash"]
    assert first["payload"] == {"x": 1, "nan": None, "inf": None, "3": [1, 2]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["time"])
    assert log.head() == {"seq": 1, "hash": second["hash"], "sig": second["sig"]}
    assert read(log.path) == [first, second]
    body = {k: first[k] for k in ("seq", "time", "actor", "event", "payload", "prev")}
    assert first["hash"] == hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                                      ensure_ascii=False).encode()).hexdigest()
    private_key(key).public_key().verify(base64.b64decode(first["sig"]), first["hash"].encode("ascii"))
    assert (tmp_path / "a.jsonl.lock").exists()
    report = verify_log(log.path, pub)
    assert report.ok and report.records == 2 and report.actor == "alpha"


def test_numpy_values_are_logged_as_python_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    log = AuditLog(tmp_path / "a.jsonl", "alpha")
    rec = log.append("dp-round", {"sigma": np.float32(0.5), "steps": np.int64(7), "ok": np.bool_(True),
                                  "v": np.array([1.0, np.nan])})
    assert rec["payload"] == {"sigma": 0.5, "steps": 7, "ok": True, "v": [1.0, None]}
    with pytest.raises(TypeError, match="payload.bad"):
        log.append("x", {"bad": object()})
    assert log.head()["seq"] == 0  # nothing written for the refused payload


def test_resume_after_a_torn_last_line(tmp_path):
    key, pub = new_key(tmp_path)
    log = AuditLog(tmp_path / "a.jsonl", "alpha", key)
    for i in range(3):
        log.append("message", {"i": i})
    torn = canonical({"seq": 3, "time": "2026-01-01T00:00:00.000000Z", "actor": "alpha"})[:40]
    with open(log.path, "ab") as fh:  # a crash in the middle of a write
        fh.write(torn)
    assert not verify_log(log.path, pub).ok
    assert AuditLog(log.path, "alpha", key).head()["seq"] == 2  # reading does not repair
    rec = AuditLog(log.path, "alpha", key).append("message", {"i": 3})  # a restarted process
    records = read(log.path)
    assert [r["event"] for r in records] == ["message"] * 3 + ["log-repair", "message"]
    assert records[3]["prev"] == records[2]["hash"] and rec["seq"] == 4
    saved = tmp_path / records[3]["payload"]["saved_as"]
    assert saved.read_bytes() == torn and records[3]["payload"]["cut_sha256"] == hashlib.sha256(torn).hexdigest()
    report = verify_log(log.path, pub)
    assert report.ok and report.records == 5


def test_resume_after_an_invalid_complete_last_line_and_a_torn_first_line(tmp_path):
    key, pub = new_key(tmp_path)
    log = AuditLog(tmp_path / "a.jsonl", "alpha", key)
    log.append("message", {"i": 0})
    with open(log.path, "ab") as fh:
        fh.write(b'{"seq":1,"garbage":true}\n')
    log.append("message", {"i": 1})
    assert verify_log(log.path, pub).ok and [r["event"] for r in read(log.path)] == ["message", "log-repair",
                                                                                     "message"]
    first = AuditLog(tmp_path / "b.jsonl", "alpha", key)
    first.path.write_bytes(b'{"seq":0,"ti')  # crash during the very first write
    first.append("agent-start", {})
    assert verify_log(first.path, pub).ok
    other = tmp_path / "c.jsonl"
    other.write_bytes(b"not a log\nat all\n")  # no valid record and whole lines: never overwritten
    with pytest.raises(RuntimeError, match="no valid audit record"):
        AuditLog(other, "alpha", key).append("x", {})
    assert other.read_bytes() == b"not a log\nat all\n"


def test_head_is_found_from_the_end_of_a_large_log(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", "alpha")
    for i in range(300):
        log.append("message", {"blob": "x" * 1000, "i": i})  # 300 kB: several read chunks
    assert log.head()["seq"] == 299
    assert log.append("message", {})["seq"] == 300


def test_a_log_of_another_actor_is_not_continued(tmp_path):
    AuditLog(tmp_path / "a.jsonl", "alpha").append("x", {})
    with pytest.raises(RuntimeError, match="audit log of 'alpha'"):
        AuditLog(tmp_path / "a.jsonl", "beta").append("x", {})


def _append_many(path: str, key: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path), "alpha", Path(key))
    for i in range(count):
        log.append("message", {"worker": worker, "i": i})


def test_two_processes_append_concurrently(tmp_path):
    key, pub = new_key(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path / "a.jsonl"), str(key), w, 200)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = verify_log(tmp_path / "a.jsonl", pub)
    assert report.ok, report.failure
    assert report.records == 400
    for w in (0, 1):
        assert [r["payload"]["i"] for r in report.entries if r["payload"]["worker"] == w] == list(range(200))


# -- verifier: unit ----------------------------------------------------------------------------

def test_missing_empty_and_unsigned_logs_fail(tmp_path):
    _, pub = new_key(tmp_path)
    assert "does not exist" in verify_log(tmp_path / "none.jsonl", pub).failure.reason
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert "empty" in verify_log(tmp_path / "empty.jsonl", pub).failure.reason
    log = AuditLog(tmp_path / "u.jsonl", "alpha")  # no signing key
    log.append("x", {})
    assert verify_log(log.path, None).ok and not verify_log(log.path, None).signatures_checked
    report = verify_log(log.path, pub)
    assert not report.ok and report.failure.line == 1 and "not signed" in report.failure.reason


def test_wrong_key_and_bad_key_files(tmp_path):
    key, _ = new_key(tmp_path / "a")
    _, other = new_key(tmp_path / "b")
    log = AuditLog(tmp_path / "a.jsonl", "alpha", key)
    log.append("x", {})
    report = verify_log(log.path, other)
    assert not report.ok and "signature is not valid" in report.failure.reason
    (tmp_path / "junk.pub").write_text("ssh-ed25519 AAAA junk\n")
    with pytest.raises(AuditError, match="not an OpenSSH or PEM public key"):
        verify_log(log.path, tmp_path / "junk.pub")
    with pytest.raises(AuditError, match="cannot be read"):
        verify_log(log.path, tmp_path / "missing.pub")


def test_time_going_backwards_and_a_changed_actor_fail_even_when_re_signed(tmp_path):
    key, pub = new_key(tmp_path)
    log = AuditLog(tmp_path / "a.jsonl", "alpha", key)
    for i in range(3):
        log.append("x", {"i": i})
    records = read(log.path)
    records[2]["time"] = "2000-01-01T00:00:00.000000Z"
    forge(records, private_key(key), log.path)
    report = verify_log(log.path, pub)
    assert report.failure.line == 3 and "before the previous" in report.failure.reason
    records = read(log.path)
    records[2]["time"], records[1]["actor"] = records[1]["time"], "beta"
    forge(records, private_key(key), log.path)
    assert "actor 'beta'" in verify_log(log.path, pub).failure.reason


def test_an_equivalent_spelling_of_a_line_fails(tmp_path):
    key, pub = new_key(tmp_path)
    log = AuditLog(tmp_path / "a.jsonl", "alpha", key)
    log.append("x", {"v": 1e16, "s": "A"})
    line = log.path.read_bytes()
    assert b"1e+16" in line
    for edited in (line.replace(b"1e+16", b"1E+16"), line.replace(b'"s":"A"', b'"s":"\\u0041"'),
                   line.replace(b'{"actor"', b'{ "actor"')):
        log.path.write_bytes(edited)
        report = verify_log(log.path, pub)
        assert not report.ok and "canonical" in report.failure.reason
    sig = json.loads(line)["sig"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = sig[:-3] + alphabet[alphabet.index(sig[-3]) ^ 1] + "=="  # flips an unused padding bit only
    assert base64.b64decode(other) == base64.b64decode(sig)  # a lenient decoder sees the same signature
    log.path.write_bytes(line.replace(sig.encode(), other.encode()))
    report = verify_log(log.path, pub)
    assert not report.ok and "signature" in report.failure.reason


# -- site rules --------------------------------------------------------------------------------

def test_a_clean_deployment_passes_every_check(deployment):
    for site in ("alpha", "beta"):
        summary = verify_site(deployment, site)
        assert summary.ok, summary.first_problem()
        site_audit = summary.actors[0]
        table = site_audit.epsilon["heart-disease"]
        assert len(table.rounds) == 3 and site_audit.max_rel_diff < 0.01 and site_audit.against is True
        assert json.loads(summary.to_json())["ok"] is True


def _edit_site_log(dep: dict, site: str, tmp: Path, edit) -> Path:
    records = read(dep["logs"][site])
    edit(records)
    out = tmp / f"{site}.jsonl"
    forge(records, private_key(dep["keys"][site][0]), out)
    return out


def test_weights_from_a_non_dp_round_are_flagged(deployment, tmp_path):
    def edit(records):
        rec = next(r for r in records if r["event"] == "dp-round" and r["payload"]["round"] == 2)
        rec["payload"].update(dp=False, noise_multiplier=0.0)
    findings = check_site(read(_edit_site_log(deployment, "alpha", tmp_path, edit)))
    assert any(f.level == "error" and "weights left from a non-DP round" in f.message for f in findings)


def test_weights_without_an_approved_message_or_a_dp_round_are_flagged(deployment, tmp_path):
    def unapproved(records):
        first = next(r for r in records if r["event"] == "message" and r["payload"]["round"] == 1)
        first["payload"]["approved"] = False
    findings = check_site(read(_edit_site_log(deployment, "alpha", tmp_path, unapproved)))
    assert [f.check for f in findings if f.level == "error"] == ["weights"]
    assert "without an approved train message" in findings[0].message and findings[0].line is not None

    def no_dp(records):
        records[:] = [r for r in records if not (r["event"] == "dp-round" and r["payload"]["round"] == 3)]
    findings = check_site(read(_edit_site_log(deployment, "alpha", tmp_path, no_dp)))
    assert any("without a dp-round" in f.message for f in findings)


def test_weights_the_egress_guard_blocked_never_left_and_are_reported_as_such(deployment, tmp_path):
    """An app that skipped its ledger charge: the reply record is there, no dp-round, but the gate's
    egress-blocked record says the reply never left. A warning naming the rule, not a weights error."""
    def blocked(records):
        records[:] = [r for r in records if not (r["event"] == "dp-round" and r["payload"]["round"] == 3)]
        reply = next(r for r in records if r["event"] == "reply" and r["payload"]["round"] == 3)
        records.insert(records.index(reply) + 1, {**reply, "event": "egress-blocked", "payload": {
            "run_id": reply["payload"]["run_id"], "round": 3, "message_type": "train", "rule": "ledger",
            "why": "no training charge", "sent_instead": {"code": 4006, "reason": "blocked"}}})
    findings = check_site(read(_edit_site_log(deployment, "alpha", tmp_path, blocked)))
    assert not [f for f in findings if f.level == "error"]
    assert [(f.level, f.check) for f in findings if "egress guard" in f.message] == [("warning", "egress")]
    assert "rule ledger" in next(f.message for f in findings if f.check == "egress")


def test_a_rounds_evaluation_release_is_composed_and_never_stands_in_for_its_training(deployment, tmp_path):
    history = tuple([(1.0, 0.05, 20)] * 3 + [(5.0, 1.0, 1)])  # build_deployment's three rounds, then an evaluation

    def evaluation(records):  # round 3's evaluation release, logged after its reply as the ClientApp does
        training = [r for r in records if r["event"] == "dp-round"][-1]
        after = site_epsilon(history, 1e-4, "prv")
        payload = {**training["payload"], "mechanism": "evaluation", "noise_multiplier": 5.0, "sample_rate": 1.0,
                   "steps": 1, "clip_norm": 3 ** 0.5, "epsilon_before": training["payload"]["epsilon_after"],
                   "epsilon_after": after, "budget_left": 10.0 - after}
        records.insert(len(records) - 1, {**training, "payload": payload})
    log = read(_edit_site_log(deployment, "alpha", tmp_path, evaluation))
    table = recompute(log)["heart-disease"]
    assert [(r.round, r.mechanism, r.charged, r.status) for r in table.rounds][-2:] == \
        [(3, "training", True, "ok"), (3, "evaluation", True, "ok")]
    assert table.by_mechanism()["evaluation"] == pytest.approx(site_epsilon(history[-1:], 1e-4, "prv"), rel=0.01)
    assert not [f for f in check_site(log) if f.level == "error"]

    def evaluation_only(records):  # round 3's training release swapped for an evaluation: weights lack their round
        rec = [r for r in records if r["event"] == "dp-round"][-1]
        rec["payload"]["mechanism"] = "evaluation"
    findings = check_site(read(_edit_site_log(deployment, "alpha", tmp_path, evaluation_only)))
    assert any("round 3" in f.message and "without a dp-round" in f.message for f in findings)


def test_epsilon_over_budget_is_flagged(deployment, tmp_path):
    def edit(records):
        for r in records:
            if r["event"] == "dp-round":
                r["payload"]["epsilon_budget"] = 1.0  # the logged ε is ~2-3 by round 3
    findings = check_site(read(_edit_site_log(deployment, "alpha", tmp_path, edit)))
    over = [f for f in findings if f.check == "budget"]
    assert over and all(f.level == "error" and "exceeds its budget 1" in f.message for f in over)


def test_a_logged_epsilon_that_does_not_match_its_parameters_is_flagged(deployment, tmp_path):
    def lower(records):  # the site claims less than its own σ, q, steps give
        rec = [r for r in records if r["event"] == "dp-round"][-1]
        rec["payload"]["epsilon_after"] *= 0.9
    findings = check_site(read(_edit_site_log(deployment, "alpha", tmp_path, lower)))
    eps = [f for f in findings if f.check == "epsilon"]
    assert len(eps) == 1 and eps[0].level == "error" and "below even the tight PLD" in eps[0].message

    def more_steps(records):  # the ledger charged more than the log shows
        rec = next(r for r in records if r["event"] == "dp-round")
        rec["payload"]["steps"] = 10
    findings = check_site(read(_edit_site_log(deployment, "alpha", tmp_path, more_steps)))
    eps = [f for f in findings if f.check == "epsilon"]
    assert eps and eps[0].level == "error" and "not in this log" in eps[0].message


# -- against the coordinator -------------------------------------------------------------------

def test_an_update_the_site_never_sent_is_caught(deployment, tmp_path):
    coordinator = read(deployment["logs"]["coordinator"])
    update = next(r for r in coordinator if r["event"] == "update" and r["payload"]["site"] == "beta")
    update["payload"]["arrays_sha256"] = "f" * 64
    forged = tmp_path / "coordinator.jsonl"
    forge(coordinator, private_key(deployment["keys"]["coordinator"][0]), forged)
    site = verify_log(deployment["logs"]["beta"], deployment["keys"]["beta"][1])
    findings = check_against(site, verify_log(forged, deployment["keys"]["coordinator"][1]), "beta")
    own, witnessed = _split_witness(findings)
    assert len(own) == 1 and "the site never sent it" in own[0].message
    assert own[0].line == update["seq"] + 1
    # re-signing the edited log changed every later hash: the heads the sites witnessed show the rewrite
    assert witnessed and all("coordinator's log was rewritten" in f.message for f in witnessed)
    alpha = check_against(verify_log(deployment["logs"]["alpha"], deployment["keys"]["alpha"][1]),
                          verify_log(forged, deployment["keys"]["coordinator"][1]), "alpha")
    assert _split_witness(alpha)[0] == []


def _split_witness(findings: list) -> tuple[list, list]:
    """(findings about the site's log or the coordinator's records, findings of the site's coordinator heads)"""
    witnessed = [f for f in findings if "coordinator's signed head" in f.message]
    return [f for f in findings if f not in witnessed], witnessed


def test_a_truncated_site_log_is_caught_against_the_coordinator(deployment, tmp_path):
    lines = deployment["logs"]["alpha"].read_bytes().splitlines(keepends=True)
    last_head = max(r["payload"]["seq"] for r in read(deployment["logs"]["coordinator"])
                    if r["event"] == "site-head" and r["payload"]["site"] == "alpha")
    cut = tmp_path / "alpha.jsonl"
    cut.write_bytes(b"".join(lines[:last_head]))  # ends just before the last record the coordinator holds
    alone = audit_logs(cut, deployment["keys"]["alpha"][1])
    assert alone.ok  # a clean prefix: only a head held elsewhere can show what is missing
    summary = verify_site(deployment, "alpha", cut)
    assert not summary.ok
    assert "truncated" in summary.first_problem() and f"seq {last_head}" in summary.first_problem()


def test_a_truncated_coordinator_log_is_caught_by_the_heads_its_messages_carried(deployment, tmp_path):
    """Every message to a site carries the coordinator log's signed head and the site logs it: removing the
    coordinator's last records (here: everything from the last head a site witnessed) shows."""
    witnessed = [r["payload"]["coordinator_head"]["seq"] for r in read(deployment["logs"]["alpha"])
                 if "coordinator_head" in r["payload"]]
    assert witnessed
    lines = deployment["logs"]["coordinator"].read_bytes().splitlines(keepends=True)
    cut = tmp_path / "coordinator.jsonl"
    cut.write_bytes(b"".join(lines[:max(witnessed)]))  # a clean prefix: its own chain still verifies
    assert audit_logs(cut, deployment["keys"]["coordinator"][1]).ok
    summary = audit_logs(deployment["logs"]["alpha"], deployment["keys"]["alpha"][1], cut,
                         deployment["keys"]["coordinator"][1])
    assert not summary.ok
    problem = summary.first_problem()
    assert "coordinator's log was truncated" in problem and f"seq {max(witnessed)}" in problem
    whole = audit_logs(deployment["logs"]["alpha"], deployment["keys"]["alpha"][1],
                       deployment["logs"]["coordinator"], deployment["keys"]["coordinator"][1])
    assert whole.ok, whole.first_problem()


def test_a_forged_head_and_a_rewritten_site_log_are_caught(deployment, tmp_path):
    coordinator = read(deployment["logs"]["coordinator"])
    head = next(r for r in coordinator if r["event"] == "site-head" and r["payload"]["site"] == "alpha")
    head["payload"]["hash"] = "0" * 64  # the coordinator cannot make a site's signature
    forged = tmp_path / "coordinator.jsonl"
    forge(coordinator, private_key(deployment["keys"]["coordinator"][0]), forged)
    site = verify_log(deployment["logs"]["alpha"], deployment["keys"]["alpha"][1])
    findings = check_against(site, verify_log(forged, deployment["keys"]["coordinator"][1]), "alpha")
    assert ["not signed by alpha's key" in f.message for f in _split_witness(findings)[0]] == [True]

    def rewrite(records):  # the site rewrites its history with its own key after sending heads
        records[:] = [r for r in records if r["event"] != "data-exclusions"]
    rewritten = _edit_site_log(deployment, "alpha", tmp_path, rewrite)
    summary = verify_site(deployment, "alpha", rewritten)
    assert summary.actors[0].log.ok and not summary.ok and "rewritten" in summary.first_problem()


# -- ε recomputation ---------------------------------------------------------------------------

REALISTIC = [  # (σ, q, steps) per round, δ
    ([(1.0, 0.05, 20)] * 5, 1e-4),
    ([(1.2, 0.1, 50)] * 3, 1e-3),
    ([(0.9, 0.125, 16)] * 4 + [(1.5, 0.125, 16)] * 2, 1e-4),
    ([(2.0, 0.02, 100)] * 2, 1e-3),
]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_recomputed_epsilon_matches_opacus_within_one_percent(accountant):
    for history, delta in REALISTIC:
        records, run = [], []
        for i, step in enumerate(history):
            run.append(step)
            records.append({"seq": i, "time": f"2026-01-01T00:00:{i:02d}.000000Z", "event": "dp-round", "payload": {
                "run_id": "1", "round": i + 1, "dataset": "d", "dp": True, "noise_multiplier": step[0],
                "sample_rate": step[1], "steps": step[2], "accountant": accountant, "delta": delta,
                "epsilon_before": 0.0, "epsilon_after": site_epsilon(tuple(run), delta, accountant),
                "epsilon_budget": 100.0}})
        table = recompute(records)["d"]
        for row in table.rounds:
            assert row.status == "ok", row.message
            assert abs(row.rel_diff) <= 0.01
        assert table.max_rel_diff < (0.002 if accountant == "prv" else 0.01)


def test_pld_matches_dp_accountings_own_pld_accountant_and_rdp_is_an_upper_bound():
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    history, delta = [(1.0, 0.05, 20), (1.0, 0.05, 20), (1.3, 0.1, 30)], 1e-4
    acc = PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    assert audit_epsilon(history, delta, "pld") == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
    assert audit_epsilon(history, delta, "rdp") >= opacus_epsilon(history, delta, "rdp") > audit_epsilon(
        history, delta, "pld")
    comp = Composition()
    comp.add(0.0, 0.05, 10)
    assert comp.pld_epsilon(delta) == float("inf")


def test_a_loose_dp_accounting_rdp_is_a_warning_not_a_failure():
    # σ=1.5, q=0.25: dp-accounting's RDP exceeds Opacus's exact one by ~1.9% (fractional orders)
    history, delta = [(1.5, 0.25, 100)], 1e-3
    logged = site_epsilon(tuple(history), delta, "rdp")
    rec = {"seq": 0, "time": "2026-01-01T00:00:00.000000Z", "event": "dp-round", "payload": {
        "run_id": "1", "round": 1, "dataset": "d", "dp": True, "noise_multiplier": 1.5, "sample_rate": 0.25,
        "steps": 100, "accountant": "rdp", "delta": delta, "epsilon_before": 0.0, "epsilon_after": logged,
        "epsilon_budget": 100.0}}
    row = recompute([rec])["d"].rounds[0]
    assert row.status == "warning" and row.rel_diff < -0.01
    assert "looser than Opacus's at fractional orders" in row.message and row.tight_after < logged


# -- property-based: every edit is detected ----------------------------------------------------

JSON_LEAF = (st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.floats() | st.text(max_size=12))
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
EVENTS = st.lists(st.tuples(st.sampled_from(["message", "dp-round", "reply", "refusal", "x", "ünïcode-ev"]),
                            st.dictionaries(st.text(max_size=8), JSON, max_size=4)), min_size=1, max_size=30)


def write_generated(folder: Path, events, actor="site-α") -> tuple[Path, Path, Path]:
    key, pub = new_key(folder)
    log = AuditLog(folder / "audit.jsonl", actor, key)
    for event, payload in events:
        log.append(event, payload)
    return log.path, key, pub


@PROPERTY
@given(EVENTS)
def test_property_a_clean_log_always_verifies(events):
    with tempfile.TemporaryDirectory() as tmp:
        path, _, pub = write_generated(Path(tmp), events)
        report = verify_log(path, pub)
        assert report.ok, report.failure
        assert report.records == len(events)


@PROPERTY
@given(EVENTS, st.data())
def test_property_any_single_byte_change_is_detected(events, data):
    with tempfile.TemporaryDirectory() as tmp:
        path, _, pub = write_generated(Path(tmp), events)
        raw = bytearray(path.read_bytes())
        pos = data.draw(st.integers(0, len(raw) - 1), label="position")
        old = raw[pos]
        # mostly edits that keep the line plausible (one flipped bit, a digit, a hex or JSON character),
        # sometimes any byte at all
        new = data.draw(st.one_of(st.sampled_from([old ^ (1 << k) for k in range(8)]),
                                  st.sampled_from(b'0123456789abcdefABCDEF"eE+-.,:{}[] \\n'),
                                  st.integers(0, 255)).filter(lambda b: b != old), label="new byte")
        raw[pos] = new
        path.write_bytes(bytes(raw))
        assert not verify_log(path, pub).ok


def test_every_single_byte_flip_of_a_small_log_is_detected(tmp_path):
    """Exhaustive: every position of a 3-record log, each with three kinds of flip (a low bit: digits and
    letters stay plausible; 0x20: case, as in 1e+16 → 1E+16; 0x80: no longer ASCII)."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path) as tmp:
        path, _, pub = write_generated(Path(tmp), [
            ("dp-round", {"dataset": "d", "epsilon_after": 1.25, "steps": 20, "dp": True, "big": 1e16}),
            ("reply", {"arrays_sha256": "ab" * 32, "metrics": {"loss": 1e-05}}),
            ("agent-stop", {"reason": "é"})])
        raw = path.read_bytes()
        pub = load_public_key(pub)
        undetected = []
        for pos in range(len(raw)):
            for flip in (0x01, 0x20, 0x80):
                edited = bytearray(raw)
                edited[pos] ^= flip
                path.write_bytes(bytes(edited))
                if verify_log(path, pub).ok:
                    undetected.append((pos, flip))
        assert undetected == [] and len(raw) > 900


@PROPERTY
@given(EVENTS, st.data())
def test_property_deleting_duplicating_or_swapping_records_is_detected(events, data):
    with tempfile.TemporaryDirectory() as tmp:
        path, _, pub = write_generated(Path(tmp), events)
        original = path.read_bytes()
        lines = original.splitlines(keepends=True)
        n = len(lines)
        last_head = json.loads(lines[-1])
        op = data.draw(st.sampled_from(["delete", "duplicate", "swap"] if n > 1 else ["delete", "duplicate"]))
        i = data.draw(st.integers(0, n - 1), label="record")
        if op == "delete":
            edited = lines[:i] + lines[i + 1:]
        elif op == "duplicate":
            j = data.draw(st.integers(0, n), label="insert at")
            edited = lines[:j] + [lines[i]] + lines[j:]
        else:
            j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i), label="other")
            edited = list(lines)
            edited[i], edited[j] = edited[j], edited[i]
        path.write_bytes(b"".join(edited))
        report = verify_log(path, pub)
        if op == "delete" and i == n - 1:  # dropping the last record is a truncation:
            assert report.ok == (n > 1)  # the chain alone cannot show it …
            assert _truncation_caught(report, last_head, pub)  # … the head the coordinator holds does
        else:
            assert not report.ok


def _truncation_caught(site_report, head: dict, site_pub: Path) -> bool:
    """check_against with a coordinator log that holds ``head`` (the site's last signed record)."""
    with tempfile.TemporaryDirectory() as tmp:
        key, pub = new_key(Path(tmp))
        coordinator = AuditLog(Path(tmp) / "coordinator.jsonl", "coordinator", key)
        coordinator.append("site-head", {"site": site_report.actor or "site-α", "seq": head["seq"],
                                         "hash": head["hash"], "sig": head["sig"]})
        findings = check_against(site_report, verify_log(coordinator.path, pub), site_report.actor or "site-α")
        return any(f.level == "error" for f in findings)


@PROPERTY
@given(EVENTS, st.data())
def test_property_truncating_the_tail_is_detected_against_the_coordinator(events, data):
    with tempfile.TemporaryDirectory() as tmp:
        path, _, pub = write_generated(Path(tmp), events)
        raw = path.read_bytes()
        lines = raw.splitlines(keepends=True)
        head = json.loads(lines[data.draw(st.integers(0, len(lines) - 1), label="head sent")])
        held_until = sum(len(line) for line in lines[:head["seq"] + 1])
        cut = data.draw(st.integers(0, held_until - 1), label="cut at byte")  # any cut before the head's end
        path.write_bytes(raw[:cut])
        assert _truncation_caught(verify_log(path, pub), head, pub)  # with --against: always an error


@PROPERTY
@given(EVENTS, st.data())
def test_property_re_signing_with_another_key_is_detected(events, data):
    with tempfile.TemporaryDirectory() as tmp:
        path, _, pub = write_generated(Path(tmp), events)
        records = read(path)
        if data.draw(st.booleans(), label="also edit"):
            i = data.draw(st.integers(0, len(records) - 1))
            records[i]["payload"]["forged"] = True
        forge(records, ed25519.Ed25519PrivateKey.generate(), path)  # consistent chain, other key
        report = verify_log(path, pub)
        assert not report.ok and report.failure.line == 1 and "signature" in report.failure.reason


# -- CLI and report ----------------------------------------------------------------------------

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


def test_cli_verify_clean_edited_and_json(deployment, tmp_path):
    site, key = deployment["logs"]["alpha"], deployment["keys"]["alpha"][1]
    coord, coord_key = deployment["logs"]["coordinator"], deployment["keys"]["coordinator"][1]
    args = ["verify", str(site), "--key", str(key), "--against", str(coord), "--coordinator-key", str(coord_key)]
    result = runner.invoke(audit_app, args)
    assert result.exit_code == 0, result.output
    assert "all logs verify" in flat(result.output)
    result = runner.invoke(audit_app, args + ["--json"])
    assert result.exit_code == 0 and json.loads(result.output)["ok"] is True

    lines = site.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b'"round":1', b'"round":2', 1)
    assert lines[4] != site.read_bytes().splitlines(keepends=True)[4]
    edited = tmp_path / "alpha.jsonl"
    edited.write_bytes(b"".join(lines))
    result = runner.invoke(audit_app, ["verify", str(edited), "--key", str(key)])
    assert result.exit_code == 1
    assert "line 5 (seq 4)" in flat(result.output) and "hash does not match" in flat(result.output)
    result = runner.invoke(audit_app, ["verify", str(edited), "--key", str(key), "--json"])
    out = json.loads(result.output)
    assert result.exit_code == 1 and out["ok"] is False
    assert out["actors"][0]["log"]["failure"] == {"line": 5, "seq": 4, "reason": out["actors"][0]["log"]["failure"]
                                                   ["reason"]}

    result = runner.invoke(audit_app, ["verify", str(site)])
    assert isinstance(result.exception, AuditError) and "--key is needed" in str(result.exception)


def _demo_run_dir(root: Path) -> Path:
    """The layout `carefl demo` leaves: kits from the real provisioning, logs per participant."""
    from deploy.coordinator.provision import load_consortium, provision
    deployment = root / "deployment"
    deployment.mkdir(parents=True)
    spec = deployment / "consortium.toml"
    spec.write_text('[consortium]\nname = "t"\ndays = 30\n\n[coordinator]\nhosts = ["127.0.0.1"]\nport = 9092\n\n'
                    '[sites."alpha"]\n[sites."beta"]\n')
    provision(load_consortium(spec), deployment / "kits")
    kits = deployment / "kits"
    keys = {a: (kits / a / "audit-signing.key", kits / a / "audit-signing.pub") for a in ("coordinator", "alpha",
                                                                                         "beta")}
    build_deployment(deployment, keys=keys)
    return root


def test_cli_verify_run_dir_and_any_edit_fails_it(tmp_path):
    run_dir = _demo_run_dir(tmp_path / "run")
    result = runner.invoke(audit_app, ["verify", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    for actor in ("coordinator", "alpha", "beta"):
        assert actor in result.output
    out = json.loads(runner.invoke(audit_app, ["verify", "--run-dir", str(run_dir), "--json"]).output)
    assert out["ok"] and {a["actor"] for a in out["actors"]} == {"coordinator", "alpha", "beta"}
    assert all(a["against_coordinator"] for a in out["actors"] if a["role"] == "site")

    coord = run_dir / "deployment" / "coordinator" / "audit.jsonl"
    raw = bytearray(coord.read_bytes())
    pos = raw.index(b'"site":"beta"') + 9
    raw[pos] ^= 0x01
    coord.write_bytes(bytes(raw))
    result = runner.invoke(audit_app, ["verify", "--run-dir", str(run_dir)])
    assert result.exit_code == 1 and "coordinator" in flat(result.output)
    coord.write_bytes(bytes(raw[:pos]) + bytes([raw[pos] ^ 0x01]) + bytes(raw[pos + 1:]))
    assert runner.invoke(audit_app, ["verify", "--run-dir", str(run_dir)]).exit_code == 0

    (run_dir / "deployment" / "sites" / "beta" / "audit.jsonl").unlink()
    result = runner.invoke(audit_app, ["verify", "--run-dir", str(run_dir), "--json"])
    out = json.loads(result.output)
    assert result.exit_code == 1 and "does not exist" in out["first_problem"]


def test_report_is_self_contained_and_escaped(tmp_path):
    run_dir = _demo_run_dir(tmp_path / "run")
    site_log = run_dir / "deployment" / "sites" / "alpha" / "audit.jsonl"
    key = run_dir / "deployment" / "kits" / "alpha" / "audit-signing.key"
    AuditLog(site_log, "alpha", key).append("refusal", {"run_id": "1001", "round": 4, "message_type": "train",
                                                        "code": 4004, "reason": "<script>alert(1)</script> budget"})
    out = tmp_path / "report.html"
    result = runner.invoke(audit_app, ["report", "--run-dir", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; budget" in page
    assert page.count("data:image/png;base64,") == 2  # one ε plot per site and dataset
    assert "10 at δ=0.0001" in page  # the budget, with its δ
    assert "Site alpha" in page and "Site beta" in page and "Coordinator" in page
    assert page.count('class="ok">verified') == 6 and "missing label: 2" in page  # overview + sections
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page
