"""Store backends, chosen by URL scheme; a driver module is imported only when its scheme is used.

sqlite:///sotto.db          relative path
sqlite:////var/lib/sotto.db absolute path
sqlite:///:memory:          in memory (tests)
/var/lib/sotto.db           a bare path means SQLite
postgresql://...            not available in this build yet
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from server.store.base import (
    ApplyResult,
    Batch,
    BatchConflictError,
    HalfLifeMismatchError,
    Signal,
    Store,
    StoreConfigError,
    StoredProfile,
    StoreError,
)

__all__ = [
    "ApplyResult",
    "Batch",
    "BatchConflictError",
    "HalfLifeMismatchError",
    "Signal",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoredProfile",
    "open_store",
    "sqlite_path",
]

Opener = Callable[[str, float], Awaitable[Store]]


def sqlite_path(url: str) -> str:
    """The file path (or ``:memory:``) of a ``sqlite:///PATH`` URL or a bare path."""
    if "://" not in url:
        path = url
    else:
        parts = urlsplit(url)
        if parts.netloc or parts.query or parts.fragment:
            raise StoreConfigError(
                f"bad SQLite URL {url!r}: expected sqlite:///relative/path.db, sqlite:////absolute/path.db "
                "or sqlite:///:memory: (no host, no query)"
            )
        path = url[len("sqlite:///") :]
    if not path:
        raise StoreConfigError(f"bad SQLite URL {url!r}: the database path is empty")
    return path


async def _open_sqlite(url: str, half_life_days: float) -> Store:
    from server.store.sqlite import SQLiteStore

    return await SQLiteStore.open(sqlite_path(url), half_life_days)


async def _open_postgresql(url: str, half_life_days: float) -> Store:
    raise StoreConfigError(
        "postgresql:// stores are not available in this build yet; use sqlite:///PATH for now"
    )


_OPENERS: dict[str, Opener] = {
    "sqlite": _open_sqlite,
    "postgresql": _open_postgresql,
}


async def open_store(url: str, half_life_days: float) -> Store:
    """Open (creating on first use) the store at ``url``; see the module doc for the URL forms.

    Raises ``StoreConfigError`` for an unknown scheme, a malformed URL, an invalid half-life or one that
    differs from the half-life the database was created with (``HalfLifeMismatchError``).
    """
    if not (math.isfinite(half_life_days) and half_life_days > 0):
        raise StoreConfigError(f"half_life_days must be a positive number of days, got {half_life_days}")
    scheme = urlsplit(url).scheme if "://" in url else "sqlite"
    opener = _OPENERS.get(scheme)
    if opener is None:
        raise StoreConfigError(
            # The URL itself is not echoed: it may carry a password.
            f"unknown store URL scheme {scheme!r}; expected one of: {', '.join(_OPENERS)} "
            "(or a bare file path for SQLite)"
        )
    return await opener(url, half_life_days)
