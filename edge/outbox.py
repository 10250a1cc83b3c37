"""The device's persistent outbox: filtered signals wait here, durably, until the aggregator has them.

A signal is committed to SQLite before :meth:`Outbox.add` returns. Signals are sealed into batches in the
outbox itself: the batch id and the serialized batch are stored *before* the first send, so a resend after
a crash, a reboot or a lost reply carries the same id and the same bytes, and the aggregator applies it
once. A batch leaves the outbox only when the aggregator acknowledges it (in the same transaction its
signals enter the transparency ledger) or when it is set aside (refused for good), dropped (over the size
or age bound) or purged (opt-out, deletion) -- and every one of those is counted, so that

    added == acknowledged + set aside + dropped + purged + still queued

holds for signals at all times, across crashes.

Durability: a rollback journal (``journal_mode=DELETE``) with ``synchronous=FULL``. A commit is in the
database file itself, synced, before :meth:`Outbox.add` returns, so no side file holds the only copy of an
acknowledged-as-stored signal: a ``-journal`` lost after a crash can at worst leave the interrupted
(uncommitted) transaction half applied, which the integrity check at the next open finds. In WAL mode a
``-wal`` file deleted after a crash silently took every commit since the last checkpoint with it (77 of 97
signals over 10 kill-and-delete cycles). The price is a few fsyncs per commit instead of one, i.e. per
utterance that yielded a signal (a few per hour): see README's Delivery section for the measured cost.

The device state (the opt-out, a pending deletion, the minor mark, the privacy budget) is a few rows in
the ``state`` table, sealed by a digest row written in the same transaction. A state that cannot be
verified at open (the digest is missing or wrong after a recovery, or wrong in a file that passed the
integrity check) fails closed: the device is marked opted out and as a minor, today's privacy budget
counts as spent, and ``state_lost`` records when; the wearer's explicit choice lifts each again.

Only :class:`~sotto.wire.Signal` values (category id, weight level, day) are stored: there is no
column a transcript or audio could go into. Deleted rows are overwritten (``secure_delete``) and freed
pages are returned to the file system (``auto_vacuum=INCREMENTAL``), so an opt-out leaves nothing behind and
the file stays small.

A file that fails ``PRAGMA integrity_check`` (or is not a database at all) at open is moved aside; whatever
rows can still be read from it (queued signals and batches, the ledger, the counters, the state) are
copied into a fresh outbox, and :attr:`Outbox.recovery` says how many. Signals the old counters account for
but that could not be read are counted as ``signals_lost_damage``, so the books still balance. A queued
row that cannot form a valid batch (a damaged region, category or weight) is quarantined: removed from the
queue, counted as ``signals_quarantined`` and logged, instead of stalling every later batch.

``read_only=True`` opens an existing file for reading only (``sotto-edge ledger``): nothing is created,
moved, recovered or written, and a file that cannot be read raises :class:`OutboxError`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from sotto.edge.privacy import DROP_REASONS
from sotto.edge.signals import encode_batch
from sotto.v1 import signals_pb2
from sotto.wire import EPSILON_SCALE, MAX_DAY_OFFSET, MAX_EPSILON, Signal, day_number, epsilon_milli

log = logging.getLogger(__name__)

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
#: What reading a damaged file may raise: SQLite's errors, and a UnicodeDecodeError when SQLite's own
#: error message quotes damaged bytes.
_DB_ERRORS = (sqlite3.DatabaseError, UnicodeDecodeError)
#: The state row that seals all the others (a SHA-256 of every other row, sorted).
STATE_DIGEST_KEY = "state_digest"
#: Set, with the time, when the state could not be verified and was failed closed.
STATE_LOST_KEY = "state_lost"
#: What an unverifiable state becomes (the keys are those of ``client``, ``device`` and ``ldp``): opted
#: out, marked as a minor, today's privacy budget spent.
_FAIL_CLOSED = ("opted_out", "minor")
_BUDGET_KEY = "privacy_budget"


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
        return Signal(self.category_id, self.weight_level, self.day).weight

    @property
    def date(self) -> dt.date:
        return dt.date(1970, 1, 1) + dt.timedelta(days=self.day)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What happened to an outbox file that failed its integrity check at open."""

    #: Where the damaged file (and its -wal/-shm companions) now are.
    moved_to: Path
    #: Why the file was judged damaged (the first line of integrity_check, or the error).
    problem: str
    #: Signals not yet sealed into a batch that were copied into the new outbox.
    recovered_signals: int
    #: Sealed batches copied over, with their ids and bytes (they are sent as they were).
    recovered_batches: int
    recovered_ledger_entries: int
    #: Rows that could be located but not read, or whose content was invalid.
    unreadable_rows: int
    #: Whether the lifetime counters were read back (else the books start again from what was found).
    counters_recovered: bool = False
    #: Whether the state (opt-out, minor mark, deletion, budget) was read back intact; when it was not,
    #: it failed closed (see the module docstring).
    state_verified: bool = False


