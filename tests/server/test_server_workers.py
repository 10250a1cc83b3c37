"""``sotto-server serve --workers N``: real worker processes on one port (SO_REUSEPORT), metrics merged
over them, exactly-once across them, a clean stop on SIGTERM, and a loud one when a worker dies."""

from __future__ import annotations

import asyncio
import os
import re
import signal as signals
import socket
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import bearer
from prometheus_client.parser import text_string_to_metric_families
from test_server_processes import _assert_same_profiles, _batches, _issue_tokens, _profiles

from sotto.v1 import signals_pb2, signals_pb2_grpc
from tools.harness import start_server, stop_server
from tools.paths import REPO

pytestmark = pytest.mark.e2e

UNLIMITED = ("--rate-burst", "100000")
#: A fresh connection lands on either of two workers; this many makes "all on one" a 2^-39 event.
MAX_CHANNELS = 40


def start_workers(
    db_url: str, workers: int, *extra: str, listen: str = "127.0.0.1:0"
) -> tuple[subprocess.Popen[str], str, str]:
    """``serve --workers N`` with merged metrics: the parent process, its target and its metrics URL."""
    proc, target = start_server(
        db_url,
        "--workers",
        str(workers),
        "--metrics-listen",
        "127.0.0.1:0",
        *extra,
        listen=listen,
        timeout=120,
    )
    # Printed right after the first line, so it may already sit in the pipe's read buffer, where select
    # would not see it: read it directly.
    assert proc.stdout is not None
    metrics = re.fullmatch(r"metrics on (http://127\.0\.0\.1:\d+/metrics)\n", proc.stdout.readline())
    assert metrics, "no metrics line"
    return proc, target, metrics.group(1)


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The merged metrics: {sample name: {sorted labels: value}}."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def calls_by_pid(url: str) -> dict[str, float]:
    return {dict(labels)["pid"]: value for labels, value in scrape(url)["sotto_process_calls"].items()}


