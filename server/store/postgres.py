"""PostgreSQL store (psycopg 3, asyncio): the production backend; several aggregators may share one database.

Why several processes give the same profiles as one:

- Applying a batch adds to stored sums (see ``server.decay``); additions commute, so the order in which
  processes commit does not matter.
- The batch id is inserted in the same transaction as the increments. ``INSERT ... ON CONFLICT DO
  NOTHING`` on the primary key makes a second transaction with the same id wait for the first one and
  then do nothing (or insert, if the first rolled back), so a batch is applied exactly once under
  READ COMMITTED without retries or table locks.
- A transaction locks its profile row first, then the entries in category order, so two batches of one
  profile queue up instead of deadlocking. Only the retention purge touches many profiles' entries in
  another order; if PostgreSQL aborts a transaction to break such a deadlock, it is retried here.

Schema migrations run on open inside a transaction holding an advisory lock, so processes starting
together migrate once.
"""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import quote

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

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

#: Same versions, same tables as server/store/sqlite.py, in PostgreSQL's types.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE batches (
            batch_id BYTEA PRIMARY KEY,
            profile_id TEXT NOT NULL,
            digest BYTEA NOT NULL,
            base_day INTEGER NOT NULL
        )""",
        "CREATE TABLE profiles (profile_id TEXT PRIMARY KEY, batches BIGINT NOT NULL)",
        """CREATE TABLE scores (
            profile_id TEXT NOT NULL,
            category_id TEXT NOT NULL,
            s DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (profile_id, category_id)
        )""",
    ),
    (
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
            token_sha256 BYTEA PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('device', 'admin')),
            profile_id TEXT CHECK ((role = 'admin') = (profile_id IS NULL))
        )""",
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
        )""",
        "CREATE INDEX signal_counts_by_day ON signal_counts (day)",
        # Profiles marked as minors (an admin's decision); the region table says where that stops signals.
        "CREATE TABLE minors (profile_id TEXT PRIMARY KEY)",
    ),
    (
        # Batch ids are unique per profile, not globally: another device sending a batch under a given id
        # first must neither block the genuine batch nor learn whether the id exists. Every unique key
        # now includes profile_id, which is also what a store distributed by profile (Citus) requires.
        "ALTER TABLE batches DROP CONSTRAINT batches_pkey",
        "ALTER TABLE batches ADD PRIMARY KEY (profile_id, batch_id)",
        "DROP INDEX batches_by_profile",  # the primary key's prefix serves deletion by profile
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
#: pg_advisory_xact_lock key serialising migrations ("sotto" in ASCII).
_MIGRATION_LOCK = 0x736F74746F
#: Connections per process. Requests beyond it wait for a free connection within their deadline.
POOL_SIZE = 10
CONNECT_TIMEOUT_S = 10
#: Attempts of a batch that PostgreSQL aborted to resolve a deadlock (see the module doc).
_ROLLBACK_ATTEMPTS = 3

_INSERT_BATCH = (
    "INSERT INTO batches (batch_id, profile_id, digest, base_day) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (profile_id, batch_id) DO NOTHING"
)
_COUNT_BATCH = (
    "INSERT INTO profiles (profile_id, batches, last_day) VALUES (%s, 1, %s) ON CONFLICT (profile_id) "
    "DO UPDATE SET batches = profiles.batches + 1, last_day = greatest(profiles.last_day, excluded.last_day)"
)
#: All entries of a batch in one statement (one round trip, one plan), inserted in category order so that
#: row locks are taken in that order (see the module doc); a batch has at most one entry per category.
_ADD_SCORES = (
    "INSERT INTO scores (profile_id, category_id, s, last_day) "
    "SELECT %s, e.category_id, e.s, e.last_day "
    "FROM unnest(%s::text[], %s::float8[], %s::int[]) AS e (category_id, s, last_day) "
    "ORDER BY e.category_id "
    "ON CONFLICT (profile_id, category_id) DO UPDATE "
    "SET s = scores.s + excluded.s, last_day = greatest(scores.last_day, excluded.last_day)"
)
_ADD_COUNTS = (
    "INSERT INTO signal_counts (profile_id, category_id, epsilon_milli, day, n) "
    "SELECT %s, e.category_id, %s, e.day, e.n "
    "FROM unnest(%s::text[], %s::int[], %s::int[]) AS e (category_id, day, n) "
    "ORDER BY e.category_id, e.day "
    "ON CONFLICT (profile_id, category_id, epsilon_milli, day) DO UPDATE "
    "SET n = signal_counts.n + excluded.n"
)
_SIGNAL_COUNTS = (
    "SELECT epsilon_milli, sum(CASE WHEN category_id = %s THEN n ELSE 0 END), sum(n) FROM signal_counts "
    "WHERE day >= %s GROUP BY epsilon_milli ORDER BY epsilon_milli"
)
#: Tables holding a profile's signals, in locking order (profiles first, see the module doc): what marking
#: it as a minor erases (deletion also erases credentials).
_SIGNAL_TABLES = ("profiles", "scores", "signal_counts", "batches")


def describe(url: str) -> str:
    """``user@host:port/dbname`` of a connection URL, for messages: never the password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the configured PostgreSQL URL"
    where = f"{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"
    return f"{parts['user']}@{where}" if parts.get("user") else where


