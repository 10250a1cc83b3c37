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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from sotto.server.store import common
from sotto.server.store.base import (
    ApplyResult,
    Batch,
    MinorProfileError,
    StoreConfigError,
    StoreUnavailableError,
)

T = TypeVar("T")

#: Same versions, same tables as server/store/sqlite.py (server/store/common.py), in PostgreSQL's types.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    *common.migrations(common.POSTGRES),
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

_COUNT_BATCH = common.pg(common.count_batch(common.POSTGRES))
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
    subject = f"PostgreSQL database {where}"
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        exists = await (await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")).fetchone()
        version = 0
        if exists and exists[0]:
            row = await (await conn.execute("SELECT version FROM schema_version")).fetchone()
            version = row[0] if row else 0
        for statement, params in common.migration_steps(subject, version, migrations):
            await conn.execute(common.pg(statement), params)
        row = await (await conn.execute(common.SELECT_HALF_LIFE)).fetchone()
        recorded, record = common.settle_half_life(subject, None if row is None else row[0], half_life_days)
        if record is not None:
            await conn.execute(common.pg(record[0]), record[1])
        return recorded


def unnest_arrays(
    batch: Batch, half_life_days: float
) -> tuple[list[str], list[float], list[int], list[str], list[int], list[int]]:
    """A batch as the arrays its statements unnest: the entries' categories, increments and last days,
    then the signal counts' categories, days and counts."""
    entries = batch.entries(half_life_days)
    counts = batch.counts()
    return (
        [e.category_id for e in entries],
        [e.increment for e in entries],
        [e.last_day for e in entries],
        [cid for cid, _, _ in counts],
        [day for _, day, _ in counts],
        [n for _, _, n in counts],
    )


async def _apply(conn: AsyncConnection, batch: Batch, half_life_days: float) -> ApplyResult:
    categories, increments, last_days, count_categories, count_days, counts = unnest_arrays(
        batch, half_life_days
    )
    # Pipeline mode: BEGIN and the batch id go out together, then the increments and COMMIT together, so
    # a batch costs two round trips to the database instead of one per statement.
    async with conn.pipeline() as pipeline, conn.transaction():
        cursor = await conn.execute(
            common.pg(common.INSERT_BATCH), (batch.batch_id, batch.profile_id, batch.digest, batch.base_day)
        )
        await pipeline.sync()
        if cursor.rowcount == 0:
            row = await (
                await conn.execute(common.pg(common.SELECT_DIGEST), (batch.profile_id, batch.batch_id))
            ).fetchone()
            return common.resend(None if row is None else row[0], batch)
        await conn.execute(_COUNT_BATCH, (batch.profile_id, max(last_days)))
        await conn.execute(_ADD_SCORES, (batch.profile_id, categories, increments, last_days))
        await conn.execute(
            _ADD_COUNTS, (batch.profile_id, batch.epsilon_milli, count_categories, count_days, counts)
        )
        # Last, holding the profile's row lock: a mark committed before this statement is seen (READ
        # COMMITTED), and a mark committing after it waits for this transaction and then erases its rows.
        if batch.refuse_minor:
            cursor = await conn.execute(common.pg(common.SELECT_MINOR), (batch.profile_id,))
            if await cursor.fetchone() is not None:
                raise MinorProfileError()
    return ApplyResult(duplicate=False, applied_signals=len(batch.signals))


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


class PostgresStore(common.SQLStore):
    """The PostgreSQL backend of ``server.store.Store``; create it with ``await PostgresStore.open(...)``."""

    def __init__(self, pool: AsyncConnectionPool, where: str, half_life_days: float | None) -> None:
        self._pool = pool
        self._where = where
        self._subject = f"PostgreSQL database {where}"
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

    async def _fetch(self, statement: common.Statement) -> list[tuple[Any, ...]]:
        async def fetch(conn: AsyncConnection) -> list[tuple[Any, ...]]:
            cursor = await conn.execute(common.pg(statement[0]), statement[1])
            return await cursor.fetchall()

        return await self._run(fetch)

    async def _write(self, statements: Sequence[common.Statement]) -> list[int]:
        async def write(conn: AsyncConnection) -> list[int]:
            async with conn.transaction():
                return [(await conn.execute(common.pg(text), params)).rowcount for text, params in statements]

        return await self._run(write)

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        """Record the batch id and add its entries in one transaction (see ``Store.apply_batch``)."""
        half_life = self.half_life_days
        return await self._run(lambda conn: _apply(conn, batch, half_life))

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
