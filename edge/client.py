"""Device side of the wire: deliver the outbox's batches to the aggregator, exactly once in effect.

Signals go into an :class:`~edge.outbox.Outbox` (SQLite on the device, in memory when no path is given)
before :meth:`DeliveryClient.add` returns. Batches are sealed there, id and bytes stored before the first
send, and sent oldest first; a batch leaves the outbox only when the aggregator acknowledges it, so a
resend after a timeout, a lost reply, a crash or a reboot carries the same id and the aggregator applies
it once.

Retries ask one question: can a resend of the same bytes succeed? Every status code has its answer in
:data:`STATUS_ACTIONS`; ``retry`` keeps the batch queued (in order, with its id) and retries it with
exponential backoff and jitter, within a flush and between flushes; ``set aside`` keeps it for inspection,
counted, and never resends it. A resend of a batch the aggregator already applied (its reply was lost, or
the call was cancelled after the work was done) is answered ``duplicate`` and counts as the acknowledgement.

==================  ==========  ==========================================================================
code                action      why
==================  ==========  ==========================================================================
OK                  ack         the aggregator stored the batch (or already had it: ``duplicate``)
CANCELLED           retry       the call was cut (a burst, a server shutting down, a reconnect storm)
UNKNOWN             retry       an unexpected server error or a broken stream: says nothing about the batch
INVALID_ARGUMENT    set aside   a field the aggregator refuses; the same bytes fail the same way
DEADLINE_EXCEEDED   retry       no answer in time; the aggregator may have applied it (then: duplicate)
NOT_FOUND           set aside   not an Ingest answer for a batch; the same call gets the same answer
ALREADY_EXISTS      set aside   another batch holds this id with different content
PERMISSION_DENIED   set aside   the credential belongs to another profile
RESOURCE_EXHAUSTED  retry       rate limit, concurrency limit or overload
FAILED_PRECONDITION set aside   the aggregator's state forbids it (a profile marked as a minor)
ABORTED             retry       a conflict with a concurrent call (a transaction aborted)
OUT_OF_RANGE        set aside   a value outside what the aggregator accepts
UNIMPLEMENTED       retry       an aggregator being upgraded or misrouted; an operator can fix it
INTERNAL            retry       a server-side fault (a store error); a resend can succeed after it
UNAVAILABLE         retry       network down, server restarting, store unavailable
DATA_LOSS           set aside   unrecoverable corruption reported for this request
UNAUTHENTICATED     set aside   the token is missing or revoked (for a deletion: see below)
==================  ==========  ==========================================================================

A batch that is retried forever is not a stall without end: the outbox drops batches past its age bound
(30 days) and counts them.

A deletion request (:meth:`DeliveryClient.delete_profile`) stays pending, and the device silent, until
the aggregator confirms it, or until the refusal itself proves it already happened: ``UNAUTHENTICATED``
after an earlier attempt that failed with a transient code (so it may have been applied), because a
successful deletion revokes the device's token and only its reply was lost. Every
other refusal keeps it pending (retried with backoff on later flushes); :func:`deletion_state` says
where it stands, and ``sotto-edge ledger`` shows it.

The device authenticates with a bearer token (sent as ``authorization`` call metadata, never inside a
message) or a TLS client certificate; ``TlsOptions`` holds the certificates.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sotto.edge.outbox import Outbox, OutboxStats, StoredBatch
from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import Signal, canonical_region, check_profile_id

log = logging.getLogger(__name__)

_RETRY, _SET_ASIDE = "retry", "set_aside"
#: What the client does after each status code (the table in this module's docstring).
STATUS_ACTIONS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.CANCELLED: _RETRY,
    grpc.StatusCode.UNKNOWN: _RETRY,
    grpc.StatusCode.INVALID_ARGUMENT: _SET_ASIDE,
    grpc.StatusCode.DEADLINE_EXCEEDED: _RETRY,
    grpc.StatusCode.NOT_FOUND: _SET_ASIDE,
    grpc.StatusCode.ALREADY_EXISTS: _SET_ASIDE,
    grpc.StatusCode.PERMISSION_DENIED: _SET_ASIDE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: _RETRY,
    grpc.StatusCode.FAILED_PRECONDITION: _SET_ASIDE,
    grpc.StatusCode.ABORTED: _RETRY,
    grpc.StatusCode.OUT_OF_RANGE: _SET_ASIDE,
    grpc.StatusCode.UNIMPLEMENTED: _RETRY,
    grpc.StatusCode.INTERNAL: _RETRY,
    grpc.StatusCode.UNAVAILABLE: _RETRY,
    grpc.StatusCode.DATA_LOSS: _SET_ASIDE,
    grpc.StatusCode.UNAUTHENTICATED: _SET_ASIDE,
}
#: Status codes after which the same batch can succeed later: it stays queued and is retried with backoff.
RETRYABLE = frozenset(code for code, action in STATUS_ACTIONS.items() if action == _RETRY)
#: Client keepalive. gRPC servers answer pings sent more often than
#: ``grpc.http2.min_ping_interval_without_data_ms`` (5 minutes, which ``server.service`` sets explicitly)
#: with GOAWAY "too_many_pings" after two strikes, so the device never pings more often than that, and
#: never on an idle connection (``permit_without_calls`` 0): an idle radio is what saves the battery, and
#: a dead connection is found by the next call's deadline anyway.
KEEPALIVE_TIME_MS = 300_000
KEEPALIVE_TIMEOUT_MS = 20_000
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
)
_INGEST = "/sotto.v1.SignalAggregator/Ingest"
#: State keys in the outbox.
_OPTED_OUT = "opted_out"
_DELETE_PENDING = "delete_pending"
#: JSON {"requested_at", "attempts", "last_code", "last_at"} while pending; {"status", "at"} once settled.
_DELETION = "deletion"


class DeletionStatus(enum.Enum):
    """Where a deletion request stands after :meth:`DeliveryClient.delete_profile` (one meaning each)."""

    #: Not confirmed yet: kept in the outbox and retried on later flushes; nothing is queued or sent.
    PENDING = "pending"
    #: The aggregator confirmed it erased the profile.
    ERASED = "erased"
    #: The aggregator confirmed it holds nothing for this profile (nothing was ever stored, or it was
    #: erased before).
    NOTHING_TO_ERASE = "nothing_to_erase"
    #: The aggregator refused with UNAUTHENTICATED after an earlier attempt: that attempt's deletion
    #: revoked the token and only its reply was lost.
    ALREADY_ERASED = "already_erased"


@dataclass(frozen=True, slots=True)
class DeletionState:
    """What the outbox remembers of the wearer's deletion request (for the ledger)."""

    status: DeletionStatus
    #: When it was requested (pending) or settled (otherwise), seconds since the epoch.
    at: float
    attempts: int = 0
    #: The status code of the last failed attempt, while pending.
    last_code: str | None = None


