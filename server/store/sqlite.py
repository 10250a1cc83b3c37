"""SQLite store: one writer thread doing ``BEGIN IMMEDIATE`` transactions, reads on a separate connection.

Each connection lives on its own single-thread executor, so the event loop never waits on SQLite and a
connection is only ever used by the thread that opened it. WAL lets the reader see the last committed
state while the writer works; ``synchronous=NORMAL`` makes a commit a WAL append without fsync (a power
loss may lose the last transactions, never corrupt the file; a lost batch is resent by the device and
applied then, because its id was lost with it).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

from server.store.base import (
    ApplyResult,
    Batch,
    BatchConflictError,
    HalfLifeMismatchError,
    StoreConfigError,
    StoredProfile,
)

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    # base_day is kept so that ids can later be pruned once a resend would fail validation anyway.
    """CREATE TABLE batches (
        batch_id BLOB PRIMARY KEY,
        profile_id TEXT NOT NULL,
        digest BLOB NOT NULL,
        base_day INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "CREATE TABLE profiles (profile_id TEXT PRIMARY KEY, batches INTEGER NOT NULL) WITHOUT ROWID",
    """CREATE TABLE scores (
        profile_id TEXT NOT NULL,
        category_id TEXT NOT NULL,
        s REAL NOT NULL,
        PRIMARY KEY (profile_id, category_id)
    ) WITHOUT ROWID""",
)
_INSERT_BATCH = (
    "INSERT INTO batches (batch_id, profile_id, digest, base_day) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (batch_id) DO NOTHING"
)
_COUNT_BATCH = (
    "INSERT INTO profiles (profile_id, batches) VALUES (?, 1) "
    "ON CONFLICT (profile_id) DO UPDATE SET batches = batches + 1"
)
_ADD_SCORE = (
    "INSERT INTO scores (profile_id, category_id, s) VALUES (?, ?, ?) "
    "ON CONFLICT (profile_id, category_id) DO UPDATE SET s = s + excluded.s"
)


@contextmanager
def _transaction(conn: sqlite3.Connection, mode: str = "") -> Iterator[None]:
    conn.execute(f"BEGIN {mode}")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite may already have rolled back (SQLITE_FULL, for example)
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _check_path(path: str) -> None:
    file = Path(path)
    if file.is_dir():
        raise StoreConfigError(f"{path} is a folder; expected a SQLite database file")
    if not file.parent.is_dir():
        raise StoreConfigError(f"cannot create SQLite database {path}: folder {file.parent} does not exist")


def _init_schema(conn: sqlite3.Connection, path: str, half_life_days: float) -> None:
    with _transaction(conn, "IMMEDIATE"):
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('half_life_days', ?)", (repr(half_life_days),)
            )
            return
        if "schema_version" not in tables:
            raise StoreConfigError(f"{path} is not a Sotto database (it has tables but no schema_version)")
        (version,) = conn.execute("SELECT version FROM schema_version").fetchone()
        if version != SCHEMA_VERSION:
            raise StoreConfigError(
                f"{path} has schema version {version}; this server reads version {SCHEMA_VERSION}"
            )
        (stored,) = conn.execute("SELECT value FROM meta WHERE key = 'half_life_days'").fetchone()
        if float(stored) != half_life_days:
            raise HalfLifeMismatchError(
                f"{path} was created with a half-life of {float(stored):g} days but {half_life_days:g} is "
                f"configured; the stored sums depend on it, so start with --half-life-days {float(stored):g} "
                "or use a new database"
            )


def _connect(path: str, half_life_days: float | None) -> sqlite3.Connection:
    """Open a connection; the writer (``half_life_days`` given) also creates or checks the schema."""
    # isolation_level=None: the sqlite3 module issues no implicit BEGIN; we open transactions ourselves.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if half_life_days is None:
            conn.execute("PRAGMA query_only = ON")
        else:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            _init_schema(conn, path, half_life_days)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreConfigError(f"cannot use {path} as a Sotto SQLite database: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _apply(conn: sqlite3.Connection, batch: Batch, half_life_days: float) -> ApplyResult:
    rows = [(batch.profile_id, cid, s) for cid, s in batch.increments(half_life_days).items()]
    with _transaction(conn, "IMMEDIATE"):
        inserted = conn.execute(
            _INSERT_BATCH, (batch.batch_id, batch.profile_id, batch.digest, batch.base_day)
        ).rowcount
        if not inserted:
            (digest,) = conn.execute(
                "SELECT digest FROM batches WHERE batch_id = ?", (batch.batch_id,)
            ).fetchone()
            if digest != batch.digest:
                raise BatchConflictError("batch id reused with different content")
            return ApplyResult(duplicate=True, applied_signals=0)
        conn.execute(_COUNT_BATCH, (batch.profile_id,))
        conn.executemany(_ADD_SCORE, rows)
    return ApplyResult(duplicate=False, applied_signals=len(batch.signals))


def _read(conn: sqlite3.Connection, profile_id: str) -> StoredProfile | None:
    with _transaction(conn):  # one snapshot for both queries
        row = conn.execute("SELECT batches FROM profiles WHERE profile_id = ?", (profile_id,)).fetchone()
        if row is None:
            return None
        sums = conn.execute("SELECT category_id, s FROM scores WHERE profile_id = ?", (profile_id,))
        return StoredProfile(profile_id=profile_id, batches=row[0], sums=dict(sums.fetchall()))


async def _call(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor, fn)


class SQLiteStore:
    """The SQLite backend of ``server.store.Store``; create it with ``await SQLiteStore.open(...)``."""

    def __init__(
        self,
        half_life_days: float,
        writer: tuple[ThreadPoolExecutor, sqlite3.Connection],
        reader: tuple[ThreadPoolExecutor, sqlite3.Connection],
    ) -> None:
        self._half_life_days = half_life_days
        self._writer = writer
        self._reader = reader
        self._closed = False

    @classmethod
    async def open(cls, path: str, half_life_days: float) -> SQLiteStore:
        """Open ``path`` (``:memory:`` allowed), creating the schema on first use and checking it after."""
        memory = path == ":memory:"
        if not memory:
            _check_path(path)
        write_executor = ThreadPoolExecutor(1, thread_name_prefix="sotto-sqlite-writer")
        try:
            writer = write_executor, await _call(write_executor, partial(_connect, path, half_life_days))
        except BaseException:
            write_executor.shutdown()
            raise
        # For :memory: the writer also serves reads: a second connection would open another, empty database.
        store = cls(half_life_days, writer, writer)
        if not memory:
            read_executor = ThreadPoolExecutor(1, thread_name_prefix="sotto-sqlite-reader")
            try:
                store._reader = read_executor, await _call(read_executor, partial(_connect, path, None))
            except BaseException:
                read_executor.shutdown()
                await store.close()
                raise
        return store

    @property
    def half_life_days(self) -> float:
        """The half-life the stored sums were built with."""
        return self._half_life_days

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        """Record the batch id and add its increments in one transaction (see ``Store.apply_batch``)."""
        executor, conn = self._writer
        return await _call(executor, partial(_apply, conn, batch, self._half_life_days))

    async def get_profile(self, profile_id: str) -> StoredProfile | None:
        """The stored profile, or None when no batch was ever applied to it."""
        executor, conn = self._reader
        return await _call(executor, partial(_read, conn, profile_id))

    async def close(self) -> None:
        """Close both connections on their own threads, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        pairs = [self._writer] if self._reader is self._writer else [self._reader, self._writer]
        for executor, conn in pairs:
            await _call(executor, conn.close)
            executor.shutdown()
