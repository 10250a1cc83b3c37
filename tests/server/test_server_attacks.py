"""Attacks on a real ``sotto-server serve`` process on loopback (issue 17's server findings), each bounded in
count and time: stalled streams, bursts, unparseable requests, oversized strings, connection and ping
floods, and signals older than the retention period. The checks are outcomes (status codes, rows, metrics,
log lines, what the server does with a connection), never latencies."""

from __future__ import annotations

import asyncio
import collections
import re
import resource
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from aggregator_testkit import (
    PROFILE,
    bearer,
    issue_device_token,
    make_batch,
    signal,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import tools.fuzz as fuzz
from sotto.server import open_store
from sotto.server.config import utc_today
from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import day_number
from tools.attack_pings import ping_once
from tools.harness import read_line

pytestmark = pytest.mark.e2e

INGEST = "/sotto.v1.SignalAggregator/Ingest"
#: gRPC shares one connection between channels to the same target; an attacker has a connection of its own.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


@dataclass
class Server:
    """A running ``sotto-server serve``: its process, gRPC target, metrics port, database, token and log."""

    proc: subprocess.Popen[str]
    target: str
    metrics_port: int
    db: Path
    token: str
    log: Path

    def refusals(self, reason: str, method: str = "Ingest") -> float:
        """``sotto_refusals_total`` for ``method`` and ``reason``, scraped from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sotto_refusals_total" and sample.labels == {
                    "method": method,
                    "reason": reason,
                }:
                    return sample.value
        return 0.0

    def stop(self) -> str:
        """Stop the server (SIGTERM, SIGKILL if it hangs); its log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.log.read_text()


async def _token(db: Path) -> str:
    store = await open_store(f"sqlite:///{db}", 30)
    try:
        return await issue_device_token(store, PROFILE)
    finally:
        await store.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``sotto-server serve`` with extra options (metrics on); every server is stopped afterwards."""
    started: list[Server] = []

    def start(*extra: str, open_files: int | None = None) -> Server:
        """``open_files``: the server's soft open-file limit when it starts (as a shell's ``ulimit -n``)."""
        db = tmp_path / f"attack{len(started)}.db"
        log = tmp_path / f"attack{len(started)}.log"
        token = asyncio.run(_token(db))
        # The log goes to a file, not a pipe: a flood of log lines must not block the server on a full pipe.
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sotto.server",
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--db",
                    f"sqlite:///{db}",
                ]
                + ["--metrics-listen", "127.0.0.1:0", *extra],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                preexec_fn=None if open_files is None else lambda: _limit_open_files(open_files),
            )
        listening = re.fullmatch(r"listening on (127\.0\.0\.1:\d+)\n", read_line(proc, 60))
        metrics = re.fullmatch(r"metrics on http://127\.0\.0\.1:(\d+)/metrics\n", read_line(proc, 30))
        assert listening and metrics, log.read_text()
        server = Server(proc, listening.group(1), int(metrics.group(1)), db, token, log)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop()


def _limit_open_files(soft: int) -> None:
    """Set this process's soft open-file limit (in a child, before it runs the server)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


async def _never() -> AsyncIterator[bytes]:
    """A request stream that sends headers and then nothing (the client never sends its message)."""
    await asyncio.sleep(3600)
    yield b""


def _today() -> int:
    return day_number(utc_today())


async def _outcomes(calls: list[grpc.aio.StreamUnaryCall], within: float) -> collections.Counter[str]:
    """The status codes the calls ended with; "HELD" for those still open after ``within`` seconds."""
    done, pending = await asyncio.wait([asyncio.ensure_future(_code(call)) for call in calls], timeout=within)
    for task in pending:
        task.cancel()
    return collections.Counter([task.result() for task in done] + ["HELD"] * len(pending))


async def _code(call: grpc.aio.StreamUnaryCall) -> str:
    try:
        await call
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(reply.status)


