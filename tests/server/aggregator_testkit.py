"""Helpers of the aggregator tests: a fixed clock, batch builders, plain-SQL views of both backends,
credentials, a test certificate authority, and running servers (in process or as real processes)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import grpc
import psycopg
from psycopg.conninfo import make_conninfo

from sotto.server import ServerConfig, Store, create_server, open_store
from sotto.server.auth import admin_credential, device_credential, new_token
from sotto.server.service import AggregatorServer
from sotto.server.store import sqlite_path
from sotto.server.store.plproxy import create_cluster, drop_cluster
from sotto.server.store.postgres import scratch_schema
from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import day_number

REPO = Path(__file__).resolve().parents[2]
TODAY = dt.date(2026, 3, 1)
TODAY_DAY = day_number(TODAY)
PROFILE = "profile_0001"
OTHER = "profile_0002"
MUSIC, ELECTRONICS, MOVIES = "338", "632", "324"
SENSITIVE = "286"  # Medical Health (subtree)
POSTGRES_ENV = "SOTTO_TEST_POSTGRES_URL"
DATA_TABLES = ("batches", "profiles", "scores", "credentials")


class Clock:
    """A settable clock for ``ServerConfig.clock``."""

    def __init__(self, date: dt.date) -> None:
        self.date = date

    def __call__(self) -> dt.date:
        return self.date


def signal(category_id: str = MUSIC, weight_level: int = 4, day_offset: int = 0) -> signals_pb2.Signal:
    return signals_pb2.Signal(category_id=category_id, weight_level=weight_level, day_offset=day_offset)


def make_batch(
    signals: Iterable[signals_pb2.Signal] | None = None, **fields: object
) -> signals_pb2.SignalBatch:
    """A valid batch (new random id, two signals on TODAY) with ``fields`` overridden."""
    values: dict[str, object] = {
        "batch_id": os.urandom(16),
        "profile_id": PROFILE,
        "region": "US",
        "taxonomy_version": "3.1",
        "base_day": TODAY_DAY,
    }
    values.update(fields)
    chosen = [signal(MUSIC, 4), signal(ELECTRONICS, 2, 1)] if signals is None else list(signals)
    return signals_pb2.SignalBatch(signals=chosen, **values)  # type: ignore[arg-type]


# --- PostgreSQL: one schema per test --------------------------------------------------------------------


def postgres_base_url() -> str:
    """The PostgreSQL server of the test run; tools/test.sh sets it up and exports it."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        raise RuntimeError(
            f"${POSTGRES_ENV} is not set: the PostgreSQL tests need a server "
            "(bash tools/test.sh installs, starts and exports one; or point it at your own, for example "
            "postgresql://sotto_test:sotto_test@127.0.0.1:5432/sotto_test)"
        )
    return url


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A new, empty schema; yields a URL that uses it, and drops the schema afterwards."""
    with scratch_schema(base_url, prefix="t") as url:
        yield url


# --- sharded PostgreSQL (PL/Proxy): one cluster per test -----------------------------------------------

PLPROXY_ENV, SHARDS_ENV, SHARD_CLUSTERS_ENV = (
    "SOTTO_TEST_PLPROXY_URL",
    "SOTTO_TEST_SHARD_URLS",
    "SOTTO_TEST_SHARD_CLUSTERS",
)
#: Partitions of a test cluster: several per shard database, as a cluster that can grow has.
TEST_PARTITIONS = 4


def plproxy_servers() -> tuple[str, list[str]]:
    """The proxy database and the shard databases of the test run (tools/plproxy.sh sets them up)."""
    proxy, shards = os.environ.get(PLPROXY_ENV), os.environ.get(SHARDS_ENV, "").split()
    if not proxy or len(shards) < 2:
        raise RuntimeError(
            f"${PLPROXY_ENV} and ${SHARDS_ENV} (two shard URLs) are not set: the sharded-store tests need "
            "a PL/Proxy database and two shard servers (bash tools/test.sh creates, starts and exports them "
            "through tools/plproxy.sh)"
        )
    return proxy, shards


@contextmanager
def plproxy_cluster(proxy: str, shards: list[str], partitions: int = TEST_PARTITIONS) -> Iterator[str]:
    """A new cluster of ``partitions`` over ``shards`` with a proxy schema of its own; yields its
    ``plproxy://`` URL, and drops the cluster, its partitions and the proxy schema afterwards."""
    cluster = f"t_{uuid.uuid4().hex[:12]}"
    with scratch_schema(proxy, prefix=cluster) as proxy_url:
        url = f"plproxy://{proxy_url.removeprefix('postgresql://')}&cluster={cluster}"
        asyncio.run(create_cluster(url, shards, partitions))
        try:
            yield url
        finally:
            asyncio.run(drop_cluster(url))


