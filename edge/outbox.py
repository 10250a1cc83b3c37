"""The device's persistent outbox: filtered signals wait here, durably, until the aggregator has them.

A signal is committed to SQLite before :meth:`Outbox.add` returns. Signals are sealed into batches in the
outbox itself: the batch id and the serialized batch are stored *before* the first send, so a resend after
a crash, a reboot or a lost reply carries the same id and the same bytes, and the aggregator applies it
once. A batch leaves the outbox only when the aggregator acknowledges it (in the same transaction its
signals enter the transparency ledger) or when it is set aside (refused for good), dropped (over the size
or age bound) or purged (opt-out, deletion) -- and every one of those is counted, so that

    added == acknowledged + set aside + dropped + purged + still queued

holds for signals at all times, across crashes.

Durability: WAL with ``synchronous=FULL``. In WAL mode ``NORMAL`` survives an application crash but may
lose the last commits on power loss, and the glasses lose power mid-send; FULL costs one fsync per commit,
i.e. per utterance that yielded a signal (a few per hour), which is negligible next to the radio.

Only :class:`~edge.privacy.Interest` values (category id, weight level, day) are stored: there is no
column a transcript or audio could go into. Deleted rows are overwritten (``secure_delete``) and freed
pages are returned to the file system (``auto_vacuum=INCREMENTAL``), so an opt-out leaves nothing behind and
the file stays small.

A file that fails ``PRAGMA quick_check`` (or is not a database at all) at open is moved aside; whatever
rows can still be read from it are copied into a fresh outbox, and :attr:`Outbox.recovery` says how many.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from sotto.edge.privacy import DROP_REASONS, Interest
from sotto.edge.signals import encode_batch
from sotto.v1 import signals_pb2
from sotto.wire import EPSILON_SCALE, MAX_DAY_OFFSET, MAX_EPSILON, epsilon_milli

#: Version of the tables below, kept in ``PRAGMA user_version``; a newer file is refused, not guessed at.
SCHEMA_VERSION = 2
_SCHEMA = (
    """CREATE TABLE signals (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        region TEXT NOT NULL,
        category_id TEXT NOT NULL,
        weight_level INTEGER NOT NULL,
        day INTEGER NOT NULL,
        -- The local-privacy epsilon the signal was noised with, in thousandths (0: not noised). A batch
        -- holds signals of one epsilon and declares it, so the aggregator can de-bias its counts.
        epsilon_milli INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE batches (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        batch_id BLOB NOT NULL UNIQUE CHECK (length(batch_id) = 16),
        payload BLOB NOT NULL,
        signals INTEGER NOT NULL,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE set_aside (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        batch_id BLOB NOT NULL UNIQUE,
        payload BLOB NOT NULL,
        signals INTEGER NOT NULL,
        code TEXT NOT NULL,
        at REAL NOT NULL
    )""",
    """CREATE TABLE ledger (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        batch_id BLOB NOT NULL,
        position INTEGER NOT NULL,
        category_id TEXT NOT NULL,
        weight_level INTEGER NOT NULL,
        day INTEGER NOT NULL,
        sent_at REAL NOT NULL,
        UNIQUE (batch_id, position)
    )""",
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)
#: What takes a file of version N-1 to N. A new file gets ``_SCHEMA`` (version 1) and then every step.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # The epsilon each acknowledged signal was noised with, in thousandths (0: not noised), so the
    # wearer can see which of them were randomized; NULL for entries recorded before it was kept.
    2: ("ALTER TABLE ledger ADD COLUMN epsilon_milli INTEGER",),
}
_DAY = 86400.0


class OutboxError(Exception):
    """The outbox file cannot be used (a newer schema, or a path that is not a file)."""


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Bounds on what waits on the device; past them the oldest batches are dropped and counted.

    The defaults hold about two months of heavy use offline (1,000 batches of up to 20 signals at about
    9 bytes each: well under a megabyte), and 30 days is the age after which an interest is too stale to be
    worth the radio; the aggregator itself would refuse a batch older than its retention period.
    """

    max_batches: int = 1000
    max_signals: int = 20_000
    max_age_days: float = 30.0
    #: Refused batches kept for inspection (never resent); the oldest are forgotten beyond this.
    max_set_aside: int = 100
    #: Ledger entries older than this are forgotten (the aggregator's retention period).
    ledger_max_age_days: float = 180.0

    def __post_init__(self) -> None:
        if min(self.max_batches, self.max_signals, self.max_set_aside) < 1:
            raise ValueError("max_batches, max_signals and max_set_aside must be at least 1")
        if self.max_age_days <= 0 or self.ledger_max_age_days <= 0:
            raise ValueError("max_age_days and ledger_max_age_days must be positive")


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """A sealed batch as it will be (re)sent: the exact bytes stored before the first attempt."""

    batch_id: bytes
    payload: bytes
    signals: int

    def message(self) -> signals_pb2.SignalBatch:
        return signals_pb2.SignalBatch.FromString(self.payload)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One signal the aggregator acknowledged: what left the device, and when. Never a transcript."""

    sent_at: float
    batch_id: bytes
    category_id: str
    weight_level: int
    day: int
    #: The local-privacy epsilon the signal was noised with (0.0: sent as the filter decided it; None:
    #: recorded before the outbox kept it).
    epsilon: float | None = None

    @property
    def noised(self) -> bool | None:
        """Whether randomized response chose this category (None: not known for this entry)."""
        return None if self.epsilon is None else self.epsilon > 0

    @property
    def weight(self) -> float:
        return Interest(self.category_id, self.weight_level, self.day).weight

    @property
    def date(self) -> dt.date:
        return dt.date(1970, 1, 1) + dt.timedelta(days=self.day)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What happened to an outbox file that failed its integrity check at open."""

    #: Where the damaged file (and its -wal/-shm companions) now are.
    moved_to: Path
    #: Why the file was judged damaged (the first line of quick_check, or the error).
    problem: str
    #: Signals not yet sealed into a batch that were copied into the new outbox.
    recovered_signals: int
    #: Sealed batches copied over, with their ids and bytes (they are sent as they were).
    recovered_batches: int
    recovered_ledger_entries: int
    #: Rows that could be located but not read, or whose content was invalid.
    unreadable_rows: int


#: Every way a signal leaves the outbox (lifetime counters). With what is still queued they add up to
#: ``signals_added``: nothing is lost without being counted.
SIGNAL_EXITS = (
    "signals_acknowledged",
    "signals_set_aside",
    "signals_dropped_overflow",
    "signals_dropped_age",
    "signals_purged",
)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Lifetime counters of the outbox (they survive restarts) and what waits now."""

    counters: dict[str, int]
    queued_signals: int
    unsealed_signals: int
    queued_batches: int
    set_aside_batches: int
    ledger_entries: int

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def signals_gone(self) -> int:
        """Signals that left the outbox, by any of ``SIGNAL_EXITS``."""
        return sum(self.get(name) for name in SIGNAL_EXITS)


class Outbox:
    """A durable, bounded queue of one device's signals and sealed batches (SQLite).

    ``path=None`` keeps everything in memory (nothing survives the process: tests and the emulator's
    default). Thread-safe: one connection behind a lock, because the device writes a few rows an hour.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        limits: OutboxLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.limits = limits or OutboxLimits()
        self._clock = clock
        self._lock = threading.RLock()
        self.recovery: Recovery | None = None
        if self.path is None:
            self._conn = self._connect(":memory:")
        else:
            if self.path.exists() and not self.path.is_file():
                raise OutboxError(f"{self.path}: not a file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            problem = _integrity_problem(self.path)
            if problem is not None:
                self.recovery = self._recover(problem)
            self._conn = self._connect(str(self.path))
        self._migrate()
        self.enforce_limits()

    # --- opening, checking, recovering -----------------------------------------------------------------

    @staticmethod
    def _connect(target: str) -> sqlite3.Connection:
        conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=10)
        # auto_vacuum must be chosen before the first table exists; it is a no-op on an existing file.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if target != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            # Keep the WAL file from growing past 1 MiB after checkpoints.
            # Checkpoint every 100 pages (400 KiB) instead of 1,000, and truncate the WAL to 1 MiB after.
            conn.execute("PRAGMA wal_autocheckpoint = 100")
            conn.execute("PRAGMA journal_size_limit = 1048576")
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _migrate(self) -> None:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            where = self.path or "memory"
            raise OutboxError(
                f"{where}: outbox schema version {version} is newer than this software ({SCHEMA_VERSION})"
            )
        if version == SCHEMA_VERSION:
            return
        with self._tx() as conn:
            if version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                version = 1
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _recover(self, problem: str) -> Recovery:
        """Move the damaged file aside and copy what can still be read into a fresh outbox there."""
        assert self.path is not None
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        moved = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(Path(f"{moved}{suffix}"))
        salvage = _salvage(moved)
        self._conn = self._connect(str(self.path))
        self._migrate()
        unreadable = salvage.unreadable
        with self._tx() as conn:
            for region, cid, level, day, milli, created in salvage.signals:
                conn.execute(
                    "INSERT INTO signals (region, category_id, weight_level, day, epsilon_milli, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (region, cid, level, day, milli, created),
                )
            for batch_id, payload, created in salvage.batches:
                message = signals_pb2.SignalBatch.FromString(payload)
                conn.execute(
                    "INSERT OR IGNORE INTO batches (batch_id, payload, signals, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (batch_id, payload, len(message.signals), created),
                )
            for row in salvage.ledger:
                conn.execute(
                    "INSERT OR IGNORE INTO ledger (batch_id, position, category_id, weight_level, day, "
                    "sent_at) VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
            for name, value in salvage.state:
                conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (name, value))
            recovered_signals = len(salvage.signals) + sum(
                len(signals_pb2.SignalBatch.FromString(p).signals) for _, p, _ in salvage.batches
            )
            # The old counters may be lost; start the books again from what is actually queued now.
            self._bump(conn, "recovered_signals", recovered_signals)
            self._bump(conn, "signals_added", recovered_signals)
            self._bump(conn, "recoveries", 1)
            self._bump(conn, "unreadable_rows", unreadable)
        self._conn.close()
        return Recovery(
            moved_to=moved,
            problem=problem,
            recovered_signals=len(salvage.signals),
            recovered_batches=len(salvage.batches),
            recovered_ledger_entries=len(salvage.ledger),
            unreadable_rows=unreadable,
        )

    # --- transactions and counters ---------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
        if by:
            conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, by),
            )

    # --- the queue -------------------------------------------------------------------------------------

    def add(self, region: str, interests: Iterable[Interest]) -> int:
        """Store signals durably (committed and synced when this returns); returns how many."""
        now = self._clock()
        rows = [
            (
                region,
                i.category_id,
                i.weight_level,
                i.day,
                0 if i.epsilon is None else epsilon_milli(i.epsilon),
                now,
            )
            for i in interests
        ]
        if not rows:
            return 0
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO signals (region, category_id, weight_level, day, epsilon_milli, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._bump(conn, "signals_added", len(rows))
            self._enforce(conn, now)
        self._reclaim()
        return len(rows)

    def count_heard(self, dropped: str | None, withheld: int = 0) -> None:
        """Count one utterance the device heard, for the wearer's page: by the privacy filter's drop
        reason (one of ``DROP_REASONS``; None when it yielded signals) and the signals the daily privacy
        budget withheld. Only counts: never the sensitive class, the categories or any text."""
        if dropped is not None and dropped not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {dropped!r}; expected one of {', '.join(DROP_REASONS)}")
        if withheld < 0:
            raise ValueError(f"withheld must be at least 0, got {withheld}")
        with self._tx() as conn:
            self._bump(conn, "utterances_heard", 1)
            self._bump(conn, "utterances_kept" if dropped is None else f"utterances_dropped_{dropped}", 1)
            self._bump(conn, "signals_withheld_budget", withheld)

    def seal(self, profile_id: str, batch_size: int, partial: bool = False) -> int:
        """Form batches from the oldest unsealed signals: every full batch, and with ``partial`` the rest.

        Each batch gets its id and its serialized bytes here, in the same transaction that removes its
        signals from the unsealed queue, so it is stored before it is ever sent. A batch holds signals of
        one region whose days lie within the wire format's day offset. Returns the number of batches.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        sealed = 0
        with self._tx() as conn:
            while True:
                rows = conn.execute(
                    "SELECT seq, region, category_id, weight_level, day, created_at, epsilon_milli "
                    "FROM signals ORDER BY seq LIMIT ?",
                    (batch_size,),
                ).fetchall()
                if not rows:
                    break
                chunk = [rows[0]]
                for row in rows[1:]:
                    days = [r[4] for r in chunk] + [row[4]]
                    if (
                        row[1] != chunk[0][1]
                        or row[6] != chunk[0][6]
                        or max(days) - min(days) > MAX_DAY_OFFSET
                    ):
                        break
                    chunk.append(row)
                # A chunk cut short by a region, epsilon or day boundary is complete: nothing can join it.
                if len(chunk) < batch_size and len(chunk) == len(rows) and not partial:
                    break
                message = encode_batch(
                    profile_id,
                    chunk[0][1],
                    [
                        Interest(r[2], r[3], r[4], epsilon=r[6] / EPSILON_SCALE if r[6] else None)
                        for r in chunk
                    ],
                )
                conn.execute(
                    "INSERT INTO batches (batch_id, payload, signals, created_at) VALUES (?, ?, ?, ?)",
                    (message.batch_id, message.SerializeToString(), len(chunk), chunk[0][5]),
                )
                conn.execute("DELETE FROM signals WHERE seq BETWEEN ? AND ?", (chunk[0][0], chunk[-1][0]))
                self._bump(conn, "batches_sealed", 1)
                sealed += 1
            self._enforce(conn, self._clock())
        self._reclaim()
        return sealed

    def batches(self) -> list[StoredBatch]:
        """Sealed batches waiting for an acknowledgement, oldest first (the order they are sent in)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT batch_id, payload, signals FROM batches ORDER BY seq"
            ).fetchall()
        return [StoredBatch(bytes(b), bytes(p), n) for b, p, n in rows]

    def next_batch(self) -> StoredBatch | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT batch_id, payload, signals FROM batches ORDER BY seq LIMIT 1"
            ).fetchone()
        return None if row is None else StoredBatch(bytes(row[0]), bytes(row[1]), row[2])

    def oldest_unsealed_at(self) -> float | None:
        """When the oldest signal not yet in a batch was added (None: there is none)."""
        with self._lock:
            (oldest,) = self._conn.execute("SELECT min(created_at) FROM signals").fetchone()
        return oldest

    def acknowledge(self, batch_id: bytes) -> bool:
        """The aggregator has the batch: remove it and record its signals in the ledger, atomically.

        Returns False when the batch is no longer queued (purged or dropped meanwhile).
        """
        now = self._clock()
        with self._tx() as conn:
            row = conn.execute(
                "SELECT payload, signals FROM batches WHERE batch_id = ?", (batch_id,)
            ).fetchone()
            if row is None:
                return False
            message = signals_pb2.SignalBatch.FromString(row[0])
            conn.executemany(
                "INSERT OR IGNORE INTO ledger (batch_id, position, category_id, weight_level, day, sent_at, "
                "epsilon_milli) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        batch_id,
                        i,
                        s.category_id,
                        s.weight_level,
                        message.base_day - s.day_offset,
                        now,
                        message.ldp_epsilon_milli,
                    )
                    for i, s in enumerate(message.signals)
                ],
            )
            conn.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            self._bump(conn, "batches_acknowledged", 1)
            self._bump(conn, "signals_acknowledged", row[1])
            self._forget_old_ledger(conn, now)
        self._reclaim()
        return True

    def set_aside(self, batch_id: bytes, code: str) -> bool:
        """The aggregator refused the batch for good (``code``): never send it again, keep it for
        inspection (bounded), count it. Returns False when the batch is no longer queued."""
        now = self._clock()
        with self._tx() as conn:
            row = conn.execute(
                "SELECT payload, signals FROM batches WHERE batch_id = ?", (batch_id,)
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO set_aside (batch_id, payload, signals, code, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (batch_id, row[0], row[1], code, now),
            )
            conn.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            self._bump(conn, "batches_set_aside", 1)
            self._bump(conn, "signals_set_aside", row[1])
            self._bump(conn, f"set_aside_{code}", 1)
            conn.execute(
                "DELETE FROM set_aside WHERE seq NOT IN "
                "(SELECT seq FROM set_aside ORDER BY seq DESC LIMIT ?)",
                (self.limits.max_set_aside,),
            )
        return True

    # --- bounds ----------------------------------------------------------------------------------------

    def enforce_limits(self) -> None:
        """Drop what is past the size and age bounds (also done on every add and seal)."""
        with self._tx() as conn:
            self._enforce(conn, self._clock())
            self._forget_old_ledger(conn, self._clock())
        self._reclaim()

    def _enforce(self, conn: sqlite3.Connection, now: float) -> None:
        cutoff = now - self.limits.max_age_days * _DAY
        (n_old,) = conn.execute("SELECT count(*) FROM signals WHERE created_at < ?", (cutoff,)).fetchone()
        if n_old:
            conn.execute("DELETE FROM signals WHERE created_at < ?", (cutoff,))
            self._bump(conn, "signals_dropped_age", n_old)
        old = conn.execute(
            "SELECT count(*), coalesce(sum(signals), 0) FROM batches WHERE created_at < ?", (cutoff,)
        ).fetchone()
        if old[0]:
            conn.execute("DELETE FROM batches WHERE created_at < ?", (cutoff,))
            self._bump(conn, "batches_dropped_age", old[0])
            self._bump(conn, "signals_dropped_age", old[1])
        # Size: count the unsealed signals too, each run of them is at least one batch to come.
        while True:
            n_batches, n_batched = conn.execute(
                "SELECT count(*), coalesce(sum(signals), 0) FROM batches"
            ).fetchone()
            (n_loose,) = conn.execute("SELECT count(*) FROM signals").fetchone()
            over = (
                n_batches + (1 if n_loose else 0) > self.limits.max_batches
                or n_batched + n_loose > self.limits.max_signals
            )
            if not over:
                break
            oldest = conn.execute("SELECT seq, signals FROM batches ORDER BY seq LIMIT 1").fetchone()
            if oldest is not None:
                conn.execute("DELETE FROM batches WHERE seq = ?", (oldest[0],))
                self._bump(conn, "batches_dropped_overflow", 1)
                self._bump(conn, "signals_dropped_overflow", oldest[1])
            else:  # only loose signals (a batch size larger than max_signals): drop the oldest of them
                conn.execute("DELETE FROM signals WHERE seq = (SELECT min(seq) FROM signals)")
                self._bump(conn, "signals_dropped_overflow", 1)

    def _reclaim(self, threshold: int = 64) -> None:
        """Give free pages back to the file system once there are more than ``threshold`` (64 pages,
        256 KiB), so a drained outbox shrinks again; below that they are simply reused. Outside any
        transaction: only executescript runs this pragma to completion (a plain execute frees a single
        page), and executescript commits first."""
        with self._lock:
            (free,) = self._conn.execute("PRAGMA freelist_count").fetchone()
            if free > threshold:
                self._conn.executescript("PRAGMA incremental_vacuum;")

    def _forget_old_ledger(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute("DELETE FROM ledger WHERE sent_at < ?", (now - self.limits.ledger_max_age_days * _DAY,))

    # --- the wearer's controls -------------------------------------------------------------------------

    def purge(self) -> int:
        """Erase every queued signal and batch, and the set-aside ones (opt-out, deletion); returns the
        number of signals erased. The ledger of what was already sent stays (see :meth:`clear_ledger`)."""
        with self._tx() as conn:
            (loose,) = conn.execute("SELECT count(*) FROM signals").fetchone()
            (batched,) = conn.execute("SELECT coalesce(sum(signals), 0) FROM batches").fetchone()
            conn.execute("DELETE FROM signals")
            conn.execute("DELETE FROM batches")
            conn.execute("DELETE FROM set_aside")
            self._bump(conn, "signals_purged", loose + batched)
        self._vacuum()
        return int(loose + batched)

    def clear_ledger(self) -> int:
        """Forget the record of sent signals (the wearer's choice); returns how many entries went."""
        with self._tx() as conn:
            (n,) = conn.execute("SELECT count(*) FROM ledger").fetchone()
            conn.execute("DELETE FROM ledger")
        self._vacuum()
        return int(n)

    def _vacuum(self) -> None:
        with self._lock:
            self._reclaim(threshold=0)
            if self.path is not None:
                # Fold the WAL (which still holds the erased rows' old pages) into the file and truncate it.
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str | None) -> None:
        with self._tx() as conn:
            if value is None:
                conn.execute("DELETE FROM state WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    # --- reading ---------------------------------------------------------------------------------------

    def ledger(self) -> list[LedgerEntry]:
        """Every acknowledged signal still remembered, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT sent_at, batch_id, category_id, weight_level, day, epsilon_milli FROM ledger "
                "ORDER BY seq"
            ).fetchall()
        return [
            LedgerEntry(t, bytes(b), c, w, d, None if m is None else m / EPSILON_SCALE)
            for t, b, c, w, d, m in rows
        ]

    def stats(self) -> OutboxStats:
        with self._lock:
            counters = {str(k): int(v) for k, v in self._conn.execute("SELECT name, value FROM counters")}
            (loose,) = self._conn.execute("SELECT count(*) FROM signals").fetchone()
            n_batches, n_batched = self._conn.execute(
                "SELECT count(*), coalesce(sum(signals), 0) FROM batches"
            ).fetchone()
            (aside,) = self._conn.execute("SELECT count(*) FROM set_aside").fetchone()
            (ledger,) = self._conn.execute("SELECT count(*) FROM ledger").fetchone()
        return OutboxStats(
            counters, int(loose + n_batched), int(loose), int(n_batches), int(aside), int(ledger)
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- integrity check and salvage -------------------------------------------------------------------------


def _integrity_problem(path: Path) -> str | None:
    """None when ``path`` is missing, empty or passes ``PRAGMA quick_check``; else what is wrong."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        # Read-write on purpose: after a crash the WAL must be replayed, which a read-only handle may refuse.
        with closing(sqlite3.connect(path, timeout=10)) as conn:
            rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
            if rows != ["ok"]:
                return rows[0] if rows else "quick_check returned nothing"
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == SCHEMA_VERSION:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                missing = {"signals", "batches", "set_aside", "ledger", "counters", "state"} - tables
                if missing:
                    return f"tables missing: {', '.join(sorted(missing))}"
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None


@dataclass(slots=True)
class _Salvage:
    signals: list[tuple[str, str, int, int, int, float]] = field(default_factory=list)
    batches: list[tuple[bytes, bytes, float]] = field(default_factory=list)
    ledger: list[tuple[bytes, int, str, int, int, float]] = field(default_factory=list)
    state: list[tuple[str, str]] = field(default_factory=list)
    unreadable: int = 0


def _read_rows(conn: sqlite3.Connection, table: str, columns: str) -> tuple[list[tuple[object, ...]], int]:
    """Rows of ``table`` in rowid order, around damaged stretches; (rows, reads that failed).

    A read that meets a damaged page fails as a whole, so the table is read forwards up to the damage,
    backwards down to it, and then from a bounded number of points in between (each read stops at the
    next damage). Best effort by design: what lies on damaged pages is gone.
    """
    found: dict[int, tuple[object, ...]] = {}
    failures = 0

    def scan(sql: str, *args: int) -> None:
        nonlocal failures
        try:
            for row in conn.execute(sql, args):
                found[int(row[0])] = tuple(row[1:])
        except sqlite3.DatabaseError:
            failures += 1

    select = f"SELECT rowid, {columns} FROM {table}"
    scan(f"{select} ORDER BY rowid")
    if failures:
        low = max(found, default=0)
        scan(f"{select} WHERE rowid > ? ORDER BY rowid DESC", low)
        high = max(found, default=low)
        above = [r for r in found if r > low]
        high = min(above) if above else high
        step = max(1, (high - low) // 256)
        for start in range(low, high, step):
            if start + 1 not in found:
                scan(f"{select} WHERE rowid > ? AND rowid < ? ORDER BY rowid", start, high)
    return [found[r] for r in sorted(found)], failures


def _salvage(path: Path) -> _Salvage:
    """Whatever valid rows can still be read from a damaged outbox file (the WAL is read too)."""
    out = _Salvage()
    try:
        conn = sqlite3.connect(path, timeout=10)
    except sqlite3.DatabaseError:
        return out
    with closing(conn):
        # A truncated file's header claims more pages than the file has, which SQLite treats as corrupt
        # before reading anything; writable_schema lets it read the pages that are there (nothing is
        # written: this is the moved-aside copy, only read).
        conn.execute("PRAGMA writable_schema = ON")
        tables: dict[str, str] = {
            "signals": "region, category_id, weight_level, day, epsilon_milli, created_at",
            "batches": "batch_id, payload, created_at",
            "ledger": "batch_id, position, category_id, weight_level, day, sent_at",
        }
        for table, columns in tables.items():
            try:
                rows, lost = _read_rows(conn, table, columns)
            except sqlite3.DatabaseError:
                continue  # the schema itself is unreadable: nothing of this table can be found
            out.unreadable += lost
            for row in rows:
                if _valid(table, row):
                    getattr(out, table).append(row)
                else:
                    out.unreadable += 1
        try:  # the wearer's choices (opt-out, a pending deletion): a few rows in a WITHOUT ROWID table
            out.state = [tuple(r) for r in conn.execute("SELECT key, value FROM state") if _valid("state", r)]
        except sqlite3.DatabaseError:
            out.unreadable += 1
    return out


def _valid(table: str, row: tuple[object, ...]) -> bool:
    """A salvaged row is kept only when every field has the type and shape it must have."""
    if table == "signals":
        region, cid, level, day, milli, created = row
        return (
            isinstance(region, str)
            and isinstance(milli, int)
            and 0 <= milli <= MAX_EPSILON * EPSILON_SCALE
            and isinstance(cid, str)
            and isinstance(level, int)
            and 1 <= level <= 4
            and isinstance(day, int)
            and isinstance(created, float | int)
        )
    if table == "batches":
        batch_id, payload, created = row
        if not (isinstance(batch_id, bytes) and len(batch_id) == 16 and isinstance(payload, bytes)):
            return False
        try:
            message = signals_pb2.SignalBatch.FromString(payload)
        except DecodeError:
            return False
        return message.batch_id == batch_id and len(message.signals) > 0 and isinstance(created, float | int)
    if table == "ledger":
        batch_id, position, cid, level, day, sent_at = row
        return (
            isinstance(batch_id, bytes)
            and isinstance(position, int)
            and isinstance(cid, str)
            and isinstance(level, int)
            and isinstance(day, int)
            and isinstance(sent_at, float | int)
        )
    key, value = row
    return isinstance(key, str) and isinstance(value, str)