def test_stalled_unauthenticated_streams_lock_nobody_out(serve: Callable[..., Server]) -> None:
    """Finding 1: one connection opens many streams that send only headers (no token, no message). They
    must not hold the concurrency limit: valid Ingest and health checks still succeed while the attack
    holds its streams open, every stalled stream is refused, counted, and logged in bounded form."""
    server = serve("--max-concurrent-rpcs", "50")
    streams = 400  # eight times the limit

    async def scenario() -> tuple[collections.Counter[str], list[int], int]:
        async with (
            grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as attacker,
            grpc.aio.insecure_channel(server.target) as device,
        ):
            open_stream = attacker.stream_unary(INGEST)
            calls = [open_stream(_never(), timeout=60) for _ in range(streams)]
            await asyncio.sleep(2)  # the attack holds its streams (the client keeps them open) ...
            stub = signals_pb2_grpc.SignalAggregatorStub(device)
            applied = []
            for _ in range(3):  # ... while a device ingests and a load balancer checks health
                reply = await stub.Ingest(
                    make_batch(base_day=_today()), timeout=10, metadata=bearer(server.token)
                )
                applied.append(reply.applied_signals)
                applied.append(await _health(device))
            codes = await _outcomes(calls, within=20)
            return codes, applied, int(server.refusals("no_credential"))

    codes, applied, counted = asyncio.run(scenario())
    assert applied == [2, health_pb2.HealthCheckResponse.SERVING] * 3
    # Refused at once (UNAUTHENTICATED), or refused by HTTP/2 before the connection's stream limit was known
    # to the client (REFUSED_STREAM: UNAVAILABLE, which a client may retry). Never held.
    assert set(codes) <= {"UNAUTHENTICATED", "UNAVAILABLE"}, codes
    assert codes["UNAUTHENTICATED"] > 0
    assert counted == codes["UNAUTHENTICATED"]
    log = server.stop()
    refused_lines = [line for line in log.splitlines() if "event=rpc_refused" in line]
    # Hundreds of refusals, a handful of lines: one per reason per 10 s, with the count left out.
    assert 1 <= len(refused_lines) <= 4, refused_lines
    assert "reason=no_credential" in refused_lines[0]


def test_stalled_authenticated_streams_end_at_the_server_deadline(serve: Callable[..., Server]) -> None:
    """Finding 1, with a valid token: streams that never send their message count against the limit of
    calls in progress, are closed by the server's deadline, and health checks answer throughout."""
    # 3 s: long enough that every call is admitted or refused before the first stalled ones end.
    server = serve("--max-concurrent-rpcs", "10", "--request-timeout-seconds", "3")

    async def scenario() -> tuple[collections.Counter[str], int]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            open_stream = channel.stream_unary(INGEST)
            calls = [open_stream(_never(), timeout=15, metadata=bearer(server.token)) for _ in range(30)]
            await asyncio.sleep(0.3)
            status = await _health(channel)  # 10 stalled calls hold every Ingest slot
            return await _outcomes(calls, within=20), status

    codes, status = asyncio.run(scenario())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert codes == {"DEADLINE_EXCEEDED": 10, "RESOURCE_EXHAUSTED": 20}, codes
    assert server.refusals("server_deadline") == 10
    assert server.refusals("overloaded") == 20


