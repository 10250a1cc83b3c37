"""Authentication and authorization: every refusal has its status and writes nothing; TLS, mutual TLS,
the device client with a token, and the rules that keep plaintext and open access on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import (
    MUSIC,
    OTHER,
    PROFILE,
    TODAY_DAY,
    Running,
    bearer,
    dump_tables,
    issue_admin_token,
    issue_device_token,
    make_batch,
    row_counts,
    running,
    signal,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sotto.edge.client import DeletionStatus, DeliveryClient, TlsOptions
from sotto.server import ServerConfig, ServerTls, create_server, open_store
from sotto.server.config import is_loopback
from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import Signal
from tools.harness import ThrowawayCA

Metadata = tuple[tuple[str, str], ...] | None
#: A call under test: given the running server and the tokens by name, make one call.
Call = Callable[[Running, dict[str, str]], Awaitable[object]]


def _ingest(profile: str, token: str | None, raw: Metadata = None) -> Call:
    def call(r: Running, tokens: dict[str, str]) -> Awaitable[object]:
        metadata = raw if token is None else bearer(tokens.get(token, token))
        return r.stub.Ingest(make_batch(profile_id=profile), timeout=5, metadata=metadata)

    return call


def _get(profile: str, token: str) -> Call:
    def call(r: Running, tokens: dict[str, str]) -> Awaitable[object]:
        request = signals_pb2.GetProfileRequest(profile_id=profile)
        return r.stub.GetProfile(request, timeout=5, metadata=bearer(tokens[token]))

    return call


def _delete(profile: str, token: str) -> Call:
    def call(r: Running, tokens: dict[str, str]) -> Awaitable[object]:
        request = signals_pb2.DeleteProfileRequest(profile_id=profile)
        return r.stub.DeleteProfile(request, timeout=5, metadata=bearer(tokens[token]))

    return call


def _audience(token: str) -> Call:
    def call(r: Running, tokens: dict[str, str]) -> Awaitable[object]:
        request = signals_pb2.AudienceSizeRequest(category_id=MUSIC)
        return r.stub.AudienceSize(request, timeout=5, metadata=bearer(tokens[token]))

    return call


UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
REFUSALS = [
    pytest.param(_ingest(PROFILE, None), UNAUTHENTICATED, "no credential: send", id="no-credential"),
    pytest.param(
        _ingest(PROFILE, None, (("authorization", "Token abc"),)),
        UNAUTHENTICATED,
        "authorization metadata must be 'Bearer <token>'",
        id="not-bearer",
    ),
    pytest.param(
        _ingest(PROFILE, None, (("authorization", "Bearer "),)),
        UNAUTHENTICATED,
        "must be 'Bearer <token>'",
        id="empty-token",
    ),
    pytest.param(
        _ingest(PROFILE, "sotto_made_up_token"),
        UNAUTHENTICATED,
        "unknown or revoked token",
        id="unknown-token",
    ),
    pytest.param(
        _ingest(PROFILE, "revoked"), UNAUTHENTICATED, "unknown or revoked token", id="revoked-token"
    ),
    pytest.param(
        _ingest(OTHER, "device"), PERMISSION_DENIED, "this credential is bound to another profile", id="other"
    ),
    pytest.param(
        _ingest(PROFILE, "admin"),
        PERMISSION_DENIED,
        "Ingest is not allowed with this credential (role admin); it needs role device",
        id="admin-ingests",
    ),
    pytest.param(
        _audience("device"),
        PERMISSION_DENIED,
        "AudienceSize is not allowed with this credential (role device); it needs role admin",
        id="device-audience",
    ),
    pytest.param(_get(OTHER, "device"), PERMISSION_DENIED, "bound to another profile", id="reads-other"),
    pytest.param(_delete(OTHER, "device"), PERMISSION_DENIED, "bound to another profile", id="deletes-other"),
]


@pytest.mark.parametrize(("call", "code", "message"), REFUSALS)
def test_refused_calls_have_their_status_and_change_nothing(
    call: Call, code: grpc.StatusCode, message: str, auth_config: ServerConfig, db_path: Path
) -> None:
    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", auth_config) as r:
            tokens = {
                "device": await issue_device_token(r.store, PROFILE),
                "other": await issue_device_token(r.store, OTHER),
                "revoked": await issue_device_token(r.store, PROFILE),
                "admin": await issue_admin_token(r.store),
            }
            for profile, token in ((PROFILE, "device"), (OTHER, "other")):
                await r.stub.Ingest(make_batch(profile_id=profile), timeout=5, metadata=bearer(tokens[token]))
            await r.store.revoke_credentials(PROFILE)
            tokens["device"] = await issue_device_token(r.store, PROFILE)
            before = dump_tables(db_path)

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(r, tokens)

            assert info.value.code() == code
            assert message in info.value.details()
            assert dump_tables(db_path) == before

    asyncio.run(scenario())


def test_devices_use_their_own_profile_and_admins_any(auth_config: ServerConfig, db_path: Path) -> None:
    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", auth_config) as r:
            device = await issue_device_token(r.store, PROFILE)
            other = await issue_device_token(r.store, OTHER)
            admin = await issue_admin_token(r.store)
            for profile, token in ((PROFILE, device), (OTHER, other)):
                reply = await r.stub.Ingest(make_batch(profile_id=profile), timeout=5, metadata=bearer(token))
                assert reply.applied_signals == 2

            own = await r.stub.GetProfile(
                signals_pb2.GetProfileRequest(profile_id=PROFILE), timeout=5, metadata=bearer(device)
            )
            by_admin = await r.stub.GetProfile(
                signals_pb2.GetProfileRequest(profile_id=OTHER), timeout=5, metadata=bearer(admin)
            )
            assert (own.profile_id, by_admin.profile_id) == (PROFILE, OTHER)

            # The wearer's deletion request from the glasses: erases the profile and revokes the token.
            deleted = await r.stub.DeleteProfile(
                signals_pb2.DeleteProfileRequest(profile_id=PROFILE), timeout=5, metadata=bearer(device)
            )
            assert deleted.deleted
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.Ingest(make_batch(), timeout=5, metadata=bearer(device))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

            by_admin_delete = await r.stub.DeleteProfile(
                signals_pb2.DeleteProfileRequest(profile_id=OTHER), timeout=5, metadata=bearer(admin)
            )
            assert by_admin_delete.deleted

    asyncio.run(scenario())
    assert row_counts(db_path) == {"batches": 0, "profiles": 0, "scores": 0, "credentials": 1}  # the admin


def test_health_needs_no_credential(auth_config: ServerConfig) -> None:
    async def scenario() -> int:
        async with running("sqlite:///:memory:", auth_config) as r:
            reply = await health_pb2_grpc.HealthStub(r.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            return int(reply.status)

    assert asyncio.run(scenario()) == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def ca() -> ThrowawayCA:
    return ThrowawayCA()


def _tls_config(config: ServerConfig, ca: ThrowawayCA, mutual: bool = False) -> ServerConfig:
    key, cert = ca.server_pair()
    tls = ServerTls(certificate_chain=cert, private_key=key, client_ca=ca.cert_pem if mutual else None)
    return dataclasses.replace(config, tls=tls)


def test_tls_serves_devices_with_tokens_and_refuses_plaintext(
    auth_config: ServerConfig, ca: ThrowawayCA, db_path: Path
) -> None:
    tls = grpc.ssl_channel_credentials(ca.cert_pem)

    async def scenario() -> None:
        async with running(
            f"sqlite:///{db_path}", _tls_config(auth_config, ca), channel_credentials=tls
        ) as r:
            token = await issue_device_token(r.store, PROFILE)
            reply = await r.stub.Ingest(make_batch(), timeout=5, metadata=bearer(token))
            assert reply.applied_signals == 2
            async with grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") as plaintext:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await signals_pb2_grpc.SignalAggregatorStub(plaintext).Ingest(
                        make_batch(), timeout=5, metadata=bearer(token)
                    )
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())
    assert row_counts(db_path)["batches"] == 1


def _stub(
    port: int, ca: ThrowawayCA, pair: tuple[bytes, bytes] | None
) -> tuple[grpc.aio.Channel, signals_pb2_grpc.SignalAggregatorStub]:
    key, cert = pair if pair is not None else (None, None)
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.cert_pem, key, cert)
    )
    return channel, signals_pb2_grpc.SignalAggregatorStub(channel)


def test_mutual_tls_binds_the_device_to_the_profile_in_its_certificate(
    auth_config: ServerConfig, ca: ThrowawayCA, db_path: Path
) -> None:
    async def scenario() -> None:
        async with running(
            f"sqlite:///{db_path}",
            _tls_config(auth_config, ca, mutual=True),
            channel_credentials=grpc.ssl_channel_credentials(ca.cert_pem, *ca.device_pair(PROFILE)),
        ) as r:
            reply = await r.stub.Ingest(
                make_batch(), timeout=5
            )  # no token: the certificate is the credential
            assert reply.applied_signals == 2
            before = dump_tables(db_path)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.Ingest(make_batch(profile_id=OTHER), timeout=5)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

            # A certificate that names no profile authenticates nobody by itself ...
            channel, anonymous = _stub(r.port, ca, ca.device_pair(None))
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await anonymous.Ingest(make_batch(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "urn:sotto:profile:PROFILE_ID URI" in info.value.details()
                # ... but carries a token: how an admin reaches a server that requires certificates.
                admin = await issue_admin_token(r.store)
                profile = await anonymous.GetProfile(
                    signals_pb2.GetProfileRequest(profile_id=PROFILE), timeout=5, metadata=bearer(admin)
                )
                assert profile.batches == 1

            channel, no_certificate = _stub(r.port, ca, None)
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await no_certificate.Ingest(make_batch(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
            assert {t: rows for t, rows in dump_tables(db_path).items() if t != "credentials"} == {
                t: rows for t, rows in before.items() if t != "credentials"
            }

    asyncio.run(scenario())


def test_certificate_of_another_ca_is_refused(auth_config: ServerConfig, ca: ThrowawayCA) -> None:
    stranger = ThrowawayCA("someone else's CA")

    async def scenario() -> grpc.StatusCode:
        async with running("sqlite:///:memory:", _tls_config(auth_config, ca, mutual=True)) as r:
            channel = grpc.aio.secure_channel(
                f"127.0.0.1:{r.port}",
                grpc.ssl_channel_credentials(ca.cert_pem, *stranger.device_pair(PROFILE)),
            )
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await signals_pb2_grpc.SignalAggregatorStub(channel).Ingest(make_batch(), timeout=5)
                return info.value.code()

    assert asyncio.run(scenario()) == grpc.StatusCode.UNAVAILABLE


def test_device_client_sends_its_token_over_tls_and_deletes_its_profile(
    auth_config: ServerConfig, ca: ThrowawayCA, db_path: Path
) -> None:
    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", _tls_config(auth_config, ca)) as r:
            token = await issue_device_token(r.store, PROFILE)
            client = DeliveryClient(
                PROFILE,
                "US",
                target=f"127.0.0.1:{r.port}",
                token=token,
                tls=TlsOptions(root_certificates=ca.cert_pem),
                batch_size=1,
            )
            try:
                client.add([Signal(MUSIC, 4, TODAY_DAY), Signal(MUSIC, 2, TODAY_DAY)])
                assert await asyncio.to_thread(client.flush) is True
                assert client.stats.batches_sent == 2
                client.add([Signal(MUSIC, 1, TODAY_DAY)])  # queued, never sent: the wearer deletes first
                assert await asyncio.to_thread(client.delete_profile) is DeletionStatus.ERASED
                assert client.pending_batches == 0
            finally:
                client.close()

    asyncio.run(scenario())
    assert row_counts(db_path) == {"batches": 0, "profiles": 0, "scores": 0, "credentials": 0}


def test_device_client_sets_aside_batches_the_server_refuses_for_its_credential(
    auth_config: ServerConfig, db_path: Path
) -> None:
    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", auth_config) as r:
            client = DeliveryClient(PROFILE, "US", target=f"127.0.0.1:{r.port}", token="sotto_wrong")
            try:
                client.add([Signal(MUSIC, 4, TODAY_DAY)])
                assert await asyncio.to_thread(client.flush) is True
                # Refused for good: set aside and counted, never resent (a retry could not succeed).
                assert client.pending_batches == 0
                assert client.stats.rejected == {"UNAUTHENTICATED": 1} and client.stats.retries == 0
                stats = client.outbox_stats()
                assert stats.set_aside_batches == 1 and stats.get("set_aside_UNAUTHENTICATED") == 1
                assert await asyncio.to_thread(client.flush) is True
                assert client.stats.rejected == {"UNAUTHENTICATED": 1}
            finally:
                client.close()

    asyncio.run(scenario())
    assert row_counts(db_path)["batches"] == 0


def test_device_client_tls_needs_a_target() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError, match="tls applies"):
        DeliveryClient(PROFILE, "US", channel=channel, tls=TlsOptions())
    with pytest.raises(ValueError, match="give both private_key and certificate_chain"):
        TlsOptions(private_key=b"key")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "refusing to serve plaintext on 0.0.0.0:0, which is not a loopback address"),
        ({"insecure": True}, "authentication may only be turned off on a loopback address"),
    ],
    ids=["plaintext", "no-auth"],
)
def test_unsafe_settings_are_refused_off_loopback(
    changes: dict[str, object], message: str, config: ServerConfig
) -> None:
    async def scenario() -> None:
        store = await open_store("sqlite:///:memory:", 30)
        try:
            with pytest.raises(ValueError, match=re.escape(message)):
                await create_server("0.0.0.0:0", store, dataclasses.replace(config, **changes))
        finally:
            await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("aggregator.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_logs_never_contain_tokens_or_profile_ids(
    auth_config: ServerConfig, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sotto.server")
    tokens: list[str] = []

    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", auth_config) as r:
            device = await issue_device_token(r.store, PROFILE)
            tokens.append(device)
            await r.stub.Ingest(make_batch([signal(MUSIC)]), timeout=5, metadata=bearer(device))
            for metadata in (bearer(device), bearer("sotto_guess"), None):
                with pytest.raises(grpc.aio.AioRpcError):
                    await r.stub.Ingest(make_batch(profile_id=OTHER), timeout=5, metadata=metadata)
            await r.stub.DeleteProfile(
                signals_pb2.DeleteProfileRequest(profile_id=PROFILE), timeout=5, metadata=bearer(device)
            )

    asyncio.run(scenario())
    assert "event=rpc_refused method=Ingest code=UNAUTHENTICATED reason=unknown_token" in caplog.text
    assert "event=rpc_refused method=Ingest code=UNAUTHENTICATED reason=no_credential" in caplog.text
    assert "event=rpc_refused method=Ingest code=PERMISSION_DENIED reason=other_profile" in caplog.text
    assert "event=profile_deleted profile=" in caplog.text
    for secret in (PROFILE, OTHER, tokens[0], "sotto_guess"):
        assert secret not in caplog.text


def test_device_client_retries_a_rate_limited_batch_with_backoff(
    auth_config: ServerConfig, db_path: Path
) -> None:
    config = dataclasses.replace(auth_config, rate_per_second=20.0, rate_burst=1)

    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", config) as r:
            token = await issue_device_token(r.store, PROFILE)
            client = DeliveryClient(
                PROFILE,
                "US",
                target=f"127.0.0.1:{r.port}",
                token=token,
                batch_size=1,
                max_attempts=10,
                backoff_s=0.05,
            )
            try:
                client.add([Signal(MUSIC, level, TODAY_DAY) for level in (1, 2, 3, 4)])
                assert await asyncio.to_thread(client.flush) is True
                # The burst of one let the first batch through; the others met RESOURCE_EXHAUSTED, stayed
                # queued and went through on a later attempt.
                assert client.stats.retries >= 1
                assert client.stats.rejected == {}
                assert client.outbox_stats().get("signals_acknowledged") == 4
            finally:
                client.close()

    asyncio.run(scenario())
    assert row_counts(db_path)["batches"] == 4
