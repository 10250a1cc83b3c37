"""tools/bench/shards.py: fresh sharded clusters for ``python -m tools.bench scale --store sharded``, and
the database CPU time they are measured by.

Functional checks only (which database the CPU time is charged to, that scratch databases are dropped,
that bad input is refused), never a timing. They need the servers of tools/plproxy.sh.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from sotto.server.store.plproxy import show_cluster
from tools.bench import ResultError, validate_result
from tools.bench import shards as bench_shards

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.bench


def plproxy_servers() -> tuple[str, list[str]]:
    proxy, shards = (
        os.environ.get(bench_shards.PROXY_ENV),
        os.environ.get(bench_shards.SHARDS_ENV, "").split(),
    )
    assert proxy and len(shards) == 2, (
        f"${bench_shards.PROXY_ENV} and ${bench_shards.SHARDS_ENV} must name the servers of tools/plproxy.sh"
    )
    return proxy, shards


def databases_on(url: str, names: list[str]) -> list[str]:
    """Those of ``names`` that exist on the server of ``url``."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (names,)).fetchall()
    return [row[0] for row in rows]


def burn(url: str) -> None:
    """Some CPU time in one backend of the database ``url`` names."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT sum(i) FROM generate_series(1, 3000000) AS i").fetchone()


def test_parse_shards_takes_powers_of_two_only() -> None:
    assert bench_shards.parse_shards("1,2,4") == [1, 2, 4]
    assert bench_shards.parse_shards(" 8 ") == [8]
    for bad in ("", "3", "0", "1,6", "-2", "two"):
        with pytest.raises(ValueError, match="--shards"):
            bench_shards.parse_shards(bad)


def test_with_database_names_another_database_on_the_same_server() -> None:
    url = "postgresql://u:p@127.0.0.1:5433/sotto_shard?sslmode=disable"
    assert bench_shards.with_database(url, "x_s0") == "postgresql://u:p@127.0.0.1:5433/x_s0?sslmode=disable"


def test_fresh_cluster_spreads_shards_over_the_servers_and_drops_them() -> None:
    proxy, shards = plproxy_servers()
    with bench_shards.fresh_cluster(proxy, shards, 4) as cluster:
        assert cluster.url.startswith("plproxy://") and "cluster=bench_" in cluster.url
        roles = [db.role for db in cluster.databases]
        assert roles == ["proxy", "shard", "shard", "shard", "shard"]
        shard_dbs = cluster.databases[1:]
        # Round-robin: shards 0 and 2 on the first server, 1 and 3 on the second.
        assert shard_dbs[0].postmaster == shard_dbs[2].postmaster != shard_dbs[1].postmaster
        assert shard_dbs[1].postmaster == shard_dbs[3].postmaster
        assert databases_on(shards[0], [db.name for db in shard_dbs]) == sorted(
            [shard_dbs[0].name, shard_dbs[2].name]
        )
        names = [db.name for db in cluster.databases]

        async def show() -> list[str]:
            return [p.connstr for p in await show_cluster(cluster.url)]

        connstrs = asyncio.run(show())
        assert len(connstrs) == 4
        assert all(f"dbname={db.name}" in connstr for db, connstr in zip(shard_dbs, connstrs, strict=True))
    assert databases_on(proxy, names) == []
    for server in shards:
        assert databases_on(server, names) == []


def test_database_cpu_charges_each_database_its_own_backends() -> None:
    proxy, shards = plproxy_servers()
    with bench_shards.fresh_cluster(proxy, shards, 2) as cluster:
        proxy_db, first, second = cluster.databases
        meter = bench_shards.DatabaseCpu(cluster.databases)
        meter.sample()
        with psycopg.connect(bench_shards.with_database(shards[1], second.name), autocommit=True) as conn:
            conn.execute("SELECT sum(i) FROM generate_series(1, 3000000) AS i").fetchone()
            meter.sample()
        meter.sample()  # after that backend has ended: what it used until the last sample that saw it
        burn(shards[1])  # the server's own database, not the cluster's: charged to nobody
        meter.sample()
        assert meter.backends(second) > 0
        assert meter.backends(first) == 0 and meter.backends(proxy_db) == 0
        report = meter.report(signals=2e4)
        assert report["shard_cpu_s"] == [0, meter.backends(second)]
        assert report["proxy_cpu_s"] == 0
        assert report["shards_cpu_s_per_1e4_signals"] == pytest.approx(meter.backends(second) / 2)
        assert report["db_cpu_s_per_1e4_signals"] == pytest.approx(meter.backends(second) / 2)
        assert report["shard_databases"] == [
            f"{first.cluster_name}:{first.name}",
            f"{second.cluster_name}:{second.name}",
        ]
        assert set(report["background_cpu_s"]) == {db.cluster_name for db in cluster.databases}


def test_database_cpu_counts_a_backend_of_the_window_from_zero() -> None:
    proxy, shards = plproxy_servers()
    with bench_shards.fresh_cluster(proxy, shards, 1) as cluster:
        _, shard = cluster.databases
        url = bench_shards.with_database(shards[0], shard.name)
        with psycopg.connect(url, autocommit=True) as before:
            before.execute("SELECT sum(i) FROM generate_series(1, 3000000) AS i").fetchone()
            meter = bench_shards.DatabaseCpu(cluster.databases)
            meter.start()  # first sample: the time `before` already used is not the window's
            with psycopg.connect(url, autocommit=True) as during:
                during.execute("SELECT sum(i) FROM generate_series(1, 3000000) AS i").fetchone()
                meter.stop()
            assert meter.backends(shard) > 0
            seen = meter._seen[(shard.postmaster, shard.name)]
            # Two backends: the one from before the window starts at what it had used, the new one at 0.
            firsts = sorted(s.first for s in seen.values())
            assert len(firsts) == 2 and firsts[0] == 0 < firsts[1]


def run_bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.bench", "scale", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_scale_smoke_on_fresh_sharded_clusters(tmp_path: Path) -> None:
    proxy, shards = plproxy_servers()
    proc = run_bench(
        "--smoke", "--store", "sharded", "--shards", "1,2", "--workers", "2", "--out", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    document = json.loads((tmp_path / "scale.json").read_text())
    validate_result(document)
    assert document["config"]["shards"] == [1, 2] and document["config"]["shard_servers"] == 2
    runs = document["results"]["runs"]
    assert [(r["store"], r["shards"], r["workers"]) for r in runs] == [("sharded", 1, 2), ("sharded", 2, 2)]
    names = []
    for run in runs:
        assert run["calls"] > 0 and run["errors"] == {}
        assert all(calls > 0 for calls in run["calls_per_worker"])
        database = run["database"]
        assert len(database["shard_cpu_s"]) == len(database["shard_databases"]) == run["shards"]
        # Every batch went through the proxy to a shard: both did work. (16 devices over 2 partitions
        # all on one: p = 2^-15.)
        assert database["proxy_cpu_s"] > 0 and all(cpu > 0 for cpu in database["shard_cpu_s"])
        assert database["db_cpu_s_per_1e4_signals"] == pytest.approx(
            (database["proxy_cpu_s"] + sum(database["shard_cpu_s"])) / run["server_signals"] * 1e4
        )
        # Every batch the server counted is stored once, on one shard.
        tables = database["tables"]
        assert tables["batches"]["rows"] * run["batch_size"] == run["server_signals"]
        assert tables["profiles"]["rows"] == run["devices"] and tables["batches"]["bytes"] > 0
        names += [
            where.rsplit(":", 1)[1] for where in database["proxy_databases"] + database["shard_databases"]
        ]
    # Two shard servers in turn; then every scratch database is gone.
    assert {where.rsplit(":", 1)[0] for where in runs[1]["database"]["shard_databases"]} == {
        bench_shards.locate(url).cluster_name for url in shards
    }
    for server in (proxy, *shards):
        assert databases_on(server, names) == []
    # The shape check covers the database figures.
    for breakage in (
        lambda r: r["database"]["shard_cpu_s"].pop(),
        lambda r: r["database"].update(proxy_cpu_s=float("nan")),
        lambda r: r["database"].update(db_cpu_s_per_1e4_signals=-1.0),
        lambda r: r.update(shards=0),
        lambda r: r["database"].update(background_cpu_s=[]),
        lambda r: r["database"]["tables"]["batches"].update(rows=-1),
    ):
        broken = copy.deepcopy(document)
        breakage(broken["results"]["runs"][1])
        with pytest.raises(ResultError):
            validate_result(broken)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--store", "sharded", "--shards", "3"), "bench: --shards"),
        (("--store", "sharded", "--shards", "1,2,x"), "bench: --shards"),
    ],
)
def test_scale_refuses_bad_shard_counts(tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    proc = run_bench("--smoke", "--out", str(tmp_path), *extra)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())


def test_scale_sharded_without_servers_says_what_it_needs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (bench_shards.PROXY_ENV, bench_shards.SHARDS_ENV)}
    proc = run_bench("--smoke", "--out", str(tmp_path), "--store", "sharded", env=env)
    assert proc.returncode != 0 and "--proxy-url" in proc.stderr and "tools/plproxy.sh" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_scale_sharded_on_a_role_that_may_not_create_databases_says_so(tmp_path: Path) -> None:
    # The test role of tools/postgres.sh has no CREATEDB: as a proxy server it is refused up front.
    url = os.environ.get("SOTTO_TEST_POSTGRES_URL")
    assert url, "$SOTTO_TEST_POSTGRES_URL must name the server of tools/postgres.sh"
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user").fetchone()
    assert row == (False,)
    proc = run_bench(
        "--smoke", "--out", str(tmp_path), "--store", "sharded", "--shards", "1", "--proxy-url", url
    )
    assert proc.returncode != 0 and "may not create databases (CREATEDB)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())