def test_a_burst_is_never_answered_cancelled(serve: Callable[..., Server]) -> None:
    """Finding 2 (the server's part): thousands of concurrent calls on one connection. Each gets an answer
    that says what to do (UNAUTHENTICATED, or UNAVAILABLE: retry), never CANCELLED or a missed deadline;
    a device's batches sent during the burst, on its own connection, are all applied."""
    server = serve()

    async def scenario() -> tuple[collections.Counter[str], collections.Counter[str]]:
        async with (
            grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as attacker,
            grpc.aio.insecure_channel(server.target) as device,
        ):
            attack_stub = signals_pb2_grpc.SignalAggregatorStub(attacker)
            device_stub = signals_pb2_grpc.SignalAggregatorStub(device)

            async def outcome(call: asyncio.Future[object]) -> str:
                try:
                    await call
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            burst = [outcome(attack_stub.Ingest(make_batch(), timeout=30)) for _ in range(3000)]
            genuine = [
                outcome(
                    device_stub.Ingest(
                        make_batch(base_day=_today()), timeout=30, metadata=bearer(server.token)
                    )
                )
                for _ in range(30)
            ]
            results = await asyncio.gather(*burst, *genuine)
            return collections.Counter(results[:3000]), collections.Counter(results[3000:])

    attack, genuine = asyncio.run(scenario())
    assert set(attack) <= {"UNAUTHENTICATED", "UNAVAILABLE"}, attack
    assert genuine == {"OK": 30}, genuine
    assert server.refusals("no_credential") == attack["UNAUTHENTICATED"]


def test_unparseable_requests_are_refused_counted_and_not_logged_each(serve: Callable[..., Server]) -> None:
    """Finding 3: bytes that are no SignalBatch. Without a credential they are refused before parsing;
    with one, INVALID_ARGUMENT (not UNKNOWN). Counted by reason; no traceback and no line per request."""
    server = serve("--unauthenticated-delay-seconds", "0")  # 200 refusals in a row, none held back
    garbage = [bytes([n % 256]) * 3 + b"\xff\xff\xff\xff" + bytes(range(n % 50)) for n in range(200)]

    async def scenario() -> tuple[collections.Counter[str], collections.Counter[str]]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            send = channel.unary_unary(INGEST)  # raw bytes, no serializer
            anonymous: collections.Counter[str] = collections.Counter()
            device: collections.Counter[str] = collections.Counter()
            for n, data in enumerate(garbage):
                for codes, metadata in ((anonymous, None), (device, bearer(server.token))):
                    if metadata is not None and n >= 40:  # the device's burst allowance is 60
                        continue
                    try:
                        await send(data, timeout=10, metadata=metadata)
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1
            return anonymous, device

    anonymous, device = asyncio.run(scenario())
    assert anonymous == {"UNAUTHENTICATED": 200}
    assert device == {"INVALID_ARGUMENT": 40}
    assert server.refusals("unparseable") == 40
    assert server.refusals("no_credential") == 200
    log = server.stop()
    assert "Traceback" not in log
    assert "level=ERROR" not in log
    # 240 refusals; a line per reason per 10 s (a slow machine may take a few windows).
    assert len([line for line in log.splitlines() if "event=rpc_refused" in line]) <= 6


@pytest.mark.parametrize("where", ["taxonomy_version", "region", "category_id"])
def test_long_client_strings_are_not_echoed(serve: Callable[..., Server], where: str) -> None:
    """Finding 4: a 20,000-character field is answered INVALID_ARGUMENT with a short message (not
    RESOURCE_EXHAUSTED for oversized trailers, which a device would retry forever)."""
    server = serve()
    long = "\u00e9" * 20_000
    if where == "category_id":
        batch = make_batch([signal(long)], base_day=_today())
    else:
        batch = make_batch(base_day=_today(), **{where: long})

    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await signals_pb2_grpc.SignalAggregatorStub(channel).Ingest(
                    batch, timeout=10, metadata=bearer(server.token)
                )
            return info.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details()) < 300
    assert "(20000 characters)" in error.details()
    assert server.refusals("invalid_argument") == 1


async def _hold_connection(target: str, wait: float = 10) -> tuple[str, asyncio.StreamWriter]:
    """Open a TCP connection, send the HTTP/2 preface, SETTINGS and one PING (which the ping policy allows),
    and keep it open: "answered" when the server replied with its SETTINGS, "closed_unanswered" when it
    closed the connection without a word, "unanswered" when nothing came within ``wait`` seconds."""
    host, _, port = target.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.ping(b"12345678")
    writer.write(conn.data_to_send())
    try:
        chunk = await asyncio.wait_for(reader.read(65536), wait)
    except ConnectionResetError:
        return "closed_unanswered", writer
    except TimeoutError:
        return "unanswered", writer
    if not chunk:
        return "closed_unanswered", writer
    events = conn.receive_data(chunk)
    assert any(isinstance(event, h2.events.RemoteSettingsChanged) for event in events), events
    return "answered", writer


