"""What the site's egress guard costs per message, beside the round it guards (issue 17: ≤ 1 % of a seg round).

One real site of MSD hippocampus volumes (the demo's preprocessing, 48×64×48) answers real train messages
through the ClientApp in this process: the demo's DP fine-tuning round (``SEG_DP_FINETUNE``: norms and
head, 2 full-batch steps) and a round training every U-Net parameter (4-patient batches, 2 steps). For
each reply the guard's own work is timed as the gate does it: reading the instruction's arrays at intake
(``egress_hook.instruction_of``), inflating the reply from its serialised objects (what
``flower_seam.reply_with_content`` does with the object store's bytes) and ``egress.check_reply`` with
the site's ledger. Median of repeats, one torch thread.

    python -m benchmarks.egress_guard [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, MessageType, Metadata, RecordDict
from flwr.app.message import make_message

from benchmarks.figures import Figure, markdown_table
from client import client_app
from client.site import load_site_config, write_site_config
from deploy.datasets import hippocampus
from deploy.datasets.data_dir import resolve_data_dir
from deploy.site import egress
from deploy.site.egress_hook import instruction_of
from deploy.site.flower_seam import inflate_message
from shared_models.registry import build_model
from shared_models.tasks import SEG_DP_FINETUNE

GOAL = 0.01  # the guard's time per reply over the round's time at the site
ROUNDS = {"DP fine-tuning (demo: norms + head)": {**SEG_DP_FINETUNE},
          "DP training, all parameters": {"train-params": "all", "optimizer": "sgd", "lr": 0.05, "batch-size": 4,
                                          "local-steps": 2, "local-epochs": 1, "clip-norm": 1.0}}


def _contents(message) -> dict[str, bytes]:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


def _site(folder: Path, n_cases: int) -> Path:
    data_dir = resolve_data_dir(None)[0]
    cases = hippocampus.private_cases(hippocampus.cases(data_dir))[:n_cases]
    rows = [(c.case_id, c.image, c.label, "test" if k % 6 == 5 else "train") for k, c in enumerate(cases)]
    manifest = hippocampus.write_manifest(folder / "hippocampus.csv", rows)
    return write_site_config(folder / "site.toml", "bench", manifest, dataset="hippocampus", manifest=True,
                             labels=sorted(hippocampus.LABELS), epsilon_budget=1e6, delta=1e-3, max_sample_rate=1.0,
                             min_noise_multiplier=0.3, device="cpu", max_physical_batch=16)


def _message(server_round: int, settings: dict):
    torch.manual_seed(0)
    model = build_model("seg-unet3d")
    config = {"model": "seg-unet3d", "seed": 1, "server-round": server_round, "dp": True, "noise-multiplier": 1.0,
              "target-epsilon": 0.0, "num-server-rounds": 1000, **settings}
    metadata = Metadata(run_id=3, message_id="", src_node_id=1, dst_node_id=2, reply_to_message_id="",
                        group_id=str(server_round), created_at=time.time(), ttl=DEFAULT_TTL,
                        message_type=MessageType.TRAIN)
    message = make_message(metadata=metadata, content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                                                  "config": ConfigRecord(config)}))
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def measure(repeats: int, n_cases: int = 24) -> list[list[object]]:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        toml = _site(Path(tmp), n_cases)
        site = load_site_config(toml)
        run_config = {"task": "seg"}
        for k, (label, settings) in enumerate(ROUNDS.items()):
            context = Context(run_id=3, node_id=2, node_config={"site-config": str(toml)}, state=RecordDict(),
                              run_config=run_config)
            client_app.train(_message(100 * k + 1, settings), context)  # warm-up: preprocessing cache, imports
            message = _message(100 * k + 2, settings)
            started = time.perf_counter()
            reply = client_app.train(message, context)
            round_s = time.perf_counter() - started
            assert not reply.has_error(), reply.error.reason
            incoming, outgoing = _contents(message), _contents(reply)
            size = sum(len(c) for c in outgoing.values())
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                instruction = instruction_of(message, dict(incoming))  # inflating consumes the dict
                whole = inflate_message(list(outgoing)[-1], dict(outgoing))  # the root comes last
                verdict = egress.check_reply(egress.Reply(whole, size), instruction, site, run_config, 3)
                times.append(time.perf_counter() - started)
            assert verdict == egress.ALLOWED, verdict
            guard_s = statistics.median(times)
            rows.append([label, f"{size / 1024:.0f} KiB", f"{round_s:.2f} s", f"{guard_s * 1000:.1f} ms",
                         f"{100 * guard_s / round_s:.2f} %"])
            print(f"{label}: reply {size / 1024:.0f} KiB, round {round_s:.2f} s, guard {guard_s * 1000:.1f} ms",
                  flush=True)
    return rows


def run(full: bool) -> list[Figure]:
    rows = measure(repeats=30 if full else 10)
    shares = [float(r[-1].rstrip(" %")) / 100 for r in rows]
    return [Figure(
        key="egress-guard", title="Egress guard: cost per reply beside the seg round it guards",
        command="python -m benchmarks.egress_guard",
        goal=f"guard time per reply ≤ {GOAL:.0%} of a seg round at the site",
        anchor="the same site's train round (real ClientApp, real Opacus, real hippocampus volumes)",
        ours=", ".join(f"{r[0]}: {r[-1]}" for r in rows), met=max(shares) <= GOAL,
        table=markdown_table(["round", "reply", "round at the site", "guard per reply", "share"], rows),
        notes="Guard = reading the instruction's arrays at intake + inflating the reply + all rules (ledger read "
              "included); the gate also waits for the ClientApp's objects, which Flower's own push waits for too.")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(markdown_table(["round", "reply", "round at the site", "guard per reply", "share"], measure(args.repeats)))


if __name__ == "__main__":
    main()
