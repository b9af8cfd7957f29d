"""One benchmark figure, and how it lands in docs/BENCHMARKS.md.

Each benchmark module exposes ``run(full: bool) -> list[Figure]``. ``python -m benchmarks`` runs
them and replaces, in docs/BENCHMARKS.md, only the text between ``<!-- bench:KEY -->`` and
``<!-- /bench:KEY -->`` for each figure it produced; the prose around the markers is hand-written
and stays. A figure a pass did not produce (``--full`` only, or ``--only``) keeps its last text.
"""

from __future__ import annotations

import datetime
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Figure:
    key: str            # marker name in docs/BENCHMARKS.md, e.g. "dp-cost-ehr"
    title: str
    command: str        # the command that reproduces exactly this table
    goal: str           # e.g. "DP step ≤ 2× the non-DP step"
    anchor: str         # what we compare with (a peer's figure, a plain-numpy/Flower baseline, ...)
    ours: str           # the headline number(s), one line
    met: bool | None    # None: no pass/fail (context figure)
    table: str          # markdown table
    notes: str = ""     # short measured caveats (generated text only; prose belongs outside the markers)
    full: bool = False  # produced by a full-size pass; a quick pass never overwrites such a block

    def markdown(self) -> str:
        verdict = {True: "**met**", False: "**not met**", None: "context"}[self.met]
        lines = [
            f"`{self.command}` — {FULL_MARK if self.full else 'quick pass'}, {machine()}, "
            f"{datetime.date.today().isoformat()}",
            "",
            f"- Goal: {self.goal} — {verdict}",
            f"- Anchor: {self.anchor}",
            f"- Ours: {self.ours}",
            "",
            self.table.strip(),
        ]
        if self.notes:
            lines += ["", self.notes.strip()]
        return "\n".join(lines)


FULL_MARK = "full pass"


def machine() -> str:
    import os
    return (f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}"
            + (", CUDA" if torch.cuda.is_available() else ", no GPU"))


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _pattern(key: str) -> re.Pattern:
    return re.compile(rf"(<!-- bench:{re.escape(key)} -->\n)(.*?)(<!-- /bench:{re.escape(key)} -->)", re.S)


def update_document(path: Path, figures: list[Figure]) -> list[str]:
    """Replace each figure's marked block in ``path``; return the keys that had no markers (appended).
    A quick figure leaves a block written by a full pass alone (it says so on its first line)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    missing = []
    for fig in figures:
        block = fig.markdown()
        pattern = _pattern(fig.key)
        found = pattern.search(text)
        if found and not fig.full and FULL_MARK in found.group(2).split("\n", 1)[0]:
            continue
        if found:
            text = pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(3), text, count=1)
        else:
            missing.append(fig.key)
            text = text.rstrip("\n") + f"\n\n## {fig.title}\n\n<!-- bench:{fig.key} -->\n{block}\n<!-- /bench:{fig.key} -->\n"
    path.write_text(text, encoding="utf-8")
    return missing


def run_module(module: str, full: bool, out: Path) -> None:
    """Entry point of one benchmark subprocess: ``python -m benchmarks.figures MODULE OUT.json [--full]``."""
    import dataclasses
    import importlib
    import json
    figures = importlib.import_module(f"benchmarks.{module}").run(full)
    out.write_text(json.dumps([dataclasses.asdict(f) for f in figures]), encoding="utf-8")


if __name__ == "__main__":
    import sys
    run_module(sys.argv[1], "--full" in sys.argv[3:], Path(sys.argv[2]))
