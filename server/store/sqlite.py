"""SQLite store: one writer thread doing ``BEGIN IMMEDIATE`` transactions, reads on a separate connection.

Each connection lives on a thread of its own (``_Worker``), so the event loop never waits on SQLite and a
connection is only ever used by the thread that opened it. Under load the writer commits the batches
that queued up while it was busy in one transaction (group commit; each batch still all-or-nothing
through its own savepoint, and acknowledged only after the COMMIT). WAL lets the reader see the last committed
state while the writer works; ``synchronous=NORMAL`` makes a commit a WAL append without fsync (a power
loss may lose the last transactions, never corrupt the file; a lost batch is resent by the device and
applied then, because its id was lost with it). A killed process loses nothing it committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sotto.server.store import common
from sotto.server.store.base import (
    ApplyResult,
    Batch,
    MinorProfileError,
    StoreConfigError,
    StoreUnavailableError,
)

T = TypeVar("T")

#: Schema migrations, applied in order on start; the schema version is the number applied. The same
#: version means the same tables on every backend (server/store/common.py).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    *common.migrations(common.SQLITE),
    (
        # Batch ids are unique per profile, not globally: another device sending a batch under a given id
        # first must neither block the genuine batch nor learn whether the id exists. SQLite cannot change
        # a primary key in place, so the table is rebuilt (its indexes go with the old table).
        """CREATE TABLE batches_v4 (
            profile_id TEXT NOT NULL,
            batch_id BLOB NOT NULL,
            digest BLOB NOT NULL,
            base_day INTEGER NOT NULL,
            PRIMARY KEY (profile_id, batch_id)
        ) WITHOUT ROWID""",
        "INSERT INTO batches_v4 (profile_id, batch_id, digest, base_day) "
        "SELECT profile_id, batch_id, digest, base_day FROM batches",
        "DROP TABLE batches",
        "ALTER TABLE batches_v4 RENAME TO batches",
        "CREATE INDEX batches_by_base_day ON batches (base_day)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_COUNT_BATCH = common.count_batch(common.SQLITE)
_ADD_SCORE = (
    "INSERT INTO scores (profile_id, category_id, s, last_day) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (profile_id, category_id) DO UPDATE "
    "SET s = s + excluded.s, last_day = max(last_day, excluded.last_day)"
)
_ADD_COUNT = (
    "INSERT INTO signal_counts (profile_id, category_id, epsilon_milli, day, n) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (profile_id, category_id, epsilon_milli, day) DO UPDATE SET n = n + excluded.n"
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


def _migrate(conn: sqlite3.Connection, path: str, half_life_days: float | None) -> float | None:
    """Bring the schema to ``SCHEMA_VERSION`` and record or check the half-life; returns the half-life."""
    with _transaction(conn, "IMMEDIATE"):
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "schema_version" not in tables:
            raise StoreConfigError(f"{path} is not a Sotto database (it has tables but no schema_version)")
        version = conn.execute("SELECT version FROM schema_version").fetchone()[0] if tables else 0
        for statement, params in common.migration_steps(path, version, MIGRATIONS):
            conn.execute(statement, params)
        row = conn.execute(common.SELECT_HALF_LIFE).fetchone()
        recorded, record = common.settle_half_life(path, None if row is None else row[0], half_life_days)
        if record is not None:
            conn.execute(*record)
        return recorded


def _connect(path: str, writer: bool) -> sqlite3.Connection:
    # isolation_level=None: the sqlite3 module issues no implicit BEGIN; we open transactions ourselves.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if writer:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Deleted rows are overwritten with zeros instead of lingering in free pages: a deleted
            # profile must not remain readable in the file.
            conn.execute("PRAGMA secure_delete = ON")
        else:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _open_writer(path: str, half_life_days: float | None) -> tuple[sqlite3.Connection, float | None]:
    """Open the writer connection and migrate the schema; returns it with the database's half-life."""
    conn = None
    try:
        conn = _connect(path, writer=True)
        return conn, _migrate(conn, path, half_life_days)
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        raise StoreConfigError(f"cannot use {path} as a Sotto SQLite database: {exc}") from exc
    except BaseException:
        if conn is not None:
            conn.close()
        raise


