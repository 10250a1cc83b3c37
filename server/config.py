"""Options of the aggregator service, grouped in dataclasses."""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sotto.policy import Policy
from sotto.wire import MAX_EPSILON, day_number


def utc_today() -> dt.date:
    """Today's date in UTC (the default clock)."""
    return dt.datetime.now(dt.UTC).date()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (``127.0.0.0/8``, ``[::1]``)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # any other host name may resolve to anything
        return False


def read_pem(path: str | Path, what: str) -> bytes:
    """The PEM file at ``path``; ``ValueError`` naming the file and ``what`` it should hold otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{path} is not PEM; expected the {what} in PEM format (-----BEGIN ...)")
    return data


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The server's TLS key and certificate chain (PEM). With ``client_ca``, TLS is mutual: every client
    must present a certificate signed by it (gRPC cannot make client certificates optional)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> ServerTls:
        """Read the PEM files; ``ValueError`` names the file that is missing or not PEM."""
        return cls(
            certificate_chain=read_pem(cert, "TLS certificate chain"),
            private_key=read_pem(key, "TLS private key"),
            client_ca=None if client_ca is None else read_pem(client_ca, "client CA certificate"),
        )

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials for ``add_secure_port``."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the service needs besides the store.

    The half-life is not here: it belongs to the stored sums, so the store owns it (see ``open_store``).
    """

    #: Taxonomy, sensitive list and region table; the bundled models folder by default.
    policy: Policy = field(default_factory=Policy.load)
    max_signals_per_batch: int = 100
    max_receive_message_bytes: int = 64 * 1024
    #: Injectable so that tests are deterministic.
    clock: Callable[[], dt.date] = utc_today
    #: Check credentials on every call. ``sotto-server serve`` always does; only an embedding on a
    #: loopback address (tests) may turn it off, and then every caller may do everything, unlimited
    #: (the rate limit is per authenticated device).
    require_auth: bool = False
    #: None serves plaintext, which ``create_server`` allows on loopback only, unless ``insecure``.
    tls: ServerTls | None = None
    #: Allow plaintext on a non-loopback address (TLS terminated by a proxy in front).
    insecure: bool = False
    #: Per-device token bucket: sustained calls per second and the burst allowed on top.
    rate_per_second: float = 1.0
    rate_burst: int = 60
    #: Authenticated aggregator calls in progress at once; RESOURCE_EXHAUSTED beyond it. Health checks,
    #: reflection and refusals do not count against it (gRPC's own ceiling sits above it).
    max_concurrent_rpcs: int = 1000
    #: HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    max_streams_per_connection: int = 100
    #: Connections the process keeps open at once (gRPC's ``grpc.max_allowed_incoming_connections``): one
    #: more is closed as soon as it is accepted, before any HTTP/2 or TLS work, so that a flood of
    #: connections cannot take the file descriptors and memory that the open connections, the store and
    #: the metrics endpoint need. Per process: ``serve --workers N`` keeps up to N times as many.
    #: ``sotto-server serve`` raises the open-file limit to fit (``limits.ensure_open_files``); so should
    #: an embedding, or the limit (often 1,024) stops accepting connections first.
    max_connections: int = 10_000
    #: Seconds an unauthenticated call waits for its refusal (at most 100 wait at once; see
    #: ``Guard._hold_back``). ``sotto-server serve`` uses 1; 0 answers at once.
    unauthenticated_delay_s: float = 0.0
    #: The longest the server works on one call; the client's own deadline applies when shorter.
    request_timeout_s: float = 10.0
    #: Entries not reinforced for this many days are purged; older batches are refused.
    retention_days: int = 180
    #: Seconds between retention purges (the first runs at start); 0 turns the purge off.
    purge_interval_s: float = 3600.0
    #: k of k-anonymity: AudienceSize reports no count below this many profiles.
    min_audience: int = 50
    #: None accepts batches with or without local differential privacy (epsilon up to edge.ldp's
    #: MAX_EPSILON); a number requires every batch to be noised with at most this epsilon.
    max_ldp_epsilon: float | None = None
    #: Let other processes of the same user bind the same port (SO_REUSEPORT), so the kernel spreads
    #: connections over them: only for ``serve --workers N``, whose parent reserved the port first.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        checks: list[tuple[str, float, float]] = [
            ("max_signals_per_batch", self.max_signals_per_batch, 1),
            ("max_receive_message_bytes", self.max_receive_message_bytes, 1024),
            ("rate_burst", self.rate_burst, 1),
            ("max_concurrent_rpcs", self.max_concurrent_rpcs, 1),
            ("max_streams_per_connection", self.max_streams_per_connection, 1),
            ("max_connections", self.max_connections, 1),
            ("retention_days", self.retention_days, 1),
            ("purge_interval_s", self.purge_interval_s, 0),
            ("unauthenticated_delay_s", self.unauthenticated_delay_s, 0),
            ("min_audience", self.min_audience, 2),
        ]
        for name, value, minimum in checks:
            if not value >= minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {value}")
        if self.max_ldp_epsilon is not None and not (0 < self.max_ldp_epsilon <= MAX_EPSILON):
            raise ValueError(f"max_ldp_epsilon must be in (0, {MAX_EPSILON:g}], got {self.max_ldp_epsilon}")
        for name, value in (
            ("rate_per_second", self.rate_per_second),
            ("request_timeout_s", self.request_timeout_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")

    def today(self) -> int:
        """Today's day number according to the configured clock."""
        return day_number(self.clock())

    def retention_cutoff(self) -> int:
        """The oldest day whose data is kept today: anything last reinforced before it is purged."""
        return self.today() - self.retention_days