async def _migrate(
    conn: AsyncConnection,
    where: str,
    half_life_days: float | None,
    migrations: tuple[tuple[str, ...], ...] = MIGRATIONS,
) -> float | None:
    """Bring the schema to the version ``migrations`` define (``SCHEMA_VERSION`` by default) and record or
    check the half-life; returns the half-life. The sharded store migrates its proxy database with a
    list of its own and every shard with this one."""
    schema_version = len(migrations)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        exists = await (await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")).fetchone()
        version = 0
        if exists and exists[0]:
            row = await (await conn.execute("SELECT version FROM schema_version")).fetchone()
            version = row[0] if row else 0
        if version > schema_version:
            raise StoreConfigError(
                f"PostgreSQL database {where} has schema version {version}, newer than this server's "
                f"{schema_version}; upgrade the server"
            )
        for statements in migrations[version:]:
            for statement in statements:
                await conn.execute(statement)
        if version == 0:
            await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (schema_version,))
        elif version < schema_version:
            await conn.execute("UPDATE schema_version SET version = %s", (schema_version,))
        row = await (await conn.execute("SELECT value FROM meta WHERE key = 'half_life_days'")).fetchone()
        if row is None:
            if half_life_days is not None:
                await conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('half_life_days', %s)", (repr(half_life_days),)
                )
            return half_life_days
        stored = float(row[0])
        if half_life_days is not None and stored != half_life_days:
            raise HalfLifeMismatchError(
                f"PostgreSQL database {where} was created with a half-life of {stored:g} days but "
                f"{half_life_days:g} is configured; the stored sums depend on it, so start with "
                f"--half-life-days {stored:g} or use a new database"
            )
        return stored


