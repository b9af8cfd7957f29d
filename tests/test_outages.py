"""Coordinator outages on a real loopback consortium (kits, TLS, node auth, site agents behind their
gates): the SuperLink killed and restarted after 2 and 75 s, and stopped and started gracefully.
Every site reconnects by itself, the ServerApp of the interrupted study does not outlive its SuperLink,
and the study resumes with ``--resume`` without anyone touching a site. How long reconnection takes is
measured by ``benchmarks/reconnect.py``, not here."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deploy import processes
from server.checkpoint import load
from server.run_dir import read_jsonl
from tests.helpers import default_run_config, running_consortium_with_policy, wait_for, wait_for_superlink, wait_run

SITES = {"cleveland": "cleveland", "hungarian": "hungarian", "va": "va"}


def _cmdlines() -> dict[int, str]:
    out = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def _serverapps(port: int) -> list[int]:
    """The ServerApp processes of this coordinator (they dial its Runtime API on ``port``)."""
    return [pid for pid, cmd in _cmdlines().items()
            if "flwr-serverapp" in cmd and f":{port}" in cmd and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _all_online(coord) -> bool:
    try:
        online = {str(n["node-id"]) for n in coord.nodes() if n.get("status") == "online"}
    except Exception:  # noqa: BLE001 - the SuperLink is still starting
        return False
    return set(coord.site_nodes().values()) <= online


def _gates(kits: Path) -> dict[str, int]:
    """Site → pid of its gated SuperNode."""
    return {site: pid for pid, cmd in _cmdlines().items() for site in SITES
            if "deploy.site.gate" in cmd and str(kits / site / "site.toml") in cmd}


def _all_back(coord, kits: Path, since: datetime.datetime, before: dict[str, int]) -> bool:
    """Every site connected after an outage: online in a session activated after ``since``, or still in the
    session it had before (the same SuperNode process: Flower's retries bridged the outage). The status
    alone would count a site whose SuperNode is gone, until the old session's heartbeat expires."""
    try:
        nodes = {str(n["node-id"]): n for n in coord.nodes()}
    except Exception:  # noqa: BLE001 - the SuperLink is still starting
        return False
    gates = _gates(kits)
    for site, node_id in coord.site_nodes().items():
        node = nodes.get(node_id, {})
        fresh = datetime.datetime.fromisoformat(str(node.get("online-at") or "1970-01-01T00:00:00+00:00")) >= since
        if node.get("status") != "online" or not (fresh or gates.get(site) == before.get(site)):
            return False
    return True


def _restart(coord):
    """Start the coordinator again; the moment it was back (UTC)."""
    since = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)  # Flower reports whole seconds
    coord.start()
    return since


def _crash(coord) -> None:
    """``kill -9`` of the SuperLink process alone, as a host crash or an OOM kill leaves it."""
    link = coord.procs[-1]
    os.kill(link.pid, signal.SIGKILL)
    link.popen.wait(timeout=30)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    # RDP accounting at the sites: outages do not depend on the accountant (the audit log is verified either way),
    # and PRV's composition at every plan and charge costs seconds of CPU per site and run
    with running_consortium_with_policy(tmp_path_factory.mktemp("outages"), SITES, accountant="rdp") as c:
        yield c