def worker_pids(parent: int) -> list[int]:
    """The worker processes of ``parent`` (Linux /proc; multiprocessing's resource tracker is not one)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in command:
                children.append(int(entry))
    return children


def test_two_workers_share_one_port_apply_once_and_merge_metrics(db_url: str) -> None:
    tokens = asyncio.run(_issue_tokens(db_url))
    batches = _batches(160, seed=11)
    proc, target, metrics = start_workers(db_url, 2, *UNLIMITED)
    channels: list[grpc.Channel] = []
    try:
        # A connection of its own per channel (no shared subchannel), so that each is a new TCP
        # connection for the kernel to hand to one of the workers; open them until both have answered.
        while len(channels) < MAX_CHANNELS:
            channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(channel)
            stub = signals_pb2_grpc.SignalAggregatorStub(channel)
            batch = batches[len(channels) - 1]
            stub.Ingest(batch, timeout=30, metadata=bearer(tokens[batch.profile_id]))
            if len(channels) >= 4 and sum(v > 0 for v in calls_by_pid(metrics).values()) == 2:
                break
        stubs = [signals_pb2_grpc.SignalAggregatorStub(c) for c in channels]
        # The rest over every connection, each batch twice on different connections and concurrently.
        plan = [(n, b) for n, b in enumerate(batches)] + [(n + 1, b) for n, b in enumerate(batches)]

        def send(step: tuple[int, signals_pb2.SignalBatch]) -> tuple[bool, int]:
            n, batch = step
            stub = stubs[n % len(stubs)]
            reply = stub.Ingest(batch, timeout=30, metadata=bearer(tokens[batch.profile_id]))
            return bool(reply.duplicate), reply.applied_signals

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(send, plan))
        per_worker = calls_by_pid(metrics)
        merged = scrape(metrics)
    finally:
        for channel in channels:
            channel.close()
        proc.send_signal(signals.SIGTERM)
        code = proc.wait(60)
        err = stop_server(proc)
    assert code == 0, err
    assert len(per_worker) == 2 and all(v > 0 for v in per_worker.values()), (per_worker, len(channels))
    calls = len(plan) + len(channels)
    assert sum(per_worker.values()) == calls
    # Exactly once across both workers: one "applied" answer per batch, the same profiles as one store.
    assert [duplicate for duplicate, _ in replies].count(False) == len(batches) - len(channels)
    applied = sum(len(b.signals) for b in batches)
    assert merged["sotto_batches_total"][(("outcome", "applied"),)] == len(batches)
    assert merged["sotto_batches_total"][(("outcome", "duplicate"),)] == calls - len(batches)
    assert merged["sotto_signals_total"][()] == applied
    assert merged["sotto_rpc_duration_seconds_count"][(("method", "Ingest"),)] == calls
    _assert_same_profiles(
        asyncio.run(_profiles(db_url, None)), asyncio.run(_profiles("sqlite:///:memory:", batches))
    )
    # Every worker drained and stopped; only worker 0 ran the retention purge.
    assert err.count("event=shutdown grace=") == 2, err
    assert re.search(r"worker=0 event=purge ", err) and not re.search(r"worker=1 event=purge ", err), err


def test_sigterm_mid_stream_drains_every_worker_and_loses_no_acknowledged_batch(postgres_url: str) -> None:
    tokens = asyncio.run(_issue_tokens(postgres_url))
    batches = _batches(2000, seed=12)
    proc, target, metrics = start_workers(postgres_url, 2, *UNLIMITED, "--grace-seconds", "10")
    acknowledged: list[bytes] = []
    refused: list[grpc.StatusCode] = []
    going = threading.Barrier(5)

    def stream(part: int) -> None:
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = signals_pb2_grpc.SignalAggregatorStub(channel)
            going.wait(30)
            for batch in batches[part::4]:
                try:
                    stub.Ingest(batch, timeout=30, metadata=bearer(tokens[batch.profile_id]))
                except grpc.RpcError as exc:
                    refused.append(exc.code())  # type: ignore[attr-defined]
                    return
                acknowledged.append(batch.batch_id)

    senders = [threading.Thread(target=stream, args=(n,)) for n in range(4)]
    try:
        for sender in senders:
            sender.start()
        going.wait(30)
        while len(acknowledged) < 100:
            assert all(s.is_alive() for s in senders), refused
            threading.Event().wait(0.05)
        proc.send_signal(signals.SIGTERM)
        code = proc.wait(60)
        for sender in senders:
            sender.join(60)
    finally:
        err = stop_server(proc)
    assert code == 0, err
    assert len(acknowledged) < len(batches), "the stop must land in the middle of the stream"
    # A call that reaches a worker as it closes is refused, never half-answered: UNAVAILABLE, or
    # CANCELLED when gRPC cancels a call it had accepted; either way it was not acknowledged, its batch
    # was applied whole or not at all, and a resend with the same id is applied at most once.
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, refused
    stored = asyncio.run(_profiles(postgres_url, None))
    total = sum(p.batches for p in stored.values() if p is not None)
    # Every acknowledged batch is stored; at most the calls in flight when the port closed were
    # committed without their answer reaching the client (one per stream).
    assert len(acknowledged) <= total <= len(acknowledged) + 4
    assert err.count("event=shutdown grace=") == 2, err
    del metrics


def test_a_worker_that_dies_stops_the_others_and_the_parent_exits_1(db_url: str) -> None:
    proc, _, metrics = start_workers(db_url, 2)
    try:
        victim, survivor = sorted(worker_pids(proc.pid))
        os.kill(victim, signals.SIGKILL)
        code = proc.wait(60)
    finally:
        err = stop_server(proc)
    assert code == 1, err
    assert re.search(rf"event=worker_died worker=\d pid={victim} exitcode=-9 action=stopping_all", err), err
    assert "event=shutdown grace=" in err  # the survivor drained
    assert not Path(f"/proc/{survivor}").exists()
    del metrics


def test_workers_refuse_an_in_memory_sqlite_store() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sotto.server", "serve", "--db", "sqlite:///:memory:", "--workers", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--workers needs a store the workers share" in proc.stderr
    assert proc.stdout == ""


def test_workers_refuse_a_port_another_server_listens_on(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even one that would share it
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sotto.server",
                "serve",
                "--db",
                f"sqlite:///{tmp_path / 'sotto.db'}",
                "--listen",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert proc.stdout == ""


def test_a_worker_that_cannot_start_is_reported_once_with_its_message(tmp_path: Path) -> None:
    # Plaintext on a non-loopback address is refused by each worker (create_server's check).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sotto.server",
            "serve",
            "--db",
            f"sqlite:///{tmp_path / 'sotto.db'}",
            "--listen",
            "0.0.0.0:0",
            "--workers",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error: refusing to serve plaintext on 0.0.0.0:") == 1, proc.stderr
    assert proc.stdout == ""


def test_a_busy_metrics_port_stops_the_start_before_any_worker_runs(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sotto.server",
                "serve",
                "--db",
                f"sqlite:///{tmp_path / 'sotto.db'}",
                "--workers",
                "2",
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr
    assert "event=workers_started" not in proc.stderr and proc.stdout == ""