def test_a_connection_flood_leaves_the_devices_connections_alone(serve: Callable[..., Server]) -> None:
    """Finding 6: a flood of connections, some held open after a ping, others sending 20 pings each. The
    process keeps at most --max-connections open: one more is closed as soon as it is accepted, before any
    HTTP/2 work, while a device's established connection keeps ingesting and answering health checks. Once
    the held connections go, new ones are accepted again, and a connection pinging without calls gets
    GOAWAY ENHANCE_YOUR_CALM (gRPC's ping policy)."""
    cap = 30
    server = serve("--max-connections", str(cap))
    host, _, port = server.target.rpartition(":")

    async def scenario() -> tuple[
        collections.Counter[str], collections.Counter[str], list[int], collections.Counter[str], int
    ]:
        async with grpc.aio.insecure_channel(server.target) as device:
            stub = signals_pb2_grpc.SignalAggregatorStub(device)
            # The device's connection is open before the flood (it counts against the cap too).
            await stub.Ingest(make_batch(base_day=_today()), timeout=10, metadata=bearer(server.token))
            held = [await _hold_connection(server.target) for _ in range(3 * cap)]
            while_full = collections.Counter(
                await asyncio.gather(*(ping_once(host, int(port), 20, 10) for _ in range(50)))
            )
            applied = []
            for _ in range(3):
                reply = await stub.Ingest(
                    make_batch(base_day=_today()), timeout=10, metadata=bearer(server.token)
                )
                applied.append(reply.applied_signals)
                applied.append(await _health(device))
            for _, writer in held:
                writer.close()
            await asyncio.sleep(1)  # the server notices the closed connections and releases their places
            after = collections.Counter(
                await asyncio.gather(*(ping_once(host, int(port), 20, 10) for _ in range(20)))
            )
            async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as later:
                status = await _health(later)
            return collections.Counter(outcome for outcome, _ in held), while_full, applied, after, status

    held, while_full, applied, after, status = asyncio.run(scenario())
    assert held == {"answered": cap - 1, "closed_unanswered": 2 * cap + 1}, held
    assert while_full == {"closed_unanswered": 50}, while_full
    assert applied == [2, health_pb2.HealthCheckResponse.SERVING] * 3
    assert after == {"goaway_ENHANCE_YOUR_CALM": 20}, after
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in server.stop()


@pytest.fixture
def many_open_files() -> Iterator[None]:
    """Room for this test process to hold a couple of thousand sockets (a soft limit of 1,024 is common)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))  # root may raise the hard limit (CI)
    elif soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    yield
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (soft, max(hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    )


def test_held_connections_do_not_exhaust_a_default_open_file_limit(
    serve: Callable[..., Server], many_open_files: None
) -> None:
    """Finding 6, the connections a flood leaves open: started with a soft open-file limit of 1,024 (Debian's
    default), a server that lets 1,100 connections exhaust it accepts nothing more, and a device connecting
    anew is locked out. The server raises its own limit to fit --max-connections (10,000 by default), so it
    answers all 1,100 and the device's new connection ingests."""
    server = serve(open_files=1024)

    async def scenario() -> tuple[collections.Counter[str], str]:
        gate = asyncio.Semaphore(100)

        async def hold() -> tuple[str, asyncio.StreamWriter]:
            async with gate:
                return await _hold_connection(server.target, wait=3)

        held = await asyncio.gather(*(hold() for _ in range(1100)))
        try:
            async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as device:
                stub = signals_pb2_grpc.SignalAggregatorStub(device)
                try:
                    await stub.Ingest(
                        make_batch(base_day=_today()), timeout=10, metadata=bearer(server.token)
                    )
                    outcome = "OK"
                except grpc.aio.AioRpcError as exc:
                    outcome = exc.code().name
        finally:
            for _, writer in held:
                writer.close()
        return collections.Counter(answer for answer, _ in held), outcome

    held, outcome = asyncio.run(scenario())
    assert held == {"answered": 1100}, held
    assert outcome == "OK"


