"""Sharded PostgreSQL store: PL/Proxy routes every call to the partition a hash of the profile id picks.

Layout:

- The **proxy database** holds the PL/Proxy functions, the cluster (a SQL/MED server of the ``plproxy``
  foreign data wrapper whose options ``p0`` … ``pN-1`` are the partitions' connection strings, N a power
  of two; one user mapping gives the user and password for all of them), the credentials, and the
  partitions paused for a move. It holds no profile data.
- Each **partition** is a schema (``CLUSTER_p00`` …) in a shard database, with the PostgreSQL store's
  schema (the same migrations, ``server.store.postgres.MIGRATIONS``) and local plpgsql functions.
  Several partitions may share one database; the cluster grows by moving partitions (``move_partition``).

A profile's rows all live in partition ``hashtext(profile_id) & (N - 1)``. Applying a batch is one call
of the local function ``sotto_apply_batch``, one transaction on that partition: the batch id and the
increments commit together, so a batch is applied exactly once per shard as on one database.
Cluster-wide reads (audience counts, signal counts, minors) and the retention purge run on all
partitions (``RUN ON ALL``) and are summed in the proxy: the audience count is the sum over partitions,
before k-anonymity is applied to it. Credentials are looked up by token hash, which says nothing about
the partition, so they stay in the proxy, where ``delete_profile`` removes them with the profile's rows.

A partition that cannot be reached, or one paused for a move, makes the calls routed to it fail with
``StoreUnavailableError`` (nothing written; the device resends later); other partitions are unaffected.

Every key that must be unique includes the profile id (``(profile_id, batch_id)`` for batch ids), so the
same schema could be distributed by profile id with Citus instead (README: "Running in production").
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from sotto.server.store import common, postgres
from sotto.server.store.base import (
    ApplyResult,
    Batch,
    BatchConflictError,
    MinorProfileError,
    PurgeResult,
    StoreConfigError,
    StoredProfile,
    StoreError,
    StoreUnavailableError,
)

T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_CLUSTER = "sotto"
#: Seconds a proxy waits for a partition's server to accept a connection before answering UNAVAILABLE.
PARTITION_CONNECT_TIMEOUT_S = 5
#: SQLSTATEs the local functions raise (class "SO" is unused by PostgreSQL).
_CONFLICT, _MINOR, _PAUSED = "SO409", "SO451", "SO503"
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,40}")
_SEARCH_PATH = re.compile(r"-c\s*search_path=([a-z_][a-z0-9_]*)")

#: The proxy database's own tables: the credentials (see the module doc) and the paused partitions.
PROXY_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        common.SCHEMA_VERSION_TABLE,
        common.meta_table(common.POSTGRES),
        *common.credentials_table(common.POSTGRES),
        # A row pauses partition `part` of a cluster of `partitions`: its calls answer UNAVAILABLE.
        "CREATE TABLE paused_partitions (part INTEGER PRIMARY KEY, partitions INTEGER NOT NULL)",
    ),
)


def _sql_array(names: tuple[str, ...]) -> str:
    return "ARRAY[" + ", ".join(f"'{name}'" for name in names) + "]"


#: The partition's functions. Tables are found through the connection's search_path (the partition's
#: schema), so one text serves every partition.
_PARTITION_FUNCTIONS = (
    f"""CREATE OR REPLACE FUNCTION sotto_apply_batch(
        i_profile_id text, i_batch_id bytea, i_digest bytea, i_base_day int, i_epsilon_milli int,
        i_refuse_minor boolean, i_categories text[], i_increments float8[], i_last_days int[],
        i_count_categories text[], i_count_days int[], i_counts int[]) RETURNS boolean
    LANGUAGE plpgsql AS $$
    DECLARE stored bytea;
    BEGIN
        INSERT INTO batches (batch_id, profile_id, digest, base_day)
        VALUES (i_batch_id, i_profile_id, i_digest, i_base_day)
        ON CONFLICT (profile_id, batch_id) DO NOTHING;
        IF NOT FOUND THEN
            SELECT digest INTO stored FROM batches WHERE profile_id = i_profile_id AND batch_id = i_batch_id;
            IF stored IS NOT NULL AND stored <> i_digest THEN
                RAISE EXCEPTION 'batch id reused with different content' USING ERRCODE = '{_CONFLICT}';
            END IF;
            RETURN false;
        END IF;
        -- The profile row first, then entries in category order: the PostgreSQL store's lock order.
        INSERT INTO profiles (profile_id, batches, last_day)
        VALUES (i_profile_id, 1, (SELECT max(d) FROM unnest(i_last_days) AS d))
        ON CONFLICT (profile_id) DO UPDATE
        SET batches = profiles.batches + 1, last_day = greatest(profiles.last_day, excluded.last_day);
        INSERT INTO scores (profile_id, category_id, s, last_day)
        SELECT i_profile_id, e.category_id, e.s, e.last_day
        FROM unnest(i_categories, i_increments, i_last_days) AS e (category_id, s, last_day)
        ORDER BY e.category_id
        ON CONFLICT (profile_id, category_id) DO UPDATE
        SET s = scores.s + excluded.s, last_day = greatest(scores.last_day, excluded.last_day);
        INSERT INTO signal_counts (profile_id, category_id, epsilon_milli, day, n)
        SELECT i_profile_id, e.category_id, i_epsilon_milli, e.day, e.n
        FROM unnest(i_count_categories, i_count_days, i_counts) AS e (category_id, day, n)
        ORDER BY e.category_id, e.day
        ON CONFLICT (profile_id, category_id, epsilon_milli, day) DO UPDATE
        SET n = signal_counts.n + excluded.n;
        IF i_refuse_minor AND EXISTS (SELECT 1 FROM minors WHERE profile_id = i_profile_id) THEN
            RAISE EXCEPTION 'this profile is marked as a minor: no interest signals are accepted'
                USING ERRCODE = '{_MINOR}';
        END IF;
        RETURN true;
    END $$""",
    """CREATE OR REPLACE FUNCTION sotto_get_profile(i_profile_id text)
    RETURNS TABLE (batches bigint, category_id text, s float8, last_day int)
    LANGUAGE sql STABLE AS $$
        SELECT p.batches, e.category_id, e.s, e.last_day FROM profiles p
        LEFT JOIN scores e ON e.profile_id = p.profile_id WHERE p.profile_id = i_profile_id
    $$""",
    # A profile's rows, profiles first (the lock order). `tables` names them: what deletion erases, and
    # what marking a minor erases (not its credentials).
    """CREATE OR REPLACE FUNCTION sotto_erase(i_profile_id text, tables text[]) RETURNS bigint
    LANGUAGE plpgsql AS $$
    DECLARE removed bigint := 0; n bigint; t text;
    BEGIN
        FOREACH t IN ARRAY tables LOOP
            EXECUTE format('DELETE FROM %I WHERE profile_id = $1', t) USING i_profile_id;
            GET DIAGNOSTICS n = ROW_COUNT;
            removed := removed + n;
        END LOOP;
        RETURN removed;
    END $$""",
    f"""CREATE OR REPLACE FUNCTION sotto_delete_profile(i_profile_id text) RETURNS bigint
    LANGUAGE sql AS $$
        SELECT sotto_erase(i_profile_id, {_sql_array(common.PROFILE_TABLES)})
    $$""",
    f"""CREATE OR REPLACE FUNCTION sotto_mark_minor(i_profile_id text, i_minor boolean) RETURNS bigint
    LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT i_minor THEN
            DELETE FROM minors WHERE profile_id = i_profile_id;
            RETURN 0;
        END IF;
        INSERT INTO minors (profile_id) VALUES (i_profile_id) ON CONFLICT DO NOTHING;
        RETURN sotto_erase(i_profile_id, {_sql_array(common.SIGNAL_TABLES)});
    END $$""",
    """CREATE OR REPLACE FUNCTION sotto_minors() RETURNS SETOF text
    LANGUAGE sql STABLE AS $$ SELECT profile_id FROM minors $$""",
    """CREATE OR REPLACE FUNCTION sotto_audience(i_category_id text, i_min_sum float8, i_since_day int)
    RETURNS bigint LANGUAGE sql STABLE AS $$
        SELECT count(*) FROM scores
        WHERE category_id = i_category_id AND s >= i_min_sum AND last_day >= i_since_day
    $$""",
    """CREATE OR REPLACE FUNCTION sotto_signal_counts(i_category_id text, i_since_day int)
    RETURNS TABLE (epsilon_milli int, category_signals bigint, all_signals bigint)
    LANGUAGE sql STABLE AS $$
        SELECT c.epsilon_milli, sum(CASE WHEN c.category_id = i_category_id THEN c.n ELSE 0 END)::bigint,
               sum(c.n)::bigint
        FROM signal_counts c WHERE c.day >= i_since_day GROUP BY c.epsilon_milli
    $$""",
    """CREATE OR REPLACE FUNCTION sotto_purge(i_before_day int)
    RETURNS TABLE (entries bigint, profiles bigint, batches bigint, signal_counts bigint)
    LANGUAGE plpgsql AS $$
    BEGIN
        -- As in the PostgreSQL store: a profile's own last_day decides, which stays right under
        -- concurrent batches.
        DELETE FROM scores WHERE last_day < i_before_day; GET DIAGNOSTICS entries = ROW_COUNT;
        DELETE FROM profiles p WHERE p.last_day < i_before_day; GET DIAGNOSTICS profiles = ROW_COUNT;
        DELETE FROM batches b WHERE b.base_day < i_before_day; GET DIAGNOSTICS batches = ROW_COUNT;
        DELETE FROM signal_counts c WHERE c.day < i_before_day; GET DIAGNOSTICS signal_counts = ROW_COUNT;
        RETURN NEXT;
    END $$""",
)

#: The proxy's functions: ``(signature, result, RUN ON clause)``; each runs the partition function of
#: the same name. A profile's calls run on its partition, found by ``sotto_partition`` (which refuses a
#: paused one); the cluster-wide ones run on all partitions.
_PROXY_FUNCTIONS = (
    (
        "sotto_apply_batch(i_profile_id text, i_batch_id bytea, i_digest bytea, i_base_day int, "
        "i_epsilon_milli int, i_refuse_minor boolean, i_categories text[], i_increments float8[], "
        "i_last_days int[], i_count_categories text[], i_count_days int[], i_counts int[])",
        "boolean",
        "sotto_partition(i_profile_id)",
    ),
    (
        "sotto_get_profile(i_profile_id text)",
        "TABLE (batches bigint, category_id text, s float8, last_day int)",
        "sotto_partition(i_profile_id)",
    ),
    ("sotto_delete_profile(i_profile_id text)", "bigint", "sotto_partition(i_profile_id)"),
    ("sotto_mark_minor(i_profile_id text, i_minor boolean)", "bigint", "sotto_partition(i_profile_id)"),
    ("sotto_minors()", "SETOF text", "ALL"),
    ("sotto_audience(i_category_id text, i_min_sum float8, i_since_day int)", "SETOF bigint", "ALL"),
    (
        "sotto_signal_counts(i_category_id text, i_since_day int)",
        "TABLE (epsilon_milli int, category_signals bigint, all_signals bigint)",
        "ALL",
    ),
    (
        "sotto_purge(i_before_day int)",
        "TABLE (entries bigint, profiles bigint, batches bigint, signal_counts bigint)",
        "ALL",
    ),
)

_PARTITION_OF = f"""CREATE OR REPLACE FUNCTION sotto_partition(i_profile_id text) RETURNS int4
LANGUAGE plpgsql STABLE AS $$
DECLARE h int4 := hashtext(i_profile_id);
BEGIN
    IF EXISTS (SELECT 1 FROM paused_partitions WHERE part = h & (partitions - 1)) THEN
        RAISE EXCEPTION 'this profile''s partition is being moved; retry later' USING ERRCODE = '{_PAUSED}';
    END IF;
    RETURN h;