#: Every way a signal leaves the outbox (lifetime counters). With what is still queued they add up to
#: ``signals_added``: nothing is lost without being counted.
SIGNAL_EXITS = (
    "signals_acknowledged",
    "signals_set_aside",
    "signals_dropped_overflow",
    "signals_dropped_age",
    "signals_purged",
    "signals_quarantined",
    "signals_lost_damage",
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
        *,
        read_only: bool = False,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.limits = limits or OutboxLimits()
        self._clock = clock
        self._lock = threading.RLock()
        self.recovery: Recovery | None = None
        self.read_only = read_only
        if read_only:
            self._conn = self._connect_read_only()
            return
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
        try:
            self._migrate()
            self._check_state()
            self.enforce_limits()
        except _DB_ERRORS as exc:
            # Damage the integrity check did not see: recover all the same.
            if self.path is None or self.recovery is not None:
                raise
            self._conn.close()
            self.recovery = self._recover(str(exc))
            self._conn = self._connect(str(self.path))
            self._migrate()
            self._check_state()
            self.enforce_limits()

    # --- opening, checking, recovering -----------------------------------------------------------------

    @staticmethod
    def _connect(target: str) -> sqlite3.Connection:
        conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=10)
        conn.text_factory = _text
        # auto_vacuum must be chosen before the first table exists; only then (setting it again on an
        # existing file rewrites its header: a file refused at open must be left as it was).
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if target != ":memory:":
            # A rollback journal, not WAL: see the module docstring (a lost side file must not lose a
            # committed signal). Converts a file written in WAL mode by earlier versions.
            conn.execute("PRAGMA journal_mode = DELETE")
            conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        """A read-only handle on an existing outbox, or ``OutboxError`` saying why it cannot be read."""
        if self.path is None:
            raise OutboxError("a read-only outbox needs a file")
        if not self.path.is_file():
            raise OutboxError(f"{self.path}: no such outbox file")
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10)
            conn.text_factory = _text
        except _DB_ERRORS as exc:
            raise OutboxError(f"{self.path}: cannot open the outbox for reading ({exc})") from None
        try:
            rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
            if rows != ["ok"]:
                raise OutboxError(
                    f"{self.path}: the outbox is damaged ({rows[0] if rows else 'no answer'}); the device "
                    "recovers it the next time it opens it"
                )
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"{self.path}: outbox schema version {version} is newer than this software "
                    f"({SCHEMA_VERSION})"
                )
            if version != SCHEMA_VERSION:
                raise OutboxError(f"{self.path}: not an outbox (schema version {version})")
            problem = _schema_problem(conn)
            if problem is not None:
                raise OutboxError(
                    f"{self.path}: the outbox is damaged ({problem}); the device recovers it the next time "
                    "it opens it"
                )
        except _DB_ERRORS as exc:
            conn.close()
            raise OutboxError(
                f"{self.path}: cannot read the outbox, it is damaged or not an outbox ({exc}); the device "
                "recovers a damaged outbox the next time it opens it"
            ) from None
        except OutboxError:
            conn.close()
            raise
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
        if version < 0:  # _integrity_problem moves such a file aside first; an in-memory one cannot be
            raise OutboxError(f"{self.path or 'memory'}: schema version {version} is not one any outbox has")
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
        for suffix in ("", "-wal", "-shm", "-journal"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(Path(f"{moved}{suffix}"))
        salvage = _salvage(moved)
        self._conn = self._connect(str(self.path))
        self._migrate()
        unreadable = salvage.unreadable
        state = dict(salvage.state)
        verified = _state_verified(state)
        now = self._clock()
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
                    "sent_at, epsilon_milli) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            state.pop(STATE_DIGEST_KEY, None)
            if not verified:
                state.update(self._failed_closed_state(now))
            for name, value in state.items():
                conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (name, value))
            self._seal_state(conn)
            recovered_signals = len(salvage.signals) + sum(
                len(signals_pb2.SignalBatch.FromString(p).signals) for _, p, _ in salvage.batches
            )
            counters = dict(salvage.counters)
            if counters:
                # The books go on: what they say was queued but could not be read is counted as lost.
                for counter, count in counters.items():
                    self._bump(conn, counter, count)
                queued_before = counters.get("signals_added", 0) - sum(
                    counters.get(n, 0) for n in SIGNAL_EXITS
                )
                lost = queued_before - recovered_signals
                if lost > 0:
                    self._bump(conn, "signals_lost_damage", lost)
                elif lost < 0:  # more than the counters knew of (counters older than the rows)
                    self._bump(conn, "signals_added", -lost)
            else:
                # The old counters are lost; start the books again from what is actually queued now.
                self._bump(conn, "signals_added", recovered_signals)
            self._bump(conn, "recovered_signals", recovered_signals)
            self._bump(conn, "recoveries", 1)
            self._bump(conn, "unreadable_rows", unreadable)
        self._conn.close()
        if not verified:
            log.error(
                "the outbox's device state could not be verified after damage: failed closed (opted out, "
                "marked as a minor, today's privacy budget spent) until the wearer chooses again"
            )
        return Recovery(
            moved_to=moved,
            problem=problem,
            recovered_signals=len(salvage.signals),
            recovered_batches=len(salvage.batches),
            recovered_ledger_entries=len(salvage.ledger),
            unreadable_rows=unreadable,
            counters_recovered=bool(salvage.counters),
            state_verified=verified,
        )

    def _failed_closed_state(self, now: float) -> dict[str, str]:
        """The state that replaces one that cannot be verified: as private as the device can be."""
        state = {key: "1" for key in _FAIL_CLOSED}
        day = day_number(dt.datetime.fromtimestamp(now, dt.UTC).date())
        # More than any daily budget: nothing more leaves today; tomorrow's budget is fresh.
        state[_BUDGET_KEY] = json.dumps({"day": day, "spent": 2**31})
        state[STATE_LOST_KEY] = str(now)
        return state

    def _check_state(self) -> None:
        """Verify the state's digest at open; seal a state written by an earlier version; fail closed on a
        digest that does not match (damage the integrity check cannot see)."""
        with self._tx() as conn:
            state = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM state")}
            if STATE_DIGEST_KEY not in state:
                self._seal_state(conn)  # a file from before digests: nothing to check it against
                return
            if _state_verified(state):
                return
            log.error("the outbox's device state does not match its digest: failed closed")
            for name, value in self._failed_closed_state(self._clock()).items():
                conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (name, value))
            self._seal_state(conn)

    @staticmethod
    def _seal_state(conn: sqlite3.Connection) -> None:
        rows = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM state")}
        conn.execute(
            "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (STATE_DIGEST_KEY, _state_digest(rows))
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
    def _take_queued(conn: sqlite3.Connection, batch_id: bytes) -> tuple[bytes, int] | None:
        """Remove a queued batch in the caller's transaction: its payload and signal count, or None when
        it is no longer queued (purged or dropped meanwhile)."""
        row = conn.execute("SELECT payload, signals FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
        return None if row is None else (row[0], row[1])

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
        if by:
            conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, by),
            )

    # --- the queue -------------------------------------------------------------------------------------

    def add(self, region: str, interests: Iterable[Signal]) -> int:
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
                damaged = [r for r in rows if _row_problem(profile_id, r) is not None]
                if damaged:
                    for row in damaged:
                        log.warning(
                            "quarantined a queued signal that cannot be sent (%s)",
                            _row_problem(profile_id, row),
                        )
                    conn.executemany("DELETE FROM signals WHERE seq = ?", [(r[0],) for r in damaged])
                    self._bump(conn, "signals_quarantined", len(damaged))
                    continue
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
                    [Signal(r[2], r[3], r[4], epsilon=r[6] / EPSILON_SCALE if r[6] else None) for r in chunk],
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
            row = self._take_queued(conn, batch_id)
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
            row = self._take_queued(conn, batch_id)
            if row is None:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO set_aside (batch_id, payload, signals, code, at) "
                "VALUES (?, ?, ?, ?, ?)",
                (batch_id, row[0], row[1], code, now),
            )
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
        # In rollback-journal mode the journal holding the erased rows' old pages is deleted at commit.
        with self._lock:
            self._reclaim(threshold=0)

    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str | None) -> None:
        """Set (or with None remove) one state value, durably."""
        self.set_states({key: value})

    def set_states(self, values: dict[str, str | None]) -> None:
        """Set (None: remove) several state values in one transaction, with the digest that seals them."""
        if STATE_DIGEST_KEY in values:
            raise ValueError(f"{STATE_DIGEST_KEY!r} is kept by the outbox itself")
        with self._tx() as conn:
            for key, value in values.items():
                if value is None:
                    conn.execute("DELETE FROM state WHERE key = ?", (key,))
                else:
                    conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))
            self._seal_state(conn)

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
    """None when ``path`` is missing or passes ``PRAGMA integrity_check``; else what is wrong.

    integrity_check, not quick_check: it also checks every index against its table, and a ledger whose
    index disagrees with it passes quick_check and fails the first write. The outbox is under a megabyte.

    An empty file is damage too: an outbox cut to nothing must not open as a new one that has forgotten
    the wearer's choices (a device that crashed before its very first commit fails closed, harmlessly).
    """
    if not path.exists():
        return None
    with path.open("rb") as fh:
        header = fh.read(16)
    if header != b"SQLite format 3\x00":
        # SQLite takes a file shorter than its header for an empty database: it is not one here.
        return "not an SQLite database (the file is empty, cut short or overwritten at its start)"
    try:
        # Read-write on purpose: after a crash the WAL must be replayed, which a read-only handle may refuse.
        with closing(sqlite3.connect(path, timeout=10)) as conn:
            conn.text_factory = _text
            rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
            if rows != ["ok"]:
                return rows[0] if rows else "integrity_check returned nothing"
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version < 0:  # a damaged header: no version this software ever wrote
                return f"schema version {version} is not one any outbox has"
            if version == SCHEMA_VERSION:
                return _schema_problem(conn)
            if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                return "tables without a schema version"
    except _DB_ERRORS as exc:
        return str(exc)
    return None


