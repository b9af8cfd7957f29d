"""How fast a consortium is whole again after its coordinator's outages.

Four heart-disease site agents on loopback (kits, TLS, SuperNode authentication, warm gated SuperNodes:
``carefl site start`` as a hospital runs it) and one coordinator. The SuperLink is killed (``kill -9``,
as a crash or an OOM kill leaves it) and restarted after 2, 30 and 120 s, and stopped gracefully and
restarted after 10 and 40 s (a maintenance window longer than Flower's own retries). For each outage: seconds from the restarted SuperLink accepting connections to
every site online again (``flwr supernode list``), with nobody touching a site. Before carefl's fix, Flower's
SuperNode gave up after 12-20 s and then hung, so no site came back from an outage longer than that.

    python -m benchmarks.reconnect [--full]     # quick: the 30 s crash only (about 2 min); full: all, 3 times
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.figures import Figure, markdown_table

QUICK = {"outages": [("kill -9", 30)], "repeats": 1}
FULL = {"outages": [("kill -9", 2), ("kill -9", 30), ("kill -9", 120), ("graceful stop", 10), ("graceful stop", 40)],
        "repeats": 3}
GOAL_SECONDS = 30.0


def log(text: str) -> None:
    print(f"[reconnect] {text}", flush=True)


def _gates() -> dict[str, int]:
    """Site → pid of its gated SuperNode (``python -m deploy.site.gate <sites/SITE/site.toml> …``)."""
    gates = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 3 and argv[1:3] == [b"-m", b"deploy.site.gate"]:
            gates[Path(argv[3].decode()).parent.name] = pid
    return gates


def _online(coord, since: datetime.datetime, before: dict[str, int]) -> int:
    """Sites connected now: online in a session activated after ``since``, or in the session they had
    before the outage (Flower's own retries bridged it: same SuperNode process). The SuperLink's database
    still says "online" for a site whose SuperNode is gone until that session's heartbeat expires (≤ 60 s),
    so the status alone would count sites that are not back."""
    try:
        nodes = {str(n["node-id"]): n for n in coord.nodes()}
    except Exception:  # noqa: BLE001 - the SuperLink is still coming up
        return 0
    gates, back = _gates(), 0
    for site, node_id in coord.site_nodes().items():
        node = nodes.get(node_id, {})
        if node.get("status") != "online":
            continue
        try:
            fresh = datetime.datetime.fromisoformat(str(node.get("online-at"))) >= since
        except ValueError:
            fresh = False
        back += fresh or (site in before and gates.get(site) == before[site])
    return back


def _until_all_online(fed, n_sites: int, since: datetime.datetime | None = None, before: dict[str, int] | None = None,
                      timeout: float = 600.0) -> float:
    start = time.monotonic()
    since = since or datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    while _online(fed.coordinator, since, before or {}) < n_sites:
        dead = [agent.name for agent in fed.agents if not agent.alive()]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} stopped; see its agent.log under the work directory")
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"sites not all online {timeout:.0f} s after the SuperLink came back")
        time.sleep(0.5)
    return time.monotonic() - start


def measure(full: bool, work: Path) -> dict[str, list[float]]:
    from benchmarks.deployment_overhead import ehr_sites
    from deploy.demo.loopback import LocalFederation

    size = FULL if full else QUICK
    results: dict[str, list[float]] = {f"{kind}, {seconds} s": [] for kind, seconds in size["outages"]}
    sites = ehr_sites(work / "fed")
    with LocalFederation(work / "fed", sites) as fed:
        coord = fed.coordinator
        _until_all_online(fed, len(sites))
        for repeat in range(size["repeats"]):
            for kind, seconds in size["outages"]:
                before = _gates()
                if kind == "kill -9":
                    link = coord.procs[-1]
                    os.kill(link.pid, signal.SIGKILL)
                    link.popen.wait(timeout=30)
                else:
                    coord.stop()
                time.sleep(seconds)
                since = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)  # Flower: whole seconds
                coord.start()  # returns once the SuperLink accepts connections (and knows the site keys)
                took = _until_all_online(fed, len(sites), since, before)
                results[f"{kind}, {seconds} s"].append(took)
                log(f"repeat {repeat + 1}: {kind} for {seconds} s → all {len(sites)} sites online {took:.1f} s "
                    f"after the SuperLink was back")
    return results


def figures(results: dict[str, list[float]], full: bool, n_sites: int = 4) -> list[Figure]:
    rows = [[outage, len(times), f"{statistics.median(times):.1f}", f"{max(times):.1f}"]
            for outage, times in results.items()]
    worst = max(max(t) for t in results.values())
    return [Figure(
        key="reconnect",
        title="Sites back after a coordinator outage",
        command="python -m benchmarks.reconnect" + (" --full" if full else ""),
        goal=f"every site reconnects by itself after any outage, all online ≤ {GOAL_SECONDS:.0f} s after the "
             f"coordinator is back",
        anchor="Flower 1.41's SuperNode alone (and carefl before this fix): gives up after 12-20 s of outage "
               "and never reconnects; every site restarted by hand",
        ours=f"all {n_sites} sites back after every outage; slowest {worst:.1f} s after the SuperLink returned",
        met=worst <= GOAL_SECONDS,
        table=markdown_table(["outage", "repeats", "median s to all online", "max s"], rows),
        notes="Seconds from the restarted SuperLink accepting connections (and knowing the site keys) to every "
              "site connected: online in `flwr supernode list` in a session activated after the restart, or in "
              "its old session where Flower's retries bridged the outage (the status alone still says online "
              "for a site whose SuperNode is gone, until its heartbeat expires). The agent checks the link every 3 s "
              "while the coordinator is down, then starts a SuperNode (imports, warm executor) that ends its previous "
              "session if the SuperLink still holds it open.",
    )]


def run(full: bool) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="carefl-reconnect-") as tmp:
        return figures(measure(full, Path(tmp)), full)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    for fig in run(args.full):
        print(fig.markdown())


if __name__ == "__main__":
    main()