async def _apply(conn: AsyncConnection, batch: Batch, half_life_days: float) -> ApplyResult:
    entries = batch.entries(half_life_days)
    # Pipeline mode: BEGIN and the batch id go out together, then the increments and COMMIT together, so
    # a batch costs two round trips to the database instead of one per statement.
    async with conn.pipeline() as pipeline, conn.transaction():
        cursor = await conn.execute(
            _INSERT_BATCH, (batch.batch_id, batch.profile_id, batch.digest, batch.base_day)
        )
        await pipeline.sync()
        if cursor.rowcount == 0:
            row = await (
                await conn.execute(
                    "SELECT digest FROM batches WHERE profile_id = %s AND batch_id = %s",
                    (batch.profile_id, batch.batch_id),
                )
            ).fetchone()
            # row is None when the profile was deleted between the two statements: apply nothing then.
            if row is not None and bytes(row[0]) != batch.digest:
                raise BatchConflictError("batch id reused with different content")
            return ApplyResult(duplicate=True, applied_signals=0)
        await conn.execute(_COUNT_BATCH, (batch.profile_id, max(e.last_day for e in entries)))
        await conn.execute(
            _ADD_SCORES,
            (
                batch.profile_id,
                [e.category_id for e in entries],
                [e.increment for e in entries],
                [e.last_day for e in entries],
            ),
        )
        counts = batch.counts()
        await conn.execute(
            _ADD_COUNTS,
            (
                batch.profile_id,
                batch.epsilon_milli,
                [cid for cid, _, _ in counts],
                [day for _, day, _ in counts],
                [n for _, _, n in counts],
            ),
        )
        # Last, holding the profile's row lock: a mark committed before this statement is seen (READ
        # COMMITTED), and a mark committing after it waits for this transaction and then erases its rows.
        if batch.refuse_minor:
            cursor = await conn.execute("SELECT 1 FROM minors WHERE profile_id = %s", (batch.profile_id,))
            if await cursor.fetchone() is not None:
                raise MinorProfileError("this profile is marked as a minor: no interest signals are accepted")
    return ApplyResult(duplicate=False, applied_signals=len(batch.signals))


async def _read(conn: AsyncConnection, profile_id: str) -> StoredProfile | None:
    # One statement reads one snapshot: the batch count and the sums always belong together.
    cursor = await conn.execute(
        "SELECT p.batches, s.category_id, s.s, s.last_day FROM profiles p "
        "LEFT JOIN scores s ON s.profile_id = p.profile_id WHERE p.profile_id = %s",
        (profile_id,),
    )
    rows = await cursor.fetchall()
    if not rows:
        return None
    entries = [row for row in rows if row[1] is not None]
    return StoredProfile(
        profile_id=profile_id,
        batches=rows[0][0],
        sums={cid: s for _, cid, s, _ in entries},
        last_days={cid: day for _, cid, _, day in entries},
    )


async def _delete(conn: AsyncConnection, profile_id: str) -> bool:
    removed = 0
    async with conn.transaction():
        # profiles first: a concurrent batch of this profile waits on that row (see the module doc).
        for table in (*_SIGNAL_TABLES, "credentials"):
            cursor = await conn.execute(f"DELETE FROM {table} WHERE profile_id = %s", (profile_id,))
            removed += cursor.rowcount
    return removed > 0


async def _signal_counts(
    conn: AsyncConnection, category_id: str, since_day: int
) -> list[tuple[int, int, int]]:
    cursor = await conn.execute(_SIGNAL_COUNTS, (category_id, since_day))
    return [(int(e), int(c), int(n)) for e, c, n in await cursor.fetchall()]


async def _mark_minor(conn: AsyncConnection, profile_id: str, minor: bool) -> int:
    removed = 0
    async with conn.transaction():
        if not minor:
            await conn.execute("DELETE FROM minors WHERE profile_id = %s", (profile_id,))
            return 0
        await conn.execute(
            "INSERT INTO minors (profile_id) VALUES (%s) ON CONFLICT DO NOTHING", (profile_id,)
        )
        for table in _SIGNAL_TABLES:
            cursor = await conn.execute(f"DELETE FROM {table} WHERE profile_id = %s", (profile_id,))
            removed += cursor.rowcount
    return removed


async def _minors(conn: AsyncConnection) -> list[str]:
    cursor = await conn.execute("SELECT profile_id FROM minors ORDER BY profile_id")
    return [row[0] for row in await cursor.fetchall()]