def deletion_state(outbox: Outbox) -> DeletionState | None:
    """Where the device's deletion request stands (None: it never asked for one)."""
    raw = outbox.get_state(_DELETION)
    pending = outbox.get_state(_DELETE_PENDING) is not None
    try:
        doc = json.loads(raw) if raw is not None else {}
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except ValueError:
        doc = {}
    if pending:
        return DeletionState(
            DeletionStatus.PENDING,
            float(doc.get("requested_at", 0.0)),
            int(doc.get("attempts", 0)),
            doc.get("last_code"),
        )
    if "status" in doc:
        try:
            return DeletionState(DeletionStatus(doc["status"]), float(doc.get("at", 0.0)))
        except ValueError:
            return None
    return None


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
    """What this process's client did (the outbox keeps the lifetime counters: ``DeliveryClient.outbox``)."""

    batches_sent: int = 0
    signals_sent: int = 0
    #: Acknowledgements saying the aggregator already had the batch (a resend after a lost reply).
    duplicates: int = 0
    #: Serialized batch bytes of every call the server answered (acknowledged or refused).
    bytes_sent: int = 0
    retries: int = 0
    #: Batches the server refused for good (set aside, never resent), by status code name.
    rejected: dict[str, int] = field(default_factory=dict)
    #: Signals not accepted because the wearer opted out or asked for deletion.
    refused_signals: int = 0
    #: Round-trip time of each acknowledged Ingest call, in milliseconds.
    latencies_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DeliveryOptions:
    """When and how batches are sent: ``DeliveryClient``'s parameters of that name (see there for each);
    these defaults are the client's."""

    batch_size: int = 20
    max_delay_s: float = 300.0
    timeout_s: float = 5.0
    max_attempts: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 900.0


