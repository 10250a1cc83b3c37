"""The interceptor in front of every ``sotto.v1.SignalAggregator`` call: authentication, the role check, the
per-device rate limit, the server-side deadline, metrics and the one log line per refused call.

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

log = logging.getLogger(__name__)

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("sotto_principal")

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def current_principal() -> Principal:
    """The caller of the call being served (set by ``Guard`` before the servicer runs)."""
    return _principal.get()


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """``context.abort`` typed as never returning."""
    await context.abort(code, message)
    # grpc raises in abort() but ships no type hints; this tells mypy that control ends here.
    raise AssertionError("context.abort returned")


class Guard(grpc.aio.ServerInterceptor):
    """Wraps each unary method of the aggregator service; see the module doc for what it checks."""

    def __init__(
        self,
        authenticator: Authenticator | None,
        limiter: RateLimiter,
        metrics: Metrics,
        timeout_s: float,
    ) -> None:
        self._authenticator = authenticator
        self._limiter = limiter
        self._metrics = metrics
        self._timeout_s = timeout_s

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

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            # None once the call succeeded; until then, what to record if the status says nothing better.
            failure: grpc.StatusCode | None = grpc.StatusCode.UNKNOWN
            try:
                principal = await self._admit(method, roles, context)
                _principal.set(principal)  # this call's own context: nothing leaks to other calls
                try:
                    # asyncio.timeout, not wait_for: the servicer runs in this call's own task, with the
                    # principal set above, and no extra task is created per call.
                    async with asyncio.timeout(self._timeout_s):
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
                if failure is not None:
                    failure = context.code() or failure  # the status of abort(), when there was one
                self._metrics.observe(method, failure, time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
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

    async def _refuse(
        self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, reason: str, message: str
    ) -> NoReturn:
        log.info("event=rpc_refused method=%s code=%s reason=%s", method, code.name, reason)
        await abort(context, code, message)
