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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sotto.server.store.base import (
    ApplyResult,
    Batch,
    BatchConflictError,
    Credential,
    HalfLifeMismatchError,
    MinorProfileError,
    PurgeResult,
    Role,
    StoreConfigError,
    StoredProfile,
    StoreUnavailableError,
)

T = TypeVar("T")

#: Schema migrations, applied in order on start; the schema version is the number applied. The same
#: version means the same tables on every backend (see server/store/postgres.py).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
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
    ),
    (
        # Retention: the day each entry (and each profile) was last reinforced. Version 1 kept no such day;
        # the newest batch of the profile is the closest bound it has.
        "ALTER TABLE scores ADD COLUMN last_day INTEGER NOT NULL DEFAULT 0",
        """UPDATE scores SET last_day = coalesce(
            (SELECT max(base_day) FROM batches b WHERE b.profile_id = scores.profile_id), 0)""",
        "ALTER TABLE profiles ADD COLUMN last_day INTEGER NOT NULL DEFAULT 0",
        """UPDATE profiles SET last_day = coalesce(
            (SELECT max(last_day) FROM scores s WHERE s.profile_id = profiles.profile_id), 0)""",
        "CREATE INDEX scores_by_last_day ON scores (last_day)",
        "CREATE INDEX scores_by_category ON scores (category_id, s)",
        "CREATE INDEX batches_by_profile ON batches (profile_id)",
        "CREATE INDEX batches_by_base_day ON batches (base_day)",
        """CREATE TABLE credentials (
            token_sha256 BLOB PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('device', 'admin')),
            profile_id TEXT CHECK ((role = 'admin') = (profile_id IS NULL))
        ) WITHOUT ROWID""",
        "CREATE INDEX credentials_by_profile ON credentials (profile_id)",
    ),
    (
        # Local differential privacy: signals per (profile, category, epsilon, day), so the audience
        # estimate can de-bias each mechanism, and deletion and retention reach them by profile and day.
        """CREATE TABLE signal_counts (
            profile_id TEXT NOT NULL,
            category_id TEXT NOT NULL,
            epsilon_milli INTEGER NOT NULL,
            day INTEGER NOT NULL,
            n BIGINT NOT NULL,
            PRIMARY KEY (profile_id, category_id, epsilon_milli, day)
        ) WITHOUT ROWID""",
        "CREATE INDEX signal_counts_by_day ON signal_counts (day)",
        # Profiles marked as minors (an admin's decision); the region table says where that stops signals.
        "CREATE TABLE minors (profile_id TEXT PRIMARY KEY) WITHOUT ROWID",
    ),
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

_INSERT_BATCH = (
    "INSERT INTO batches (batch_id, profile_id, digest, base_day) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (profile_id, batch_id) DO NOTHING"
)
_COUNT_BATCH = (
    "INSERT INTO profiles (profile_id, batches, last_day) VALUES (?, 1, ?) "
    "ON CONFLICT (profile_id) DO UPDATE "
    "SET batches = batches + 1, last_day = max(last_day, excluded.last_day)"
)
_ADD_SCORE = (
    "INSERT INTO scores (profile_id, category_id, s, last_day) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (profile_id, category_id) DO UPDATE "
    "SET s = s + excluded.s, last_day = max(last_day, excluded.last_day)"
)
_ADD_COUNT = (
    "INSERT INTO signal_counts (profile_id, category_id, epsilon_milli, day, n) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (profile_id, category_id, epsilon_milli, day) DO UPDATE SET n = n + excluded.n"
)
_SIGNAL_COUNTS = (
    "SELECT epsilon_milli, sum(CASE WHEN category_id = ? THEN n ELSE 0 END), sum(n) FROM signal_counts "
    "WHERE day >= ? GROUP BY epsilon_milli ORDER BY epsilon_milli"
)
#: Tables holding a profile's signals: what marking it as a minor erases (deletion also erases credentials).
_SIGNAL_TABLES = ("profiles", "scores", "signal_counts", "batches")


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
        if version > SCHEMA_VERSION:
            raise StoreConfigError(
                f"{path} has schema version {version}, newer than this server's {SCHEMA_VERSION}; "
                "upgrade the server"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        if version == 0:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif version < SCHEMA_VERSION:
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        row = conn.execute("SELECT value FROM meta WHERE key = 'half_life_days'").fetchone()
        if row is None:
            if half_life_days is not None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('half_life_days', ?)", (repr(half_life_days),)
                )
            return half_life_days
        stored = float(row[0])
        if half_life_days is not None and stored != half_life_days:
            raise HalfLifeMismatchError(
                f"{path} was created with a half-life of {stored:g} days but {half_life_days:g} is "
                f"configured; the stored sums depend on it, so start with --half-life-days {stored:g} "
                "or use a new database"
            )
        return stored


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
        _INSERT_BATCH, (batch.batch_id, batch.profile_id, batch.digest, batch.base_day)
    ).rowcount
    if not inserted:
        (digest,) = conn.execute(
            "SELECT digest FROM batches WHERE profile_id = ? AND batch_id = ?",
            (batch.profile_id, batch.batch_id),
        ).fetchone()
        if digest != batch.digest:
            raise BatchConflictError("batch id reused with different content")
        return ApplyResult(duplicate=True, applied_signals=0)
    conn.execute(_COUNT_BATCH, (batch.profile_id, max(e.last_day for e in entries)))
    conn.executemany(
        _ADD_SCORE, [(batch.profile_id, e.category_id, e.increment, e.last_day) for e in entries]
    )
    conn.executemany(
        _ADD_COUNT,
        [(batch.profile_id, cid, batch.epsilon_milli, day, n) for cid, day, n in batch.counts()],
    )
    # Last, as in the PostgreSQL store, where a concurrent mark committed by now is seen here.
    if (
        batch.refuse_minor
        and conn.execute("SELECT 1 FROM minors WHERE profile_id = ?", (batch.profile_id,)).fetchone()
    ):
        raise MinorProfileError("this profile is marked as a minor: no interest signals are accepted")
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


