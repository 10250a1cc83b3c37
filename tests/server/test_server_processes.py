"""Real aggregator processes: two of them on one PostgreSQL database, and one killed with SIGKILL in the
middle of a stream of batches. Either way every batch counts exactly once."""

from __future__ import annotations

import asyncio
import random
import signal as signals
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import (
    ELECTRONICS,
    MOVIES,
    MUSIC,
    bearer,
    issue_device_token,
    make_batch,
    signal,
)

from sotto.policy import Policy
from sotto.server import ServerConfig, open_store
from sotto.server.config import utc_today
from sotto.server.store import StoredProfile
from sotto.server.validation import validate_batch
from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import day_number
from tools.harness import start_server, stop_server

pytestmark = pytest.mark.e2e

PROFILES = [f"process_{n:04d}" for n in range(4)]
#: These tests send a device's batches much faster than a device would: lift the rate limit.
UNLIMITED = ("--rate-burst", "100000")


def _batches(count: int, seed: int) -> list[signals_pb2.SignalBatch]:
    """Batches of several profiles, categories, weights and days (servers use the real clock)."""
    rng = random.Random(seed)
    today = day_number(utc_today())
    return [
        make_batch(
            [
                signal(rng.choice((MUSIC, ELECTRONICS, MOVIES)), rng.randint(1, 4), rng.randint(0, 30))
                for _ in range(rng.randint(1, 5))
            ],
            profile_id=PROFILES[n % len(PROFILES)],
            base_day=today - rng.randint(0, 60),
            batch_id=rng.randbytes(16),
        )
        for n in range(count)
    ]


async def _issue_tokens(url: str) -> dict[str, str]:
    store = await open_store(url, 30)
    try:
        return {profile: await issue_device_token(store, profile) for profile in PROFILES}
    finally:
        await store.close()


async def _profiles(
    url: str, batches: list[signals_pb2.SignalBatch] | None
) -> dict[str, StoredProfile | None]:
    """The stored profiles at ``url``, or (with ``batches``) those one store makes of each batch once."""
    store = await open_store(url, 30)
    try:
        if batches is not None:
            config = ServerConfig(policy=Policy.load(), clock=utc_today)
            for batch in batches:
                await store.apply_batch(validate_batch(batch, config))
        return {profile: await store.get_profile(profile) for profile in PROFILES}
    finally:
        await store.close()


def _assert_same_profiles(
    got: dict[str, StoredProfile | None], expected: dict[str, StoredProfile | None]
) -> None:
    for profile in PROFILES:
        a, b = got[profile], expected[profile]
        assert a is not None and b is not None
        assert a.batches == b.batches, profile
        assert a.sums == pytest.approx(b.sums, rel=1e-12), profile
        assert a.last_days == b.last_days, profile


@pytest.mark.parametrize("shared", ["postgres_url", "plproxy_url"], ids=["postgresql", "plproxy"])
def test_two_processes_on_one_postgresql_database_equal_one(
    shared: str, request: pytest.FixtureRequest
) -> None:
    """Two processes on one PostgreSQL database, or on one sharded store."""
    postgres_url = str(request.getfixturevalue(shared))
    tokens = asyncio.run(_issue_tokens(postgres_url))
    batches = _batches(120, seed=1)
    first, first_target = start_server(postgres_url, *UNLIMITED)
    second, second_target = start_server(postgres_url, *UNLIMITED)
    try:
        channels = [grpc.insecure_channel(t) for t in (first_target, second_target)]
        stubs = [signals_pb2_grpc.SignalAggregatorStub(c) for c in channels]
        # Every batch goes to one process; every third also to the other at the same time, and every
        # fifth once more later: interleaved, concurrent and duplicated across processes.
        plan = [(n % 2, b) for n, b in enumerate(batches)]
        plan += [(1 - n % 2, b) for n, b in enumerate(batches) if n % 3 == 0]
        random.Random(2).shuffle(plan)
        plan += [(n % 2, b) for n, b in enumerate(batches) if n % 5 == 0]

        def send(step: tuple[int, signals_pb2.SignalBatch]) -> bool:
            index, batch = step
            reply = stubs[index].Ingest(batch, timeout=30, metadata=bearer(tokens[batch.profile_id]))
            return bool(reply.duplicate)

        with ThreadPoolExecutor(8) as pool:
            duplicates = list(pool.map(send, plan))
        for channel in channels:
            channel.close()
    finally:
        logs = [stop_server(first), stop_server(second)]
    assert duplicates.count(False) == len(batches), logs
    _assert_same_profiles(
        asyncio.run(_profiles(postgres_url, None)), asyncio.run(_profiles("sqlite:///:memory:", batches))
    )


def test_kill_9_mid_stream_then_resend_counts_every_batch_once(db_url: str, tmp_path: Path) -> None:
    tokens = asyncio.run(_issue_tokens(db_url))
    batches = _batches(400, seed=3)
    acknowledged: list[bytes] = []
    enough = threading.Event()

    def stream(target: str) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = signals_pb2_grpc.SignalAggregatorStub(channel)
            for batch in batches:
                try:
                    stub.Ingest(batch, timeout=10, metadata=bearer(tokens[batch.profile_id]))
                except grpc.RpcError:
                    return  # the server is gone: this batch and the rest were never acknowledged
                acknowledged.append(batch.batch_id)
                if len(acknowledged) == 40:
                    enough.set()
        enough.set()

    server, target = start_server(db_url, *UNLIMITED, cwd=tmp_path)
    try:
        sender = threading.Thread(target=stream, args=(target,))
        sender.start()
        assert enough.wait(60), "the stream did not start"
        server.send_signal(signals.SIGKILL)
        sender.join(60)
        assert server.wait(10) == -signals.SIGKILL
    finally:
        stop_server(server)
    assert 40 <= len(acknowledged) < len(batches), "the kill must land in the middle of the stream"

    server, target = start_server(db_url, *UNLIMITED, cwd=tmp_path)
    try:
        acked = set(acknowledged)
        resend = [b for b in batches if b.batch_id not in acked] + [
            b for b in batches if b.batch_id in acked
        ][::7]
        with grpc.insecure_channel(target) as channel:
            stub = signals_pb2_grpc.SignalAggregatorStub(channel)
            replies = {
                b.batch_id: stub.Ingest(b, timeout=10, metadata=bearer(tokens[b.profile_id])) for b in resend
            }
    finally:
        stop_server(server)
    assert all(replies[i].duplicate for i in acked if i in replies)
    # At most the batch in flight at the kill was committed without its acknowledgement.
    assert sum(r.duplicate for i, r in replies.items() if i not in acked) <= 1
    _assert_same_profiles(
        asyncio.run(_profiles(db_url, None)), asyncio.run(_profiles("sqlite:///:memory:", batches))
    )
    assert sum(p.batches for p in asyncio.run(_profiles(db_url, None)).values() if p) == len(batches)