END $$"""


def _proxy_function(cluster: str, signature: str, result: str, run_on: str) -> str:
    name = signature.partition("(")[0]
    # TARGET names the partition function unqualified, so it is found in each partition's schema.
    return (
        f"CREATE OR REPLACE FUNCTION {signature} RETURNS {result} LANGUAGE plproxy AS $$\n"
        f"    CLUSTER '{cluster}'; RUN ON {run_on}; TARGET {name};\n$$"
    )


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition of a cluster: its number, connection string (without credentials) and schema."""

    number: int
    connstr: str
    schema: str


def parse_url(url: str) -> tuple[str, str]:
    """The proxy database's ``postgresql://`` URL and the cluster name of a ``plproxy://`` URL.

    ``plproxy://USER:PASSWORD@HOST:PORT/DBNAME?cluster=NAME`` takes any libpq parameter besides
    ``cluster`` (default ``sotto``), which names the SQL/MED server holding the partitions.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    clusters = [value for key, value in query if key == "cluster"]
    cluster = clusters[-1] if clusters else DEFAULT_CLUSTER
    if not _NAME.fullmatch(cluster):
        raise StoreConfigError(
            f"bad cluster name {cluster!r} in the plproxy:// URL: lower-case letters, digits and '_'"
        )
    rest = urlencode([(key, value) for key, value in query if key != "cluster"])
    return urlunsplit(("postgresql", parts.netloc, parts.path, rest, parts.fragment)), cluster


def _partition_connstr(shard_url: str, schema: str) -> tuple[str, str, str]:
    """``(connstr, user, password)`` for a partition in schema ``schema`` of the database at ``shard_url``:
    the user and password go to the cluster's user mapping, not into the connection string."""
    params = conninfo_to_dict(shard_url)
    user, password = str(params.pop("user", "") or ""), str(params.pop("password", "") or "")
    if not user:
        raise StoreConfigError(f"shard URL {postgres.describe(shard_url)} names no user")
    params.setdefault("connect_timeout", PARTITION_CONNECT_TIMEOUT_S)
    params["options"] = f"-csearch_path={schema}"
    return make_conninfo(**{k: str(v) for k, v in params.items()}), user, password