def _read(conn: sqlite3.Connection, profile_id: str) -> StoredProfile | None:
    # One statement reads one snapshot: the batch count and the sums always belong together.
    rows = conn.execute(
        "SELECT p.batches, s.category_id, s.s, s.last_day FROM profiles p "
        "LEFT JOIN scores s ON s.profile_id = p.profile_id WHERE p.profile_id = ?",
        (profile_id,),
    ).fetchall()
    if not rows:
        return None
    entries = [row for row in rows if row[1] is not None]
    return StoredProfile(
        profile_id=profile_id,
        batches=rows[0][0],
        sums={cid: s for _, cid, s, _ in entries},
        last_days={cid: day for _, cid, _, day in entries},
    )


def _delete(conn: sqlite3.Connection, profile_id: str) -> bool:
    with _transaction(conn, "IMMEDIATE"):
        removed = sum(
            conn.execute(f"DELETE FROM {table} WHERE profile_id = ?", (profile_id,)).rowcount
            for table in (*_SIGNAL_TABLES, "credentials")
        )
    return removed > 0


def _signal_counts(conn: sqlite3.Connection, category_id: str, since_day: int) -> list[tuple[int, int, int]]:
    return [(int(e), int(c), int(n)) for e, c, n in conn.execute(_SIGNAL_COUNTS, (category_id, since_day))]


def _mark_minor(conn: sqlite3.Connection, profile_id: str, minor: bool) -> int:
    with _transaction(conn, "IMMEDIATE"):
        if not minor:
            conn.execute("DELETE FROM minors WHERE profile_id = ?", (profile_id,))
            return 0
        conn.execute("INSERT INTO minors (profile_id) VALUES (?) ON CONFLICT DO NOTHING", (profile_id,))
        return sum(
            conn.execute(f"DELETE FROM {table} WHERE profile_id = ?", (profile_id,)).rowcount
            for table in _SIGNAL_TABLES
        )


