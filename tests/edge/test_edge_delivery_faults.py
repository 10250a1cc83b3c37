"""Fault tests of delivery: the real pipeline (text queries, to stay fast), the real client and outbox, the
real aggregator; a device killed with SIGKILL, replies lost after the server applied them, the server
down for a while, an outbox past its bound, a damaged outbox file.

The check is always the same: what the aggregator holds equals what the device's ledger says was
acknowledged -- the same batches, each applied once, the same scores -- and every signal the outbox
accepted is accounted for (acknowledged, or dropped and counted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from edge_testkit import PROFILE, REPO, TODAY, AggregatorThread, assert_outbox_balanced, free_port
from fault_proxy import ResponseDroppingProxy

from sotto.edge.client import DeliveryClient
from sotto.edge.outbox import LedgerEntry, Outbox, OutboxLimits
from sotto.edge.pipeline import EdgeModels, Pipeline
from sotto.policy import Policy
from sotto.server import ServerConfig

QUERIES = [
    line.strip()
    for line in (REPO / "tools" / "demo" / "queries.txt").read_text(encoding="utf-8").splitlines()
    if line.strip()
]


def _produce(pipeline: Pipeline, client: DeliveryClient, utterances: int, start: int = 0) -> int:
    """Analyse ``utterances`` demo queries (cycling) and hand their signals to the client; returns the
    number of signals the outbox accepted."""
    accepted = 0
    for i in range(start, start + utterances):
        result = pipeline.analyze_text(QUERIES[i % len(QUERIES)], today=TODAY)
        accepted += client.add(result.signals)
    return accepted


def _drain(client: DeliveryClient, deadline_s: float = 30.0) -> None:
    give_up = time.monotonic() + deadline_s
    while not client.flush():
        assert time.monotonic() < give_up, f"outbox not drained: {client.outbox_stats()}"
        time.sleep(0.1)


def _expected_scores(ledger: list[LedgerEntry]) -> dict[str, float]:
    """Scores the aggregator must hold: every acknowledged signal once (all on the server's today, so
    decay leaves each weight as it is)."""
    scores: dict[str, float] = defaultdict(float)
    for entry in ledger:
        scores[entry.category_id] += entry.weight
    return dict(scores)


def _assert_server_holds_exactly(
    server: AggregatorThread, profile_id: str, ledger: list[LedgerEntry]
) -> None:
    profile = server.profile(profile_id)
    assert profile.batches == len({e.batch_id for e in ledger})
    assert {s.category_id: s.score for s in profile.scores} == pytest.approx(_expected_scores(ledger))


# --- SIGKILL, 20 times -------------------------------------------------------------------------------


def test_device_killed_20_times_every_accepted_signal_counted_once(policy: Policy, tmp_path: Path) -> None:
    """tools/emulate_device.py --kill-every: the device process is SIGKILLed at random moments while it
    analyses, writes its outbox and sends, and restarted; in the end the aggregator holds every signal
    the outboxes accepted, once."""
    queries = tmp_path / "queries.txt"
    # 2 devices x 40 utterances, a kill after every 2 (and a fraction): about 30 kills.
    queries.write_text("\n".join((QUERIES * 3)[:40]) + "\n", encoding="utf-8")
    outboxes = tmp_path / "outboxes"
    report = tmp_path / "report.json"
    # The emulator dates signals by the real calendar: the aggregator must too.
    with AggregatorThread(f"sqlite:///{tmp_path / 'agg.db'}", ServerConfig(policy=policy)) as server:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tools.emulate_device",
                "--target",
                server.target,
                "--text",
                "--queries",
                str(queries),
                "--devices",
                "2",
                "--profile-prefix",
                "fault",
                "--batch-size",
                "2",
                "--max-delay",
                "0",
                "--outbox-dir",
                str(outboxes),
                "--kill-every",
                "2",
                "--report",
                str(report),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(report.read_text())
        assert summary["kills"] >= 20, summary["kills"]
        for device in ("fault-device-0001", "fault-device-0002"):
            with Outbox(outboxes / f"{device}.db") as box:
                stats = box.stats()
                assert stats.queued_signals == 0
                # Nothing was dropped or refused: every accepted signal was acknowledged ...
                assert stats.get("signals_added") == stats.get("signals_acknowledged") > 0
                ledger = box.ledger()
                assert len(ledger) == stats.get("signals_acknowledged")
                assert_outbox_balanced(box)
            # ... and the aggregator applied each of them exactly once.
            _assert_server_holds_exactly(server, device, ledger)
    assert summary["outbox"]["signals_added"] == summary["outbox"]["signals_acknowledged"]


# --- replies lost after the server applied the batch ---------------------------------------------------


def test_lost_replies_are_resent_and_applied_once(
    edge_models: EdgeModels, server_config: ServerConfig, db_url: str, tmp_path: Path
) -> None:
    with (
        AggregatorThread(db_url, server_config) as server,
        ResponseDroppingProxy(server.target, drop_rate=0.3, seed=11) as proxy,
    ):
        client = DeliveryClient(
            PROFILE,
            "US",
            target=proxy.address,
            outbox=tmp_path / "outbox.db",
            batch_size=2,
            max_attempts=6,
            backoff_s=0.01,
            max_delay_s=0,
        )
        try:
            pipeline = Pipeline(edge_models)
            accepted = 0
            for i in range(40):
                accepted += _produce(pipeline, client, 1, start=i)
                client.flush()  # one call per batch as it fills; a lost reply leaves it queued
            _drain(client)
            ledger = client.outbox.ledger()
            assert_outbox_balanced(client.outbox)
            assert proxy.dropped >= 5, (proxy.dropped, proxy.forwarded)
            # Each lost reply was for a batch the server had applied: the resend came back "duplicate".
            assert client.stats.duplicates >= 1
            assert len(ledger) == accepted == client.outbox_stats().get("signals_acknowledged")
            _assert_server_holds_exactly(server, PROFILE, ledger)
        finally:
            client.close()


# --- the aggregator down for a while --------------------------------------------------------------------


def test_server_down_then_back_outbox_drains_in_order(
    edge_models: EdgeModels, server_config: ServerConfig, db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    client = DeliveryClient(
        PROFILE,
        "US",
        target=f"127.0.0.1:{port}",
        outbox=tmp_path / "outbox.db",
        batch_size=3,
        max_attempts=1,
        backoff_s=0.01,
        max_backoff_s=0.05,
        max_delay_s=0,
    )
    try:
        pipeline = Pipeline(edge_models)
        accepted = 0
        for i in range(30):  # offline: every attempt fails, everything waits in the outbox
            accepted += _produce(pipeline, client, 1, start=i)
            assert client.flush_if_due() in (False, None)
        assert client.stats.batches_sent == 0
        client.outbox.seal(PROFILE, client.batch_size, partial=True)
        order = [b.batch_id for b in client.outbox.batches()]
        assert len(order) >= 5
        with AggregatorThread(db_url, server_config, port=port) as server:
            _drain(client)
            ledger = client.outbox.ledger()
            acked_order = list(dict.fromkeys(e.batch_id for e in ledger))
            assert acked_order == order  # oldest first, as sealed
            assert len(ledger) == accepted
            assert client.stats.duplicates == 0
            _assert_server_holds_exactly(server, PROFILE, ledger)
            assert_outbox_balanced(client.outbox)
    finally:
        client.close()


# --- overflow --------------------------------------------------------------------------------------------


def test_overflow_drops_the_oldest_reports_them_and_delivers_the_newest(
    edge_models: EdgeModels, server_config: ServerConfig, db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    outbox = Outbox(tmp_path / "outbox.db", OutboxLimits(max_batches=5))
    client = DeliveryClient(
        PROFILE, "US", target=f"127.0.0.1:{port}", outbox=outbox, batch_size=2, max_attempts=1
    )
    try:
        pipeline = Pipeline(edge_models)
        sealed: list[bytes] = []
        for i in range(40):
            _produce(pipeline, client, 1, start=i)
            sealed += [b.batch_id for b in outbox.batches() if b.batch_id not in sealed]
        client.outbox.seal(PROFILE, client.batch_size, partial=True)
        sealed += [b.batch_id for b in outbox.batches() if b.batch_id not in sealed]
        kept = [b.batch_id for b in outbox.batches()]
        stats = outbox.stats()
        assert len(kept) == 5
        assert kept == sealed[-5:]  # the newest survive
        assert stats.get("batches_dropped_overflow") == len(sealed) - 5 > 0  # the oldest are reported
        assert stats.get("signals_dropped_overflow") > 0
        assert_outbox_balanced(outbox)
        with AggregatorThread(db_url, server_config, port=port) as server:
            _drain(client)
            ledger = outbox.ledger()
            assert list(dict.fromkeys(e.batch_id for e in ledger)) == kept
            _assert_server_holds_exactly(server, PROFILE, ledger)
    finally:
        client.close()
        outbox.close()


# --- a damaged outbox file -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_outbox_is_detected_at_start_recovered_and_the_device_keeps_working(
    damage: str, edge_models: EdgeModels, server_config: ServerConfig, db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    port = free_port()
    pipeline = Pipeline(edge_models)
    offline = DeliveryClient(PROFILE, "US", target=f"127.0.0.1:{port}", outbox=path, batch_size=1)
    _produce(pipeline, offline, 400)
    before = {b.batch_id for b in offline.outbox.batches()}
    offline.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        if damage == "truncate":
            f.truncate(size - 2 * 4096)  # the last two pages never reached the disk
        else:
            f.seek(size - 6 * 4096)  # four pages of garbage where the newest rows are
            f.write(b"\x5a" * 4096 * 4)

    client = DeliveryClient(PROFILE, "US", target=f"127.0.0.1:{port}", outbox=path, batch_size=1)
    try:
        recovery = client.outbox.recovery
        assert recovery is not None, "the damage went unnoticed"
        assert recovery.moved_to.exists()
        recovered = {b.batch_id for b in client.outbox.batches()}
        assert recovery.recovered_batches == len(recovered) > 0
        assert recovered < before  # some of it, and nothing that was not there
        assert recovery.unreadable_rows > 0  # the rest is reported
        accepted_after = _produce(pipeline, client, 5)  # keeps working
        assert accepted_after > 0
        with AggregatorThread(db_url, server_config, port=port) as server:
            _drain(client)
            ledger = client.outbox.ledger()
            assert recovered <= {e.batch_id for e in ledger}
            assert len({e.batch_id for e in ledger}) == len(recovered) + accepted_after
            _assert_server_holds_exactly(server, PROFILE, ledger)
            assert_outbox_balanced(client.outbox)
    finally:
        client.close()


# --- the emulator, offline for a while ------------------------------------------------------------------


def test_emulator_offline_for_a_while_then_drains(policy: Policy, tmp_path: Path) -> None:
    """tools/emulate_device.py --offline-for: the devices produce with no network (their outboxes fill),
    then come online and deliver everything, once."""
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n", encoding="utf-8")
    outboxes = tmp_path / "outboxes"
    report = tmp_path / "report.json"
    with AggregatorThread(f"sqlite:///{tmp_path / 'agg.db'}", ServerConfig(policy=policy)) as server:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tools.emulate_device",
                "--target",
                server.target,
                "--text",
                "--queries",
                str(queries),
                "--devices",
                "2",
                "--profile-prefix",
                "offline",
                "--batch-size",
                "2",
                "--offline-for",
                "1",
                "--outbox-dir",
                str(outboxes),
                "--report",
                str(report),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(report.read_text())
        assert summary["outbox"]["signals_added"] == summary["outbox"]["signals_acknowledged"] > 0
        assert summary["outbox"]["queued_signals"] == 0 and summary["batches_pending"] == 0
        for device in ("offline-device-0001", "offline-device-0002"):
            with Outbox(outboxes / f"{device}.db") as box:
                ledger = box.ledger()
            _assert_server_holds_exactly(server, device, ledger)


def test_emulator_kill_every_needs_an_outbox_dir() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.emulate_device", "--target", "127.0.0.1:1", "--kill-every", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--kill-every needs --outbox-dir" in proc.stderr