def _apply_in_transaction(conn: sqlite3.Connection, batch: Batch, half_life_days: float) -> ApplyResult:
    """The statements of one batch, inside a transaction the caller opened and will commit."""
    entries = batch.entries(half_life_days)
    inserted = conn.execute(
        common.INSERT_BATCH, (batch.batch_id, batch.profile_id, batch.digest, batch.base_day)
    ).rowcount
    if not inserted:
        (digest,) = conn.execute(common.SELECT_DIGEST, (batch.profile_id, batch.batch_id)).fetchone()
        return common.resend(digest, batch)
    conn.execute(_COUNT_BATCH, (batch.profile_id, max(e.last_day for e in entries)))
    conn.executemany(
        _ADD_SCORE, [(batch.profile_id, e.category_id, e.increment, e.last_day) for e in entries]
    )
    conn.executemany(
        _ADD_COUNT,
        [(batch.profile_id, cid, batch.epsilon_milli, day, n) for cid, day, n in batch.counts()],
    )
    # Last, as in the PostgreSQL store, where a concurrent mark committed by now is seen here.
    if batch.refuse_minor and conn.execute(common.SELECT_MINOR, (batch.profile_id,)).fetchone():
        raise MinorProfileError()
    return ApplyResult(duplicate=False, applied_signals=len(batch.signals))


def _apply(conn: sqlite3.Connection, batch: Batch, half_life_days: float) -> ApplyResult:
    with _transaction(conn, "IMMEDIATE"):
        return _apply_in_transaction(conn, batch, half_life_days)


def _apply_group(
    conn: sqlite3.Connection, batches: list[tuple[Batch, float]]
) -> list[ApplyResult | Exception]:
    """Apply several batches in one transaction; one outcome (result or exception) per batch, in order.

    Each batch runs inside its own savepoint, so a batch that fails (a reused id, say) leaves no trace
    while the others commit. An ``OperationalError`` (disk full, I/O) fails the whole group: SQLite may
    have rolled the transaction back already, and nothing of it is committed.
    """
    if len(batches) == 1:
        batch, half_life = batches[0]
        try:
            return [_apply(conn, batch, half_life)]
        except Exception as exc:
            return [exc]
    outcomes: list[ApplyResult | Exception] = []
    try:
        with _transaction(conn, "IMMEDIATE"):
            for batch, half_life in batches:
                conn.execute("SAVEPOINT batch")
                try:
                    outcomes.append(_apply_in_transaction(conn, batch, half_life))
                except sqlite3.OperationalError:
                    raise
                except Exception as exc:
                    conn.execute("ROLLBACK TO batch")
                    outcomes.append(exc)
                conn.execute("RELEASE batch")
    except Exception as exc:  # nothing of the group was committed
        return [exc] * len(batches)
    return outcomes


def _fetch(conn: sqlite3.Connection, statement: common.Statement) -> list[tuple[Any, ...]]:
    return conn.execute(*statement).fetchall()


def _write(conn: sqlite3.Connection, statements: Sequence[common.Statement]) -> list[int]:
    with _transaction(conn, "IMMEDIATE"):
        return [conn.execute(*statement).rowcount for statement in statements]


#: At most this many queued jobs are taken in one round of a worker (one transaction for the batches).
MAX_ROUND = 256


@dataclass(slots=True)
class _Job:
    """A call waiting for a worker: a function of no arguments, or a batch that may share a transaction."""

    future: asyncio.Future[Any]
    fn: Callable[[], Any] | None = None
    apply: tuple[sqlite3.Connection, Batch, float] | None = None


