"""Shared test helpers: the real data directory, real site configs, the app's run config, the `carefl`
CLI in a subprocess, a running loopback consortium."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from deploy.coordinator.superlink import Coordinator

REPO = Path(__file__).resolve().parent.parent


def in_ci() -> bool:
    """Whether this is a CI run (``$CI`` is ``true``, any case)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def data_root() -> Path:
    """The real data directory: ``$CAREFL_DATA``, else ../shared/data beside the repo."""
    return Path(os.environ.get("CAREFL_DATA", REPO.parent / "shared" / "data"))


def require_data(path: Path, what: str = "real data") -> Path:
    """``path`` if it exists. Otherwise skip the test, or, in CI (where the data must be there), fail it;
    either way naming the missing path."""
    if not path.exists():
        message = f"{what} not found: {path} is missing"
        if in_ci():
            pytest.fail(f"{message} (CI=true: data sets must be present, set $CAREFL_DATA)", pytrace=False)
        pytest.skip(message)
    return path


def data_dir() -> Path:
    """The real data directory with the UCI heart-disease files in it (else skip, or fail in CI)."""
    root = data_root()
    require_data(root / "uci_heart_disease", "real heart-disease data")
    return root


def shared_data(sub: str) -> Path:
    """A folder (or file) of the real shared data (else skip, or fail in CI)."""
    return require_data(data_root() / sub, "real imaging data")


def site_config(folder: Path, centre: str, **policy) -> Path:
    """A real site config file for one hospital of the real data, with a ledger beside it."""
    from client.ingest.heart_disease import centre_file
    from client.site import write_site_config

    policy = {"epsilon_budget": 10.0, "delta": 1e-4, **policy}
    return write_site_config(folder / centre / "site.toml", centre, centre_file(data_dir(), centre),
                             device="cpu", **policy)


def default_run_config(**overrides) -> dict:
    """The app's own run config from pyproject.toml, with overrides."""
    from deploy.coordinator.follow import app_run_config

    return app_run_config(**overrides)


class Replied:
    """A Flower Grid whose nodes have already replied: ``send_and_receive`` hands back these replies."""

    def __init__(self, replies):
        self.replies = replies

    def get_node_ids(self):
        return [r.metadata.src_node_id for r in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.replies)


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.5 s; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def hippocampus_cases():
    """The MSD hippocampus cases of the real data (else skip, or fail in CI)."""
    from deploy.datasets import hippocampus

    root = data_root()
    require_data(root / hippocampus.FOLDER, "hippocampus data")
    return hippocampus.cases(root)


def hippocampus_site(folder: Path, site_id: str, site_cases, max_sample_rate: float = 0.6, **policy) -> Path:
    """A site config for ``site_cases`` (every third case in the test split), DP policy for small crops."""
    from deploy.datasets import hippocampus
    from client.site import write_site_config

    rows = [(c.case_id, c.image, c.label, "test" if i % 3 == 2 else "train") for i, c in enumerate(site_cases)]
    manifest = hippocampus.write_manifest(folder / site_id / "hippocampus.csv", rows)
    return write_site_config(folder / site_id / "site.toml", site_id, manifest, device="cpu",
                             dataset="hippocampus", manifest=True, labels=[0, 1, 2], epsilon_budget=50.0,
                             delta=1e-3, max_sample_rate=max_sample_rate, min_noise_multiplier=0.3, **policy)


# ---- one DP training message for the ClientApp, and a fresh context (as a restarted agent has) ----

DP_SIGMA, DP_CLIP, DP_BATCH, DP_EPOCHS = 1.1, 1.0, 8, 1


def dp_train_message(server_round: int, **overrides):
    """A TRAIN message for ``ehr-logreg`` with DP (σ, clip, batch, epochs as above), seeded model."""
    import torch
    from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, MessageType, Metadata, RecordDict
    from flwr.app.message import make_message

    from shared_models.registry import build_model

    torch.manual_seed(0)
    model = build_model("ehr-logreg", n_features=13)
    config = {"model": "ehr-logreg", "local-steps": 0, "local-epochs": DP_EPOCHS, "batch-size": DP_BATCH,
              "optimizer": "sgd", "lr": 0.05, "seed": 1, "server-round": server_round, "dp": True,
              "noise-multiplier": DP_SIGMA, "clip-norm": DP_CLIP, "target-epsilon": 0.0, "num-server-rounds": 3,
              **overrides}
    meta = Metadata(run_id=11, message_id=f"m{server_round}-{time.time_ns()}", src_node_id=1, dst_node_id=5,
                    reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=DEFAULT_TTL,
                    message_type=MessageType.TRAIN)
    return make_message(metadata=meta, content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                                           "config": ConfigRecord(config)}))


