"""sotto.edge.client against the real aggregator (server/) running in a background thread."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from edge_testkit import CATS, DOGS, GARDENING, MOVIES, MUSIC, PROFILE, TODAY, AggregatorThread, free_port

from sotto.edge.client import DeliveryClient
from sotto.server import ServerConfig
from sotto.wire import Signal, day_number

DAY = day_number(TODAY)


def _client(target: str, region: str = "US", **options: object) -> DeliveryClient:
    settings: dict[str, object] = {"timeout_s": 2.0, "max_attempts": 2, "backoff_s": 0.05}
    settings.update(options)
    return DeliveryClient(PROFILE, region, target=target, **settings)  # type: ignore[arg-type]


def _stored_batch_ids(db: Path) -> list[bytes]:
    with closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT batch_id FROM batches")]


def _flush_until_delivered(client: DeliveryClient, deadline_s: float = 20.0) -> int:
    """What a device does: flush again later while the network comes back; returns the number of calls.

    The channel may still be backing off from the refused connections for a moment after the server
    starts, so a single flush can legitimately come back False.
    """
    calls = 0
    give_up = time.monotonic() + deadline_s
    while True:
        calls += 1
        if client.flush():
            return calls
        assert time.monotonic() < give_up, "batch still pending after the server came up"
        time.sleep(0.2)


def test_batches_by_batch_size_and_server_profile_reflects_all(
    server_config: ServerConfig, db_url: str
) -> None:
    levels = {MUSIC: 4, MOVIES: 3, DOGS: 2, CATS: 1, GARDENING: 4}
    with AggregatorThread(db_url, server_config) as server:
        client = _client(server.target, batch_size=2)
        try:
            client.add(Signal(cid, level, DAY) for cid, level in levels.items())
            assert client.pending_batches == 3  # two full batches sealed, one partial in the buffer

            assert client.flush() is True

            assert client.pending_batches == 0
            assert client.stats.batches_sent == 3
            assert client.stats.signals_sent == 5
            assert client.stats.duplicates == 0 and client.stats.rejected == {}
            assert len(client.stats.latencies_ms) == 3
            profile = server.profile()
        finally:
            client.close()
    assert profile.batches == 3
    scores = {s.category_id: s.score for s in profile.scores}
    assert scores == pytest.approx({cid: level / 4 for cid, level in levels.items()})


def test_flush_with_nothing_queued_is_a_no_op(server_config: ServerConfig, db_url: str) -> None:
    with AggregatorThread(db_url, server_config) as server:
        client = _client(server.target)
        try:
            assert client.pending_batches == 0
            assert client.flush() is True
            assert client.stats.batches_sent == 0
        finally:
            client.close()


def test_batch_waits_for_the_server_and_is_applied_once(server_config: ServerConfig, tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "later.db"
    client = _client(f"127.0.0.1:{port}", batch_size=10)
    try:
        client.add([Signal(MUSIC, 4, DAY), Signal(DOGS, 2, DAY)])

        assert client.flush() is False  # nothing listens on the port
        assert client.pending_batches == 1
        assert client.stats.batches_sent == 0 and client.stats.rejected == {}
        # The outbox holds the sealed batch: its id and bytes were stored before the first attempt.
        (pending,) = client.outbox.batches()
        pending_id = pending.batch_id
        assert len(pending_id) == 16
        assert client.flush() is False  # still down: still the same batch, same id, same bytes
        assert client.outbox.batches() == [pending]

        with AggregatorThread(f"sqlite:///{db}", server_config, port=port) as server:
            _flush_until_delivered(client)
            assert client.pending_batches == 0
            assert client.stats.batches_sent == 1 and client.stats.signals_sent == 2
            first = server.profile()

            # Resend the very same bytes (as after a reply lost on the way back): applied once only.
            reply = client._ingest(pending.payload, timeout=5)
            assert reply.duplicate is True and reply.batch_id == pending_id
            second = server.profile()
    finally:
        client.close()

    assert _stored_batch_ids(db) == [pending_id]
    assert first.batches == second.batches == 1
    assert {s.category_id: s.score for s in second.scores} == pytest.approx({MUSIC: 1.0, DOGS: 0.5})


def test_refused_batch_is_counted_and_not_kept(server_config: ServerConfig, db_url: str) -> None:
    with AggregatorThread(db_url, server_config) as server:
        blocked = _client(server.target, region="DE", batch_size=1)
        try:
            blocked.add([Signal(MUSIC, 4, DAY)])

            assert blocked.flush() is True  # nothing left that could ever succeed

            assert blocked.stats.rejected == {"INVALID_ARGUMENT": 1}
            assert blocked.pending_batches == 0
            assert blocked.stats.batches_sent == 0 and blocked.stats.retries == 0
            with pytest.raises(grpc.RpcError) as info:
                server.profile()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        finally:
            blocked.close()


def test_refused_batch_does_not_block_the_next_one(server_config: ServerConfig, db_url: str) -> None:
    with AggregatorThread(db_url, server_config) as server:
        client = _client(server.target, batch_size=1)
        try:
            # 286 Medical Health is sensitive: the aggregator refuses that batch for good.
            client.add([Signal("286", 4, DAY), Signal(MUSIC, 4, DAY)])
            assert client.flush() is True
            assert client.stats.rejected == {"INVALID_ARGUMENT": 1}
            assert client.stats.batches_sent == 1
            profile = server.profile()
        finally:
            client.close()
    assert [s.category_id for s in profile.scores] == [MUSIC]


@pytest.mark.parametrize(
    ("batch_size", "max_attempts", "timeout_s"),
    [(0, 4, 5.0), (20, 0, 5.0), (20, 4, 0.0)],
    ids=["batch", "attempts", "timeout"],
)
def test_bad_options_are_refused(batch_size: int, max_attempts: int, timeout_s: float) -> None:
    with pytest.raises(ValueError, match="batch_size and max_attempts"):
        DeliveryClient(
            PROFILE,
            "US",
            target="127.0.0.1:1",
            batch_size=batch_size,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
        )


def test_target_or_channel_exactly_one() -> None:
    with pytest.raises(ValueError, match="exactly one of target or channel"):
        DeliveryClient(PROFILE, "US")
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError, match="exactly one"):
        DeliveryClient(PROFILE, "US", target="127.0.0.1:1", channel=channel)