class _Worker:
    """One thread that runs the jobs queued for one connection, in order.

    The jobs queued while the thread was busy are taken together in one round: consecutive batches are
    applied in one transaction (``_apply_group``), and the round's results go back to the event loop in
    one wake-up. Per batch, the COMMIT and the thread hand-offs cost more than the statements themselves;
    a round shares them (BENCHMARKS.md has the profile that showed it).
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker's thread; SQLite errors a retry may cure become StoreUnavailableError."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Job(future, fn=fn))
        return await _unavailable(future)

    async def apply(self, conn: sqlite3.Connection, batch: Batch, half_life_days: float) -> ApplyResult:
        """Apply ``batch``, in one transaction with the batches queued next to it."""
        future: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Job(future, apply=(conn, batch, half_life_days)))
        return await _unavailable(future)

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < MAX_ROUND:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            self._settle(self._run_round(jobs))

    @staticmethod
    def _run_round(jobs: list[_Job]) -> list[tuple[_Job, Any, BaseException | None]]:
        done: list[tuple[_Job, Any, BaseException | None]] = []
        n = 0
        while n < len(jobs):
            job = jobs[n]
            if job.apply is not None:
                group = [job]
                while n + len(group) < len(jobs) and jobs[n + len(group)].apply is not None:
                    group.append(jobs[n + len(group)])
                conn = job.apply[0]
                outcomes = _apply_group(conn, [(g.apply[1], g.apply[2]) for g in group if g.apply])
                for g, outcome in zip(group, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        done.append((g, None, outcome))
                    else:
                        done.append((g, outcome, None))
                n += len(group)
                continue
            assert job.fn is not None
            try:
                done.append((job, job.fn(), None))
            except Exception as exc:
                done.append((job, None, exc))
            n += 1
        return done

    @staticmethod
    def _settle(done: list[tuple[_Job, Any, BaseException | None]]) -> None:
        loops: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any, BaseException | None]]] = {}
        for item in done:
            loops.setdefault(item[0].future.get_loop(), []).append(item)
        for loop, items in loops.items():
            # A closed loop (RuntimeError) means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[_Job, Any, BaseException | None]]) -> None:
    for job, result, exc in items:
        if job.future.cancelled():  # the caller gave up (deadline); the outcome stands, unacknowledged
            continue
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)


async def _unavailable(future: asyncio.Future[T]) -> T:
    try:
        return await future
    except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk full, I/O error
        raise StoreUnavailableError(f"SQLite: {exc}") from exc


class SQLiteStore(common.SQLStore):
    """The SQLite backend of ``server.store.Store``; create it with ``await SQLiteStore.open(...)``."""

    def __init__(
        self,
        path: str,
        half_life_days: float | None,
        writer: tuple[_Worker, sqlite3.Connection],
        reader: tuple[_Worker, sqlite3.Connection],
    ) -> None:
        self._subject = path
        self._half_life_days = half_life_days
        self._writer = writer
        self._reader = reader
        self._closed = False

    @classmethod
    async def open(cls, path: str, half_life_days: float | None) -> SQLiteStore:
        """Open ``path`` (``:memory:`` allowed), migrating the schema to the current version.

        ``half_life_days`` is recorded on first use and checked after; None accepts what is recorded.
        """
        memory = path == ":memory:"
        if not memory:
            _check_path(path)
        write_worker = _Worker("sotto-sqlite-writer")
        try:
            conn, recorded = await write_worker.call(partial(_open_writer, path, half_life_days))
        except BaseException:
            write_worker.stop()
            raise
        # For :memory: the writer also serves reads: a second connection would open another, empty database.
        writer = write_worker, conn
        store = cls(path, recorded, writer, writer)
        if not memory:
            read_worker = _Worker("sotto-sqlite-reader")
            try:
                store._reader = read_worker, await read_worker.call(partial(_connect, path, False))
            except BaseException:
                read_worker.stop()
                await store.close()
                raise
        return store

    async def _fetch(self, statement: common.Statement) -> list[tuple[Any, ...]]:
        worker, conn = self._reader
        return await worker.call(partial(_fetch, conn, statement))

    async def _write(self, statements: Sequence[common.Statement]) -> list[int]:
        worker, conn = self._writer
        return await worker.call(partial(_write, conn, statements))

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        """Record the batch id and add its entries in one transaction (see ``Store.apply_batch``)."""
        worker, conn = self._writer
        return await worker.apply(conn, batch, self.half_life_days)

    async def close(self) -> None:
        """Close both connections on their own threads, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        pairs = [self._writer] if self._reader is self._writer else [self._reader, self._writer]
        for worker, conn in pairs:
            await worker.call(conn.close)
            worker.stop()