def fresh_context(site_toml):
    """A fresh context, as a restarted agent (new SuperNode, new ClientApp process) would have."""
    from flwr.app import Context, RecordDict

    return Context(run_id=11, node_id=5, node_config={"site-config": str(site_toml)}, state=RecordDict(),
                   run_config={})


# ---- the `carefl` CLI in a subprocess, leaving no Flower process behind ----

CAREFL = [sys.executable, "-m", "deploy.cli"]
FLOWER_BINARIES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp",
                   "flwr-clientapp", "flwr-simulation", "deploy.site.gate", "deploy.site.warm", "bin/carefl")


def flower_pids_mentioning(marker: str) -> list[int]:
    """Flower processes whose command line or environment mentions ``marker`` (our run's folder)."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(b in cmd for b in FLOWER_BINARIES) and (marker in cmd or marker in env):
            found.append(pid)
    return found


def run_carefl(args: list[str], tmp_path: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`carefl ARGS` in ``tmp_path`` on the real data; kills (and fails on) any Flower process it left."""
    from deploy.processes import NO_PHONE_HOME

    env = {**os.environ, **NO_PHONE_HOME, "CAREFL_DATA": str(data_dir()), "COLUMNS": "120", **(env or {})}
    try:
        return subprocess.run(CAREFL + args, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=tmp_path, stdin=subprocess.DEVNULL)
    finally:
        leftovers = flower_pids_mentioning(str(tmp_path))
        for pid in leftovers:  # never leave a process behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left running: {leftovers}"


# ---- a real loopback consortium: kits, a TLS coordinator, one site agent per site ----

def consortium_spec(folder: Path, sites, port: int) -> Path:
    """A consortium.toml for ``sites`` with a coordinator on 127.0.0.1:``port``."""
    spec = folder / "consortium.toml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(f'[consortium]\nname = "t"\n[coordinator]\nhosts = ["127.0.0.1"]\nport = {port}\n'
                    f'listen-host = "127.0.0.1"\n' + "".join(f"[sites.{s}]\n" for s in sites))
    return spec


def add_dataset(site_toml: Path, centre: str) -> None:
    """What the site's data scientist does to the kit's template: name the data and a budget."""
    add_dataset_with_policy(site_toml, centre)


def add_dataset_with_policy(site_toml: Path, centre: str, **policy) -> None:
    """``add_dataset``, with more settings of the dataset's policy (e.g. ``accountant="rdp"``)."""
    from client.ingest.heart_disease import centre_file
    from deploy.coordinator.superlink import toml_value

    policy = {"epsilon_budget": 10.0, "delta": 1e-4, **policy}
    settings = "".join(f"{key} = {toml_value(value)}\n" for key, value in policy.items())
    with site_toml.open("a") as fh:
        fh.write(f'\n[datasets.heart-disease]\npath = "{centre_file(data_dir(), centre)}"\n{settings}')


class SuperLinkLog:
    """The lines a coordinator's SuperLink appends to ``<state dir>/superlink.log`` from now on: reading them
    costs nothing, unlike a question to the SuperLink (each one a `flwr` process, about a CPU-second)."""

    def __init__(self, coord: Coordinator) -> None:
        self.path = Path(coord.state_dir) / "superlink.log"
        self.offset, self.partial = self._size(), b""

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def new_lines(self) -> str:
        """Whole lines appended since the last call (the log is only ever appended to, across restarts)."""
        size = self._size()
        if size < self.offset:  # a new file: read it from its start
            self.offset, self.partial = 0, b""
        if size == self.offset:
            return ""
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = self.partial + fh.read(size - self.offset)
        self.offset = size
        done, _, self.partial = data.rpartition(b"\n")
        return done.decode(errors="replace")


# a SuperNode (re)connected: the event every wait for sites to be online is waiting for
NODE_EVENT = re.compile(r"Activated node_id=")


