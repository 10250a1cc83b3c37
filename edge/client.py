"""Device side of the wire: batch filtered signals and deliver them to the aggregator.

Batches get their id when they are formed, so a batch that is resent after UNAVAILABLE or
DEADLINE_EXCEEDED carries the same id and the aggregator applies it once. The queue here lives in
memory; only signals that passed the privacy filter ever enter it.

The device authenticates with a bearer token (sent as ``authorization`` call metadata, never inside a
message) or a TLS client certificate; ``TlsOptions`` holds the certificates.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from edge.privacy import Interest
from edge.signals import encode_batch
from sotto.v1 import signals_pb2, signals_pb2_grpc

#: Status codes after which the same batch can succeed after a short backoff.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Status codes after which the batch can succeed only later (rate limit, overload) or once the device's
#: credential is fixed: it stays queued, and the flush stops without retrying now.
HELD = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS to the aggregator: the CA that signed its certificate (None: the system's trusted roots) and,
    for mutual TLS, the device's own PEM private key and certificate chain."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError(
                "give both private_key and certificate_chain for a client certificate, or neither"
            )

    @classmethod
    def from_files(
        cls,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
    ) -> TlsOptions:
        """Read PEM files (any may be None)."""

        def read(path: str | os.PathLike[str] | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials for ``grpc.secure_channel``."""
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(slots=True)
class DeliveryStats:
    batches_sent: int = 0
    signals_sent: int = 0
    duplicates: int = 0
    #: Serialized batch bytes of every call the server answered (acknowledged or refused).
    bytes_sent: int = 0
    retries: int = 0
    #: Batches the server refused for good (never resent), by status code name.
    rejected: dict[str, int] = field(default_factory=dict)
    #: Refusals that left the batch queued (rate limit, credential), by status code name.
    held: dict[str, int] = field(default_factory=dict)
    #: Round-trip time of each acknowledged Ingest call, in milliseconds.
    latencies_ms: list[float] = field(default_factory=list)


class DeliveryClient:
    """Batches one device's signals and sends them with a deadline.

    ``channel`` may be shared by many devices (the emulator does); the client owns it only when it
    creates it from ``target``, over TLS when ``tls`` is given. ``token`` is the device's bearer token.
    """

    def __init__(
        self,
        profile_id: str,
        region: str,
        target: str | None = None,
        channel: grpc.Channel | None = None,
        batch_size: int = 20,
        timeout_s: float = 5.0,
        max_attempts: int = 4,
        backoff_s: float = 0.2,
        token: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        if (target is None) == (channel is None):
            raise ValueError("give exactly one of target or channel")
        if tls is not None and channel is not None:
            raise ValueError(
                "tls applies to a channel the client creates from target; secure your own channel"
            )
        if batch_size < 1 or max_attempts < 1 or timeout_s <= 0:
            raise ValueError("batch_size and max_attempts must be >= 1 and timeout_s > 0")
        self.profile_id = profile_id
        self.region = region
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._own_channel = channel is None
        if channel is not None:
            self._channel = channel
        elif tls is not None:
            self._channel = grpc.secure_channel(target, tls.credentials())  # type: ignore[arg-type]
        else:
            self._channel = grpc.insecure_channel(target)  # type: ignore[arg-type]
        self._stub = signals_pb2_grpc.SignalAggregatorStub(self._channel)
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self._buffer: list[Interest] = []
        self._pending: deque[signals_pb2.SignalBatch] = deque()
        self._lock = threading.Lock()
        self.stats = DeliveryStats()

    def add(self, interests: Iterable[Interest]) -> None:
        """Queue signals; a full batch is formed (and given its id) as soon as there are enough."""
        with self._lock:
            self._buffer.extend(interests)
            while len(self._buffer) >= self.batch_size:
                self._seal(self.batch_size)

    @property
    def pending_batches(self) -> int:
        return len(self._pending) + (1 if self._buffer else 0)

    def _seal(self, n: int) -> None:
        chunk, self._buffer = self._buffer[:n], self._buffer[n:]
        self._pending.append(encode_batch(self.profile_id, self.region, chunk))

    def flush(self) -> bool:
        """Send every queued signal; True when nothing is left pending.

        Stops at the first batch that still fails with a retryable status after ``max_attempts``, or that
        is held back (rate limit, credential refused); it stays queued, in order, with its id. Batches
        refused for good are set aside and counted.
        """
        with self._lock:
            if self._buffer:
                self._seal(len(self._buffer))
            while self._pending:
                batch = self._pending[0]
                outcome = self._send(batch)
                if outcome == "retry":
                    return False
                self._pending.popleft()
            return True

    def _send(self, batch: signals_pb2.SignalBatch) -> str:
        size = batch.ByteSize()
        for attempt in range(self.max_attempts):
            started = time.perf_counter()
            try:
                reply = self._stub.Ingest(batch, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code in HELD:
                    self.stats.bytes_sent += size  # the server read the batch and answered
                    self.stats.held[code.name] = self.stats.held.get(code.name, 0) + 1
                    return "retry"
                if code not in RETRYABLE:
                    self.stats.bytes_sent += size  # the server read the batch and answered
                    self.stats.rejected[code.name] = self.stats.rejected.get(code.name, 0) + 1
                    return "rejected"
                if attempt + 1 < self.max_attempts:
                    self.stats.retries += 1
                    # Exponential backoff with full jitter, so many devices do not retry in step.
                    time.sleep(random.uniform(0, self.backoff_s * 2**attempt))
                continue
            self.stats.latencies_ms.append((time.perf_counter() - started) * 1000)
            self.stats.bytes_sent += size
            self.stats.batches_sent += 1
            if reply.duplicate:
                self.stats.duplicates += 1
            else:
                self.stats.signals_sent += len(batch.signals)
            return "sent"
        return "retry"

    def delete_profile(self) -> bool:
        """Ask the aggregator to erase this device's profile (the wearer's deletion request).

        Queued signals are dropped first, so nothing of the profile is sent afterwards. Retries like a
        batch; returns True when the aggregator had something to erase, and raises ``grpc.RpcError`` when
        the request could not be delivered (call it again later). The aggregator also revokes the
        device's token, so the device must be enrolled again, under a new profile id, to send more.
        """
        with self._lock:
            self._buffer.clear()
            self._pending.clear()
            request = signals_pb2.DeleteProfileRequest(profile_id=self.profile_id)
            for attempt in range(self.max_attempts):
                try:
                    reply = self._stub.DeleteProfile(request, timeout=self.timeout_s, metadata=self._metadata)
                except grpc.RpcError as exc:
                    code = exc.code()  # type: ignore[attr-defined]
                    if code not in RETRYABLE or attempt + 1 == self.max_attempts:
                        raise
                    time.sleep(random.uniform(0, self.backoff_s * 2**attempt))
                    continue
                return bool(reply.deleted)
            raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()