async def _cluster(conn: AsyncConnection, cluster: str) -> tuple[list[Partition], dict[str, str]]:
    """The partitions of ``cluster`` in order and the user mapping's ``user`` and ``password``."""
    row = await (
        await conn.execute(
            "SELECT s.srvoptions, m.umoptions FROM pg_foreign_server s "
            "JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw AND w.fdwname = 'plproxy' "
            "LEFT JOIN pg_user_mappings m ON m.srvid = s.oid "
            "AND (m.usename = current_user OR m.usename = 'public') "
            "WHERE s.srvname = %s ORDER BY m.usename = 'public' LIMIT 1",
            (cluster,),
        )
    ).fetchone()
    if row is None:
        raise StoreConfigError(
            f"the proxy database has no PL/Proxy cluster {cluster!r}; create it with "
            "`sotto-server cluster create`"
        )
    partitions = []
    for option in row[0] or []:
        key, _, value = option.partition("=")
        if re.fullmatch(r"p\d+", key):
            match = _SEARCH_PATH.search(str(conninfo_to_dict(value).get("options", "")))
            if match is None:
                raise StoreConfigError(
                    f"partition {key} of cluster {cluster!r} names no schema (search_path)"
                )
            partitions.append(Partition(int(key[1:]), value, match.group(1)))
    partitions.sort(key=lambda p: p.number)
    if not partitions or [p.number for p in partitions] != list(range(len(partitions))):
        raise StoreConfigError(f"cluster {cluster!r} must have partitions p0 … pN-1")
    mapping = dict(option.partition("=")[::2] for option in (row[1] or []))
    return partitions, mapping