def wait_for_superlink(coord: Coordinator, ask, timeout: float, what: str, event: re.Pattern = NODE_EVENT,
                       every: float = 10.0, gap: float = 2.0, final: bool = False) -> None:
    """``wait_for`` for a predicate that asks the SuperLink through Flower's CLI (``ask``): asked at once, then
    as soon as the SuperLink logs a line matching ``event`` (``final``: and every ``gap`` s from then on),
    otherwise every ``every`` s, never twice within ``gap`` s, and once more at the deadline. (Asking every
    second, a `flwr` process each time, kept a CPU core busy during every wait, slowing down everything else
    the suite runs meanwhile.)"""
    log = SuperLinkLog(coord)  # before the first question: no event after it is missed
    deadline = time.monotonic() + timeout
    asked, hinted = -math.inf, False
    while True:
        hinted = hinted or bool(event.search(log.new_lines()))
        now = time.monotonic()
        last = now >= deadline
        if last or (now - asked >= gap and (hinted or now - asked >= every)):
            asked, hinted = now, hinted and final
            if ask():
                return
            if last:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def wait_online(coord: Coordinator, sites: list[str], timeout: float = 120.0) -> None:
    """Until every one of ``sites`` is online at the coordinator; AssertionError after ``timeout``."""
    ids = {coord.site_nodes()[s] for s in sites}

    def online() -> bool:
        return ids <= {str(n["node-id"]) for n in coord.nodes() if n.get("status") == "online"}

    try:
        wait_for_superlink(coord, online, timeout, f"sites {sites} to be online")
    except AssertionError:
        raise AssertionError(f"sites {sites} not online after {timeout:.0f}s: {coord.nodes()}") from None


def wait_run(coord: Coordinator, run_id: int, timeout: float = 300.0) -> str:
    """The run's final status once it is ``finished:…``; AssertionError after ``timeout``. Flower is asked when
    the SuperLink logs the end of the run's ServerApp task (or every few seconds)."""
    status = ["unknown"]

    def finished() -> bool:
        status[0] = coord.run_status(run_id)
        return status[0].startswith("finished")

    try:
        wait_for_superlink(coord, finished, timeout, f"run {run_id}", every=15.0, final=True,
                           event=re.compile(rf"Finished task \d+ of run {run_id}\b"))
    except AssertionError:
        raise AssertionError(f"run {run_id} still {status[0]} after {timeout:.0f}s") from None
    return status[0]


@contextmanager
def running_consortium(root: Path, sites: dict[str, str], unapproved: tuple[str, ...] = ()):
    """Kits, a coordinator and one `carefl site start` agent per site (site → heart-disease centre),
    every site approving the app except ``unapproved``; all stopped by pid on the way out."""
    with running_consortium_with_policy(root, sites, unapproved) as consortium:
        yield consortium


@contextmanager
def running_consortium_with_policy(root: Path, sites: dict[str, str], unapproved: tuple[str, ...] = (), **policy):
    """``running_consortium`` whose sites' heart-disease policy has these settings too, e.g. ``accountant="rdp"``
    where a study is not about the accountant: PRV's composition at every plan and charge of a site costs
    seconds of CPU per run, and on 2 cores that slows every test running meanwhile."""
    from deploy import processes
    from deploy.coordinator.provision import load_consortium, provision
    from deploy.coordinator.superlink import Coordinator
    from deploy.site.approval import app_hash, approve

    data_dir()
    kits = root / "kits"
    provision(load_consortium(consortium_spec(root, sites, processes.free_port())), kits)
    coord = Coordinator(root / "state", kits / "coordinator")
    agents = []
    try:
        coord.start()
        digest = app_hash(coord.app_dir)
        for site, centre in sites.items():
            add_dataset_with_policy(kits / site / "site.toml", centre, **policy)
            if site not in unapproved:
                approve(kits / site / "site.toml", digest)
            agents.append(processes.start(
                site, [processes.tool("carefl"), "site", "start", "--kit", str(kits / site), "--config",
                       str(kits / site / "site.toml"), "--runtime-port", str(processes.free_port())],
                processes.flower_env(root / site), root / site / "agent.log"))
        wait_online(coord, list(sites))
        yield {"root": root, "kits": kits, "coord": coord, "digest": digest}
    finally:
        for agent in agents:
            agent.stop()
        coord.stop()
