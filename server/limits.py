"""Limits of one aggregator process: per-device rate limiting (one token bucket per key, in process memory)
and the open-file limit that the cap on connections needs.

Each aggregator process limits on its own, so N processes behind a load balancer allow up to N times the
configured rate to a device that spreads its calls; a device normally keeps one connection, and so one
process.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

#: Buckets kept before full ones are dropped (a full bucket is the same as no bucket).
MAX_BUCKETS = 100_000


class RateLimiter:
    """Token buckets: a key may make ``burst`` calls at once and ``rate`` calls per second after that."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate > 0 and burst >= 1):
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        #: key -> (tokens, time of the last update)
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - then) * self._rate)

    def acquire(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when allowed, else the seconds until a token is available."""
        now = self._clock()
        tokens = self._level(key, now)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self._rate
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._buckets = {k: v for k, v in self._buckets.items() if self._level(k, now) < self._burst}
        return 0.0


#: File descriptors a process needs besides its gRPC connections: the store's files or connections, the
#: metrics endpoint and its clients, gRPC's own (listening sockets, wakeup fds) and the log.
RESERVED_FILES = 256


def ensure_open_files(connections: int) -> int:
    """Raise this process's open-file limit (RLIMIT_NOFILE) so that ``connections`` connections fit with
    ``RESERVED_FILES`` to spare: without that, a flood of connections below the connection cap would meet
    the limit first (Debian's default is 1,024), and then every file and socket the process opens fails.
    Returns the soft limit now in force; ``ValueError`` saying why when it cannot be raised that far (the
    hard limit is above an unprivileged process's reach, or above the kernel's ``fs.nr_open``)."""
    needed = connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= needed else needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, new_hard))
    except (ValueError, OSError) as exc:
        raise ValueError(
            f"{connections} connections need an open-file limit of {needed}, but it is {soft} (hard limit "
            f"{hard}) and cannot be raised ({exc})"
        ) from None
    return needed
