"""Reproduce docs/RESULTS.md: heart-disease accuracy of each strategy on the FLamby split.

Runs the real ServerApp/ClientApp on Flower's simulation engine with the four hospitals as four
sites (partition i → centre i, exactly the FLamby split), several seeds per strategy, and prints
mean ± sd of the mean-centre accuracy next to FLamby's published figures.

    python -m benchmarks.heart_disease_results [--seeds 5] [--rounds 15] [--out runs/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from client.data_dir import resolve_data_dir
from deploy.local import LocalFederation
from server.run_dir import SUMMARY_FILE

FLAMBY = {"fedavg": "0.685 ± 0.028", "fedprox": "0.685 ± 0.028", "fedadam": "0.726 ± 0.014",
          "fedyogi": "0.731 ± 0.013"}
# Local SGD learning rate and server learning rate used for each strategy (see docs/RESULTS.md).
SETTINGS = {
    "fedavg": {"lr": 0.05},
    "fedprox": {"lr": 0.05, "proximal-mu": 0.01},
    "fedadam": {"lr": 0.01, "server-lr": 0.1, "server-tau": 1e-3},
    "fedyogi": {"lr": 0.01, "server-lr": 0.1, "server-tau": 1e-3},
}


def wait(fed: LocalFederation, run_id: int, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = fed.run_status(run_id)
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise TimeoutError(f"run {run_id} did not finish in {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-steps", type=int, default=100)
    parser.add_argument("--strategies", default=",".join(SETTINGS))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/results"))
    args = parser.parse_args()
    data_dir, _ = resolve_data_dir(args.data_dir)
    out = args.out.resolve()
    results: dict[str, list[dict]] = {}
    with LocalFederation(out / "deployment", {}, simulated_sites=4) as fed:
        for strategy in args.strategies.split(","):
            for seed in range(42, 42 + args.seeds):
                run_out = out / f"{strategy}-seed{seed}"
                config = {"strategy": strategy, "seed": seed, "num-server-rounds": args.rounds,
                          "local-steps": args.local_steps, "batch-size": 4, "dp": False, "sim-data-dir": str(data_dir),
                          "out-dir": str(run_out), "min-sites": 4, **SETTINGS[strategy]}
                status = wait(fed, fed.submit(config))
                summary = json.loads((run_out / SUMMARY_FILE).read_text())
                results.setdefault(strategy, []).append(summary)
                print(f"{strategy} seed {seed}: {status}, mean-centre accuracy "
                      f"{summary['mean_centre_accuracy']:.3f}, pooled {summary['pooled_accuracy']:.3f}", flush=True)

    print(f"\n{args.rounds} rounds × {args.local_steps} local SGD steps, batch 4, {args.seeds} seeds (42…)")
    print("| strategy | local lr | server lr | mean-centre accuracy | pooled accuracy | pooled AUC | FLamby |")
    print("|---|---|---|---|---|---|---|")
    for strategy, runs in results.items():
        def stat(key: str) -> str:
            values = [r[key] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {sd:.3f}"
        print(f"| {strategy} | {SETTINGS[strategy]['lr']} | {SETTINGS[strategy].get('server-lr', '–')} | "
              f"{stat('mean_centre_accuracy')} | "
              f"{stat('pooled_accuracy')} | {stat('pooled_auc')} | {FLAMBY[strategy]} |")


if __name__ == "__main__":
    main()
