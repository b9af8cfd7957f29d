"""The site's privacy ledger: what each dataset has spent, kept on the site's disk (SQLite).

One row per release: each training round that released weights (run id, round, σ, C, q, steps, δ,
ε after, the number of parameters the round trained — d: fine-tuning a few of them is what makes DP
work), each feature-statistics release (round 0 of its run) and each evaluation release (the test
metrics of a round); ``kind`` says which. The accountant's state for a dataset is the merged list of
its (σ, q, steps) — so ε composes across kinds, rounds, runs and studies, and survives agent and
SuperNode restarts. A release is charged *before* it is computed, in one transaction with the budget
check: a crash after the charge can only over-count, never let a release go unaccounted, and the same
(run, round, kind) is never charged twice. Nothing here can reset a dataset's spending; migrations of
older ledgers copy every row with its id.

Distributed DP (opt-in, docs/PRIVACY.md): a training round whose site added σ/√t of a secure sum's σ records
t (``honest_sites``). Each dataset then has two tracks: its own noise alone (σ as recorded: ``epsilon_after``,
what the site can always state) and the assumption that t honest sites' noise is in the sum (σ·√t per row:
``epsilon_assumed_after``). The policy says which one the budget is checked by; both are recorded.
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from privacy.accounting import Step, epsilon, merge

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset          TEXT    NOT NULL,
    run_id           TEXT    NOT NULL,
    round            INTEGER NOT NULL,
    noise_multiplier REAL    NOT NULL,
    clip_norm        REAL    NOT NULL,
    sample_rate      REAL    NOT NULL,
    steps            INTEGER NOT NULL,
    accountant       TEXT    NOT NULL,
    delta            REAL    NOT NULL,
    epsilon_before   REAL    NOT NULL,
    epsilon_after    REAL    NOT NULL,
    recorded_at      TEXT    NOT NULL,
    trained_parameters INTEGER,           -- d: how many numbers the round trained, noised and sent
    kind             TEXT    NOT NULL DEFAULT 'training',  -- KINDS: what the release was
    honest_sites     INTEGER,             -- t of distributed DP (σ here is the site's share); NULL: 1, own noise
    epsilon_assumed_after REAL,           -- ε after, every row's σ counted as σ·√t; NULL: equal to epsilon_after
    UNIQUE (dataset, run_id, round, kind)
);
"""
KINDS = ("training", "feature-statistics", "evaluation")  # what a release was (`carefl site budget` splits by it)
# Older ledgers gain the newer columns: the trained dimension (old rows keep NULL), the kind (round 0
# was only ever a feature-statistics release), and distributed DP's two (old rows keep NULL: own noise only).
MIGRATIONS = (
    ("trained_parameters", ("ALTER TABLE rounds ADD COLUMN trained_parameters INTEGER",)),
    ("kind", ("ALTER TABLE rounds ADD COLUMN kind TEXT NOT NULL DEFAULT 'training'",
              "UPDATE rounds SET kind = 'feature-statistics' WHERE round = 0")),
    ("honest_sites", ("ALTER TABLE rounds ADD COLUMN honest_sites INTEGER",)),
    ("epsilon_assumed_after", ("ALTER TABLE rounds ADD COLUMN epsilon_assumed_after REAL",)),
)
BUDGET_TRACKS = ("own-noise", "assumed")  # which ε a charge checks the budget by (policy.DISTRIBUTED_DP_BUDGETS)
UNIQUE_COLUMNS = ["dataset", "run_id", "round", "kind"]  # a round's training and its evaluation are two rows


class LedgerError(RuntimeError):
    """The ledger cannot be read or written: the site refuses to train (fail closed)."""


class BudgetExceeded(Exception):
    """This round would take the dataset past its lifetime budget."""

    def __init__(self, dataset: str, spent: float, needed: float, budget: float, delta: float,
                 what: str = "this round", by: str = "own-noise") -> None:
        self.dataset, self.spent, self.needed, self.budget, self.delta = dataset, spent, needed, budget, delta
        self.by = by
        remaining = max(budget - spent, 0.0)
        which = ("the ε assuming the honest sites' noise in the secure sum" if by == "assumed" else
                 "the ε of this site's own noise")
        super().__init__(
            f"privacy budget of dataset '{dataset}' would be exceeded: {what} needs ε={needed - spent:.4g} "
            f"(total {needed:.4g}) but only ε={remaining:.4g} of {budget:g} remains (δ={delta:g}), by {which}"
        )


class AlreadyCharged(Exception):
    """The same (run, round, kind) was already released on this dataset."""


