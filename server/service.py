"""The gRPC face of the aggregator: a thin servicer, health checking, reflection and the retention purge.

The servicer converts protobuf to domain values (``server.validation``), checks that the caller may touch
the profile, calls the store and converts back. Authentication, rate limits, deadlines and metrics of
every call are the interceptor's (``server.guard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Awaitable
from typing import NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sotto.ldp_math import debias
from sotto.server import decay
from sotto.server.auth import Authenticator
from sotto.server.config import ServerConfig, is_loopback
from sotto.server.guard import SERVICE_NAME, Guard, abort, current_principal
from sotto.server.limits import RateLimiter
from sotto.server.metrics import Metrics
from sotto.server.store import (
    BatchConflictError,
    MinorProfileError,
    PurgeResult,
    Store,
    StoreUnavailableError,
)
from sotto.server.validation import (
    ValidationError,
    accepted_days,
    validate_audience,
    validate_batch,
    validate_profile_id,
)
from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import TAXONOMY_VERSION, date_of

__all__ = ["SERVICE_NAME", "AggregatorServer", "AggregatorServicer", "create_server", "purge_expired"]

T = TypeVar("T")

#: The method each store operation serves (the label of its refusals when the store is unavailable).
_METHOD_OF = {
    "apply_batch": "Ingest",
    "get_profile": "GetProfile",
    "delete_profile": "DeleteProfile",
    "audience_size": "AudienceSize",
    "signal_counts": "AudienceSize",
}

log = logging.getLogger(__name__)

# Random per process: tags let one run's log lines be correlated, but cannot be matched to known ids.
_LOG_SALT = secrets.token_bytes(16)


#: How often clients may ping (gRPC's defaults, stated so that the device's keepalive can be checked
#: against them): a client pinging more often than every 5 minutes, or at all on a connection without
#: calls, gets GOAWAY "too_many_pings" after two strikes. ``edge.client.CHANNEL_OPTIONS`` stays within it.
MIN_PING_INTERVAL_MS = 300_000
PING_POLICY: tuple[tuple[str, int], ...] = (
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_ping_strikes", 2),
)
#: Connection lifetimes, enforced by gRPC: a connection that has not finished its TLS and HTTP/2 handshake
#: within 10 s is closed; one without calls for 5 minutes is closed with GOAWAY; any connection is asked to
#: go away after an hour (spreading reconnects behind a load balancer), with 30 s for its calls to finish.
CONNECTION_POLICY: tuple[tuple[str, int], ...] = (
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.max_connection_age_ms", 3_600_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
)
#: Calls gRPC itself admits beyond ``max_concurrent_rpcs`` (which the guard enforces on authenticated
#: aggregator calls): room for health checks, reflection and the refusals, which finish at once.
UNGUARDED_CALLS = 200


def profile_tag(profile_id: str) -> str:
    """A short salted hash standing for ``profile_id`` in logs (the id itself is never logged)."""
    return hashlib.blake2b(profile_id.encode(), key=_LOG_SALT, digest_size=6).hexdigest()


class AggregatorServicer(signals_pb2_grpc.SignalAggregatorServicer):
    """``sotto.v1.SignalAggregator`` on top of a ``Store``."""

    def __init__(self, store: Store, config: ServerConfig, metrics: Metrics) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics

    async def _refuse(
        self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, reason: str, message: str
    ) -> NoReturn:
        """Count the refusal by its fixed ``reason`` label and answer ``code``."""
        self._metrics.refusals.labels(method, reason).inc()
        await abort(context, code, message)

    async def _authorize(self, context: grpc.aio.ServicerContext, method: str, profile_id: str) -> None:
        """PERMISSION_DENIED unless the caller may touch ``profile_id`` (a device only its own)."""
        if not current_principal().may_access(profile_id):
            log.info("event=rpc_refused method=%s code=PERMISSION_DENIED reason=other_profile", method)
            await self._refuse(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                "other_profile",
                "this credential is bound to another profile; a device may only use its own",
            )

    async def _store_call(self, context: grpc.aio.ServicerContext, operation: str, call: Awaitable[T]) -> T:
        """Await a store operation; a store that cannot do it now becomes UNAVAILABLE for the client."""
        try:
            return await call
        except StoreUnavailableError as exc:
            self._metrics.store_errors.labels(operation).inc()
            log.warning("event=store_error operation=%s error=%r", operation, str(exc))
            await self._refuse(
                context,
                _METHOD_OF[operation],
                grpc.StatusCode.UNAVAILABLE,
                "store_unavailable",
                "the store is unavailable; retry later (nothing changed)",
            )

    async def _profile_id(self, context: grpc.aio.ServicerContext, method: str, profile_id: str) -> str:
        await self._authorize(context, method, profile_id)
        try:
            return validate_profile_id(profile_id)
        except ValidationError as exc:
            await self._refuse(
                context, method, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", str(exc)
            )

    async def Ingest(
        self, request: signals_pb2.SignalBatch, context: grpc.aio.ServicerContext
    ) -> signals_pb2.IngestResponse:
        """Validate the batch and apply it exactly once."""
        await self._authorize(context, "Ingest", request.profile_id)
        try:
            batch = validate_batch(request, self._config)
        except ValidationError as exc:
            log.info("event=ingest_rejected code=INVALID_ARGUMENT field=%s", exc.field)
            await self._refuse(
                context, "Ingest", grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", str(exc)
            )
        try:
            result = await self._store_call(context, "apply_batch", self._store.apply_batch(batch))
        except BatchConflictError as exc:
            log.warning("event=ingest_rejected code=ALREADY_EXISTS batch=%s", batch.batch_id.hex())
            await self._refuse(context, "Ingest", grpc.StatusCode.ALREADY_EXISTS, "batch_conflict", str(exc))
        except MinorProfileError as exc:
            log.info("event=ingest_rejected code=FAILED_PRECONDITION reason=minor")
            await self._refuse(context, "Ingest", grpc.StatusCode.FAILED_PRECONDITION, "minor", str(exc))
        self._metrics.batches.labels("duplicate" if result.duplicate else "applied").inc()
        self._metrics.signals.inc(result.applied_signals)
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
        """Return the profile's scores decayed to today, best first, without entries past retention."""
        profile_id = await self._profile_id(context, "GetProfile", request.profile_id)
        stored = await self._store_call(context, "get_profile", self._store.get_profile(profile_id))
        if stored is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such profile")
        # Entries past retention that the next purge has not removed yet are already gone for readers.
        cutoff = self._config.retention_cutoff()
        sums = {cid: s for cid, s in stored.sums.items() if stored.last_days[cid] >= cutoff}
        if not sums:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such profile")
        today = self._config.today()
        half_life = self._store.half_life_days
        ranked = sorted(
            ((decay.score(s, today, half_life), cid) for cid, s in sums.items()),
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

    async def DeleteProfile(
        self, request: signals_pb2.DeleteProfileRequest, context: grpc.aio.ServicerContext
    ) -> signals_pb2.DeleteProfileResponse:
        """Erase the profile with its batch ids and device tokens (a user's deletion request)."""
        profile_id = await self._profile_id(context, "DeleteProfile", request.profile_id)
        deleted = await self._store_call(context, "delete_profile", self._store.delete_profile(profile_id))
        if deleted:
            self._metrics.deletions.inc()
        log.info(
            "event=profile_deleted profile=%s by=%s deleted=%s",
            profile_tag(profile_id),
            current_principal().role or "unchecked",
            deleted,
        )
        return signals_pb2.DeleteProfileResponse(deleted=deleted)

    async def AudienceSize(
        self, request: signals_pb2.AudienceSizeRequest, context: grpc.aio.ServicerContext
    ) -> signals_pb2.AudienceSizeResponse:
        """Count the profiles scoring at least ``min_score`` in a category, or say the audience is too small
        when fewer than ``min_audience`` match (no count is revealed then)."""
        try:
            category_id, min_score = validate_audience(request, self._config)
        except ValidationError as exc:
            await self._refuse(
                context, "AudienceSize", grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", str(exc)
            )
        today = self._config.today()
        # The threshold moves into stored-sum space once, so the database compares plain numbers.
        min_sum = decay.stored_sum(min_score, today, self._store.half_life_days)
        count = await self._store_call(
            context,
            "audience_size",
            self._store.audience_size(category_id, min_sum, self._config.retention_cutoff()),
        )
        groups = await self._store_call(
            context,
            "signal_counts",
            self._store.signal_counts(category_id, self._config.retention_cutoff()),
        )
        estimate = debias(groups, len(self._config.policy.interest_ids))
        k = self._config.min_audience
        # k-anonymity holds for both figures: neither is revealed when either says fewer than k.
        too_small = count < k or estimate.estimate < k
        self._metrics.audiences.labels("too_small" if too_small else "answered").inc()
        if too_small:
            return signals_pb2.AudienceSizeResponse(too_small=True, min_audience=k, as_of_day=today)
        return signals_pb2.AudienceSizeResponse(
            too_small=False,
            profiles=count,
            min_audience=k,
            as_of_day=today,
            estimated_signals=estimate.estimate,
            estimate_low=estimate.low,
            estimate_high=estimate.high,
            confidence=estimate.confidence,
            noised_signals=sum(n for milli, _, n in groups if milli),
        )


async def purge_expired(store: Store, config: ServerConfig, metrics: Metrics) -> PurgeResult:
    """Remove what retention no longer allows (see ``Store.purge``) and count it."""
    result = await store.purge(config.retention_cutoff())
    for kind in ("entries", "profiles", "batches"):
        metrics.purged.labels(kind).inc(getattr(result, kind))
    metrics.last_purge.set_to_current_time()
    log.info("event=purge entries=%d profiles=%d batches=%d", result.entries, result.profiles, result.batches)
    return result


async def _purge_forever(store: Store, config: ServerConfig, metrics: Metrics) -> None:
    while True:
        try:
            await purge_expired(store, config, metrics)
        except StoreUnavailableError as exc:  # the next round will catch up
            metrics.store_errors.labels("purge").inc()
            log.warning("event=store_error operation=purge error=%r", str(exc))
        await asyncio.sleep(config.purge_interval_s)


class AggregatorServer(grpc.aio.Server):
    """A started ``grpc.aio.Server`` whose ``stop`` first reports NOT_SERVING to health checks, so load
    balancers drain it during the grace period, and stops the retention purge."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        metrics: Metrics,
        purger: asyncio.Task[None] | None,
    ) -> None:
        self._server = server
        self._health = health_servicer
        self._purger = purger
        #: The server's metrics (``metrics.serve(host, port)`` exposes them over HTTP).
        self.metrics = metrics

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
        """Report NOT_SERVING, then stop accepting RPCs and give running ones ``grace`` seconds.

        A call still running after the grace period is cancelled and never acknowledged; its batch is
        either committed whole or not at all, and the device resends it with the same id.
        """
        log.info("event=shutdown grace=%s", grace)
        await self._health.enter_graceful_shutdown()
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Delegate to the wrapped server."""
        return bool(await self._server.wait_for_termination(timeout))


def _check_security(address: str, config: ServerConfig) -> None:
    host = address.rpartition(":")[0]
    if is_loopback(host):
        return
    if config.tls is None and not config.insecure:
        raise ValueError(
            f"refusing to serve plaintext on {address}, which is not a loopback address: give a TLS "
            "certificate and key (--tls-cert, --tls-key), or --insecure when a proxy in front terminates TLS"
        )
    if not config.require_auth:
        raise ValueError(f"authentication may only be turned off on a loopback address, not {address}")


async def create_server(
    address: str, store: Store, config: ServerConfig, metrics: Metrics | None = None
) -> tuple[AggregatorServer, int]:
    """Build, bind and start the aggregator on ``address`` (``host:0`` picks a free port).

    Returns the running server and the bound port. ``await server.stop(grace)`` turns health checks to
    NOT_SERVING before draining. The caller keeps ownership of ``store``. Raises ``ValueError`` for a
    configuration that is unsafe on ``address`` or a half-life too short for today's dates, and
    ``RuntimeError`` when the address cannot be bound.
    """
    _check_security(address, config)
    first, last = accepted_days(config.today())
    low, high = decay.supported_days(store.half_life_days)
    if first < low or last > high:
        raise ValueError(
            f"a half-life of {store.half_life_days:g} days keeps scores in float range only from "
            f"{date_of(low)} to {date_of(high)}, but batches accepted today span "
            f"{date_of(first)} to {date_of(last)}; use a longer half-life"
        )
    metrics = metrics or Metrics()
    guard = Guard(
        authenticator=Authenticator(store) if config.require_auth else None,
        limiter=RateLimiter(config.rate_per_second, config.rate_burst),
        metrics=metrics,
        timeout_s=config.request_timeout_s,
        max_concurrent=config.max_concurrent_rpcs,
        unauthenticated_delay_s=config.unauthenticated_delay_s,
    )
    options = [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        # gRPC enables SO_REUSEPORT by default: a second server on a busy port would start "fine" and
        # silently take half of the traffic (into another database, perhaps). Fail to bind instead,
        # unless this is one of the workers of `serve --workers N` (server.workers reserved the port).
        ("grpc.so_reuseport", int(config.reuse_port)),
        # One connection cannot open more streams than this; gRPC clients queue the rest.
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # Connections beyond this many are closed by gRPC as soon as they are accepted (see ServerConfig).
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        *PING_POLICY,
        *CONNECTION_POLICY,
    ]
    server = grpc.aio.server(
        interceptors=[guard],
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs + UNGUARDED_CALLS,
    )
    signals_pb2_grpc.add_SignalAggregatorServicer_to_server(
        AggregatorServicer(store, config, metrics), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if config.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, config.tls.credentials())
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {address}: {exc}") from exc
    await server.start()
    purger = (
        asyncio.create_task(_purge_forever(store, config, metrics), name="sotto-purge")
        if config.purge_interval_s
        else None
    )
    log.info(
        "event=listening address=%s port=%d tls=%s mutual_tls=%s auth=%s",
        address,
        port,
        config.tls is not None,
        config.tls is not None and config.tls.client_ca is not None,
        config.require_auth,
    )
    return AggregatorServer(server, health_servicer, metrics, purger), port
