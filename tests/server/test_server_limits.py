"""Abuse limits (rate, concurrency, deadline, size), store outages and graceful shutdown: each refusal has
its status and writes nothing; a call in flight at shutdown either finishes or is never acknowledged."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import (
    MUSIC,
    OTHER,
    PROFILE,
    bearer,
    issue_admin_token,
    issue_device_token,
    make_batch,
    row_counts,
    running,
    signal,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sotto.server import ServerConfig, Store, create_server, open_store
from sotto.server.limits import RESERVED_FILES, RateLimiter
from sotto.server.service import SERVICE_NAME, AggregatorServer
from sotto.server.store import ApplyResult, Batch, StoreUnavailableError
from sotto.v1 import signals_pb2, signals_pb2_grpc


class GatedStore:
    """A real store whose ``apply_batch`` waits at a gate, to hold calls in flight (or to fail them)."""

    def __init__(self, inner: Store, fail: bool = False) -> None:
        self._inner = inner
        self._fail = fail
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        self.entered.set()
        if self._fail:
            raise StoreUnavailableError("disk on fire")
        await self.gate.wait()
        return await self._inner.apply_batch(batch)


@dataclass
class Gated:
    server: AggregatorServer
    store: GatedStore
    channel: grpc.aio.Channel

    @property
    def stub(self) -> signals_pb2_grpc.SignalAggregatorStub:
        return signals_pb2_grpc.SignalAggregatorStub(self.channel)


@asynccontextmanager
async def gated(db_path: Path, config: ServerConfig, fail: bool = False) -> AsyncIterator[Gated]:
    """An in-process aggregator on a ``GatedStore`` over SQLite at ``db_path``."""
    inner = await open_store(f"sqlite:///{db_path}", 30)
    store = GatedStore(inner, fail)
    server, port = await create_server("127.0.0.1:0", store, config)  # type: ignore[arg-type]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Gated(server, store, channel)
    finally:
        store.gate.set()
        await server.stop(None)
        await inner.close()


def test_rate_limit_per_device(auth_config: ServerConfig, db_path: Path) -> None:
    limited = dataclasses.replace(auth_config, rate_burst=3, rate_per_second=0.001)

    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", limited) as r:
            device = bearer(await issue_device_token(r.store, PROFILE))
            other = bearer(await issue_device_token(r.store, OTHER))
            admin = bearer(await issue_admin_token(r.store))
            for _ in range(3):
                await r.stub.Ingest(make_batch(), timeout=5, metadata=device)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.Ingest(make_batch(), timeout=5, metadata=device)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit exceeded for this device; retry in" in info.value.details()
            # Other devices have buckets of their own; admins are not limited.
            await r.stub.Ingest(make_batch(profile_id=OTHER), timeout=5, metadata=other)
            for _ in range(5):
                await r.stub.GetProfile(
                    signals_pb2.GetProfileRequest(profile_id=PROFILE), timeout=5, metadata=admin
                )

    asyncio.run(scenario())
    assert row_counts(db_path)["batches"] == 4  # 3 of PROFILE, 1 of OTHER; the refused one wrote nothing


def test_token_bucket_refills_at_the_configured_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert [limiter.acquire("a"), limiter.acquire("a")] == [0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] += 100
    assert [limiter.acquire("a"), limiter.acquire("a"), limiter.acquire("a") > 0] == [0.0, 0.0, True]


_RAISE_OPEN_FILES = """
import resource, sys
from sotto.server.limits import RESERVED_FILES, ensure_open_files
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
print(ensure_open_files(1000) == 1000 + RESERVED_FILES, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
print(ensure_open_files(10) == 1000 + RESERVED_FILES)  # never lowered
"""


def test_the_open_file_limit_is_raised_to_fit_the_connection_cap() -> None:
    """In a process of its own (the limit is the process's): a soft limit of 512 is raised for 1,000
    connections and the reserve, and never lowered."""
    ran = subprocess.run(
        [sys.executable, "-c", _RAISE_OPEN_FILES], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["True", str(1000 + RESERVED_FILES), "True"]


def test_serve_refuses_a_connection_cap_beyond_the_open_file_limit(tmp_path: Path) -> None:
    """A cap the kernel cannot give file descriptors for (fs.nr_open is far below 10^9) is a usage error
    naming the limit and both ways out, before anything is bound."""
    ran = subprocess.run(
        [sys.executable, "-m", "sotto.server", "serve", "--db", f"sqlite:///{tmp_path / 's.db'}"]
        + ["--listen", "127.0.0.1:0", "--max-connections", "1000000000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 2, ran.stderr
    assert "--max-connections 1000000000" in ran.stderr
    assert "open-file limit" in ran.stderr and "ulimit -n" in ran.stderr
    assert ran.stdout == ""
    with pytest.raises(ValueError, match="max_connections must be at least 1"):
        ServerConfig(max_connections=0)


def test_concurrent_call_limit(config: ServerConfig, db_path: Path) -> None:
    async def scenario() -> None:
        async with gated(db_path, dataclasses.replace(config, max_concurrent_rpcs=1)) as g:
            first = asyncio.ensure_future(g.stub.Ingest(make_batch(), timeout=10))
            await g.store.entered.wait()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await g.stub.Ingest(make_batch([signal(MUSIC, 1)]), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            g.store.gate.set()
            assert (await first).applied_signals == 2

    asyncio.run(scenario())
    assert row_counts(db_path)["batches"] == 1


def test_server_deadline(config: ServerConfig, db_path: Path) -> None:
    async def scenario() -> None:
        async with gated(db_path, dataclasses.replace(config, request_timeout_s=0.2)) as g:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await g.stub.Ingest(make_batch(), timeout=10)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "did not finish within 0.2 s" in info.value.details()

    asyncio.run(scenario())
    assert row_counts(db_path)["batches"] == 0


def test_store_outage_is_unavailable_and_counted(config: ServerConfig, db_path: Path) -> None:
    async def scenario() -> float | None:
        async with gated(db_path, config, fail=True) as g:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await g.stub.Ingest(make_batch(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "retry later" in info.value.details()
            return g.server.metrics.registry.get_sample_value(
                "sotto_store_errors_total", {"operation": "apply_batch"}
            )

    assert asyncio.run(scenario()) == 1
    assert row_counts(db_path)["batches"] == 0


def test_message_size_limit(config: ServerConfig, db_path: Path) -> None:
    async def scenario() -> grpc.StatusCode:
        async with running(
            f"sqlite:///{db_path}", dataclasses.replace(config, max_receive_message_bytes=2048)
        ) as r:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.Ingest(make_batch([signal()] * 300), timeout=5)
            return info.value.code()

    assert asyncio.run(scenario()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert row_counts(db_path)["batches"] == 0


def test_call_in_flight_at_shutdown_finishes_within_the_grace_period(
    config: ServerConfig, db_path: Path
) -> None:
    async def scenario() -> None:
        async with gated(db_path, config) as g:
            call = asyncio.ensure_future(g.stub.Ingest(make_batch(), timeout=10))
            await g.store.entered.wait()
            watch = health_pb2_grpc.HealthStub(g.channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(g.server.stop(10))
            # NOT_SERVING first, while the batch is still in flight ...
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            # ... which then finishes and is acknowledged.
            g.store.gate.set()
            assert (await call).applied_signals == 2
            await stopping

    asyncio.run(scenario())
    assert row_counts(db_path)["batches"] == 1


def test_call_still_running_after_the_grace_period_is_not_acknowledged(
    config: ServerConfig, db_path: Path
) -> None:
    async def scenario() -> None:
        async with gated(db_path, config) as g:
            call = asyncio.ensure_future(g.stub.Ingest(make_batch(), timeout=10))
            await g.store.entered.wait()
            await g.server.stop(0.2)
            with pytest.raises(grpc.aio.AioRpcError):
                await call

    asyncio.run(scenario())
    assert row_counts(db_path)["batches"] == 0


class BrokenStore(GatedStore):
    """A store with a bug: its error message quotes the profile id."""

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        raise RuntimeError(f"cannot apply a batch of {batch.profile_id}")


def test_unexpected_error_is_internal_and_logged_without_its_message(
    config: ServerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        inner = await open_store("sqlite:///:memory:", 30)
        server, port = await create_server("127.0.0.1:0", BrokenStore(inner), config)  # type: ignore[arg-type]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await signals_pb2_grpc.SignalAggregatorStub(channel).Ingest(make_batch(), timeout=5)
                return info.value
        finally:
            await server.stop(None)
            await inner.close()

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "event=internal_error method=Ingest error=RuntimeError at=" in caplog.text
    assert "test_server_limits.py:" in caplog.text
    assert PROFILE not in caplog.text
