"""Scale: the real ServerApp and ClientApp on Flower's simulation engine (Ray) with many EHR sites.

    python -m benchmarks --only scale [--full]        # quick: 10 and 100 sites; full: 10, 100, 1000

Per size: a SuperLink with ``--simulation`` (as ``carefl simulate`` starts it) runs a 3-round
heart-disease study in which every virtual site trains and evaluates every round (``min-sites`` = all
of them, so a round that loses a site fails). Reported: start-up (submit → first round begins: the
Ray cluster, the actors, the handshake query to every site), seconds of round 1 and of the later
(steady-state) rounds, and the peak memory of the whole process tree (SuperLink, SuperExec,
flwr-simulation with the ServerApp, Ray's GCS/raylet/workers) as the sum of every process's PSS —
shared pages counted once — sampled every 0.5 s; the SuperLink's own peak RSS and the size of its
state database show whether the message store grows.

Virtual site i uses centre i mod 4 (``client/ingest/heart_disease.py: partition_for``); a centre's training
rows are split among its sites while each share keeps ≥ 8 rows, beyond that sites share shards.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.figures import Figure, markdown_table
from deploy.datasets.data_dir import resolve_data_dir
from deploy.coordinator.superlink import CONNECTION, Coordinator, toml_value
from server.run_dir import ROUNDS_FILE, SUMMARY_FILE

ROUNDS = 3
GOAL_SITES, GOAL_GB = 1000, 8.0
# Each round: 5 local SGD steps of the logistic regression per site, no DP (virtual sites allow it), so
# the figure measures the framework (messages, actors, validation, aggregation), not local training.
STUDY = {"num-server-rounds": ROUNDS, "model": "ehr-logreg", "strategy": "fedavg", "dp": False,
         "noise-multiplier": 0.0, "local-steps": 5, "batch-size": 8, "round-retries": 0}


@dataclass
class Sample:
    peak_pss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    peak_processes: int = 0
    superlink_rss_mb: list[float] = field(default_factory=list)
    at_peak: dict[str, float] = field(default_factory=dict)  # process kind → PSS (MB) in the peak sample


def kind_of(pid: int) -> str:
    """A short name for a process of the tree: flower-superlink, flwr-simulation, raylet, ray::ClientAppActor…"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    for word in words[:4]:
        name = Path(word).name
        if name and not name.startswith(("python", "-")):
            return name
    return Path(words[0]).name


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return out


def memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in kB, from /proc/PID/smaps_rollup (0, 0 if it is gone)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("Pss", 0), values.get("Rss", 0)