async def _connect_partition(partition: Partition, mapping: dict[str, str]) -> AsyncConnection:
    return await AsyncConnection.connect(
        partition.connstr,
        user=mapping.get("user"),
        password=mapping.get("password"),
        autocommit=True,
        connect_timeout=postgres.CONNECT_TIMEOUT_S,
    )


async def _migrate_partition(conn: AsyncConnection, partition: Partition, half_life: float | None) -> None:
    """Create the partition's schema if needed, migrate it as a PostgreSQL store and (re)create its
    functions, under the store's migration lock."""
    where = f"partition {partition.number}"
    async with conn.transaction():  # under the lock: processes starting together create it once
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (postgres._MIGRATION_LOCK,))
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(partition.schema)))
    await postgres._migrate(conn, where, half_life)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (postgres._MIGRATION_LOCK,))
        for statement in _PARTITION_FUNCTIONS:
            await conn.execute(statement)


async def _install_proxy_functions(conn: AsyncConnection, cluster: str) -> None:
    """(Re)create the proxy's functions for ``cluster``, under the store's migration lock."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (postgres._MIGRATION_LOCK,))
        await conn.execute(_PARTITION_OF)
        for signature, result, run_on in _PROXY_FUNCTIONS:
            await conn.execute(_proxy_function(cluster, signature, result, run_on))


def _unavailable_or(exc: psycopg.Error) -> Exception:
    """The store error a proxy call's failure means."""
    state = exc.sqlstate or ""
    if state == _CONFLICT:
        return BatchConflictError()
    if state == _MINOR:
        return MinorProfileError()
    # PL/Proxy reports a partition it cannot reach (or lost mid-call) as an internal error of its own
    # (remote errors keep their SQLSTATE); a paused partition has its own state.
    if state == _PAUSED or (state == "XX000" and "PL/Proxy" in str(exc) and "REMOTE ERROR" not in str(exc)):
        return StoreUnavailableError(f"sharded store: {exc}")
    # A call that reached a partition just before a move paused it, and waited there for the move's
    # lock, finds the old schema dropped: it wrote nothing, and a resend goes to the new place.
    if state in ("42P01", "42883") and "REMOTE ERROR" in str(exc):
        return StoreUnavailableError(f"sharded store: the partition moved during the call: {exc}")
    return exc