def _schema_problem(conn: sqlite3.Connection) -> str | None:
    """None when every table is defined exactly as this version creates it. integrity_check does not read
    the definitions: a damaged byte there would rename a column under every later query."""
    stored = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    for name, definition in _table_definitions().items():
        if stored.get(name) != definition:
            return f"table {name} is missing or its definition is damaged"
    return None


@functools.cache
def _table_definitions() -> dict[str, str]:
    """Each table's definition as SQLite stores it in a file of ``SCHEMA_VERSION``: ``_SCHEMA`` and then
    every migration, the one path every outbox takes (a migration such as ADD COLUMN rewrites the text)."""
    with closing(sqlite3.connect(":memory:")) as conn:
        for statement in _SCHEMA:
            conn.execute(statement)
        for step in range(2, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
        rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name: sql for name, sql in rows if not name.startswith("sqlite_")}


@dataclass(slots=True)
class _Salvage:
    signals: list[tuple[str, str, int, int, int, float]] = field(default_factory=list)
    batches: list[tuple[bytes, bytes, float]] = field(default_factory=list)
    ledger: list[tuple[bytes, int, str, int, int, float, int | None]] = field(default_factory=list)
    state: list[tuple[str, str]] = field(default_factory=list)
    counters: list[tuple[str, int]] = field(default_factory=list)
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
        except _DB_ERRORS:
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
        conn.text_factory = _text
    except _DB_ERRORS:
        return out
    with closing(conn):
        # A truncated file's header claims more pages than the file has, which SQLite treats as corrupt
        # before reading anything; writable_schema lets it read the pages that are there (nothing is
        # written: this is the moved-aside copy, only read).
        conn.execute("PRAGMA writable_schema = ON")
        # A file from before schema 2 has no epsilon in its ledger: read it as NULL (not recorded).
        try:
            conn.execute("SELECT epsilon_milli FROM ledger LIMIT 0")
            ledger_epsilon = "epsilon_milli"
        except _DB_ERRORS:
            ledger_epsilon = "NULL"
        tables: dict[str, str] = {
            "signals": "region, category_id, weight_level, day, epsilon_milli, created_at",
            "batches": "batch_id, payload, created_at",
            "ledger": f"batch_id, position, category_id, weight_level, day, sent_at, {ledger_epsilon}",
        }
        for table, columns in tables.items():
            try:
                rows, lost = _read_rows(conn, table, columns)
            except _DB_ERRORS:
                continue  # the schema itself is unreadable: nothing of this table can be found
            out.unreadable += lost
            for row in rows:
                if _valid(table, row):
                    getattr(out, table).append(row)
                else:
                    out.unreadable += 1
        try:  # the wearer's choices (opt-out, a pending deletion): a few rows in a WITHOUT ROWID table
            out.state = [tuple(r) for r in conn.execute("SELECT key, value FROM state") if _valid("state", r)]
        except _DB_ERRORS:
            out.unreadable += 1
            out.state = []
        try:  # all or nothing: a partial set of counters would make the books wrong
            counters = [(n, v) for n, v in conn.execute("SELECT name, value FROM counters")]
            if all(isinstance(n, str) and isinstance(v, int) and v >= 0 for n, v in counters):
                out.counters = counters
        except _DB_ERRORS:
            out.unreadable += 1
    return out


