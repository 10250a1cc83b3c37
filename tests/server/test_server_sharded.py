"""What only the sharded store (PL/Proxy) has: partitions holding the PostgreSQL store's schema, a proxy
holding no profile data, counts summed over partitions before k, a paused partition answering
UNAVAILABLE for its own profiles only, and moving a partition to another database.

Every other store test runs against the sharded store too (the ``plproxy`` parameter of ``store_url`` and
``db_url`` in conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid

import grpc
import psycopg
import pytest
from aggregator_testkit import (
    ELECTRONICS,
    MUSIC,
    PROFILE,
    SHARD_CLUSTERS_ENV,
    TEST_PARTITIONS,
    bearer,
    cells_mentioning,
    issue_admin_token,
    issue_device_token,
    make_batch,
    running,
    sharded_databases,
    signal,
)

from sotto.server import ServerConfig, open_store
from sotto.server.auth import device_credential
from sotto.server.config import utc_today
from sotto.server.store import StoreConfigError, StoredProfile, StoreUnavailableError
from sotto.server.store import plproxy as sharded
from sotto.server.store import postgres as postgres_backend
from sotto.server.store.postgres import scratch_schema
from sotto.server.validation import validate_batch
from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import day_number
from tools.harness import start_server, stop_server

PROFILES = [f"device_{n:05d}" for n in range(24)]


def partition_of(url: str, profile_id: str) -> int:
    """The partition PL/Proxy routes ``profile_id`` to, computed independently of the store."""
    proxy, partitions = sharded_databases(url)
    with psycopg.connect(proxy) as conn:
        row = conn.execute("SELECT hashtext(%s) & %s", (profile_id, len(partitions) - 1)).fetchone()
    assert row is not None
    return int(row[0])


def test_partitions_hold_the_postgresql_schema_and_the_proxy_no_profile_data(
    plproxy_url: str, config: ServerConfig
) -> None:
    async def scenario() -> None:
        store = await open_store(plproxy_url, 30)
        try:
            await store.add_credential(device_credential("sotto_token", PROFILE))
            for profile in (PROFILE, *PROFILES):
                await store.apply_batch(validate_batch(make_batch(profile_id=profile), config))
            assert await store.delete_profile(PROFILE)
        finally:
            await store.close()

    asyncio.run(scenario())
    proxy, partitions = sharded_databases(plproxy_url)
    assert len(partitions) == TEST_PARTITIONS
    for conninfo in partitions:
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [
                (postgres_backend.SCHEMA_VERSION,)
            ]
            tables = conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            ).fetchall()
            assert {t for (t,) in tables} == {
                "schema_version",
                "meta",
                "batches",
                "profiles",
                "scores",
                "credentials",
                "signal_counts",
                "minors",
            }
    with psycopg.connect(proxy) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchall()
        assert {t for (t,) in tables} == {"schema_version", "meta", "credentials", "paused_partitions"}
        assert conn.execute("SELECT count(*) FROM credentials").fetchone() == (0,)
    # The profiles are spread over the partitions, and the deleted one is nowhere.
    assert len({partition_of(plproxy_url, p) for p in PROFILES}) == TEST_PARTITIONS
    assert cells_mentioning(plproxy_url, PROFILE) == []


def test_audience_is_summed_over_partitions_before_k(plproxy_url: str, config: ServerConfig) -> None:
    """Five profiles over four partitions, none holding five, with k = 5: the sum reaches k."""
    config = dataclasses.replace(config, min_audience=5)
    profiles = PROFILES[:5]
    per_partition = [partition_of(plproxy_url, p) for p in profiles]
    assert max(per_partition.count(n) for n in set(per_partition)) < 5

    async def scenario() -> signals_pb2.AudienceSizeResponse:
        async with running(plproxy_url, config) as r:
            for profile in profiles:
                await r.stub.Ingest(make_batch([signal(MUSIC)], profile_id=profile), timeout=5)
            return await r.stub.AudienceSize(signals_pb2.AudienceSizeRequest(category_id=MUSIC), timeout=5)

    reply = asyncio.run(scenario())
    assert (reply.too_small, reply.profiles, reply.estimated_signals) == (False, 5, 5)


def test_a_paused_partition_is_unavailable_for_its_profiles_only(
    plproxy_url: str, config: ServerConfig
) -> None:
    paused = partition_of(plproxy_url, PROFILE)
    other = next(p for p in PROFILES if partition_of(plproxy_url, p) != paused)
    proxy, _ = sharded_databases(plproxy_url)
    batch = validate_batch(make_batch(), config)

    async def scenario() -> None:
        store = await open_store(plproxy_url, 30)
        try:
            with psycopg.connect(proxy, autocommit=True) as conn:
                conn.execute("INSERT INTO paused_partitions VALUES (%s, %s)", (paused, TEST_PARTITIONS))
            with pytest.raises(StoreUnavailableError, match="being moved"):
                await store.apply_batch(batch)
            with pytest.raises(StoreUnavailableError):
                await store.get_profile(PROFILE)
            assert not (
                await store.apply_batch(validate_batch(make_batch(profile_id=other), config))
            ).duplicate
            await sharded.resume_partition(plproxy_url, paused)
            assert await store.get_profile(PROFILE) is None  # nothing was written while paused
            assert not (await store.apply_batch(batch)).duplicate
            assert (await store.apply_batch(batch)).duplicate
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_moved_partition_reads_back_identical(
    plproxy_url: str, plproxy_server: tuple[str, list[str]], config: ServerConfig
) -> None:
    moved = partition_of(plproxy_url, PROFILES[0])
    _, shards = plproxy_server
    proxy, before = sharded_databases(plproxy_url)
    target = shards[1 - moved % len(shards)]  # partitions go round-robin: this is the other server
    batches = [
        validate_batch(
            make_batch([signal(MUSIC, 1 + n % 4, n % 3)], profile_id=p, batch_id=bytes([n, i]) * 8), config
        )
        for i, p in enumerate(PROFILES)
        for n in range(3)
    ]

    async def profiles(store_url: str) -> dict[str, StoredProfile | None]:
        store = await open_store(store_url, 30)
        try:
            return {p: await store.get_profile(p) for p in PROFILES}
        finally:
            await store.close()

    async def fill() -> None:
        store = await open_store(plproxy_url, 30)
        try:
            for batch in batches:
                await store.apply_batch(batch)
            await store.mark_minor("minor_000001", True)
        finally:
            await store.close()

    asyncio.run(fill())
    snapshot = asyncio.run(profiles(plproxy_url))
    assert all(snapshot.values())
    new = asyncio.run(sharded.move_partition(plproxy_url, moved, target))

    _, after = sharded_databases(plproxy_url)
    assert after[:moved] + after[moved + 1 :] == before[:moved] + before[moved + 1 :]
    assert after[moved] != before[moved] and new.schema in after[moved]
    with psycopg.connect(before[moved]) as conn:  # the old schema is gone
        assert conn.execute("SELECT to_regclass('profiles')").fetchone() == (None,)
    assert asyncio.run(profiles(plproxy_url)) == snapshot

    async def after_the_move() -> None:
        store = await open_store(plproxy_url, 30)
        try:
            assert all([(await store.apply_batch(batch)).duplicate for batch in batches])  # ids moved too
            assert await store.minors() == ["minor_000001"]
        finally:
            await store.close()

    asyncio.run(after_the_move())
    with psycopg.connect(proxy) as conn:
        assert conn.execute("SELECT count(*) FROM paused_partitions").fetchone() == (0,)


def test_cluster_definitions_are_checked(plproxy_server: tuple[str, list[str]]) -> None:
    proxy, shards = plproxy_server
    url = f"plproxy://{proxy.removeprefix('postgresql://')}?cluster=t_missing_cluster"
    with pytest.raises(StoreConfigError, match="no PL/Proxy cluster 't_missing_cluster'"):
        asyncio.run(open_store(url, 30))
    with pytest.raises(StoreConfigError, match="power of two"):
        asyncio.run(sharded.create_cluster(url, shards, 3))
    with pytest.raises(StoreConfigError, match="bad cluster name"):
        asyncio.run(open_store(f"plproxy://{proxy.removeprefix('postgresql://')}?cluster=Bad-Name", 30))


# --- faults: one shard server stopped in the middle of a stream -----------------------------------------


def _shard_cluster(index: int) -> list[str]:
    """``[VERSION, NAME]`` of the PostgreSQL cluster serving shard ``index`` (for pg_ctlcluster)."""
    clusters = os.environ.get(SHARD_CLUSTERS_ENV, "").split()
    if len(clusters) < 2:
        pytest.fail(
            f"${SHARD_CLUSTERS_ENV} must name the two shard clusters (tools/plproxy.sh)", pytrace=False
        )
    return clusters[index].split("/", 1)


def _pg_ctlcluster(action: str, cluster: list[str]) -> None:
    done = subprocess.run(["pg_ctlcluster", *cluster, action], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.e2e
def test_a_stopped_shard_refuses_its_profiles_only_and_resends_apply_once(
    plproxy_url: str, config: ServerConfig
) -> None:
    """Shard 0's server stops mid-stream: batches of profiles on shard 1 keep being applied, those on
    shard 0 get UNAVAILABLE with nothing written; once it is back, the resends are applied once."""
    down = _shard_cluster(0)
    # Partitions go round-robin over the two shards: even partitions are on shard 0.
    on_down = {p for p in PROFILES if partition_of(plproxy_url, p) % 2 == 0}
    assert on_down and on_down != set(PROFILES)
    today = day_number(utc_today())
    rng = random.Random(5)
    batches = [
        make_batch(
            [signal(rng.choice((MUSIC, ELECTRONICS)), rng.randint(1, 4), rng.randint(0, 5))],
            profile_id=PROFILES[n % len(PROFILES)],
            base_day=today,
            batch_id=rng.randbytes(16),
        )
        for n in range(240)
    ]

    async def issue() -> tuple[dict[str, str], str]:
        store = await open_store(plproxy_url, 30)
        try:
            return {p: await issue_device_token(store, p) for p in PROFILES}, await issue_admin_token(store)
        finally:
            await store.close()

    tokens, admin = asyncio.run(issue())
    outcomes: dict[bytes, grpc.StatusCode] = {}
    answered = threading.Semaphore(0)

    def stream(stub: signals_pb2_grpc.SignalAggregatorStub) -> None:
        for batch in batches:
            try:
                stub.Ingest(batch, timeout=30, metadata=bearer(tokens[batch.profile_id]))
                outcomes[batch.batch_id] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                outcomes[batch.batch_id] = exc.code()  # type: ignore[attr-defined]
            answered.release()

    server, target = start_server(plproxy_url, "--rate-burst", "100000")
    stopped = False
    try:
        with grpc.insecure_channel(target) as channel:
            stub = signals_pb2_grpc.SignalAggregatorStub(channel)
            sender = threading.Thread(target=stream, args=(stub,))
            sender.start()
            for _ in range(60):
                assert answered.acquire(timeout=60), "the stream stalled"
            _pg_ctlcluster("stop", down)
            stopped = True
            for _ in range(120):  # the stream goes on while the shard is down
                assert answered.acquire(timeout=60), "the stream stalled"
            # A cluster-wide read needs every partition: it is refused, and retryable, meanwhile.
            with pytest.raises(grpc.RpcError) as info:
                stub.AudienceSize(
                    signals_pb2.AudienceSizeRequest(category_id=MUSIC), timeout=30, metadata=bearer(admin)
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            _pg_ctlcluster("start", down)
            stopped = False
            sender.join(120)
            assert not sender.is_alive()

            refused = [b for b in batches if outcomes[b.batch_id] != grpc.StatusCode.OK]
            assert refused, "stopping the shard refused nothing"
            assert {outcomes[b.batch_id] for b in refused} == {grpc.StatusCode.UNAVAILABLE}
            assert {b.profile_id for b in refused} <= on_down  # the other shard's profiles never failed

            # The devices resend what was refused (and a few acknowledged ones): each applied once.
            resend = refused + [b for b in batches if outcomes[b.batch_id] == grpc.StatusCode.OK][::9]
            replies: dict[bytes, signals_pb2.IngestResponse] = {}
            for batch in resend:
                for _attempt in range(50):  # the first calls after the restart may still find it starting
                    try:
                        replies[batch.batch_id] = stub.Ingest(
                            batch, timeout=30, metadata=bearer(tokens[batch.profile_id])
                        )
                        break
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                        time.sleep(0.2)
                else:
                    pytest.fail("a resend was never accepted after the shard came back")
    finally:
        if stopped:
            _pg_ctlcluster("start", down)
        err = stop_server(server)
    assert all(replies[b.batch_id].duplicate for b in resend if outcomes[b.batch_id] == grpc.StatusCode.OK)
    # Refused means nothing written (at most the one call in flight when the server stopped may have
    # committed without its acknowledgement reaching the proxy).
    assert sum(replies[b.batch_id].duplicate for b in refused) <= 1, err

    async def stored() -> dict[str, StoredProfile | None]:
        store = await open_store(plproxy_url, 30)
        try:
            return {p: await store.get_profile(p) for p in PROFILES}
        finally:
            await store.close()

    async def expected() -> dict[str, StoredProfile | None]:
        store = await open_store("sqlite:///:memory:", 30)
        try:
            for batch in batches:
                await store.apply_batch(validate_batch(batch, dataclasses.replace(config, clock=utc_today)))
            return {p: await store.get_profile(p) for p in PROFILES}
        finally:
            await store.close()

    got, want = asyncio.run(stored()), asyncio.run(expected())
    for profile in PROFILES:  # nothing lost, nothing doubled
        a, b = got[profile], want[profile]
        assert a is not None and b is not None
        assert (a.batches, a.last_days) == (b.batches, b.last_days), profile
        assert a.sums == pytest.approx(b.sums, rel=1e-12), profile


# --- the admin commands ---------------------------------------------------------------------------------


def _sotto_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sotto.server", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.e2e
def test_cluster_commands_create_show_and_move(
    plproxy_server: tuple[str, list[str]], config: ServerConfig
) -> None:
    proxy, shards = plproxy_server
    cluster = f"t_{uuid.uuid4().hex[:12]}"
    with scratch_schema(proxy, prefix=cluster) as proxy_url:
        url = f"plproxy://{proxy_url.removeprefix('postgresql://')}&cluster={cluster}"
        created = _sotto_server("cluster", "create", "--db", url, "--partitions", "4", *shards)
        try:
            assert created.returncode == 0, created.stderr
            partitions = json.loads(created.stdout)["partitions"]
            assert [(p["partition"], p["schema"]) for p in partitions] == [
                (n, f"{cluster}_p{n:02d}") for n in range(4)
            ]
            assert all("password" not in p["connstr"] for p in partitions)  # it is in the user mapping
            # The tables appear when a store first opens the cluster: `token issue` does here.
            issued = _sotto_server("token", "issue", "--db", url, PROFILE)
            assert issued.returncode == 0, issued.stderr
            moved = partition_of(url, PROFILE)

            async def apply() -> StoredProfile | None:
                store = await open_store(url, 30)
                try:
                    await store.apply_batch(validate_batch(make_batch(), config))
                    return await store.get_profile(PROFILE)
                finally:
                    await store.close()

            before = asyncio.run(apply())
            shown = _sotto_server("cluster", "show", "--db", url)
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)["partitions"] == partitions

            move = _sotto_server("cluster", "move", "--db", url, "--partition", str(moved), "--to", shards[0])
            assert move.returncode == 0, move.stderr
            assert json.loads(move.stdout)["moved"] == moved
            shown = json.loads(_sotto_server("cluster", "show", "--db", url).stdout)["partitions"]
            assert shown[moved]["schema"] == json.loads(move.stdout)["schema"] != partitions[moved]["schema"]

            async def read() -> StoredProfile | None:
                store = await open_store(url, 30)
                try:
                    return await store.get_profile(PROFILE)
                finally:
                    await store.close()

            assert asyncio.run(read()) == before
            bad = _sotto_server("cluster", "create", "--db", url, "--partitions", "3", *shards)
            assert (bad.returncode, "power of two" in bad.stderr) == (2, True)
        finally:
            if created.returncode == 0:
                asyncio.run(sharded.drop_cluster(url))


def test_a_partition_moved_under_ingest_loses_and_doubles_nothing(
    plproxy_url: str, plproxy_server: tuple[str, list[str]], config: ServerConfig
) -> None:
    """Batches keep coming while the partition moves: those refused while it is paused are resent after,
    and every batch counts once."""
    moved = partition_of(plproxy_url, PROFILES[0])
    _, shards = plproxy_server
    profiles = [p for p in PROFILES if partition_of(plproxy_url, p) == moved]
    batches = [
        validate_batch(
            make_batch([signal(MUSIC, 1 + n % 4, n % 5)], profile_id=p, batch_id=bytes([n, i]) * 8), config
        )
        for n in range(40)
        for i, p in enumerate(profiles)
    ]

    async def scenario() -> tuple[dict[str, StoredProfile | None], int]:
        store = await open_store(plproxy_url, 30)
        try:
            refused: list[int] = []

            async def ingest() -> None:
                for n, batch in enumerate(batches):
                    try:
                        await store.apply_batch(batch)
                    except StoreUnavailableError:
                        refused.append(n)
                    await asyncio.sleep(0)

            await asyncio.gather(ingest(), sharded.move_partition(plproxy_url, moved, shards[1 - moved % 2]))
            for n in refused:  # the devices resend
                assert not (await store.apply_batch(batches[n])).duplicate
            return {p: await store.get_profile(p) for p in profiles}, len(refused)
        finally:
            await store.close()

    async def expected() -> dict[str, StoredProfile | None]:
        store = await open_store("sqlite:///:memory:", 30)
        try:
            for batch in batches:
                await store.apply_batch(batch)
            return {p: await store.get_profile(p) for p in profiles}
        finally:
            await store.close()

    got, refused = asyncio.run(scenario())
    assert refused, "the move never paused the stream"
    want = asyncio.run(expected())
    for profile in profiles:
        a, b = got[profile], want[profile]
        assert a is not None and b is not None
        assert (a.batches, a.last_days) == (b.batches, b.last_days), profile
        assert a.sums == pytest.approx(b.sums, rel=1e-12), profile