class PlProxyStore(postgres.PostgresStore):
    """The sharded backend of ``server.store.Store``; create it with ``await PlProxyStore.open(...)``.

    Credentials are the proxy database's own (inherited from ``PostgresStore``); everything about a
    profile goes through the proxy functions.
    """

    @classmethod
    async def open(cls, url: str, half_life_days: float | None) -> PlProxyStore:
        """Connect to the proxy, migrate every partition and then the proxy, open a connection pool."""
        proxy_url, cluster = parse_url(url)
        where = postgres.describe(proxy_url)
        try:
            async with await AsyncConnection.connect(
                proxy_url, autocommit=True, connect_timeout=postgres.CONNECT_TIMEOUT_S
            ) as conn:
                partitions, mapping = await _cluster(conn, cluster)
                recorded = await postgres._migrate(conn, where, half_life_days, PROXY_MIGRATIONS)
                # Each partition records the half-life too, so that one moved elsewhere still knows it.
                for partition in partitions:
                    async with await _connect_partition(partition, mapping) as part:
                        await _migrate_partition(part, partition, recorded)
                await _install_proxy_functions(conn, cluster)
        except psycopg.Error as exc:
            raise StoreConfigError(
                f"cannot use the sharded store at {where} (cluster {cluster}): {exc}"
            ) from exc
        return cls(await postgres.open_pool(proxy_url), where, recorded)

    async def _run(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        try:
            return await super()._run(fn)
        except psycopg.Error as exc:
            mapped = _unavailable_or(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        """One call of the partition's ``sotto_apply_batch``: one transaction on the profile's shard."""
        params = (
            batch.profile_id,
            batch.batch_id,
            batch.digest,
            batch.base_day,
            batch.epsilon_milli,
            batch.refuse_minor,
            *postgres.unnest_arrays(batch, self.half_life_days),
        )

        async def call(conn: AsyncConnection) -> bool:
            cursor = await conn.execute(
                "SELECT sotto_apply_batch(%s, %s, %s, %s, %s, %s, %s::text[], %s::float8[], %s::int[], "
                "%s::text[], %s::int[], %s::int[])",
                params,
            )
            row = await cursor.fetchone()
            return bool(row and row[0])

        applied = await self._run(call)
        return ApplyResult(duplicate=not applied, applied_signals=len(batch.signals) if applied else 0)

    async def get_profile(self, profile_id: str) -> StoredProfile | None:
        """The stored profile, read from its partition in one statement."""

        async def call(conn: AsyncConnection) -> StoredProfile | None:
            cursor = await conn.execute("SELECT * FROM sotto_get_profile(%s)", (profile_id,))
            return common.profile_from_rows(profile_id, await cursor.fetchall())

        return await self._run(call)

    async def delete_profile(self, profile_id: str) -> bool:
        """Erase the profile's rows on its partition and its credentials in the proxy.

        The proxy's deletion commits only after the partition's did; if the partition fails, the tokens
        stay, so the device can ask again.
        """

        async def call(conn: AsyncConnection) -> bool:
            async with conn.transaction():
                tokens = await conn.execute("DELETE FROM credentials WHERE profile_id = %s", (profile_id,))
                row = await (await conn.execute("SELECT sotto_delete_profile(%s)", (profile_id,))).fetchone()
            return tokens.rowcount + (int(row[0]) if row else 0) > 0

        return await self._run(call)

    async def audience_size(self, category_id: str, min_sum: float, since_day: int) -> int:
        """Profiles above ``min_sum`` in the category, counted on every partition and summed."""

        async def call(conn: AsyncConnection) -> int:
            cursor = await conn.execute(
                "SELECT coalesce(sum(n), 0) FROM sotto_audience(%s, %s, %s) AS n",
                (category_id, min_sum, since_day),
            )
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

        return await self._run(call)

    async def signal_counts(self, category_id: str, since_day: int) -> list[tuple[int, int, int]]:
        """Per epsilon, the signal counts of every partition summed."""

        async def call(conn: AsyncConnection) -> list[tuple[int, int, int]]:
            cursor = await conn.execute(
                "SELECT epsilon_milli, sum(category_signals), sum(all_signals) "
                "FROM sotto_signal_counts(%s, %s) GROUP BY epsilon_milli ORDER BY epsilon_milli",
                (category_id, since_day),
            )
            return common.signal_counts_from_rows(await cursor.fetchall())

        return await self._run(call)

    async def mark_minor(self, profile_id: str, minor: bool) -> int:
        """Mark or unmark a minor on its partition (see ``Store.mark_minor``)."""

        async def call(conn: AsyncConnection) -> int:
            row = await (
                await conn.execute("SELECT sotto_mark_minor(%s, %s)", (profile_id, minor))
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._run(call)

    async def minors(self) -> list[str]:
        """Profiles marked as minors, from every partition."""

        async def call(conn: AsyncConnection) -> list[str]:
            cursor = await conn.execute("SELECT m FROM sotto_minors() AS m ORDER BY m")
            return [row[0] for row in await cursor.fetchall()]

        return await self._run(call)

    async def purge(self, before_day: int) -> PurgeResult:
        """The retention purge on every partition (each in one transaction), totals summed."""

        async def call(conn: AsyncConnection) -> PurgeResult:
            cursor = await conn.execute(
                "SELECT coalesce(sum(entries), 0), coalesce(sum(profiles), 0), coalesce(sum(batches), 0), "
                "coalesce(sum(signal_counts), 0) FROM sotto_purge(%s)",
                (before_day,),
            )
            row = await cursor.fetchone()
            assert row is not None
            return common.purge_result([int(n) for n in row])

        return await self._run(call)


# --- administration ------------------------------------------------------------------------------------


def _admin(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Database errors of an administration step as ``StoreError`` (psycopg's messages name host, port,
    user and database, never the password)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except psycopg.Error as exc:
            raise StoreError(f"sharded store: {exc}") from exc

    return wrapper


@_admin
async def create_cluster(url: str, shard_urls: list[str], partitions: int) -> list[Partition]:
    """Define the cluster of the ``plproxy://`` URL in its proxy database: ``partitions`` (a power of two)
    spread round-robin over the shard databases, in schemas ``CLUSTER_p00`` …; every shard URL must
    name the same user and password (one user mapping serves them all). The partitions' tables are
    created when a store first opens the cluster."""
    if partitions < 1 or partitions & (partitions - 1):
        raise StoreConfigError(f"the number of partitions must be a power of two, got {partitions}")
    if not shard_urls:
        raise StoreConfigError("name at least one shard database")
    proxy_url, cluster = parse_url(url)
    built = [
        _partition_connstr(shard_urls[n % len(shard_urls)], f"{cluster}_p{n:02d}") for n in range(partitions)
    ]
    if len({(user, password) for _, user, password in built}) != 1:
        raise StoreConfigError("every shard URL must name the same user and password")
    _, user, password = built[0]
    options = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(f"p{n}"), sql.Literal(connstr))
        for n, (connstr, _, _) in enumerate(built)
    )
    async with await AsyncConnection.connect(proxy_url, autocommit=True) as conn, conn.transaction():
        await conn.execute(
            sql.SQL("CREATE SERVER {} FOREIGN DATA WRAPPER plproxy OPTIONS ({})").format(
                sql.Identifier(cluster), options
            )
        )
        await conn.execute(
            sql.SQL("CREATE USER MAPPING FOR PUBLIC SERVER {} OPTIONS (user {}, password {})").format(
                sql.Identifier(cluster), sql.Literal(user), sql.Literal(password)
            )
        )
        found, _ = await _cluster(conn, cluster)
    return found


@_admin
async def show_cluster(url: str) -> list[Partition]:
    """The partitions of the cluster of the ``plproxy://`` URL, in order."""
    proxy_url, cluster = parse_url(url)
    async with await AsyncConnection.connect(proxy_url, autocommit=True) as conn:
        partitions, _ = await _cluster(conn, cluster)
    return partitions


@_admin
async def drop_cluster(url: str) -> None:
    """Drop the cluster definition and every partition's schema with its data (tests, decommissioning)."""
    proxy_url, cluster = parse_url(url)
    async with await AsyncConnection.connect(proxy_url, autocommit=True) as conn:
        partitions, mapping = await _cluster(conn, cluster)
        for partition in partitions:
            async with await _connect_partition(partition, mapping) as part:
                await part.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(partition.schema))
                )
        await conn.execute(sql.SQL("DROP SERVER {} CASCADE").format(sql.Identifier(cluster)))


