"""The interceptor in front of every ``sotto.v1.SignalAggregator`` call: authentication, the role check, the
per-device rate limit, the concurrency limit, the server-side deadline, metrics and the log line of each
refused call.

Order matters against attackers: the caller is authenticated from the call's metadata *before* its request
message is read, so a stream that sends headers and nothing else is refused at once instead of holding a
slot; the request message is read inside the server's deadline, so an authenticated stream that never sends
its message is closed after ``timeout_s``; and only authenticated calls count against the concurrency limit,
so health checks (not guarded) keep answering while Ingest is saturated.

Health checking and reflection are not guarded: load balancers and operators call them without
credentials, and they reveal nothing about profiles.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from traceback import extract_tb
from typing import Any, NoReturn

import grpc

from sotto.server.auth import ACCESS, UNCHECKED, Authenticator, AuthError, Principal
from sotto.server.limits import RateLimiter
from sotto.server.metrics import Metrics
from sotto.server.store import Role, StoreUnavailableError
from sotto.v1 import signals_pb2

SERVICE_NAME: str = signals_pb2.DESCRIPTOR.services_by_name["SignalAggregator"].full_name
#: The longest status message sent to a client: a message may quote a client's field, and gRPC refuses
#: trailers past its metadata limit (16 KB) with RESOURCE_EXHAUSTED, which a client would retry forever.
MAX_DETAILS = 512
#: Unauthenticated refusals held back at once (see ``Guard._hold_back``); beyond this many they are answered
#: at once, so that held refusals never take the room gRPC keeps for health checks (``UNGUARDED_CALLS``).
MAX_HELD_REFUSALS = 100
#: A refusal's log line is written at most once per this many seconds for each method and reason; the
#: next line says how many were left out in between, so an attacker cannot flood the log.
REFUSAL_LOG_INTERVAL_S = 10.0

log = logging.getLogger(__name__)

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("sotto_principal")

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def current_principal() -> Principal:
    """The caller of the call being served (set by ``Guard`` before the servicer runs)."""
    return _principal.get()


def bounded(message: str, limit: int = MAX_DETAILS) -> str:
    """``message`` cut to ``limit`` characters, saying so when it was cut."""
    if len(message) <= limit:
        return message
    return message[: limit - 30] + f"... ({len(message)} characters)"


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """``context.abort`` typed as never returning, with the message bounded (see ``MAX_DETAILS``)."""
    await context.abort(code, bounded(message))
    # grpc raises in abort() but ships no type hints; this tells mypy that control ends here.
    raise AssertionError("context.abort returned")


class _AlreadyAnswered(Exception):
    """gRPC itself answered the call (with ``code``) before the guard could."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code


class RefusalLog:
    """One INFO line per method and reason per ``interval_s`` at most, with the count of the left-out ones.

    Keys come from fixed sets (method names and refusal reasons), so the table stays small.
    """

    def __init__(
        self, interval_s: float = REFUSAL_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ):
        self._interval_s = interval_s
        self._clock = clock
        #: (method, reason) -> (time of the last line written, refusals not logged since)
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def refused(self, method: str, code: grpc.StatusCode, reason: str) -> None:
        """Log this refusal, or count it for the next line when one was written less than an interval ago."""
        now = self._clock()
        key = (method, reason)
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return
        suppressed = 0 if last is None else last[1]
        self._last[key] = (now, 0)
        log.info(
            "event=rpc_refused method=%s code=%s reason=%s suppressed=%d",
            method,
            code.name,
            reason,
            suppressed,
        )