class TreeSampler(threading.Thread):
    """Samples the memory of a process and all its descendants until stopped."""

    def __init__(self, root: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.period, self.sample = root, period, Sample()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = descendants(self.root)
            usage = [memory_kb(p) for p in pids]
            s = self.sample
            total = sum(u[0] for u in usage) / 1024
            if total > s.peak_pss_mb:
                s.at_peak = {}
                for pid, (pss, _) in zip(pids, usage):
                    kind = kind_of(pid)
                    s.at_peak[kind] = s.at_peak.get(kind, 0.0) + pss / 1024
            s.peak_pss_mb = max(s.peak_pss_mb, total)
            s.peak_rss_mb = max(s.peak_rss_mb, sum(u[1] for u in usage) / 1024)
            s.peak_processes = max(s.peak_processes, len(pids))
            s.superlink_rss_mb.append(memory_kb(self.root)[1] / 1024)
            self._halt.wait(self.period)

    def stop(self) -> Sample:
        self._halt.set()
        self.join()
        return self.sample


def submit(coordinator: Coordinator, run_config: dict, sites: int, client_cpus: int, ray_cpus: int) -> int:
    """``flwr run`` with the simulation's federation config (what ``Coordinator.submit`` does, plus
    the Ray settings this benchmark varies)."""
    overrides = coordinator.state_dir / f"run-config-{time.time_ns()}.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
    federation = (f"num_supernodes={sites} client_resources_num_cpus={client_cpus} init_args_num_cpus={ray_cpus} "
                  f'init_args_logging_level="error" init_args_log_to_driver=false')
    done = coordinator.flwr("run", str(coordinator.app_dir), CONNECTION, "--run-config", str(overrides),
                            "--federation-config", federation, "--format", "json", timeout=300)
    try:
        return int(json.loads(done.stdout)["run-id"])
    except (json.JSONDecodeError, KeyError):
        raise RuntimeError(f"flwr run failed: {(done.stdout + done.stderr).strip()[-1500:]}") from None


def run_size(sites: int, work: Path, data_dir: Path, timeout: float, client_cpus: int = 1,
             ray_cpus: int | None = None) -> dict:
    ray_cpus = ray_cpus or len(os.sched_getaffinity(0))
    out = work / f"sites-{sites}"
    coordinator = Coordinator(work / f"coordinator-{sites}")
    row = {"sites": sites, "actors": ray_cpus // client_cpus, "completed": False, "status": "not started",
           "load": os.getloadavg()[0]}
    coordinator.start(120)
    sampler = TreeSampler(coordinator.procs[0].pid)
    sampler.start()
    try:
        config = {**STUDY, "sim-data-dir": str(data_dir), "out-dir": str(out), "min-sites": sites,
                  "round-timeout": timeout}
        started = time.monotonic()
        run_id = submit(coordinator, config, sites, client_cpus, ray_cpus)
        deadline, seen = started + timeout * (ROUNDS + 1), {}
        status = "running"
        while time.monotonic() < deadline:
            time.sleep(1.0)
            for record in _records(out / ROUNDS_FILE):
                seen.setdefault(record["round"], (time.monotonic(), record))
            if len(seen) >= ROUNDS or not coordinator.alive().get("superlink", False):
                status = coordinator.run_status(run_id)
                if status.startswith("finished") or len(seen) >= ROUNDS:
                    break
            elif int(time.monotonic() - started) % 20 == 0:
                status = coordinator.run_status(run_id)
                if status.startswith("finished"):
                    break
        for _ in range(60):  # the run ends after the last round's record: wait for its summary
            status = coordinator.run_status(run_id)
            if status.startswith("finished") or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        wall = time.monotonic() - started
        rounds = [seen[r][1] for r in sorted(seen)]
        row.update(status=status, wall_s=wall, rounds=[r["seconds"] for r in rounds],
                   replied=[len(r.get("sites_replied", [])) for r in rounds])
        if rounds:
            first_seen, first = seen[min(seen)]
            row["startup_s"] = first_seen - started - first["seconds"]
        row["completed"] = (status == "finished:completed" and len(rounds) == ROUNDS
                            and all(n == sites for n in row["replied"]) and (out / SUMMARY_FILE).exists())
        if not row["completed"]:
            row["log_tail"] = "\n".join(coordinator.run_log(run_id).strip().splitlines()[-12:])
    finally:
        sample = sampler.stop()
        coordinator.stop()
    db = sum(f.stat().st_size for f in coordinator.state_dir.glob("superlink.db*"))  # with its WAL
    row["load"] = max(row["load"], os.getloadavg()[0])  # other jobs on the machine (1-minute load average)
    row.update(peak_pss_mb=sample.peak_pss_mb, peak_rss_mb=sample.peak_rss_mb, processes=sample.peak_processes,
               superlink_peak_mb=max(sample.superlink_rss_mb, default=0.0),
               at_peak={k: round(v) for k, v in sorted(sample.at_peak.items(), key=lambda kv: -kv[1])},
               superlink_start_mb=next((m for m in sample.superlink_rss_mb if m > 0), 0.0),
               state_db_mb=db / 2**20)
    return row


def _records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def run(full: bool) -> list[Figure]:
    data_dir, _ = resolve_data_dir(None)
    sizes = (10, 100, 1000) if full else (10,)  # quick: the pass stays under 10 min; --full for 100 and 1000
    rows = []
    with tempfile.TemporaryDirectory(prefix="carefl-scale-") as tmp:
        for sites in sizes:
            row = run_size(sites, Path(tmp), data_dir, timeout=1800 if sites >= 1000 else 600)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
            if row.get("log_tail"):
                print(row["log_tail"], flush=True)
    table = []
    for r in rows:
        steady = r.get("rounds", [])[1:]
        table.append([r["sites"], r["actors"], f"{r.get('startup_s', float('nan')):.0f}",
                      f"{r['rounds'][0]:.1f}" if r.get("rounds") else "–",
                      f"{statistics.mean(steady):.1f}" if steady else "–",
                      f"{r['peak_pss_mb'] / 1024:.2f}", r["processes"],
                      f"{r['superlink_start_mb']:.0f} → {r['superlink_peak_mb']:.0f}", f"{r['state_db_mb']:.1f}",
                      "yes" if r["completed"] else f"no ({r['status']})"])
    biggest = rows[-1]
    goal_row = next((r for r in rows if r["sites"] == GOAL_SITES), None)
    met = None if goal_row is None else bool(goal_row["completed"] and goal_row["peak_pss_mb"] / 1024 <= GOAL_GB)
    steady = biggest.get("rounds", [])[1:]
    ours = (f"{biggest['sites']} sites: {statistics.mean(steady):.1f} s per steady-state round, "
            f"peak {biggest['peak_pss_mb'] / 1024:.2f} GB (PSS of the process tree), "
            f"{'all sites every round' if biggest['completed'] else 'did not complete'}"
            if steady else f"{biggest['sites']} sites: did not complete ({biggest['status']})")
    return [Figure(
        key="scale",
        title="Scale (simulation)",
        command="python -m benchmarks --only scale" + (" --full" if full else ""),
        goal=f"{GOAL_SITES} simulated sites per round within {GOAL_GB:g} GB on 2 cores"
             + ("" if full else " (1000 sites run with --full only)"),
        anchor="Flower's Ray simulation engine running carefl's real ServerApp and ClientApp",
        ours=ours,
        met=met,
        table=markdown_table(["sites", "Ray actors", "start-up (s)", "round 1 (s)", "later rounds (s/round)",
                              "peak memory (GB)", "processes", "SuperLink RSS (MB)", "state DB (MB)",
                              "all sites, every round"], table),
        notes=(f"{ROUNDS} rounds, FedAvg, ehr-logreg, {STUDY['local-steps']} local steps, no DP, every site "
               "trains and evaluates every round (min-sites = all). Ray actors = cores / client-resources "
               "num-cpus (1). Peak memory: sum of PSS over the SuperLink and all its descendants, sampled "
               "every 0.5 s. Start-up: submit → round 1 begins (Ray, actors, handshake with every site). "
               "Load average of the machine (other jobs included) around the runs: "
               + ", ".join(f"{r['sites']} sites {r['load']:.1f}" for r in rows) + ". "
               f"At the peak of {biggest['sites']} sites (MB): "
               + ", ".join(f"{kind} {mb}" for kind, mb in biggest.get("at_peak", {}).items()) + "."),
    )]


if __name__ == "__main__":
    import sys
    data, _ = resolve_data_dir(None)
    with tempfile.TemporaryDirectory(prefix="carefl-scale-") as tmp:
        for n in [int(a) for a in sys.argv[1:]] or [10]:
            result = run_size(n, Path(tmp), data, timeout=1800)
            print(json.dumps(result, indent=1), flush=True)
