"""The sharded store in ``python -m tools.bench scale``: fresh PL/Proxy clusters of 1, 2, 4 … shards, and
the CPU time their PostgreSQL processes spend.

    python -m tools.bench scale --store sharded --shards 1,2,4 --workers 1,2

**Fresh clusters.** Each run gets a cluster of its own on the PostgreSQL servers that tools/plproxy.sh
provides (``--proxy-url`` / ``$SOTTO_TEST_PLPROXY_URL`` for the proxy, ``--shard-url`` /
``$SOTTO_TEST_SHARD_URLS`` for the shard servers): a scratch proxy database with the ``plproxy``
extension, and one scratch database per shard, handed out round-robin over the shard servers (4 shards
over the two servers of tools/plproxy.sh are two databases on each). The cluster has one partition per
shard. Everything is dropped afterwards, as the scratch schema of ``--store postgresql`` is.

**Database CPU.** A shard is a database, so its cost is its backends' CPU time: ``DatabaseCpu`` samples
``/proc`` during the run and adds up the user+system time of the client backends of each watched
database (found among the children of the server's postmaster by their process title, ``postgres:
[CLUSTER: ]USER DATABASE HOST …``), separately for the proxy and for every shard. The servers'
background processes (WAL writer, checkpointer, background writer, autovacuum) work for every database
of the server, other users' included, so their time is reported apart, per server, as an upper bound of
what the run added there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: The tables of a partition that grow with the data (``ShardedRun.tables``).
DATA_TABLES = ("batches", "profiles", "scores", "signal_counts")
PROXY_ENV, SHARDS_ENV = "SOTTO_TEST_PLPROXY_URL", "SOTTO_TEST_SHARD_URLS"
#: Seconds between two samples of /proc: a backend that ends mid-run loses at most this much CPU time
#: (the store's pooled connections and PL/Proxy's connections to the partitions live through the run).
SAMPLE_INTERVAL_S = 0.25
#: A client backend's title after ``postgres: [CLUSTER: ]``: user, database, client address, activity.
_CLIENT_TITLE = re.compile(r"(\S+) (\S+) (\[local\]|\S+\(\d+\)) ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scale --store sharded``."""
    parser.add_argument(
        "--shards", default="1,2,4", help="--store sharded: comma-separated shard counts (powers of two)"
    )
    parser.add_argument(
        "--proxy-url", help=f"--store sharded: the proxy's PostgreSQL server (default ${PROXY_ENV})"
    )
    parser.add_argument(
        "--shard-url",
        action="append",
        default=[],
        help=f"--store sharded: a shard server (repeatable; default the URLs in ${SHARDS_ENV})",
    )


def parse_shards(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; ``ValueError`` for anything but powers of two (one partition per
    shard, and a PL/Proxy cluster has a power of two of partitions)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 1 or n & (n - 1) for n in counts):
        raise ValueError(f"--shards: expected comma-separated powers of two (1,2,4), got {text!r}")
    return counts