def _minors(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT profile_id FROM minors ORDER BY profile_id")]


def _audience(conn: sqlite3.Connection, category_id: str, min_sum: float, since_day: int) -> int:
    (count,) = conn.execute(
        "SELECT count(*) FROM scores WHERE category_id = ? AND s >= ? AND last_day >= ?",
        (category_id, min_sum, since_day),
    ).fetchone()
    return int(count)


def _purge(conn: sqlite3.Connection, before_day: int) -> PurgeResult:
    with _transaction(conn, "IMMEDIATE"):
        entries = conn.execute("DELETE FROM scores WHERE last_day < ?", (before_day,)).rowcount
        # A profile's last_day is the newest of its entries', so these profiles have no entry left.
        profiles = conn.execute("DELETE FROM profiles WHERE last_day < ?", (before_day,)).rowcount
        batches = conn.execute("DELETE FROM batches WHERE base_day < ?", (before_day,)).rowcount
        counts = conn.execute("DELETE FROM signal_counts WHERE day < ?", (before_day,)).rowcount
    return PurgeResult(entries=entries, profiles=profiles, batches=batches, signal_counts=counts)


def _add_credential(conn: sqlite3.Connection, credential: Credential) -> None:
    with _transaction(conn, "IMMEDIATE"):
        conn.execute(
            "INSERT INTO credentials (token_sha256, role, profile_id) VALUES (?, ?, ?)",
            (credential.token_sha256, credential.role.value, credential.profile_id),
        )


def _find_credential(conn: sqlite3.Connection, token_sha256: bytes) -> Credential | None:
    row = conn.execute(
        "SELECT role, profile_id FROM credentials WHERE token_sha256 = ?", (token_sha256,)
    ).fetchone()
    return None if row is None else Credential(token_sha256, Role(row[0]), row[1])


def _count_credentials(conn: sqlite3.Connection, role: Role) -> int:
    (count,) = conn.execute("SELECT count(*) FROM credentials WHERE role = ?", (role.value,)).fetchone()
    return int(count)


def _revoke(conn: sqlite3.Connection, profile_id: str | None) -> int:
    with _transaction(conn, "IMMEDIATE"):
        if profile_id is None:
            return conn.execute("DELETE FROM credentials WHERE role = 'admin'").rowcount
        return conn.execute("DELETE FROM credentials WHERE profile_id = ?", (profile_id,)).rowcount


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


class SQLiteStore:
    """The SQLite backend of ``server.store.Store``; create it with ``await SQLiteStore.open(...)``."""

    def __init__(
        self,
        path: str,
        half_life_days: float | None,
        writer: tuple[_Worker, sqlite3.Connection],
        reader: tuple[_Worker, sqlite3.Connection],
    ) -> None:
        self._path = path
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

    @property
    def half_life_days(self) -> float:
        """The half-life the stored sums were built with."""
        if self._half_life_days is None:
            raise StoreConfigError(
                f"{self._path} has no half-life recorded yet; `sotto-server serve` records it on first start"
            )
        return self._half_life_days

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        worker, conn = self._writer
        return await worker.call(partial(fn, conn))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        worker, conn = self._reader
        return await worker.call(partial(fn, conn))

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        """Record the batch id and add its entries in one transaction (see ``Store.apply_batch``)."""
        worker, conn = self._writer
        return await worker.apply(conn, batch, self.half_life_days)

    async def get_profile(self, profile_id: str) -> StoredProfile | None:
        """The stored profile, or None when nothing is stored for it."""
        return await self._read(lambda conn: _read(conn, profile_id))

    async def delete_profile(self, profile_id: str) -> bool:
        """Erase every row of the profile in one transaction; True when there was something."""
        return await self._write(lambda conn: _delete(conn, profile_id))

    async def audience_size(self, category_id: str, min_sum: float, since_day: int) -> int:
        """Distinct profiles with at least ``min_sum`` in the category, reinforced since ``since_day``."""
        return await self._read(lambda conn: _audience(conn, category_id, min_sum, since_day))

    async def signal_counts(self, category_id: str, since_day: int) -> list[tuple[int, int, int]]:
        """Per epsilon: signals of the category and of every category since ``since_day``."""
        return await self._read(lambda conn: _signal_counts(conn, category_id, since_day))

    async def mark_minor(self, profile_id: str, minor: bool) -> int:
        """Mark or unmark a minor; marking erases the profile's signals (see ``Store.mark_minor``)."""
        return await self._write(lambda conn: _mark_minor(conn, profile_id, minor))

    async def minors(self) -> list[str]:
        """Profiles marked as minors."""
        return await self._read(_minors)

    async def purge(self, before_day: int) -> PurgeResult:
        """Remove what was last reinforced before ``before_day`` (see ``Store.purge``)."""
        return await self._write(lambda conn: _purge(conn, before_day))

    async def add_credential(self, credential: Credential) -> None:
        """Store a credential."""
        await self._write(lambda conn: _add_credential(conn, credential))

    async def find_credential(self, token_sha256: bytes) -> Credential | None:
        """The credential with this token hash, or None."""
        return await self._read(lambda conn: _find_credential(conn, token_sha256))

    async def count_credentials(self, role: Role) -> int:
        """How many credentials of ``role`` are stored."""
        return await self._read(lambda conn: _count_credentials(conn, role))

    async def revoke_credentials(self, profile_id: str | None) -> int:
        """Remove the profile's device credentials, or every admin credential for None."""
        return await self._write(lambda conn: _revoke(conn, profile_id))

    async def close(self) -> None:
        """Close both connections on their own threads, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        pairs = [self._writer] if self._reader is self._writer else [self._reader, self._writer]
        for worker, conn in pairs:
            await worker.call(conn.close)
            worker.stop()