# --- plain-SQL views of a store, independent of the store code -----------------------------------------


def _dump_postgres(conninfo: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(conninfo) as conn:
        names = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchall()
        return {
            name: sorted(
                tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                for row in conn.execute(f"SELECT * FROM {name}").fetchall()
            )
            for (name,) in names
        }


def sharded_databases(url: str) -> tuple[str, list[str]]:
    """The proxy database of a ``plproxy://`` URL and its partitions' connection strings (with the
    cluster's user mapping), read from the proxy's SQL/MED catalog."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    cluster = dict(query)["cluster"]
    proxy = urlunsplit(
        ("postgresql", parts.netloc, parts.path, urlencode([q for q in query if q[0] != "cluster"]), "")
    )
    with psycopg.connect(proxy) as conn:
        row = conn.execute(
            "SELECT s.srvoptions, m.umoptions FROM pg_foreign_server s "
            "JOIN pg_user_mappings m ON m.srvid = s.oid WHERE s.srvname = %s",
            (cluster,),
        ).fetchone()
    assert row is not None, f"no cluster {cluster}"
    login = dict(option.split("=", 1) for option in row[1])
    partitions = sorted(
        (int(key[1:]), value)
        for key, _, value in (o.partition("=") for o in row[0])
        if re.fullmatch(r"p\d+", key)
    )
    return proxy, [make_conninfo(connstr, **login) for _, connstr in partitions]


def dump_tables(url: str | Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table of the database at ``url`` (SQLite path or URL, or PostgreSQL URL); for
    a sharded store, the proxy's rows and every partition's, table by table."""
    if isinstance(url, str) and url.startswith("postgresql://"):
        return _dump_postgres(url)
    if isinstance(url, str) and url.startswith("plproxy://"):
        proxy, partitions = sharded_databases(url)
        merged: dict[str, list[tuple[object, ...]]] = {}
        for conninfo in (proxy, *partitions):
            for table, rows in _dump_postgres(conninfo).items():
                merged[table] = sorted([*merged.get(table, []), *rows], key=repr)
        return merged
    path = url if isinstance(url, Path) else sqlite_path(url)
    with closing(sqlite3.connect(path)) as conn:
        names = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {name: sorted(conn.execute(f"SELECT * FROM {name}").fetchall()) for (name,) in names}


def row_counts(url: str | Path) -> dict[str, int]:
    """Rows per data table."""
    tables = dump_tables(url)
    return {table: len(tables[table]) for table in DATA_TABLES}


def cells_mentioning(url: str | Path, needle: str) -> list[tuple[str, tuple[object, ...]]]:
    """(table, row) of every row with a cell that contains ``needle`` (as text or as bytes)."""
    found = []
    for table, rows in dump_tables(url).items():
        for row in rows:
            for cell in row:
                text = cell.decode("latin-1") if isinstance(cell, bytes) else str(cell)
                if needle in text:
                    found.append((table, row))
                    break
    return found


# --- credentials ------------------------------------------------------------------------------------


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


async def issue_device_token(store: Store, profile_id: str = PROFILE) -> str:
    token = new_token()
    await store.add_credential(device_credential(token, profile_id))
    return token


async def issue_admin_token(store: Store) -> str:
    token = new_token()
    await store.add_credential(admin_credential(token))
    return token


# --- running servers -------------------------------------------------------------------------------------


@dataclass
class Running:
    """A started in-process aggregator and a client channel to it."""

    server: AggregatorServer
    port: int
    store: Store
    channel: grpc.aio.Channel

    @property
    def stub(self) -> signals_pb2_grpc.SignalAggregatorStub:
        return signals_pb2_grpc.SignalAggregatorStub(self.channel)


@asynccontextmanager
async def running(
    url: str,
    config: ServerConfig,
    half_life_days: float = 30,
    channel_credentials: grpc.ChannelCredentials | None = None,
) -> AsyncIterator[Running]:
    """Open a store at ``url``, serve it on a free port and connect to it; tear everything down after."""
    store = await open_store(url, half_life_days)
    try:
        server, port = await create_server("127.0.0.1:0", store, config)
        try:
            target = f"127.0.0.1:{port}"
            channel = (
                grpc.aio.insecure_channel(target)
                if channel_credentials is None
                else grpc.aio.secure_channel(target, channel_credentials)
            )
            async with channel:
                yield Running(server, port, store, channel)
        finally:
            await server.stop(None)
    finally:
        await store.close()
