"""Store backends, chosen by URL scheme; a driver module is imported only when its scheme is used.

sqlite:///sotto.db          relative path
sqlite:////var/lib/sotto.db absolute path
sqlite:///:memory:          in memory (tests)
/var/lib/sotto.db           a bare path means SQLite
postgresql://USER:PASSWORD@HOST:5432/DBNAME?sslmode=verify-full
postgres://USER:PASSWORD@HOST:5432/DBNAME
                            PostgreSQL (any libpq URL, either scheme; needs the `postgres` extra: psycopg 3
                            and psycopg_pool)
plproxy://USER:PASSWORD@HOST:5432/PROXYDB?cluster=sotto
                            sharded PostgreSQL: the PL/Proxy proxy database (any libpq parameter besides
                            `cluster`, the SQL/MED server naming the partitions; see
                            server/store/plproxy.py and `sotto-server cluster create`)
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from sotto.server.store.base import (
    ApplyResult,
    Batch,
    BatchConflictError,
    Credential,
    Entry,
    HalfLifeMismatchError,
    MinorProfileError,
    PurgeResult,
    Role,
    Signal,
    Store,
    StoreConfigError,
    StoredProfile,
    StoreError,
    StoreUnavailableError,
)

__all__ = [
    "ApplyResult",
    "Batch",
    "BatchConflictError",
    "Credential",
    "Entry",
    "HalfLifeMismatchError",
    "MinorProfileError",
    "PurgeResult",
    "Role",
    "Signal",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
    "StoredProfile",
    "open_store",
    "sqlite_path",
]

Opener = Callable[[str, float | None], Awaitable[Store]]


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


async def _open_sqlite(url: str, half_life_days: float | None) -> Store:
    from sotto.server.store.sqlite import SQLiteStore

    return await SQLiteStore.open(sqlite_path(url), half_life_days)


async def _check_postgres_extra() -> None:
    missing = [name for name in ("psycopg", "psycopg_pool") if importlib.util.find_spec(name) is None]
    if missing:
        raise StoreConfigError(
            f"PostgreSQL stores need {' and '.join(missing)}: pip install 'sotto[postgres]'"
        )


async def _open_postgresql(url: str, half_life_days: float | None) -> Store:
    await _check_postgres_extra()
    from sotto.server.store.postgres import PostgresStore

    return await PostgresStore.open(url, half_life_days)


async def _open_plproxy(url: str, half_life_days: float | None) -> Store:
    await _check_postgres_extra()
    from sotto.server.store.plproxy import PlProxyStore

    return await PlProxyStore.open(url, half_life_days)


_OPENERS: dict[str, Opener] = {
    "sqlite": _open_sqlite,
    "postgresql": _open_postgresql,
    "postgres": _open_postgresql,  # libpq accepts both spellings
    "plproxy": _open_plproxy,
}


async def open_store(url: str, half_life_days: float | None) -> Store:
    """Open (creating and migrating as needed) the store at ``url``; see the module doc for the URL forms.

    ``half_life_days`` is recorded when the database is new and checked against it afterwards; None
    (for the admin commands, which never touch scores) accepts whatever the database has.

    Raises ``StoreConfigError`` for an unknown scheme, a malformed URL, an unreachable or foreign database,
    an invalid half-life or one that differs from the recorded one (``HalfLifeMismatchError``).
    """
    if half_life_days is not None and not (math.isfinite(half_life_days) and half_life_days > 0):
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