async def _audience(conn: AsyncConnection, category_id: str, min_sum: float, since_day: int) -> int:
    cursor = await conn.execute(
        "SELECT count(*) FROM scores WHERE category_id = %s AND s >= %s AND last_day >= %s",
        (category_id, min_sum, since_day),
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _purge(conn: AsyncConnection, before_day: int) -> PurgeResult:
    async with conn.transaction():
        entries = await conn.execute("DELETE FROM scores WHERE last_day < %s", (before_day,))
        # A profile's last_day is the newest of its entries'. Testing the row's own column (not "has no
        # entries left") keeps this right when a batch of the profile commits concurrently: PostgreSQL
        # re-checks the updated row before deleting it.
        profiles = await conn.execute("DELETE FROM profiles WHERE last_day < %s", (before_day,))
        batches = await conn.execute("DELETE FROM batches WHERE base_day < %s", (before_day,))
        counts = await conn.execute("DELETE FROM signal_counts WHERE day < %s", (before_day,))
    return PurgeResult(
        entries=entries.rowcount,
        profiles=profiles.rowcount,
        batches=batches.rowcount,
        signal_counts=counts.rowcount,
    )


async def _add_credential(conn: AsyncConnection, credential: Credential) -> None:
    await conn.execute(
        "INSERT INTO credentials (token_sha256, role, profile_id) VALUES (%s, %s, %s)",
        (credential.token_sha256, credential.role.value, credential.profile_id),
    )


async def _find_credential(conn: AsyncConnection, token_sha256: bytes) -> Credential | None:
    cursor = await conn.execute(
        "SELECT role, profile_id FROM credentials WHERE token_sha256 = %s", (token_sha256,)
    )
    row = await cursor.fetchone()
    return None if row is None else Credential(token_sha256, Role(row[0]), row[1])


async def _count_credentials(conn: AsyncConnection, role: Role) -> int:
    cursor = await conn.execute("SELECT count(*) FROM credentials WHERE role = %s", (role.value,))
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _revoke(conn: AsyncConnection, profile_id: str | None) -> int:
    if profile_id is None:
        cursor = await conn.execute("DELETE FROM credentials WHERE role = 'admin'")
    else:
        cursor = await conn.execute("DELETE FROM credentials WHERE profile_id = %s", (profile_id,))
    return cursor.rowcount


#: A connection used less than this long ago is handed out without a liveness round trip.
CHECK_AFTER_IDLE_S = 1.0
_returned_at: weakref.WeakKeyDictionary[AsyncConnection, float] = weakref.WeakKeyDictionary()


async def _mark_returned(conn: AsyncConnection) -> None:
    """Pool ``reset`` hook: remember when the connection came back."""
    _returned_at[conn] = time.monotonic()


async def _check_if_idle(conn: AsyncConnection) -> None:
    """Pool ``check`` hook: test a connection with a round trip only when it sat idle.

    Checking on every checkout cost a round trip per call (two per Ingest: credential, then batch), about
    a tenth of the aggregator's time under load. A connection in steady use needs no check; one idle
    for a while (as after a database restart) gets it. A restart in the middle of heavy traffic may
    still hand out a dead connection once: that call answers UNAVAILABLE with nothing committed, the
    device resends, and the pool replaces the connection.
    """
    if time.monotonic() - _returned_at.get(conn, float("-inf")) >= CHECK_AFTER_IDLE_S:
        await AsyncConnectionPool.check_connection(conn)


async def open_pool(url: str) -> AsyncConnectionPool:
    """The connection pool of a store: autocommit connections, checked when they sat idle."""
    pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=POOL_SIZE,
        open=False,
        kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
        # A connection that died with a database restart is replaced, not handed out.
        check=_check_if_idle,
        reset=_mark_returned,
        name="sotto",
    )
    await pool.open()
    return pool


