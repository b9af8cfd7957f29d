"""Run the benchmarks, print each figure, and refresh its block in docs/BENCHMARKS.md.

    python -m benchmarks                 # quick pass (`make bench`, under 10 minutes on 2 cores)
    python -m benchmarks --full          # every figure at full size (hours: 1000 simulated sites, 5 seeds, ...)
    python -m benchmarks --only aggregation,scale [--no-write]

Each module runs in its own process, so one benchmark's threads, imports and memory never colour
another's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.figures import Figure, update_document

# In the order of docs/BENCHMARKS.md.
MODULES = ["dp_overhead", "seg_dp_overhead", "deployment_overhead", "reconnect", "aggregation", "attacks", "secure_aggregation", "scale",
           "heart_disease_results", "seg_results", "seg_dp_finetune", "dp_evaluation", "egress_guard"]
DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size runs (hours)")
    parser.add_argument("--only", default="", help=f"comma-separated of: {', '.join(MODULES)}")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    chosen = [m for m in args.only.split(",") if m] or MODULES
    unknown = sorted(set(chosen) - set(MODULES))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    produced: list[Figure] = []
    failed = []
    for module in chosen:
        start = time.monotonic()
        print(f"\n=== {module} {'(full)' if args.full else '(quick)'}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "figures.json"
            cmd = [sys.executable, "-m", "benchmarks.figures", module, str(out)] + (["--full"] if args.full else [])
            if subprocess.run(cmd, env=env).returncode != 0 or not out.exists():
                failed.append(module)
                print(f"=== {module} FAILED (see above); its figures keep their last text", flush=True)
                continue
            figures = [Figure(**{**f, "full": args.full}) for f in json.loads(out.read_text())]
        for fig in figures:
            print(f"\n## {fig.title}\n\n{fig.markdown()}\n", flush=True)
        produced += figures
        print(f"=== {module}: {len(figures)} figure(s) in {time.monotonic() - start:.0f} s", flush=True)
    if produced and not args.no_write:
        appended = update_document(DOCUMENT, produced)
        print(f"\nwrote {len(produced)} figure(s) to {DOCUMENT}" + (f"; new sections: {', '.join(appended)}" if appended else ""))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