def test_signals_older_than_the_retention_period_are_not_stored(serve: Callable[..., Server]) -> None:
    """Finding 7: a batch whose base day is inside the retention period carries a signal observed (by its
    day_offset) before the cut-off. Only the fresh signal is stored; a batch with nothing fresh is refused."""
    server = serve("--retention-days", "30")
    today = _today()
    cutoff = today - 30
    mixed = make_batch([signal(day_offset=0), signal(day_offset=10)], base_day=cutoff + 5)
    stale = make_batch([signal(day_offset=6), signal(day_offset=20)], base_day=cutoff + 5)

    async def scenario() -> tuple[int, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = signals_pb2_grpc.SignalAggregatorStub(channel)
            applied = (await stub.Ingest(mixed, timeout=10, metadata=bearer(server.token))).applied_signals
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Ingest(stale, timeout=10, metadata=bearer(server.token))
            return applied, info.value.code()

    applied, code = asyncio.run(scenario())
    assert (applied, code) == (1, grpc.StatusCode.INVALID_ARGUMENT)
    server.stop()
    with closing(sqlite3.connect(server.db)) as conn:
        days = [day for (day,) in conn.execute("SELECT day FROM signal_counts")]
        batches = [bytes(b) for (b,) in conn.execute("SELECT batch_id FROM batches")]
    assert days == [cutoff + 5]
    assert batches == [mixed.batch_id]


def test_fuzzed_requests_over_grpc(serve: Callable[..., Server]) -> None:
    """Hypothesis-drawn request bodies (tools/fuzz.py) sent to the real server with a valid token: every
    answer is an acknowledgement or a deliberate refusal (never UNKNOWN or INTERNAL), nothing is logged as an
    error, and the database holds exactly the batches acknowledged as applied. A valid batch goes between
    every 20 drawn bodies, so the applied path is always exercised amid the hostile ones (few drawn batches
    are valid and new: Hypothesis favours repeated simple ids)."""
    server = serve("--rate-burst", "100000")
    drawn = fuzz.draw_requests(400, seed_value=7, today=_today())
    valid = [make_batch(base_day=_today()).SerializeToString() for _ in range(len(drawn) // 20)]
    bodies = [
        body
        for n, chunk in enumerate(range(0, len(drawn), 20))
        for body in (valid[n], *drawn[chunk : chunk + 20])
    ]

    async def scenario() -> tuple[collections.Counter[str], int]:
        codes: collections.Counter[str] = collections.Counter()
        applied = 0
        async with grpc.aio.insecure_channel(server.target) as channel:
            send = channel.unary_unary(INGEST, response_deserializer=signals_pb2.IngestResponse.FromString)
            for body in bodies:
                try:
                    reply = await send(body, timeout=10, metadata=bearer(server.token))
                    codes["OK"] += 1
                    applied += not reply.duplicate
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
        return codes, applied

    codes, applied = asyncio.run(scenario())
    # RESOURCE_EXHAUSTED: bodies past the 64 KB message limit, refused by gRPC before any parsing.
    # PERMISSION_DENIED: batches for profiles other than the token's.
    deliberate = {"OK", "INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}
    assert set(codes) <= deliberate, codes
    assert codes["INVALID_ARGUMENT"] > 0 and applied >= len(valid), (codes, applied)
    log = server.stop()
    assert "Traceback" not in log and "level=ERROR" not in log
    with closing(sqlite3.connect(server.db)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == applied