def _text(raw: bytes) -> str:
    """TEXT as SQLite returns it; a damaged byte becomes U+FFFD instead of an exception while reading,
    so the row fails validation (or the state its digest) and is handled like any other damage."""
    return raw.decode("utf-8", "replace")


def _row_problem(profile_id: str, row: tuple[object, ...]) -> str | None:
    """Why a queued signal row (seq, region, category, weight, day, created, epsilon) cannot go into a
    batch (a damaged byte: ``Us`` for ``US``), or None. The same checks ``encode_batch`` applies."""
    _, region, cid, level, day, _, milli = row
    try:
        if not (isinstance(region, str) and isinstance(cid, str) and isinstance(level, int)):
            raise ValueError("a field has the wrong type")
        if not (isinstance(day, int) and isinstance(milli, int)):
            raise ValueError("a field has the wrong type")
        encode_batch(
            profile_id, region, [Signal(cid, level, day, epsilon=milli / EPSILON_SCALE if milli else None)]
        )
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _state_digest(rows: dict[str, str]) -> str:
    """The digest that seals the state: every row but the digest itself, in key order."""
    content = sorted((k, v) for k, v in rows.items() if k != STATE_DIGEST_KEY)
    return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()


def _state_verified(rows: dict[str, str]) -> bool:
    """True when ``rows`` hold a digest row and it matches every other row (nothing lost or changed)."""
    return rows.get(STATE_DIGEST_KEY) == _state_digest(rows)


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
        batch_id, position, cid, level, day, sent_at, milli = row
        return (
            (milli is None or (isinstance(milli, int) and milli >= 0))
            and isinstance(batch_id, bytes)
            and isinstance(position, int)
            and isinstance(cid, str)
            and isinstance(level, int)
            and isinstance(day, int)
            and isinstance(sent_at, float | int)
        )
    key, value = row
    return isinstance(key, str) and isinstance(value, str)
