"""Profiles over their life: deletion that leaves no trace, audiences with k-anonymity, and retention, on
every backend, checked with plain SQL."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import (
    ELECTRONICS,
    MOVIES,
    MUSIC,
    OTHER,
    PROFILE,
    SENSITIVE,
    TODAY,
    Clock,
    bearer,
    cells_mentioning,
    issue_admin_token,
    issue_device_token,
    make_batch,
    row_counts,
    running,
    signal,
)

from sotto.server import ServerConfig, create_server, open_store
from sotto.server.metrics import Metrics
from sotto.server.service import purge_expired
from sotto.v1 import signals_pb2
from sotto.wire import day_number


def test_deletion_leaves_no_row_of_the_profile(auth_config: ServerConfig, db_url: str) -> None:
    async def scenario() -> None:
        async with running(db_url, auth_config) as r:
            admin = bearer(await issue_admin_token(r.store))
            for profile in (PROFILE, OTHER):
                device = bearer(await issue_device_token(r.store, profile))
                await issue_device_token(r.store, profile)  # a second device of the same wearer
                for _ in range(3):
                    await r.stub.Ingest(make_batch(profile_id=profile), timeout=5, metadata=device)
            assert cells_mentioning(db_url, PROFILE)  # batches, profiles, scores and credentials

            reply = await r.stub.DeleteProfile(
                signals_pb2.DeleteProfileRequest(profile_id=PROFILE), timeout=5, metadata=admin
            )
            assert reply.deleted
            again = await r.stub.DeleteProfile(
                signals_pb2.DeleteProfileRequest(profile_id=PROFILE), timeout=5, metadata=admin
            )
            assert not again.deleted
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.GetProfile(
                    signals_pb2.GetProfileRequest(profile_id=PROFILE), timeout=5, metadata=admin
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())
    assert cells_mentioning(db_url, PROFILE) == []
    # The other wearer keeps everything: 3 batches, 1 profile, 2 entries, 2 device tokens (+ the admin's).
    assert row_counts(db_url) == {"batches": 3, "profiles": 1, "scores": 2, "credentials": 3}


def _audience(category_id: str = MUSIC, min_score: float = 0.0) -> signals_pb2.AudienceSizeRequest:
    return signals_pb2.AudienceSizeRequest(category_id=category_id, min_score=min_score)


def test_audience_size_is_refused_below_k(auth_config: ServerConfig, db_url: str) -> None:
    config = dataclasses.replace(auth_config, min_audience=3)

    async def scenario() -> None:
        async with running(db_url, config) as r:
            admin = bearer(await issue_admin_token(r.store))

            async def add(profile: str, level: int) -> None:
                device = bearer(await issue_device_token(r.store, profile))
                await r.stub.Ingest(
                    make_batch([signal(MUSIC, level)], profile_id=profile), timeout=5, metadata=device
                )

            await add("profile_0001", 4)
            await add("profile_0002", 2)
            small = await r.stub.AudienceSize(_audience(), timeout=5, metadata=admin)
            assert (small.too_small, small.profiles, small.min_audience) == (True, 0, 3)

            await add("profile_0003", 3)
            await add("profile_0003", 1)  # the same profile again: still 3 distinct profiles
            enough = await r.stub.AudienceSize(_audience(), timeout=5, metadata=admin)
            assert (enough.too_small, enough.profiles, enough.as_of_day) == (False, 3, day_number(TODAY))

            # Scores are 1.0, 0.5 and 1.0: only two reach 0.75, which is too few to say.
            above = await r.stub.AudienceSize(_audience(min_score=0.75), timeout=5, metadata=admin)
            assert (above.too_small, above.profiles) == (True, 0)
            await add("profile_0004", 4)
            above = await r.stub.AudienceSize(_audience(min_score=0.75), timeout=5, metadata=admin)
            assert (above.too_small, above.profiles) == (False, 3)
            exact = await r.stub.AudienceSize(_audience(min_score=1.0), timeout=5, metadata=admin)
            assert (exact.too_small, exact.profiles) == (False, 3)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_audience("nope"), "category_id: unknown category 'nope'"),
        (_audience(SENSITIVE), "category_id: sensitive category 286"),
        (_audience("1"), "is not an interest category this aggregator accepts"),
        (_audience(min_score=-0.5), "min_score must be a finite number of at least 0; got -0.5"),
        (_audience(min_score=math.nan), "min_score must be a finite number"),
        (_audience(min_score=math.inf), "min_score must be a finite number"),
    ],
    ids=["unknown", "sensitive", "not-interest", "negative", "nan", "inf"],
)
def test_bad_audience_queries_are_invalid(
    request_: signals_pb2.AudienceSizeRequest, message: str, config: ServerConfig
) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with running("sqlite:///:memory:", config) as r:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.AudienceSize(request_, timeout=5)
            return info.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_retention_forgets_what_was_not_reinforced(config: ServerConfig, clock: Clock, db_url: str) -> None:
    """180 days by default: an entry lives on while signals keep coming, and goes 180 days after the last."""
    day = day_number(TODAY)

    async def scenario() -> None:
        async with running(db_url, config) as r:
            metrics = Metrics()
            await r.stub.Ingest(make_batch([signal(MUSIC), signal(MOVIES)], base_day=day), timeout=5)
            await r.stub.Ingest(make_batch([signal(ELECTRONICS)], profile_id=OTHER, base_day=day), timeout=5)
            clock.date = TODAY + dt.timedelta(days=100)
            await r.stub.Ingest(make_batch([signal(MUSIC)], base_day=day + 100), timeout=5)

            clock.date = TODAY + dt.timedelta(days=181)
            # Past retention is gone for readers at once, before any purge ran ...
            profile = await r.stub.GetProfile(signals_pb2.GetProfileRequest(profile_id=PROFILE), timeout=5)
            assert [s.category_id for s in profile.scores] == [MUSIC]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.GetProfile(signals_pb2.GetProfileRequest(profile_id=OTHER), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            audience = await r.stub.AudienceSize(_audience(ELECTRONICS), timeout=5)
            assert audience.too_small
            # ... and out of the database at the next purge: rows and batch ids alike.
            assert row_counts(db_url) == {"batches": 3, "profiles": 2, "scores": 3, "credentials": 0}
            assert metrics.registry.get_sample_value("sotto_purge_last_success_timestamp_seconds") == 0
            result = await purge_expired(r.store, config, metrics)
            assert (result.entries, result.profiles, result.batches) == (2, 1, 2)
            assert metrics.registry.get_sample_value("sotto_purge_last_success_timestamp_seconds") > 0
            assert cells_mentioning(db_url, OTHER) == []
            assert row_counts(db_url) == {"batches": 1, "profiles": 1, "scores": 1, "credentials": 0}
            assert metrics.registry.get_sample_value("sotto_purged_rows_total", {"kind": "entries"}) == 2

            clock.date = TODAY + dt.timedelta(days=281)
            await purge_expired(r.store, config, metrics)
            assert cells_mentioning(db_url, PROFILE) == []

    asyncio.run(scenario())


def test_server_purges_at_start(config: ServerConfig, clock: Clock, db_url: str) -> None:
    async def scenario() -> None:
        async with running(db_url, config) as r:
            await r.stub.Ingest(make_batch(), timeout=5)
        clock.date = TODAY + dt.timedelta(days=200)
        store = await open_store(db_url, 30)
        server, _ = await create_server("127.0.0.1:0", store, config)
        try:
            for _ in range(200):  # the purge runs in the background right after start
                if row_counts(db_url)["profiles"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert row_counts(db_url) == {"batches": 0, "profiles": 0, "scores": 0, "credentials": 0}
        finally:
            await server.stop(None)
            await store.close()

    asyncio.run(scenario())


def test_deleted_profile_is_not_left_in_the_sqlite_file(config: ServerConfig, db_path: Path) -> None:
    """Not even in free pages or the write-ahead log: the raw bytes of the file no longer hold the id."""

    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", config) as r:
            for _ in range(20):
                await r.stub.Ingest(make_batch(), timeout=5)
            await r.stub.Ingest(make_batch(profile_id=OTHER), timeout=5)
            await r.stub.DeleteProfile(signals_pb2.DeleteProfileRequest(profile_id=PROFILE), timeout=5)

    asyncio.run(scenario())
    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]
    assert files
    assert all(PROFILE.encode() not in p.read_bytes() for p in files)
    assert OTHER.encode() in db_path.read_bytes()
