"""What only the sharded store (PL/Proxy) has: partitions holding the PostgreSQL store's schema, a proxy
holding no profile data, counts summed over partitions before k, a paused partition answering
UNAVAILABLE for its own profiles only, and moving a partition to another database.

Every other store test runs against the sharded store too (the ``plproxy`` parameter of ``store_url`` and
``db_url`` in conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses

import psycopg
import pytest
from aggregator_testkit import (
    MUSIC,
    PROFILE,
    TEST_PARTITIONS,
    cells_mentioning,
    make_batch,
    running,
    sharded_databases,
    signal,
)

from sotto.server import ServerConfig, open_store
from sotto.server.auth import device_credential
from sotto.server.store import StoreConfigError, StoredProfile, StoreUnavailableError
from sotto.server.store import plproxy as sharded
from sotto.server.store import postgres as postgres_backend
from sotto.server.validation import validate_batch
from sotto.v1 import signals_pb2

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