@dataclass(frozen=True)
class Charge:
    """What one charge recorded: the dataset's ε before and after by its own noise, and after under the
    distributed-DP assumption (both tracks are always kept, so either can be stated later)."""

    dataset: str
    epsilon_before: float
    epsilon_after: float          # own noise alone
    delta: float
    accountant: str
    epsilon_assumed_after: float | None = None  # every row's σ counted as σ·√t (None: epsilon_after, as nothing
                                                # was assumed)
    budget_by: str = "own-noise"                # BUDGET_TRACKS: the ε the budget was checked against

    def __post_init__(self) -> None:
        if self.epsilon_assumed_after is None:
            object.__setattr__(self, "epsilon_assumed_after", self.epsilon_after)


def _steps(rows, assumed: bool) -> list[Step]:
    """(σ, q, steps[, t]) rows as accountant steps: σ as recorded (the site's own noise), or σ·√t when
    ``assumed`` (t honest sites each adding σ: the sum carries σ·√t). A missing or NULL t is 1."""
    return merge((row[0] * math.sqrt(row[3]) if assumed and len(row) > 3 and row[3] else row[0], row[1], row[2])
                 for row in rows)


class PrivacyLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect()
            try:
                db.executescript(SCHEMA)
                _migrate(db)
            finally:
                db.close()
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"privacy ledger {self.path} cannot be opened: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def history(self, dataset: str, db: sqlite3.Connection | None = None, kind: str | None = None,
                assumed: bool = False) -> list[Step]:
        """The accountant state of ``dataset``: merged (σ, q, steps) of every charged release (of ``kind`` only);
        with ``assumed``, each σ as σ·√t of its row's honest sites (the distributed-DP track)."""
        conn = db or self._connect()
        try:
            rows = conn.execute("SELECT noise_multiplier, sample_rate, steps, honest_sites FROM rounds WHERE "
                                "dataset = ? AND (? IS NULL OR kind = ?) ORDER BY id", (dataset, kind, kind)).fetchall()
        finally:
            if db is None:
                conn.close()
        return _steps(rows, assumed)

    def spent(self, dataset: str, delta: float, accountant: str, assumed: bool = False) -> float:
        return epsilon(self.history(dataset, assumed=assumed), delta, accountant)

    def spent_by_kind(self, dataset: str, delta: float, accountant: str) -> dict[str, float]:
        """ε of each kind of release alone (training, feature statistics, evaluation); their composition is
        ``spent``, which is less than their sum."""
        kinds = [r["kind"] for r in self.rounds(dataset)]
        return {kind: epsilon(self.history(dataset, kind=kind), delta, accountant)
                for kind in KINDS if kind in kinds}

    def check_room(self, dataset: str, steps: list[tuple], delta: float, budget: float, accountant: str,
                   assumed: bool = False) -> float:
        """The ε ``dataset`` would reach after ``steps`` (σ, q, steps) or (σ, q, steps, honest sites) more, on the
        own-noise track or the ``assumed`` one; BudgetExceeded if past ``budget``. Nothing is recorded: this
        lets a site refuse a study it cannot finish before anyone trains."""
        history = self.history(dataset, assumed=assumed)
        before = epsilon(history, delta, accountant)
        after = epsilon(history + _steps(steps, assumed), delta, accountant)
        if after > budget:
            raise BudgetExceeded(dataset, before, after, budget, delta, what="the study",
                                 by="assumed" if assumed else "own-noise")
        return after

    def charge(self, dataset: str, run_id: str, server_round: int, noise_multiplier: float, clip_norm: float,
               sample_rate: float, steps: int, delta: float, budget: float, accountant: str,
               trained_parameters: int | None = None, kind: str = "training", honest_sites: int = 1,
               budget_by: str = "own-noise") -> Charge:
        """Check the budget and record the round, atomically; raise BudgetExceeded or AlreadyCharged.

        ``honest_sites`` t > 1: ``noise_multiplier`` is this site's share σ/√t of a secure sum (training only).
        Both ε are computed and recorded; the budget is checked by ``budget_by``'s."""
        if kind not in KINDS:
            raise ValueError(f"release kind must be one of {', '.join(KINDS)}")
        if budget_by not in BUDGET_TRACKS:
            raise ValueError(f"budget_by must be one of {', '.join(BUDGET_TRACKS)}")
        if isinstance(honest_sites, bool) or not isinstance(honest_sites, int) or honest_sites < 1:
            raise ValueError("honest_sites must be a whole number >= 1")
        if honest_sites > 1 and kind != "training":
            raise ValueError(f"a {kind} release is not part of a secure sum: it relies on its own noise only")
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            raise LedgerError(f"privacy ledger {self.path} cannot be opened: {exc}") from None
        try:
            db.execute("BEGIN IMMEDIATE")  # one writer: concurrent rounds cannot both pass the check
            if db.execute("SELECT 1 FROM rounds WHERE dataset = ? AND run_id = ? AND round = ? AND kind = ?",
                          (dataset, run_id, server_round, kind)).fetchone():
                what = (f"round {server_round} of run {run_id} was already trained" if kind == "training" else
                        f"the {kind} release of round {server_round} of run {run_id} was already charged")
                raise AlreadyCharged(f"{what} on dataset '{dataset}'; a second release would be charged again, so "
                                     f"it is refused")
            step = [(noise_multiplier, sample_rate, steps, honest_sites)]
            own, assumed = self.history(dataset, db), self.history(dataset, db, assumed=True)
            before = epsilon(own, delta, accountant)
            after = epsilon(own + _steps(step, False), delta, accountant)
            # Equal tracks (nothing assumed, ever): one accountant run serves both.
            same = merge(own + _steps(step, False)) == merge(assumed + _steps(step, True))
            after_assumed = after if same else epsilon(assumed + _steps(step, True), delta, accountant)
            if budget_by == "own-noise" and after > budget:
                raise BudgetExceeded(dataset, before, after, budget, delta)
            if budget_by == "assumed" and after_assumed > budget:
                raise BudgetExceeded(dataset, epsilon(assumed, delta, accountant), after_assumed, budget, delta,
                                     by="assumed")
            db.execute(
                "INSERT INTO rounds (dataset, run_id, round, noise_multiplier, clip_norm, sample_rate, steps, "
                "accountant, delta, epsilon_before, epsilon_after, recorded_at, trained_parameters, kind, "
                "honest_sites, epsilon_assumed_after) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (dataset, run_id, server_round, noise_multiplier, clip_norm, sample_rate, steps, accountant, delta,
                 before, after, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), trained_parameters, kind,
                 honest_sites, after_assumed),
            )
            db.execute("COMMIT")
            return Charge(dataset, before, after, delta, accountant, after_assumed, budget_by)
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def rounds(self, dataset: str | None = None) -> list[dict]:
        db = self._connect()
        db.row_factory = sqlite3.Row
        try:
            query = "SELECT * FROM rounds" + (" WHERE dataset = ?" if dataset else "") + " ORDER BY id"
            return [dict(r) for r in db.execute(query, (dataset,) if dataset else ())]
        finally:
            db.close()

    def datasets(self) -> list[str]:
        db = self._connect()
        try:
            return [r[0] for r in db.execute("SELECT DISTINCT dataset FROM rounds ORDER BY dataset")]
        finally:
            db.close()