def test_sites_reconnect_by_themselves_after_every_outage_and_the_study_resumes(consortium):
    coord, kits, root = consortium["coord"], consortium["kits"], consortium["root"]
    agents = {pid for pid, cmd in _cmdlines().items() if " site start " in cmd and str(kits) in cmd}
    assert len(agents) == len(SITES)
    out = root / "run"
    config = default_run_config(**{"num-server-rounds": 3, "local-steps": 20, "min-sites": 3, "round-timeout": 90,
                                   "sites": ",".join(SITES), "out-dir": str(out)})
    for key in ("audit-log", "audit-key"):  # as `carefl coordinator run`: the coordinator's one log in its state dir
        config.pop(key)
    coord.submit(config)
    wait_for(lambda: (out / "checkpoint.pt").exists(), 300, "the checkpoint of round 1")
    assert _serverapps(coord.port)

    # 1. crash: the study's ServerApp must not live on (and write to the run directory) without its SuperLink
    before = _gates(kits)
    _crash(coord)
    wait_for(lambda: not _serverapps(coord.port), 30, "the orphaned ServerApp to stop")
    time.sleep(2)
    since = _restart(coord)
    wait_for_superlink(coord, lambda: _all_back(coord, kits, since, before), 120, "every site back after a 2 s outage")

    # 2. a crash that outlasts Flower's own retries (the SuperNodes give up after ~15 s) and the agent's
    # backoff cap (60 s)
    for seconds in (75,):
        before = _gates(kits)
        _crash(coord)
        time.sleep(seconds)
        assert all(agent in _cmdlines() for agent in agents)  # the agents wait; nobody restarts them
        since = _restart(coord)
        wait_for_superlink(coord, lambda: _all_back(coord, kits, since, before), 120,
                           f"every site back after a {seconds} s outage")
        assert set(_gates(kits).values()).isdisjoint(before.values())  # new SuperNodes, started by the agents

    # 3. a graceful stop (what `carefl coordinator stop` does) and a start
    before = _gates(kits)
    coord.stop()
    time.sleep(10)
    since = _restart(coord)
    wait_for_superlink(coord, lambda: _all_back(coord, kits, since, before), 120,
                       "every site back after a graceful restart")

    # the study resumes from its checkpoint; no site was touched
    done = load(out).round
    assert 1 <= done < 3 and not (out / "summary.json").exists()
    run_id = coord.submit({**config, "resume-from": str(out)})
    assert wait_run(coord, run_id, timeout=400) == "finished:completed", coord.run_log(run_id)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["sites"] == sorted(SITES)
    assert sorted(r["round"] for r in read_jsonl(out / "rounds.jsonl")) == [1, 2, 3]
    assert agents <= set(_cmdlines())  # the same agent processes throughout
    for site in SITES:
        log = (root / site / "agent.log").read_text()
        assert "unreachable" in log and "reachable again" in log, log[-3000:]

    # an auditor verifies the coordinator's one audit log (all attempts) against every site's own log
    sites = [arg for s in SITES for arg in ("--site", str(kits / s))]
    done = subprocess.run([processes.tool("carefl"), "audit", "verify", "--state-dir", str(root / "state"), "--kit",
                           str(kits / "coordinator"), *sites, "--json"], capture_output=True, text=True, timeout=300,
                          env=processes.flower_env(root / "auditor"), stdin=subprocess.DEVNULL)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], result.get("first_problem")
    assert {a["actor"] for a in result["actors"]} == {"coordinator", *SITES}


def test_a_restarted_site_ends_its_stale_session_instead_of_waiting_a_minute(consortium):
    """A site's SuperNode killed (its agent restarts it): the SuperLink still holds the old session open
    for up to 60 s; the new one ends it and is online at once, not refused until the heartbeat expires."""
    coord, kits = consortium["coord"], consortium["kits"]
    wait_for_superlink(coord, lambda: _all_online(coord), 120, "every site online")
    gate = next(pid for pid, cmd in _cmdlines().items()
                if "deploy.site.gate" in cmd and str(kits / "va" / "site.toml") in cmd)
    supernode_log = kits / "va" / "agent" / "supernode.log"
    seen = supernode_log.read_text().count("previous session")
    os.killpg(os.getpgid(gate), signal.SIGKILL)
    wait_for(lambda: supernode_log.read_text().count("previous session") > seen, 60,
              "the new SuperNode to end the stale session")
    wait_for_superlink(coord, lambda: _all_online(coord), 30, "va online again")
    assert "refused to activate" not in (consortium["root"] / "va" / "agent.log").read_text()