class Guard(grpc.aio.ServerInterceptor):
    """Wraps each unary method of the aggregator service; see the module doc for what it checks."""

    def __init__(
        self,
        authenticator: Authenticator | None,
        limiter: RateLimiter,
        metrics: Metrics,
        timeout_s: float,
        max_concurrent: int = 1000,
        refusal_log: RefusalLog | None = None,
        unauthenticated_delay_s: float = 0.0,
    ) -> None:
        self._authenticator = authenticator
        self._limiter = limiter
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._max_concurrent = max_concurrent
        self._active = 0
        self._refusal_log = refusal_log or RefusalLog()
        self._delay_s = unauthenticated_delay_s
        self._held = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Return the method's handler, wrapped when it belongs to the aggregator service."""
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.rpartition("/")  # type: ignore[attr-defined]
        if handler is None or service != f"/{SERVICE_NAME}":
            return handler
        # A method without an access rule is a programming error: fail at its first call, loudly.
        roles = ACCESS[method]
        behavior: Behavior = handler.unary_unary
        parse: Callable[[bytes], Any] = handler.request_deserializer

        async def guarded(requests: object, context: grpc.aio.ServicerContext) -> Any:
            # Served as a stream-unary handler (the wire is the same for the client): gRPC's unary handler
            # would wait for the request message before any of this code runs, so a stream that never
            # sends it would hold its slot unauthenticated and outside every deadline.
            started = time.perf_counter()
            # None once the call succeeded; until then, what to record if the status says nothing better.
            failure: grpc.StatusCode | None = grpc.StatusCode.UNKNOWN
            admitted = False
            try:
                principal = await self._admit(method, roles, context)
                _principal.set(principal)  # this call's own context: nothing leaks to other calls
                if self._active >= self._max_concurrent:
                    await self._refuse(
                        context,
                        method,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "overloaded",
                        "the aggregator is at its limit of calls in progress; "
                        "retry later (nothing was applied)",
                    )
                self._active += 1
                admitted = True
                try:
                    # asyncio.timeout, not wait_for: the servicer runs in this call's own task, with the
                    # principal set above, and no extra task is created per call. The deadline covers
                    # reading the request too.
                    async with asyncio.timeout(self._timeout_s):
                        request = await self._read(method, parse, context)
                        response = await behavior(request, context)
                except TimeoutError:
                    await self._refuse(
                        context,
                        method,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "server_deadline",
                        f"the aggregator did not finish within {self._timeout_s:g} s; retry later (a batch "
                        "resent with the same id is applied at most once)",
                    )
                failure = None
                return response
            except asyncio.CancelledError:  # the client went away or its deadline passed
                failure = grpc.StatusCode.CANCELLED
                raise
            except _AlreadyAnswered as exc:
                failure = exc.code
                # Nothing more to send; gRPC ends a cancelled handler quietly.
                raise asyncio.CancelledError from None
            except grpc.aio.AbortError:  # a status set on purpose, by abort()
                raise
            except Exception as exc:
                # gRPC would log the exception's message, which may quote a profile id from a query.
                # Log where it happened and what kind it was; answer INTERNAL.
                where = "; ".join(
                    f"{Path(f.filename).name}:{f.lineno}" for f in extract_tb(exc.__traceback__)
                )
                log.error("event=internal_error method=%s error=%s at=%s", method, type(exc).__name__, where)
                await abort(context, grpc.StatusCode.INTERNAL, "internal error (logged by the aggregator)")
            finally:
                if admitted:
                    self._active -= 1
                if failure is not None:
                    failure = context.code() or failure  # the status of abort(), when there was one
                self._metrics.observe(method, failure, time.perf_counter() - started)

        return grpc.stream_unary_rpc_method_handler(
            guarded, request_deserializer=None, response_serializer=handler.response_serializer
        )

    async def _read(
        self, method: str, parse: Callable[[bytes], Any], context: grpc.aio.ServicerContext
    ) -> Any:
        """The call's one request message, parsed; INVALID_ARGUMENT when it is missing or unparseable."""
        raw = await context.read()
        if raw is grpc.aio.EOF:
            try:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")
            except grpc.aio.AbortError:
                self._metrics.refusals.labels(method, "no_message").inc()
                self._refusal_log.refused(method, grpc.StatusCode.INVALID_ARGUMENT, "no_message")
                raise
            except Exception:
                # gRPC had already answered the call: a message over --max-message-bytes ends the call with
                # RESOURCE_EXHAUSTED before it reaches us, and reading then returns EOF.
                self._metrics.refusals.labels(method, "message_too_large").inc()
                self._refusal_log.refused(method, grpc.StatusCode.RESOURCE_EXHAUSTED, "message_too_large")
                raise _AlreadyAnswered(grpc.StatusCode.RESOURCE_EXHAUSTED) from None
        try:
            return parse(raw)
        except Exception:  # protobuf's DecodeError, and whatever else a parser raises on hostile bytes
            await self._refuse(
                context,
                method,
                grpc.StatusCode.INVALID_ARGUMENT,
                "unparseable",
                f"the request is not a valid {method} message (protobuf could not parse it)",
            )

    async def _admit(
        self, method: str, roles: frozenset[Role], context: grpc.aio.ServicerContext
    ) -> Principal:
        """The caller, once authenticated, allowed to call ``method`` and within its rate."""
        if self._authenticator is None:
            return UNCHECKED
        try:
            principal = await self._authenticator.authenticate(
                tuple(context.invocation_metadata() or ()), context.auth_context()
            )
        except AuthError as exc:
            await self._hold_back()
            await self._refuse(context, method, exc.code, exc.reason, str(exc))
        except StoreUnavailableError as exc:
            self._metrics.store_errors.labels("find_credential").inc()
            log.warning("event=store_error operation=find_credential error=%r", str(exc))
            await self._refuse(
                context,
                method,
                grpc.StatusCode.UNAVAILABLE,
                "store_unavailable",
                "the aggregator cannot check credentials right now; retry later",
            )
        if principal.role not in roles:
            await self._refuse(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                "role",
                f"{method} is not allowed with this credential (role {principal.role}); "
                f"it needs role {' or '.join(sorted(roles))}",
            )
        key = principal.rate_key
        if key is not None:
            wait_s = self._limiter.acquire(key)
            if wait_s:
                await self._refuse(
                    context,
                    method,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "rate_limited",
                    f"rate limit exceeded for this device; retry in {wait_s:.1f} s (nothing was applied)",
                )
        return principal

    async def _hold_back(self) -> None:
        """Wait ``unauthenticated_delay_s`` before an unauthenticated refusal, while fewer than
        ``MAX_HELD_REFUSALS`` wait. A client that opens streams without a credential as fast as it can then
        gets at most (streams per connection / delay) answers per second and connection, instead of keeping
        the event loop busy; a held refusal costs a timer, not CPU. A genuine device with a bad token only
        learns it a moment later."""
        if self._delay_s <= 0 or self._held >= MAX_HELD_REFUSALS:
            return
        self._held += 1
        try:
            await asyncio.sleep(self._delay_s)
        finally:
            self._held -= 1

    async def _refuse(
        self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, reason: str, message: str
    ) -> NoReturn:
        """Count and log (bounded) a refusal with a fixed ``reason`` label, and answer ``code``."""
        self._metrics.refusals.labels(method, reason).inc()
        self._refusal_log.refused(method, code, reason)
        await abort(context, code, message)