def _unique_columns(db: sqlite3.Connection) -> list[list[str]]:
    """The column lists of the rounds table's UNIQUE constraints."""
    return [[col[2] for col in db.execute(f"PRAGMA index_info('{index[1]}')")]
            for index in db.execute("PRAGMA index_list(rounds)") if index[2] and index[3] == "u"]


def _outdated(db: sqlite3.Connection) -> bool:
    columns = {row[1] for row in db.execute("PRAGMA table_info(rounds)")}
    return any(column not in columns for column, _ in MIGRATIONS) or UNIQUE_COLUMNS not in _unique_columns(db)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older ledger to this schema in one transaction (another process may be doing the same):
    add the newer columns, then — when rows are unique per (dataset, run, round) only — rebuild the table
    with uniqueness per kind, copying every row with its id in id order and keeping the id sequence."""
    if not _outdated(db):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(rounds)")}
        for column, statements in MIGRATIONS:
            if column not in columns:
                for statement in statements:
                    db.execute(statement)
        if UNIQUE_COLUMNS not in _unique_columns(db):
            names = ", ".join(row[1] for row in db.execute("PRAGMA table_info(rounds)"))
            count = db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
            sequence = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'rounds'").fetchone()
            db.execute("ALTER TABLE rounds RENAME TO rounds_before_kind_unique")
            db.execute(SCHEMA)
            db.execute(f"INSERT INTO rounds ({names}) SELECT {names} FROM rounds_before_kind_unique ORDER BY id")
            if db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] != count:
                raise sqlite3.DatabaseError("ledger migration copied a different number of rows; nothing changed")
            db.execute("DROP TABLE rounds_before_kind_unique")
            if sequence is not None:  # ids never restart below what the old table handed out
                db.execute("DELETE FROM sqlite_sequence WHERE name = 'rounds' AND seq < ?", (sequence[0],))
                if db.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'rounds'").fetchone() is None:
                    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('rounds', ?)", (sequence[0],))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