def servers(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The proxy server and shard servers for ``--store sharded``, from the options or the environment."""
    proxy = args.proxy_url or os.environ.get(PROXY_ENV)
    shards = list(args.shard_url) or os.environ.get(SHARDS_ENV, "").split()
    if not proxy or not shards:
        raise ValueError(
            f"--store sharded needs --proxy-url and --shard-url (or ${PROXY_ENV} and ${SHARDS_ENV}); "
            "bash tools/plproxy.sh sets up and prints them for the local servers"
        )
    return proxy, shards


def with_database(url: str, database: str) -> str:
    """``url`` (``postgresql://…/DB?…``) naming ``database`` instead."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


# --- database CPU ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Database:
    """A database to watch: ``role`` ("proxy" or "shard"), its name, and its server's postmaster."""

    role: str
    name: str
    postmaster: int
    cluster_name: str


def locate(url: str) -> Database:
    """The postmaster and ``cluster_name`` of the server ``url`` connects to (through one of its
    backends, whose parent it is), with the database ``url`` names; ``ValueError`` for a server whose
    processes this machine cannot see (it runs elsewhere, or in another PID namespace)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_backend_pid(), current_setting('cluster_name'), current_database()"
        ).fetchone()
        assert row is not None
        backend, cluster_name, name = int(row[0]), str(row[1]), str(row[2])
        try:
            postmaster = _stat(backend)[1]  # while the backend lives: it ends with the connection
        except (OSError, IndexError, ValueError):
            raise ValueError(
                f"the PostgreSQL server of database {name} is not a process on this machine"
            ) from None
    return Database("", name, int(postmaster), cluster_name)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: [state, ppid, …]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _title(pid: int, cluster_name: str) -> str:
    """The process title of a child of a postmaster, without ``postgres: [CLUSTER: ]``."""
    text = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    text = text.removeprefix("postgres: ")
    if cluster_name:
        text = text.removeprefix(f"{cluster_name}: ")
    return text


@dataclass
class _Seen:
    first: float
    last: float


@dataclass
class DatabaseCpu:
    """CPU-seconds of the watched databases' backends, and of their servers' background processes.

    ``sample()`` reads /proc once; ``start()`` samples in a thread until ``stop()``. A process's time is
    what it used between the first and the last sample that saw it (from 0 for one that started after
    the first sample).
    """

    databases: Sequence[Database]
    interval_s: float = SAMPLE_INTERVAL_S
    _seen: dict[tuple[int, str], dict[tuple[int, int], _Seen]] = field(default_factory=dict)
    _samples: int = 0
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        """One look at every child of the watched servers' postmasters."""
        postmasters = {db.postmaster: db.cluster_name for db in self.databases}
        names = {(db.postmaster, db.name) for db in self.databases}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                fields = _stat(pid)
                parent = int(fields[1])
                if parent not in postmasters:
                    continue
                title = _title(pid, postmasters[parent])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not a process we may read
            client = _CLIENT_TITLE.match(title)
            if client is None:
                key = (parent, "")  # a background process of the server
            elif (parent, client.group(2)) in names:
                key = (parent, client.group(2))
            else:
                continue  # a backend of another database
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            # (pid, start time): a pid reused by a new process within the run is another process.
            process = (pid, int(fields[19]))
            seen = self._seen.setdefault(key, {}).get(process)
            if seen is None:
                self._seen[key][process] = _Seen(cpu if self._samples == 0 else 0.0, cpu)
            else:
                seen.last = cpu
        self._samples += 1

    def start(self) -> None:
        """Take the first sample now, then one every ``interval_s`` in a thread until ``stop()``."""
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="database-cpu", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        """Stop the thread and take the last sample."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _total(self, key: tuple[int, str]) -> float:
        return sum(seen.last - seen.first for seen in self._seen.get(key, {}).values())

    def backends(self, database: Database) -> float:
        """CPU-seconds of ``database``'s client backends over the sampled window."""
        return self._total((database.postmaster, database.name))

    def background(self) -> dict[str, float]:
        """CPU-seconds of each watched server's background processes, by ``cluster_name`` (or pid)."""
        found = {db.postmaster: db.cluster_name or str(db.postmaster) for db in self.databases}
        return {name: self._total((pid, "")) for pid, name in sorted(found.items())}

    def report(self, signals: float) -> dict[str, Any]:
        """The run's database figures: CPU-seconds of the proxy and of each shard, their sums per 10^4
        of ``signals``, and the servers' background time."""
        proxy = sum(self.backends(db) for db in self.databases if db.role == "proxy")
        shards = [self.backends(db) for db in self.databases if db.role == "shard"]

        def per(value: float) -> float:
            return value / signals * 1e4 if signals else 0.0

        def where(db: Database) -> str:
            return f"{db.cluster_name or db.postmaster}:{db.name}"

        return {
            "proxy_databases": [where(db) for db in self.databases if db.role == "proxy"],
            "shard_databases": [where(db) for db in self.databases if db.role == "shard"],
            "proxy_cpu_s": proxy,
            "shard_cpu_s": shards,
            "proxy_cpu_s_per_1e4_signals": per(proxy),
            "shards_cpu_s_per_1e4_signals": per(sum(shards)),
            "db_cpu_s_per_1e4_signals": per(proxy + sum(shards)),
            "background_cpu_s": self.background(),
        }


# --- fresh clusters -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardedRun:
    """A fresh cluster: its ``plproxy://`` URL, the databases it is made of, and the shards' URLs."""

    url: str
    databases: list[Database]
    shard_urls: list[str]

    def tables(self) -> dict[str, dict[str, int]]:
        """Rows and bytes on disk (table, indexes and TOAST; ``pg_total_relation_size``) of each data
        table, summed over the shards: what a stored batch, profile or score costs."""
        import psycopg

        totals = {table: {"rows": 0, "bytes": 0} for table in DATA_TABLES}
        for url in self.shard_urls:
            with psycopg.connect(url, autocommit=True) as conn:
                schemas = conn.execute(
                    "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench%' ORDER BY nspname"
                ).fetchall()
                for (schema,) in schemas:
                    for table in DATA_TABLES:
                        name = f'"{schema}"."{table}"'
                        row = conn.execute(
                            f"SELECT count(*), pg_total_relation_size('{name}') FROM {name}"  # noqa: S608
                        ).fetchone()
                        assert row is not None
                        totals[table]["rows"] += int(row[0])
                        totals[table]["bytes"] += int(row[1])
        return totals


def _create_database(server_url: str, name: str) -> Database:
    import psycopg

    from sotto.server.store.postgres import describe

    with psycopg.connect(server_url, autocommit=True) as conn:
        try:
            conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.errors.InsufficientPrivilege:
            raise SystemExit(
                f"bench: {describe(server_url)} may not create databases (CREATEDB): the scratch "
                "databases of --store sharded need it; bash tools/plproxy.sh grants it"
            ) from None
    try:
        return locate(with_database(server_url, name))
    except ValueError as exc:  # the database CPU cannot be measured: no figures rather than wrong ones
        _drop_database(server_url, name)
        raise SystemExit(f"bench: --store sharded measures the servers' processes: {exc}") from None


def _drop_database(server_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_cluster(proxy_url: str, shard_urls: Sequence[str], shards: int) -> Iterator[ShardedRun]:
    """A new cluster of ``shards`` shard databases (one partition each), handed out round-robin over
    ``shard_urls``, with a proxy database of its own on ``proxy_url``'s server; dropped afterwards."""
    import psycopg

    from sotto.server.store.plproxy import create_cluster

    stem = f"sotto_bench_{uuid.uuid4().hex[:12]}"
    created: list[tuple[str, str]] = []  # (server URL, database), dropped in reverse
    try:
        proxy_db = f"{stem}_proxy"
        proxy = _create_database(proxy_url, proxy_db)
        created.append((proxy_url, proxy_db))
        with psycopg.connect(with_database(proxy_url, proxy_db), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION plproxy")
        databases = [replace(proxy, role="proxy")]
        shard_dbs = []
        for n in range(shards):
            server, name = shard_urls[n % len(shard_urls)], f"{stem}_s{n}"
            shard = _create_database(server, name)
            created.append((server, name))
            databases.append(replace(shard, role="shard"))
            shard_dbs.append(with_database(server, name))
        cluster = f"bench_{stem.rsplit('_', 1)[1]}"
        plproxy = with_database(proxy_url, proxy_db).replace("postgresql://", "plproxy://", 1)
        url = f"{plproxy}{'&' if '?' in plproxy else '?'}cluster={cluster}"

        async def create() -> None:
            await create_cluster(url, shard_dbs, shards)

        asyncio.run(create())
        yield ShardedRun(url, databases, shard_dbs)
    finally:
        for server, name in reversed(created):
            try:
                _drop_database(server, name)
            except Exception as exc:  # noqa: BLE001 - report it, and let the run's own error through
                print(f"bench: could not drop the scratch database {name}: {exc}", file=sys.stderr)