class PostgresStore:
    """The PostgreSQL backend of ``server.store.Store``; create it with ``await PostgresStore.open(...)``."""

    def __init__(self, pool: AsyncConnectionPool, where: str, half_life_days: float | None) -> None:
        self._pool = pool
        self._where = where
        self._half_life_days = half_life_days

    @classmethod
    async def open(cls, url: str, half_life_days: float | None) -> PostgresStore:
        """Connect, migrate the schema to the current version and open a connection pool.

        ``half_life_days`` is recorded on first use and checked after; None accepts what is recorded.
        """
        where = describe(url)
        try:
            async with await AsyncConnection.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                recorded = await _migrate(conn, where, half_life_days)
        except psycopg.Error as exc:
            # psycopg's messages name host, port, user and database, never the password.
            raise StoreConfigError(f"cannot use PostgreSQL database {where}: {exc}") from exc
        return cls(await open_pool(url), where, recorded)

    @property
    def half_life_days(self) -> float:
        """The half-life the stored sums were built with."""
        if self._half_life_days is None:
            raise StoreConfigError(
                f"PostgreSQL database {self._where} has no half-life recorded yet; "
                "`sotto-server serve` records it on first start"
            )
        return self._half_life_days

    async def _run(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        for attempt in range(_ROLLBACK_ATTEMPTS):
            try:
                async with self._pool.connection() as conn:
                    return await fn(conn)
            except psycopg.errors.TransactionRollback as exc:  # deadlock victim: nothing committed
                if attempt + 1 == _ROLLBACK_ATTEMPTS:
                    raise StoreUnavailableError(f"PostgreSQL {self._where}: {exc}") from exc
            except psycopg.OperationalError as exc:  # connection lost, pool exhausted, server shutting down
                raise StoreUnavailableError(f"PostgreSQL {self._where}: {exc}") from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        """Record the batch id and add its entries in one transaction (see ``Store.apply_batch``)."""
        half_life = self.half_life_days
        return await self._run(lambda conn: _apply(conn, batch, half_life))

    async def get_profile(self, profile_id: str) -> StoredProfile | None:
        """The stored profile, or None when nothing is stored for it."""
        return await self._run(lambda conn: _read(conn, profile_id))

    async def delete_profile(self, profile_id: str) -> bool:
        """Erase every row of the profile in one transaction; True when there was something."""
        return await self._run(lambda conn: _delete(conn, profile_id))

    async def audience_size(self, category_id: str, min_sum: float, since_day: int) -> int:
        """Distinct profiles with at least ``min_sum`` in the category, reinforced since ``since_day``."""
        return await self._run(lambda conn: _audience(conn, category_id, min_sum, since_day))

    async def signal_counts(self, category_id: str, since_day: int) -> list[tuple[int, int, int]]:
        """Per epsilon: signals of the category and of every category since ``since_day``."""
        return await self._run(lambda conn: _signal_counts(conn, category_id, since_day))

    async def mark_minor(self, profile_id: str, minor: bool) -> int:
        """Mark or unmark a minor; marking erases the profile's signals (see ``Store.mark_minor``)."""
        return await self._run(lambda conn: _mark_minor(conn, profile_id, minor))

    async def minors(self) -> list[str]:
        """Profiles marked as minors."""
        return await self._run(_minors)

    async def purge(self, before_day: int) -> PurgeResult:
        """Remove what was last reinforced before ``before_day`` (see ``Store.purge``)."""
        return await self._run(lambda conn: _purge(conn, before_day))

    async def add_credential(self, credential: Credential) -> None:
        """Store a credential."""
        await self._run(lambda conn: _add_credential(conn, credential))

    async def find_credential(self, token_sha256: bytes) -> Credential | None:
        """The credential with this token hash, or None."""
        return await self._run(lambda conn: _find_credential(conn, token_sha256))

    async def count_credentials(self, role: Role) -> int:
        """How many credentials of ``role`` are stored."""
        return await self._run(lambda conn: _count_credentials(conn, role))

    async def revoke_credentials(self, profile_id: str | None) -> int:
        """Remove the profile's device credentials, or every admin credential for None."""
        return await self._run(lambda conn: _revoke(conn, profile_id))

    async def close(self) -> None:
        """Close the pool (idempotent)."""
        await self._pool.close()


def with_search_path(url: str, schema: str) -> str:
    """``url`` with libpq's ``options`` setting the schema, so every connection lands in ``schema``."""
    return f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def scratch_schema(base_url: str, prefix: str = "scratch") -> Iterator[str]:
    """A new, empty schema on ``base_url`` (tests, benchmarks): yields a URL that uses it, and drops the
    schema with everything in it afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(base_url, schema)
    finally:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
