"""The gRPC service in process: GetProfile, health checking, reflection, logging, binding."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import ELECTRONICS, MOVIES, MUSIC, PROFILE, TODAY_DAY, make_batch, running, signal
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sotto.server import ServerConfig, create_server, open_store
from sotto.server.service import SERVICE_NAME
from sotto.v1 import signals_pb2


def _profile_scenario(
    db_path: Path, config: ServerConfig, request: signals_pb2.GetProfileRequest
) -> signals_pb2.Profile:
    async def scenario() -> signals_pb2.Profile:
        async with running(f"sqlite:///{db_path}", config) as r:
            await r.stub.Ingest(
                make_batch([signal(MUSIC, 2), signal(ELECTRONICS, 4), signal(MOVIES, 1)]), timeout=5
            )
            await r.stub.Ingest(make_batch([signal(MUSIC, 3)]), timeout=5)
            await r.stub.Ingest(make_batch([signal(MUSIC, 4)], profile_id="someone_else"), timeout=5)
            return await r.stub.GetProfile(request, timeout=5)

    return asyncio.run(scenario())


def test_get_profile_is_sorted_best_first_with_names(config: ServerConfig, db_path: Path) -> None:
    profile = _profile_scenario(db_path, config, signals_pb2.GetProfileRequest(profile_id=PROFILE))
    assert (profile.profile_id, profile.taxonomy_version, profile.as_of_day, profile.batches) == (
        PROFILE,
        "3.1",
        TODAY_DAY,
        2,
    )
    assert [(s.category_id, s.name, s.tier1) for s in profile.scores] == [
        (MUSIC, "Music", "Entertainment"),
        (ELECTRONICS, "Consumer Electronics", "Technology & Computing"),
        (MOVIES, "Movies", "Entertainment"),
    ]
    assert [s.score for s in profile.scores] == pytest.approx([1.25, 1.0, 0.25])


def test_get_profile_top_k(config: ServerConfig, db_path: Path) -> None:
    profile = _profile_scenario(db_path, config, signals_pb2.GetProfileRequest(profile_id=PROFILE, top_k=2))
    assert [s.category_id for s in profile.scores] == [MUSIC, ELECTRONICS]


@pytest.mark.parametrize(
    ("profile_id", "code", "message"),
    [
        ("nobody_here", grpc.StatusCode.NOT_FOUND, "no such profile"),
        ("bad id!", grpc.StatusCode.INVALID_ARGUMENT, "profile_id must be 8 to 64 characters"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "profile_id must be 8 to 64 characters"),
    ],
)
def test_get_profile_errors(
    profile_id: str, code: grpc.StatusCode, message: str, config: ServerConfig, db_path: Path
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _profile_scenario(db_path, config, signals_pb2.GetProfileRequest(profile_id=profile_id))
    assert isinstance(info.value, grpc.aio.AioRpcError)
    assert info.value.code() == code
    assert message in info.value.details()


def test_health_is_serving_then_not_serving_at_shutdown(config: ServerConfig) -> None:
    async def scenario() -> None:
        store = await open_store("sqlite:///:memory:", 30)
        server, port = await create_server("127.0.0.1:0", store, config)
        assert port > 0
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for service in ("", SERVICE_NAME):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                stopping = asyncio.create_task(server.stop(0.5))
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                await stopping
        finally:
            await server.stop(None)
            await store.close()

    asyncio.run(scenario())


def test_reflection_lists_the_services(config: ServerConfig) -> None:
    async def scenario() -> set[str]:
        async with running("sqlite:///:memory:", config) as r:
            call = reflection_pb2_grpc.ServerReflectionStub(r.channel).ServerReflectionInfo(timeout=5)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await call.read()
            await call.done_writing()
            return {s.name for s in reply.list_services_response.service}

    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= asyncio.run(scenario())


def test_logs_never_contain_the_profile_id(
    config: ServerConfig, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sotto.server")
    batch_id = bytes(16)

    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", config) as r:
            await r.stub.Ingest(make_batch(batch_id=batch_id), timeout=5)
            await r.stub.Ingest(make_batch(batch_id=batch_id), timeout=5)
            for bad in (make_batch(region="DE"), make_batch([signal(MUSIC)], batch_id=batch_id)):
                with pytest.raises(grpc.aio.AioRpcError):
                    await r.stub.Ingest(bad, timeout=5)
            await r.stub.GetProfile(signals_pb2.GetProfileRequest(profile_id=PROFILE), timeout=5)

    asyncio.run(scenario())
    assert "event=ingest batch=" in caplog.text
    assert "event=ingest_rejected code=INVALID_ARGUMENT field=region" in caplog.text
    assert "event=ingest_rejected code=ALREADY_EXISTS" in caplog.text
    assert PROFILE not in caplog.text


def test_binding_a_busy_port_fails_clearly(config: ServerConfig) -> None:
    async def scenario() -> None:
        async with running("sqlite:///:memory:", config) as r:
            store = await open_store("sqlite:///:memory:", 30)
            try:
                with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{r.port}"):
                    await create_server(f"127.0.0.1:{r.port}", store, config)
            finally:
                await store.close()

    asyncio.run(scenario())
