"""The gRPC face of the aggregator: a thin servicer, health checking and reflection.

The servicer converts protobuf to domain values (``server.validation``), calls the store and converts
back; nothing else happens here.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge.policy import TAXONOMY_VERSION
from server import decay
from server.config import ServerConfig
from server.store import BatchConflictError, Store
from server.validation import ValidationError, accepted_days, validate_batch, validate_profile_id
from sotto.v1 import signals_pb2, signals_pb2_grpc

SERVICE_NAME: str = signals_pb2.DESCRIPTOR.services_by_name["SignalAggregator"].full_name

log = logging.getLogger(__name__)

# Random per process: tags let one run's log lines be correlated, but cannot be matched to known ids.
_LOG_SALT = secrets.token_bytes(16)


def profile_tag(profile_id: str) -> str:
    """A short salted hash standing for ``profile_id`` in logs (the id itself is never logged)."""
    return hashlib.blake2b(profile_id.encode(), key=_LOG_SALT, digest_size=6).hexdigest()


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    # grpc raises in abort() but ships no type hints; this tells mypy that control ends here.
    raise AssertionError("context.abort returned")


class AggregatorServicer(signals_pb2_grpc.SignalAggregatorServicer):
    """``sotto.v1.SignalAggregator`` on top of a ``Store``."""

    def __init__(self, store: Store, config: ServerConfig) -> None:
        self._store = store
        self._config = config

    async def Ingest(
        self, request: signals_pb2.SignalBatch, context: grpc.aio.ServicerContext
    ) -> signals_pb2.IngestResponse:
        """Validate the batch and apply it exactly once."""
        try:
            batch = validate_batch(request, self._config)
        except ValidationError as exc:
            log.info("event=ingest_rejected code=INVALID_ARGUMENT field=%s", exc.field)
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            result = await self._store.apply_batch(batch)
        except BatchConflictError as exc:
            log.warning("event=ingest_rejected code=ALREADY_EXISTS batch=%s", batch.batch_id.hex())
            await _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        log.debug(
            "event=ingest batch=%s profile=%s signals=%d duplicate=%s",
            batch.batch_id.hex(),
            profile_tag(batch.profile_id),
            result.applied_signals,
            result.duplicate,
        )
        return signals_pb2.IngestResponse(
            batch_id=batch.batch_id, duplicate=result.duplicate, applied_signals=result.applied_signals
        )

    async def GetProfile(
        self, request: signals_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> signals_pb2.Profile:
        """Return the profile's scores decayed to today, best first."""
        try:
            profile_id = validate_profile_id(request.profile_id)
        except ValidationError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        stored = await self._store.get_profile(profile_id)
        if stored is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "no such profile")
        today = self._config.today()
        half_life = self._store.half_life_days
        ranked = sorted(
            ((decay.score(s, today, half_life), cid) for cid, s in stored.sums.items()),
            key=lambda item: (-item[0], item[1]),
        )
        if request.top_k:
            ranked = ranked[: request.top_k]
        taxonomy = self._config.policy.taxonomy
        return signals_pb2.Profile(
            profile_id=profile_id,
            taxonomy_version=TAXONOMY_VERSION,
            as_of_day=today,
            batches=stored.batches,
            scores=[
                signals_pb2.CategoryScore(
                    category_id=cid, name=taxonomy[cid].name, tier1=taxonomy[cid].tier1, score=score
                )
                for score, cid in ranked
            ],
        )


class AggregatorServer(grpc.aio.Server):
    """A started ``grpc.aio.Server`` whose ``stop`` first reports NOT_SERVING to health checks, so load
    balancers drain it during the grace period."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        self._server = server
        self._health = health_servicer

    def add_generic_rpc_handlers(self, generic_rpc_handlers: object) -> None:
        """Delegate to the wrapped server."""
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_insecure_port(self, address: str) -> int:
        """Delegate to the wrapped server."""
        return int(self._server.add_insecure_port(address))

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        """Delegate to the wrapped server."""
        return int(self._server.add_secure_port(address, server_credentials))

    async def start(self) -> None:
        """Delegate to the wrapped server."""
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, then stop accepting RPCs and give running ones ``grace`` seconds."""
        log.info("event=shutdown grace=%s", grace)
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Delegate to the wrapped server."""
        return bool(await self._server.wait_for_termination(timeout))


async def create_server(address: str, store: Store, config: ServerConfig) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start the aggregator on ``address`` (``host:0`` picks a free port).

    Returns the running server and the bound port. ``await server.stop(grace)`` turns health checks to
    NOT_SERVING before draining. The caller keeps ownership of ``store``.
    """
    first, last = accepted_days(config.today())
    low, high = decay.supported_days(store.half_life_days)
    if first < low or last > high:
        raise ValueError(
            f"a half-life of {store.half_life_days:g} days keeps scores in float range only from "
            f"{decay.date_of(low)} to {decay.date_of(high)}, but batches accepted today span "
            f"{decay.date_of(first)} to {decay.date_of(last)}; use a longer half-life"
        )
    options = [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        # gRPC enables SO_REUSEPORT by default: a second server on a busy port would start "fine" and
        # silently take half of the traffic (into another database, perhaps). Fail to bind instead.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    signals_pb2_grpc.add_SignalAggregatorServicer_to_server(AggregatorServicer(store, config), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    # TLS will bind here with add_secure_port(address, credentials) instead.
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {address}: {exc}") from exc
    await server.start()
    log.info("event=listening address=%s port=%d", address, port)
    return AggregatorServer(server, health_servicer), port
