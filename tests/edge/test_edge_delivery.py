"""DeliveryClient with a persistent outbox against the real aggregator: batching, retries, the wearer's
controls (opt-out, deletion), keepalive, and the `sotto-edge ledger` command."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from edge_testkit import CATS, DOGS, MOVIES, MUSIC, PROFILE, TODAY, AggregatorThread, free_port, run_edge

from sotto.edge.client import (
    CHANNEL_OPTIONS,
    KEEPALIVE_TIME_MS,
    DeletionStatus,
    DeliveryClient,
    deletion_state,
)
from sotto.edge.outbox import Outbox, OutboxLimits
from sotto.server import ServerConfig
from sotto.server.service import MIN_PING_INTERVAL_MS, PING_POLICY
from sotto.wire import Signal, day_number

DAY = day_number(TODAY)


def _client(target: str, outbox: Path | Outbox | None = None, **options: object) -> DeliveryClient:
    settings: dict[str, object] = {"timeout_s": 2.0, "max_attempts": 2, "backoff_s": 0.05}
    settings.update(options)
    return DeliveryClient(PROFILE, "US", target=target, outbox=outbox, **settings)  # type: ignore[arg-type]


def test_signals_wait_for_a_full_batch_or_the_maximum_delay(server_config: ServerConfig, db_url: str) -> None:
    with AggregatorThread(db_url, server_config) as server:
        client = _client(server.target, batch_size=3, max_delay_s=3600)
        try:
            client.add([Signal(MUSIC, 4, DAY), Signal(DOGS, 2, DAY)])
            assert client.due() is False and client.flush_if_due() is None  # not worth a call yet
            client.add([Signal(CATS, 1, DAY)])
            assert client.due() is True  # a full batch
            assert client.flush_if_due() is True
            assert client.stats.batches_sent == 1

            client.add([Signal(MOVIES, 3, DAY)])
            oldest = client.outbox.oldest_unsealed_at()
            assert oldest is not None
            assert client.due(now=oldest + 3599) is False
            assert client.due(now=oldest + 3600) is True  # the lone signal has waited long enough
            assert client.flush() is True
            assert client.stats.batches_sent == 2 and client.stats.signals_sent == 4
        finally:
            client.close()


def test_failed_flush_backs_off_before_the_next_attempt() -> None:
    client = _client(f"127.0.0.1:{free_port()}", batch_size=1, max_attempts=1, backoff_s=60, max_backoff_s=60)
    try:
        client.add([Signal(MUSIC, 4, DAY)])
        assert client.due() is True
        assert client.flush_if_due() is False  # nothing listens
        assert client.due() is False  # a full batch waits, but the backoff has not passed
        assert client.pending_batches == 1
    finally:
        client.close()


def test_batches_survive_a_restart_and_are_sent_with_their_ids(
    server_config: ServerConfig, db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    down = _client(f"127.0.0.1:{free_port()}", outbox=path, batch_size=2, max_attempts=1)
    down.add([Signal(MUSIC, 4, DAY), Signal(DOGS, 2, DAY), Signal(CATS, 1, DAY)])
    assert down.flush() is False
    ids = [b.batch_id for b in down.outbox.batches()]
    down.close()  # the "reboot"
    assert len(ids) == 2
    with AggregatorThread(db_url, server_config) as server:
        client = _client(server.target, outbox=path, batch_size=2)
        try:
            assert client.flush() is True
            ledger = client.outbox.ledger()
            profile = server.profile()
        finally:
            client.close()
    assert [e.batch_id for e in ledger] == [ids[0], ids[0], ids[1]]
    assert profile.batches == 2


def test_opt_out_purges_at_once_refuses_new_signals_and_is_remembered(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    client = _client(f"127.0.0.1:{free_port()}", outbox=path, batch_size=2, max_attempts=1)
    try:
        client.add([Signal(MUSIC, 4, DAY), Signal(DOGS, 2, DAY), Signal(CATS, 1, DAY)])
        assert client.set_opt_out(True) == 3
        assert client.pending_batches == 0
        assert client.add([Signal(MOVIES, 4, DAY)]) == 0
        assert client.stats.refused_signals == 1
        assert client.flush() is True  # nothing to send, nothing sent
    finally:
        client.close()
    again = _client(f"127.0.0.1:{free_port()}", outbox=path)
    try:
        assert again.opted_out is True  # survives a restart
        assert again.add([Signal(MOVIES, 4, DAY)]) == 0
        again.set_opt_out(False)
        assert again.add([Signal(MOVIES, 4, DAY)]) == 1
    finally:
        again.close()
    with Outbox(path) as box:
        assert box.stats().get("signals_purged") == 3


def test_deletion_clears_outbox_and_ledger_and_is_delivered_after_a_restart(
    server_config: ServerConfig, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    port = free_port()
    db = f"sqlite:///{tmp_path / 'agg.db'}"
    with AggregatorThread(db, server_config, port=port) as server:
        client = _client(server.target, outbox=path, batch_size=1)
        client.add([Signal(MUSIC, 4, DAY)])
        assert client.flush() is True
        assert len(client.outbox.ledger()) == 1
        assert server.profile().batches == 1
    # The aggregator is down when the wearer asks for deletion: erased locally now, delivered later.
    client.add([Signal(DOGS, 2, DAY)])
    assert client.delete_profile() is DeletionStatus.PENDING
    assert client.outbox.ledger() == [] and client.pending_batches == 0
    state = deletion_state(client.outbox)
    assert state is not None and state.status is DeletionStatus.PENDING and state.last_code == "UNAVAILABLE"
    assert client.add([Signal(CATS, 1, DAY)]) == 0  # nothing new for a profile being deleted
    client.close()
    with AggregatorThread(db, server_config, port=port) as server:
        rebooted = _client(server.target, outbox=path)
        try:
            assert rebooted.deletion_pending is True
            deadline = 50
            while not rebooted.flush():
                deadline -= 1
                assert deadline, "the deletion was never delivered"
            assert rebooted.deletion_pending is False
            settled = deletion_state(rebooted.outbox)
            assert settled is not None and settled.status is DeletionStatus.ERASED
            with pytest.raises(grpc.RpcError) as info:
                server.profile()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        finally:
            rebooted.close()


def test_keepalive_stays_within_the_servers_ping_policy() -> None:
    options = dict(CHANNEL_OPTIONS)
    policy = dict(PING_POLICY)
    assert options["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS >= MIN_PING_INTERVAL_MS
    assert policy["grpc.http2.min_ping_interval_without_data_ms"] == MIN_PING_INTERVAL_MS
    # The device never pings an idle connection, and the server would not accept it if it did.
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert policy["grpc.keepalive_permit_without_calls"] == 0


def test_bad_delivery_options_are_refused() -> None:
    for options in ({"max_delay_s": -1}, {"backoff_s": 10, "max_backoff_s": 1}):
        with pytest.raises(ValueError, match="max_delay_s"):
            DeliveryClient(PROFILE, "US", target="127.0.0.1:1", **options)  # type: ignore[arg-type]


# --- sotto-edge ledger ----------------------------------------------------------------------------------


def _sent_outbox(path: Path) -> bytes:
    with Outbox(path) as box:
        box.add("US", [Signal(MUSIC, 4, DAY), Signal(DOGS, 2, DAY)])
        box.seal(PROFILE, batch_size=2)
        (batch,) = box.batches()
        box.acknowledge(batch.batch_id)
        box.add("US", [Signal(CATS, 1, DAY)])  # queued, not sent: not in the ledger
        return batch.batch_id


def test_ledger_json_lists_what_was_sent(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    batch_id = _sent_outbox(path)
    proc = run_edge("ledger", "--outbox", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["category_id"], r["weight"], r["day"], r["batch_id"]) for r in rows] == [
        (MUSIC, 1.0, TODAY.isoformat(), batch_id.hex()),
        (DOGS, 0.5, TODAY.isoformat(), batch_id.hex()),
    ]
    assert rows[0]["name"] == "Music" and rows[0]["tier1"]
    assert all(
        set(r) == {"sent_at", "day", "category_id", "name", "tier1", "weight", "batch_id"} for r in rows
    )


def test_ledger_table_and_clear(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    batch_id = _sent_outbox(path)
    table = run_edge("ledger", "--outbox", str(path))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["sent", "(UTC)"]
    assert len(lines) == 3 and all(batch_id.hex()[:8] in line for line in lines[1:])
    cleared = run_edge("ledger", "--outbox", str(path), "--clear")
    assert cleared.returncode == 0 and cleared.stdout.strip() == "cleared 2 ledger entries"
    assert json.loads(run_edge("ledger", "--outbox", str(path), "--json").stdout) == []
    with Outbox(path) as box:
        assert box.stats().queued_signals == 1  # clearing the ledger leaves the queue alone


def test_ledger_of_a_device_that_never_sent_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "none" / "outbox.db"
    proc = run_edge("ledger", "--outbox", str(path))
    assert proc.returncode == 0 and "No signals have been sent" in proc.stdout
    assert not path.parent.exists()


def test_ledger_reports_a_newer_outbox_as_an_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    Outbox(path).close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    proc = run_edge("ledger", "--outbox", str(path))
    assert proc.returncode == 2 and "newer than this software" in proc.stderr


def test_limits_reach_the_client(tmp_path: Path) -> None:
    """The outbox bound applies to what the client queues (the overflow itself is tested in
    test_edge_outbox and the fault tests)."""
    box = Outbox(tmp_path / "o.db", OutboxLimits(max_batches=2))
    client = _client(f"127.0.0.1:{free_port()}", outbox=box, batch_size=1)
    try:
        client.add([Signal(MUSIC, 4, DAY), Signal(DOGS, 2, DAY), Signal(CATS, 1, DAY)])
        assert client.pending_batches == 2
        assert box.stats().get("batches_dropped_overflow") == 1
    finally:
        client.close()
        box.close()
