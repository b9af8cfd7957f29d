"""A consortium stood up from kits on 127.0.0.1 with real processes: TLS, SuperNode authentication,
site-side code approval, and what happens to whoever does not belong."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from deploy import processes
from deploy.coordinator.superlink import Coordinator
from deploy.coordinator.provision import load_consortium, provision, write_keygen
from server.run_dir import read_jsonl
from tests.helpers import (add_dataset, consortium_spec, data_dir, default_run_config, running_consortium_with_policy,
                           wait_online, wait_run)

SITES = {"site-a": "cleveland", "site-b": "hungarian", "site-c": "va"}  # site-c will not approve the app


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    # RDP accounting at the sites: TLS, authentication and approval do not depend on the accountant
    with running_consortium_with_policy(tmp_path_factory.mktemp("consortium"), SITES, unapproved=("site-c",),
                                        accountant="rdp") as c:
        yield c


def test_the_superlink_runs_with_tls_node_auth_persistent_state_and_no_runtime_installs(consortium):
    argv = consortium["coord"].superlink_argv()
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert "--disable-runtime-dependency-installation" in argv
    assert argv[argv.index("--database") + 1].endswith("superlink.db")
    assert (consortium["root"] / "state" / "superlink.db").exists()
    assert set(consortium["coord"].site_nodes()) == set(SITES)


def test_unapproved_site_refuses_and_the_round_goes_on_with_the_others(consortium):
    coord, root = consortium["coord"], consortium["root"]
    out = root / "run-open"
    run_id = coord.submit(default_run_config(**{"num-server-rounds": 1, "local-steps": 10, "min-sites": 2,
                                                "sites": "", "out-dir": str(out)}))
    assert wait_run(coord, run_id) == "finished:completed", coord.run_log(run_id)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites"] == ["site-a", "site-b"] and summary["rounds_completed"] == 1
    assert {r["site"] for r in read_jsonl(out / "metrics.jsonl")} == {"site-a", "site-b"}
    # site-c computed nothing and spent nothing; its SuperNode said which app it refused
    assert not (consortium["kits"] / "site-c" / "privacy-ledger.sqlite").exists()
    assert not (consortium["kits"] / "site-c" / "cache").exists()
    log = (consortium["kits"] / "site-c" / "agent" / "supernode.log").read_text()
    assert f"app sha256:{consortium['digest']} is not approved" in log
    assert (consortium["kits"] / "site-a" / "privacy-ledger.sqlite").exists()


def test_a_run_naming_an_unapproved_site_fails_with_a_clear_message(consortium):
    coord, root = consortium["coord"], consortium["root"]
    run_id = coord.submit(default_run_config(**{"num-server-rounds": 1, "local-steps": 5, "round-timeout": 20,
                                                "sites": "site-a,site-b,site-c", "out-dir": str(root / "run-named")}))
    assert wait_run(coord, run_id) == "finished:failed"
    log = " ".join(coord.run_log(run_id).split())
    assert "the study cannot start, no site trained" in log and "site site-c: app sha256:" in log
    assert "not approved" in log and "Traceback" not in log  # an expected end: one line, no traceback
    assert read_jsonl(root / "run-named" / "metrics.jsonl")[-1]["event"] == "stopped"
    assert (root / "run-named" / "report.html").exists()


def test_a_stopped_study_is_one_line_from_carefl_coordinator_run_with_its_report(consortium):
    """What an operator sees when a study cannot start: the reason in one line, no traceback, a report."""
    root, kits = consortium["root"], consortium["kits"]
    out = root / "run-cli"
    done = subprocess.run([processes.tool("carefl"), "coordinator", "run", "--kit", str(kits / "coordinator"),
                           "--state-dir", str(root / "state"), "--sites", "site-a,site-c", "--rounds", "1",
                           "--local-steps", "5", "--round-timeout", "60", "--out", str(out)],
                          capture_output=True, text=True, env={**processes.flower_env(root / "cli"), "COLUMNS": "300"},
                          timeout=300, stdin=subprocess.DEVNULL)
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, text
    assert "stopped: the study cannot start, no site trained" in text and "site site-c: app sha256:" in text
    assert f"report: {out / 'report.html'}" in text and "Traceback" not in text
    assert "stopped after 0 of 1 round(s)" in (out / "report.html").read_text()


def _supernode(root: Path, name: str, args: list[str]) -> tuple[int, str]:
    """A bare flower-supernode with these connection arguments; its exit code and log."""
    log = root / f"{name}.log"
    proc = processes.start(name, [processes.tool("flower-supernode"), *args, "--port", str(processes.free_port()),
                                  "--max-retries", "2", "--max-wait-time", "10"],
                           processes.flower_env(root / name), log)
    try:
        code = proc.popen.wait(timeout=120)
    finally:
        proc.stop()
    return code, log.read_text()


def test_an_unregistered_key_is_refused_and_the_agent_says_what_to_do(consortium):
    root, kits, coord = consortium["root"], consortium["kits"], consortium["coord"]
    rogue = root / "rogue"
    write_keygen(rogue)
    (rogue / "ca.crt").write_bytes((kits / "site-a" / "ca.crt").read_bytes())
    config = rogue / "site.toml"
    config.write_text(f'[site]\nid = "rogue"\ncoordinator = "127.0.0.1:{coord.port}"\n')
    add_dataset(config, "switzerland")
    done = subprocess.run([processes.tool("carefl"), "site", "start", "--kit", str(rogue), "--config", str(config),
                           "--runtime-port", str(processes.free_port()), "--refusal-patience", "0"],
                          capture_output=True, text=True,
                          env=processes.flower_env(rogue / "home"), timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "does not know this site's key" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert len(coord.nodes()) == len(SITES)  # nobody got in


def test_a_site_trusting_another_ca_cannot_connect(consortium, tmp_path):
    other = tmp_path / "other"
    provision(load_consortium(consortium_spec(other, {"site-a": None}, 1)), other / "kits")
    kits, coord = consortium["kits"], consortium["coord"]
    code, log = _supernode(tmp_path, "wrong-ca", [
        "--root-certificates", str(other / "kits" / "site-a" / "ca.crt"), "--superlink", f"127.0.0.1:{coord.port}",
        "--auth-supernode-private-key", str(kits / "site-a" / "supernode.key")])
    assert code != 0
    assert re.search(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed", log), log[-2000:]


def test_a_site_agent_with_another_ca_stops_and_names_the_certificate(consortium, tmp_path):
    """Not an outage: retrying cannot fix a kit whose CA did not sign the coordinator's certificate."""
    other = tmp_path / "other"
    provision(load_consortium(consortium_spec(other, {"site-a": None}, 1)), other / "kits")
    kits, coord = consortium["kits"], consortium["coord"]
    kit = tmp_path / "kit"
    kit.mkdir()
    for name in ("supernode.key", "supernode.pub", "site.toml"):
        (kit / name).write_bytes((kits / "site-a" / name).read_bytes())
    (kit / "supernode.key").chmod(0o600)
    (kit / "ca.crt").write_bytes((other / "kits" / "site-a" / "ca.crt").read_bytes())
    done = subprocess.run([processes.tool("carefl"), "site", "start", "--kit", str(kit), "--config",
                           str(kit / "site.toml"), "--runtime-port", str(processes.free_port())],
                          capture_output=True, text=True, env=processes.flower_env(tmp_path / "home"), timeout=120,
                          stdin=subprocess.DEVNULL)
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, text
    assert f"the coordinator at 127.0.0.1:{coord.port} presents a certificate" in text
    assert "does not accept" in text and str(kit / "ca.crt") in text and "Traceback" not in text