#: The defaults of ``DeliveryClient``'s parameters.
_DEFAULTS = DeliveryOptions()


class DeliveryClient:
    """Stores one device's signals in its outbox and sends them in batches with a deadline.

    ``outbox`` is an :class:`Outbox`, a file path (the client opens and owns it), or None for an in-memory
    outbox that does not survive the process. A batch is sent when ``batch_size`` signals are waiting, or
    when the oldest has waited ``max_delay_s`` (see :meth:`flush_if_due`); :meth:`flush` sends everything
    now. ``channel`` may be shared by many devices (the emulator does); the client owns it only when it
    creates it from ``target``, over TLS when ``tls`` is given. ``token`` is the device's bearer token.
    """

    def __init__(
        self,
        profile_id: str,
        region: str,
        target: str | None = None,
        channel: grpc.Channel | None = None,
        batch_size: int = _DEFAULTS.batch_size,
        timeout_s: float = _DEFAULTS.timeout_s,
        max_attempts: int = _DEFAULTS.max_attempts,
        backoff_s: float = _DEFAULTS.backoff_s,
        token: str | None = None,
        tls: TlsOptions | None = None,
        outbox: Outbox | str | os.PathLike[str] | None = None,
        max_delay_s: float = _DEFAULTS.max_delay_s,
        max_backoff_s: float = _DEFAULTS.max_backoff_s,
    ) -> None:
        # Checked before anything is opened: a malformed id or region would be stored with every signal
        # and refused by the aggregator with every batch.
        profile_id = check_profile_id(profile_id)
        region = canonical_region(region)
        if (target is None) == (channel is None):
            raise ValueError("give exactly one of target or channel")
        if tls is not None and channel is not None:
            raise ValueError(
                "tls applies to a channel the client creates from target; secure your own channel"
            )
        if batch_size < 1 or max_attempts < 1 or timeout_s <= 0:
            raise ValueError("batch_size and max_attempts must be >= 1 and timeout_s > 0")
        if max_delay_s < 0 or backoff_s < 0 or max_backoff_s < backoff_s:
            raise ValueError("max_delay_s and backoff_s must be >= 0, and max_backoff_s >= backoff_s")
        self.profile_id = profile_id
        self.region = region
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_delay_s = max_delay_s
        self.max_backoff_s = max_backoff_s
        self._own_outbox = not isinstance(outbox, Outbox)
        self.outbox = outbox if isinstance(outbox, Outbox) else Outbox(outbox)
        self._own_channel = channel is None
        if channel is not None:
            self._channel = channel
        elif tls is not None:
            self._channel = grpc.secure_channel(target, tls.credentials(), options=CHANNEL_OPTIONS)  # type: ignore[arg-type]
        else:
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)  # type: ignore[arg-type]
        self._stub = signals_pb2_grpc.SignalAggregatorStub(self._channel)
        # Sends the stored bytes as they are: a resend is byte for byte the first send.
        self._ingest = self._channel.unary_unary(
            _INGEST, request_serializer=None, response_deserializer=signals_pb2.IngestResponse.FromString
        )
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self._lock = threading.RLock()
        self._failures = 0
        self._next_try = 0.0
        self.stats = DeliveryStats()

    # --- queueing ------------------------------------------------------------------------------------

    def add(self, interests: Iterable[Signal]) -> int:
        """Store signals durably in the outbox (on disk when this returns); full batches are sealed now.

        Returns how many were stored: none while the wearer is opted out or a deletion is pending.
        """
        interests = list(interests)
        with self._lock:
            if self.opted_out or self.deletion_pending:
                self.stats.refused_signals += len(interests)
                return 0
            added = self.outbox.add(self.region, interests)
            self.outbox.seal(self.profile_id, self.batch_size)
            return added

    @property
    def pending_batches(self) -> int:
        """Sealed batches waiting, plus one for signals not yet in a batch."""
        stats = self.outbox.stats()
        return stats.queued_batches + (1 if stats.unsealed_signals else 0)

    def outbox_stats(self) -> OutboxStats:
        return self.outbox.stats()

    # --- sending -------------------------------------------------------------------------------------

    def due(self, now: float | None = None) -> bool:
        """True when a send is worth the radio now: a full batch (or a deletion) waits, or the oldest
        signal has waited ``max_delay_s``; and the backoff after the last failure has passed."""
        if time.monotonic() < self._next_try:
            return False
        if self.deletion_pending or self.outbox.next_batch() is not None:
            return True
        oldest = self.outbox.oldest_unsealed_at()
        wall = time.time() if now is None else now
        return oldest is not None and wall - oldest >= self.max_delay_s

    def flush_if_due(self) -> bool | None:
        """Flush when :meth:`due`; None when nothing was due, else what :meth:`flush` returned.

        Firmware calls this after each utterance and from a timer; it is cheap when nothing is due.
        """
        with self._lock:
            return self.flush() if self.due() else None

    def flush(self) -> bool:
        """Send every queued signal now, oldest batch first; True when nothing is left pending.

        Stops at the first batch that still fails with a retryable status after ``max_attempts`` (it
        stays queued, in order, with its id, and :meth:`due` waits a growing, jittered backoff before the
        next try). Batches refused for good are set aside and counted.
        """
        with self._lock:
            if self.deletion_pending and self._deliver_deletion() is DeletionStatus.PENDING:
                return self._failed()
            if self.opted_out:
                return True
            self.outbox.seal(self.profile_id, self.batch_size, partial=True)
            while (batch := self.outbox.next_batch()) is not None:
                if not self._send(batch):
                    return self._failed()
            self._failures = 0
            self._next_try = 0.0
            return True

    def _failed(self) -> bool:
        self._failures += 1
        delay = min(self.max_backoff_s, self.backoff_s * 2**self._failures)
        self._next_try = time.monotonic() + random.uniform(delay / 2, delay)
        return False

    def _send(self, batch: StoredBatch) -> bool:
        """Deliver one stored batch; False when it must wait (still queued)."""
        size = len(batch.payload)
        for attempt in range(self.max_attempts):
            started = time.perf_counter()
            try:
                reply = self._ingest(batch.payload, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code not in RETRYABLE:
                    self.stats.bytes_sent += size  # the server read the batch and answered
                    self.stats.rejected[code.name] = self.stats.rejected.get(code.name, 0) + 1
                    self.outbox.set_aside(batch.batch_id, code.name)
                    # Loud on purpose: a missing or revoked credential sets every batch aside.
                    log.error(
                        "the aggregator refused a batch of %d signals for good (%s: %s); it is set aside%s",
                        batch.signals,
                        code.name,
                        exc.details(),  # type: ignore[attr-defined]
                        " (is the device's token missing or revoked?)"
                        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                        else "",
                    )
                    return True
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.stats.bytes_sent += size
                if attempt + 1 < self.max_attempts:
                    self.stats.retries += 1
                    self._sleep_backoff(attempt)
                continue
            self.stats.latencies_ms.append((time.perf_counter() - started) * 1000)
            self.stats.bytes_sent += size
            self.stats.batches_sent += 1
            if reply.duplicate:
                self.stats.duplicates += 1
            else:
                self.stats.signals_sent += batch.signals
            self.outbox.acknowledge(batch.batch_id)
            return True
        return False

    def _sleep_backoff(self, attempt: int) -> None:
        # Exponential backoff with full jitter, so many devices do not retry in step.
        time.sleep(random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt)))

    # --- the wearer's controls -----------------------------------------------------------------------

    @property
    def opted_out(self) -> bool:
        return self.outbox.get_state(_OPTED_OUT) is not None

    def set_opt_out(self, opted_out: bool) -> int:
        """The wearer's switch, remembered in the outbox across restarts. Opting out erases every queued
        signal at once and refuses new ones; returns the number of signals erased."""
        with self._lock:
            if not opted_out:
                self.outbox.set_state(_OPTED_OUT, None)
                return 0
            self.outbox.set_state(_OPTED_OUT, "1")
            return self.outbox.purge()

    @property
    def deletion_pending(self) -> bool:
        return self.outbox.get_state(_DELETE_PENDING) == self.profile_id

    def delete_profile(self) -> DeletionStatus:
        """The wearer's deletion request: erase the outbox and the local ledger, then ask the aggregator
        to erase the profile.

        The request is recorded in the outbox first and stays there until the aggregator confirms it (or
        its refusal proves it already happened, see the module docstring): when it cannot be confirmed
        now, :attr:`DeletionStatus.PENDING` is returned and every later :meth:`flush` tries again, even
        after a reboot; until then nothing is queued or sent. The aggregator also revokes the device's
        token, so the device must be enrolled again, under a new profile id, to send more.
        """
        with self._lock:
            if not self.deletion_pending:
                self.outbox.set_state(_DELETION, json.dumps({"requested_at": time.time(), "attempts": 0}))
                self.outbox.set_state(_DELETE_PENDING, self.profile_id)
            self.outbox.purge()
            self.outbox.clear_ledger()
            return self._deliver_deletion()

    def _deliver_deletion(self) -> DeletionStatus:
        request = signals_pb2.DeleteProfileRequest(profile_id=self.profile_id)
        for attempt in range(self.max_attempts):
            previous = self._deletion_maybe_applied()
            try:
                reply = self._stub.DeleteProfile(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.UNAUTHENTICATED and previous:
                    return self._deletion_settled(DeletionStatus.ALREADY_ERASED)
                self._deletion_failed(code.name, maybe_applied=code in RETRYABLE)
                if code not in RETRYABLE:
                    # Not proof of anything: the request stays pending, the device silent.
                    log.error(
                        "the aggregator refused the deletion request (%s: %s); it stays pending",
                        code.name,
                        exc.details(),  # type: ignore[attr-defined]
                    )
                    return DeletionStatus.PENDING
                if attempt + 1 < self.max_attempts:
                    self._sleep_backoff(attempt)
                continue
            return self._deletion_settled(
                DeletionStatus.ERASED if reply.deleted else DeletionStatus.NOTHING_TO_ERASE
            )
        return DeletionStatus.PENDING

    def _deletion_doc(self) -> dict[str, object]:
        try:
            doc = json.loads(self.outbox.get_state(_DELETION) or "{}")
        except ValueError:
            doc = {}
        return doc if isinstance(doc, dict) else {}

    def _deletion_maybe_applied(self) -> bool:
        """True when an earlier attempt may have reached the aggregator and been applied (it failed with
        a transient code, not after a refusal of the token), so a revoked token now proves it was."""
        return self._deletion_doc().get("maybe_applied") is True

    def _deletion_failed(self, code: str, maybe_applied: bool) -> None:
        doc = self._deletion_doc()
        attempts = doc.get("attempts", 0)
        doc.update(
            attempts=(attempts if isinstance(attempts, int) else 0) + 1, last_code=code, last_at=time.time()
        )
        if code == grpc.StatusCode.UNAUTHENTICATED.name:
            # The token was refused before any attempt could have been applied: a later refusal proves
            # nothing either.
            doc["token_refused"] = True
        if maybe_applied and not doc.get("token_refused"):
            doc["maybe_applied"] = True
        self.outbox.set_state(_DELETION, json.dumps(doc))

    def _deletion_settled(self, status: DeletionStatus) -> DeletionStatus:
        self.outbox.set_state(_DELETION, json.dumps({"status": status.value, "at": time.time()}))
        self.outbox.set_state(_DELETE_PENDING, None)
        log.info("deletion request settled: %s", status.value)
        return status

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()
        if self._own_outbox:
            self.outbox.close()