#: The tables of a partition that hold data, in the order a move copies them.
_DATA_TABLES = ("meta", "profiles", "scores", "signal_counts", "batches", "minors", "credentials")


async def _copy_table(old: AsyncConnection, new: AsyncConnection, table: str) -> None:
    """Stream every row of ``table`` from ``old`` to ``new`` with COPY (binary, columns by name)."""
    cursor = await old.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
        (table,),
    )
    columns = sql.SQL(", ").join(sql.Identifier(row[0]) for row in await cursor.fetchall())
    name = sql.Identifier(table)
    async with (
        old.cursor() as source,
        new.cursor() as target,
        source.copy(sql.SQL("COPY {} ({}) TO STDOUT (FORMAT binary)").format(name, columns)) as rows_out,
        target.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(name, columns)) as rows_in,
    ):
        async for chunk in rows_out:
            await rows_in.write(chunk)


@_admin
async def move_partition(url: str, number: int, shard_url: str) -> Partition:
    """Move partition ``number`` of the cluster to the database at ``shard_url`` (a new schema there).

    1. Pause the partition in the proxy: its calls answer UNAVAILABLE (devices resend later).
    2. On the old database, lock its tables against writes; this waits for calls already under way.
    3. Create and migrate the schema in the new database and stream every row there (COPY), in one
       transaction.
    4. In one proxy transaction, point the partition at the new schema and lift the pause.
    5. Drop the old schema (still under the lock, so a straggling write fails instead of being lost).

    A failure before step 4 leaves the partition where it was (paused: run the move again, or lift the
    pause with ``resume_partition``).
    """
    proxy_url, cluster = parse_url(url)
    async with await AsyncConnection.connect(proxy_url, autocommit=True) as proxy:
        partitions, mapping = await _cluster(proxy, cluster)
        if not 0 <= number < len(partitions):
            raise StoreConfigError(
                f"cluster {cluster!r} has partitions 0 to {len(partitions) - 1}, not {number}"
            )
        source = partitions[number]
        suffix = uuid.uuid4().hex[:8]
        connstr, user, password = _partition_connstr(shard_url, f"{cluster}_p{number:02d}_{suffix}")
        if (user, password) != (mapping.get("user"), mapping.get("password")):
            raise StoreConfigError("the new shard URL must name the cluster's user and password")
        target = Partition(number, connstr, f"{cluster}_p{number:02d}_{suffix}")
        await proxy.execute(
            "INSERT INTO paused_partitions (part, partitions) VALUES (%s, %s) ON CONFLICT (part) DO NOTHING",
            (number, len(partitions)),
        )
        async with (
            await _connect_partition(source, mapping) as old,
            await _connect_partition(target, mapping) as new,
        ):
            await _migrate_partition(new, target, None)
            async with old.transaction():
                tables = sql.SQL(", ").join(sql.Identifier(t) for t in _DATA_TABLES)
                await old.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(tables))
                async with new.transaction():
                    for table in _DATA_TABLES:
                        await new.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
                        await _copy_table(old, new, table)
                async with proxy.transaction():
                    await proxy.execute(
                        sql.SQL("ALTER SERVER {} OPTIONS (SET {} {})").format(
                            sql.Identifier(cluster), sql.Identifier(f"p{number}"), sql.Literal(target.connstr)
                        )
                    )
                    await proxy.execute("DELETE FROM paused_partitions WHERE part = %s", (number,))
                await old.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(source.schema)))
    return target


@_admin
async def resume_partition(url: str, number: int) -> None:
    """Lift the pause of partition ``number`` (after a move that failed before switching)."""
    proxy_url, _ = parse_url(url)
    async with await AsyncConnection.connect(proxy_url, autocommit=True) as proxy:
        await proxy.execute("DELETE FROM paused_partitions WHERE part = %s", (number,))