def test_a_plaintext_client_cannot_connect_to_the_tls_coordinator(consortium, tmp_path):
    kits, coord = consortium["kits"], consortium["coord"]
    code, log = _supernode(tmp_path, "plaintext", [
        "--insecure", "--superlink", f"127.0.0.1:{coord.port}",
        "--auth-supernode-private-key", str(kits / "site-a" / "supernode.key")])
    assert code != 0
    assert "SuperNode ID" not in log  # it never got a node id


def _readme_commands(readme: Path) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", readme.read_text(), flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_a_fresh_user_can_follow_the_kit_readmes_on_two_shells(tmp_path):
    """Every command of both READMEs, as written, run from the kit folders (one shell each)."""
    data_dir()
    kits = tmp_path / "kits"
    provision(load_consortium(consortium_spec(tmp_path, ["st-mary"], processes.free_port())), kits)
    coord_kit, site_kit = kits / "coordinator", kits / "st-mary"
    env = processes.flower_env(tmp_path / "home")

    def shell(cmd: str, cwd: Path, timeout: float = 300) -> str:
        argv = shlex.split(cmd)
        assert argv[0] == "carefl", cmd
        done = subprocess.run([processes.tool("carefl"), *argv[1:]], cwd=cwd, env={**env, "COLUMNS": "200"},
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{cmd}\n{done.stdout}{done.stderr}"
        return done.stdout

    coordinator_cmds = _readme_commands(coord_kit / "README.md")
    site_cmds = _readme_commands(site_kit / "README.md")
    assert [c.split()[:3] for c in coordinator_cmds] == [
        ["carefl", "coordinator", "start"], ["carefl", "coordinator", "app-hash"], ["carefl", "coordinator", "status"],
        ["carefl", "coordinator", "run"], ["carefl", "coordinator", "stop"]]
    assert [c.split()[:3] for c in site_cmds] == [
        ["carefl", "site", "validate"], ["carefl", "site", "approve"], ["carefl", "site", "start"]]
    agent = None
    try:
        shell(coordinator_cmds[0], coord_kit)                              # shell 1: start the coordinator
        digest = shell(coordinator_cmds[1], coord_kit).strip()
        add_dataset(site_kit / "site.toml", "cleveland")                   # shell 2: the site describes its data
        shell(site_cmds[1].replace("HASH_OR_FAB_OR_PATH", digest), site_kit)
        start = shlex.split(site_cmds[2])
        agent = processes.start("st-mary", [processes.tool("carefl"), *start[1:]], env, tmp_path / "agent.log",
                                cwd=site_kit)
        coord = Coordinator(coord_kit / "state", coord_kit)
        wait_online(coord, ["st-mary"])
        assert "online" in shell(coordinator_cmds[2], coord_kit)           # shell 1: status, then a run
        assert "--rounds 2" in coordinator_cmds[3]
        out = shell(coordinator_cmds[3].replace("--rounds 2", "--rounds 1") + " --local-steps 5", coord_kit, timeout=400)
        assert "mean over centres" in out and f"app sha256:{digest}" in out
        summary = json.loads(next((coord_kit / "state" / "runs").glob("*/summary.json")).read_text())
        assert summary["sites"] == ["st-mary"] and summary["rounds_completed"] == 1
    finally:
        if agent is not None:
            agent.stop()
        stop = subprocess.run([processes.tool("carefl"), *shlex.split(coordinator_cmds[4])[1:]], cwd=coord_kit,
                              env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not (coord_kit / "state" / "superlink.json").exists()


def test_a_self_keyed_site_is_added_and_its_agent_waits_out_a_coordinator_outage(tmp_path):
    """keygen at the site → add-site at the running coordinator → coordinator down → agent started →
    coordinator back (its database still knows the key) → the agent connects without help."""
    data_dir()
    kits = tmp_path / "kits"
    provision(load_consortium(consortium_spec(tmp_path, ["st-a"], processes.free_port())), kits)
    coord_kit, own = kits / "coordinator", tmp_path / "st-b"
    env = processes.flower_env(tmp_path / "home")

    def carefl(*args: str) -> str:
        done = subprocess.run([processes.tool("carefl"), *args], env={**env, "COLUMNS": "200"}, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{args}\n{done.stdout}{done.stderr}"
        return done.stdout

    state = ["--kit", str(coord_kit), "--state-dir", str(tmp_path / "state")]
    agent = None
    try:
        pub = carefl("site", "keygen", "--out", str(own)).strip().splitlines()[-1]
        assert pub.startswith("ecdsa-sha2-nistp384 ")
        carefl("coordinator", "start", *state, "--background")
        assert "registered with the running SuperLink: st-b" in " ".join(
            carefl("coordinator", "add-site", "st-b", str(own / "supernode.pub"), *state).split())
        carefl("coordinator", "stop", "--state-dir", str(tmp_path / "state"))

        (own / "ca.crt").write_bytes((coord_kit / "ca.crt").read_bytes())
        config = own / "site.toml"
        coordinator = Coordinator(tmp_path / "state", coord_kit)
        config.write_text(f'[site]\nid = "st-b"\ncoordinator = "127.0.0.1:{coordinator.port}"\n')
        add_dataset(config, "hungarian")
        agent = processes.start("st-b", [processes.tool("carefl"), "site", "start", "--kit", str(own), "--config",
                                         str(config), "--runtime-port", str(processes.free_port())],
                                env, tmp_path / "agent.log")
        # the coordinator is down: the agent waits for it (a TLS handshake every few seconds), no SuperNode yet
        deadline = time.monotonic() + 150
        while "unreachable" not in (tmp_path / "agent.log").read_text() and time.monotonic() < deadline:
            time.sleep(1)
        assert agent.alive() and "unreachable" in (tmp_path / "agent.log").read_text()
        assert not (own / "agent" / "supernode.log").exists()
        carefl("coordinator", "start", *state, "--background")
        wait_online(coordinator, ["st-b"], timeout=240)
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run([processes.tool("carefl"), "coordinator", "stop", "--state-dir", str(tmp_path / "state")],
                       env=env, capture_output=True, timeout=180)
