"""Exactly-once application of batches, on every backend."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from aggregator_testkit import ELECTRONICS, MUSIC, PROFILE, TODAY_DAY, make_batch, row_counts, running, signal

from sotto.server import ServerConfig, open_store
from sotto.server.store import BatchConflictError
from sotto.server.validation import validate_batch
from sotto.v1 import signals_pb2

GET_PROFILE = signals_pb2.GetProfileRequest(profile_id=PROFILE)


def test_resent_batch_is_a_duplicate_and_changes_nothing(config: ServerConfig, db_url: str) -> None:
    batch = make_batch([signal(MUSIC, 4), signal(ELECTRONICS, 2)])

    async def scenario() -> None:
        async with running(db_url, config) as r:
            first = await r.stub.Ingest(batch, timeout=5)
            assert (first.batch_id, first.duplicate, first.applied_signals) == (batch.batch_id, False, 2)
            before = await r.stub.GetProfile(GET_PROFILE, timeout=5)
            for _ in range(3):
                again = await r.stub.Ingest(batch, timeout=5)
                assert (again.batch_id, again.duplicate, again.applied_signals) == (batch.batch_id, True, 0)
            after = await r.stub.GetProfile(GET_PROFILE, timeout=5)
            assert after == before
            assert after.batches == 1
            assert {s.category_id: s.score for s in after.scores} == {MUSIC: 1.0, ELECTRONICS: 0.5}

    asyncio.run(scenario())
    assert row_counts(db_url) == {"batches": 1, "profiles": 1, "scores": 2, "credentials": 0}


def test_resent_batch_with_signals_reordered_is_a_duplicate(config: ServerConfig, db_url: str) -> None:
    a, b = signal(MUSIC, 4), signal(ELECTRONICS, 2)

    async def scenario() -> None:
        async with running(db_url, config) as r:
            await r.stub.Ingest(make_batch([a, b], batch_id=bytes(16)), timeout=5)
            again = await r.stub.Ingest(make_batch([b, a], batch_id=bytes(16)), timeout=5)
            assert again.duplicate

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("signals", "fields"),
    [
        pytest.param([signal(MUSIC, 3)], {}, id="weight"),
        pytest.param([signal(MUSIC, 4, day_offset=1)], {}, id="day_offset"),
        pytest.param([signal(ELECTRONICS, 4)], {}, id="category"),
        pytest.param([signal(MUSIC, 4), signal(MUSIC, 4)], {}, id="extra-signal"),
        pytest.param([signal(MUSIC, 4)], {"region": "CA"}, id="region"),
        pytest.param([signal(MUSIC, 4)], {"base_day": TODAY_DAY - 1}, id="base_day"),
    ],
)
def test_reused_batch_id_with_other_content_is_refused(
    signals: list[signals_pb2.Signal], fields: dict[str, object], config: ServerConfig, db_url: str
) -> None:
    batch_id = b"\x01" * 16
    original = make_batch([signal(MUSIC, 4)], batch_id=batch_id)
    reused = make_batch(signals, batch_id=batch_id, **fields)

    async def scenario() -> None:
        async with running(db_url, config) as r:
            await r.stub.Ingest(original, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.Ingest(reused, timeout=5)
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert info.value.details() == "batch id reused with different content"
            profile = await r.stub.GetProfile(GET_PROFILE, timeout=5)
            assert profile.batches == 1
            assert {s.category_id: s.score for s in profile.scores} == {MUSIC: 1.0}

    asyncio.run(scenario())
    assert row_counts(db_url) == {"batches": 1, "profiles": 1, "scores": 1, "credentials": 0}


def test_concurrent_resends_apply_once(store_url: str, config: ServerConfig) -> None:
    batch = validate_batch(make_batch([signal(MUSIC, 4)]), config)

    async def scenario() -> None:
        store = await open_store(store_url, 30)
        try:
            results = await asyncio.gather(*(store.apply_batch(batch) for _ in range(20)))
            assert sorted(r.duplicate for r in results) == [False] + [True] * 19
            assert sum(r.applied_signals for r in results) == 1
            profile = await store.get_profile(PROFILE)
            assert profile is not None
            assert profile.batches == 1
            assert list(profile.sums) == [MUSIC]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_store_conflict_raises_and_keeps_the_first_content(store_url: str, config: ServerConfig) -> None:
    first = validate_batch(make_batch([signal(MUSIC, 4)], batch_id=bytes(16)), config)
    second = validate_batch(make_batch([signal(MUSIC, 1)], batch_id=bytes(16)), config)

    async def scenario() -> None:
        store = await open_store(store_url, 30)
        try:
            await store.apply_batch(first)
            before = await store.get_profile(PROFILE)
            with pytest.raises(BatchConflictError, match="batch id reused with different content"):
                await store.apply_batch(second)
            assert await store.get_profile(PROFILE) == before
        finally:
            await store.close()

    asyncio.run(scenario())
