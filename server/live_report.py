"""Keep a running coordinator's report.html (and, when asked, its TensorBoard log) up to date.

``RunReporter`` is called by the ServerApp after each round and once at the end, including the end
of a failed run. Rendering never fails a run: a problem is logged as a warning and the run goes on.
During the run, report.html is refreshed only when the last refresh is old enough (at least
``REFRESH_SECONDS`` and ten times what a render takes), so fast runs pay for one render, at the
end, and long runs (imaging rounds take minutes) show their progress.

TensorBoard (run config ``tensorboard = true``, ``--tensorboard`` on the run commands): scalars per
round in ``<run dir>/tensorboard/`` — ``<metric>/<site>`` for each site's test metrics, training
loss and ε, ``federation/<metric>`` for the pooled and mean-centre metrics (their noise std stays in the
run directory and the report). Only numbers the coordinator already holds. Needs the ``tensorboard``
package, imported only when asked for.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from server.report import write_report
from server.run_dir import METRICS_FILE, ROUNDS_FILE, read_jsonl

log = logging.getLogger("flwr")

REFRESH_SECONDS = 30.0
TENSORBOARD_DIR = "tensorboard"
# Per-site record keys that are not metrics (or are not worth a chart of their own).
NOT_SCALARS = {"round", "site", "error", "dp", "delta", "clip_norm", "sample_rate", "local_steps", "weight",
               "num_test", "noise_multiplier", "eval_dp", "eval_noise_std", "eval_noise_multiplier", "eval_l2_bound"}
STD_SUFFIX = "_std"  # a figure's noise std (server/metrics.py)


class TensorBoardUnavailable(RuntimeError):
    """``tensorboard = true`` but the tensorboard package is not installed."""


def tensorboard_writer(folder: Path):
    """torch's SummaryWriter on ``folder``; TensorBoardUnavailable if the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorBoardUnavailable("tensorboard = true, but the tensorboard package is not installed "
                                     "(pip install tensorboard; it is in requirements.lock.txt)") from None
    return SummaryWriter(log_dir=str(folder))


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def round_scalars(run_dir: Path, server_round: int) -> dict[str, float]:
    """The TensorBoard scalars of one round, read back from the run directory (tag → value)."""
    scalars: dict[str, float] = {}
    for record in read_jsonl(run_dir / METRICS_FILE):
        if record.get("round") != server_round or "site" not in record:
            continue
        for key, value in record.items():
            v = _number(value)
            if key not in NOT_SCALARS and not key.endswith(STD_SUFFIX) and v is not None:
                scalars[f"{key}/{record['site']}"] = v
    for record in read_jsonl(run_dir / ROUNDS_FILE):
        if record.get("round") == server_round:
            scalars.update({f"federation/{k}": float(v) for k, v in record.items()
                            if k not in ("round", "sites_replied") and not k.endswith(STD_SUFFIX)
                            and _number(v) is not None})
    return scalars


class RunReporter:
    def __init__(self, run_dir: Path, tensorboard: bool = False, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.run_dir = Path(run_dir)
        self.refresh_seconds = refresh_seconds
        self._last_render = time.monotonic()  # the first refresh comes a full interval into the run
        self._render_cost = 0.0
        self._writer = None
        if tensorboard:
            try:
                self._writer = tensorboard_writer(self.run_dir / TENSORBOARD_DIR)
                log.info("TensorBoard log: %s", self.run_dir / TENSORBOARD_DIR)
            except TensorBoardUnavailable as exc:
                log.warning("%s; the run goes on without a TensorBoard log", exc)
            except Exception as exc:  # noqa: BLE001 - reporting never stops a run
                log.warning("TensorBoard log not started (%s: %s); the run goes on", type(exc).__name__, exc)

    def round_done(self, server_round: int) -> None:
        """After a round was recorded: its TensorBoard scalars; report.html when a refresh is due."""
        if self._writer is not None:
            try:
                for tag, value in round_scalars(self.run_dir, server_round).items():
                    self._writer.add_scalar(tag, value, server_round)
                self._writer.flush()
            except Exception as exc:  # noqa: BLE001
                log.warning("TensorBoard: round %d not logged (%s: %s)", server_round, type(exc).__name__, exc)
        since = time.monotonic() - self._last_render
        if since >= max(self.refresh_seconds, 10 * self._render_cost):
            self.render()

    def render(self) -> Path | None:
        started = time.monotonic()
        try:
            return write_report(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - a report problem must never fail the run
            log.warning("run report not written (%s: %s); `carefl report %s` writes it later",
                        type(exc).__name__, exc, self.run_dir)
            return None
        finally:
            self._last_render = time.monotonic()
            self._render_cost = self._last_render - started

    def close(self) -> None:
        """At the end of the run, completed or not: the final report.html; close TensorBoard."""
        path = self.render()
        if path is not None:
            log.info("run report: %s", path)
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("TensorBoard log not closed cleanly (%s)", exc)
            self._writer = None
