"""Sotto aggregator: validates on-device interest signals and merges them into decaying profiles."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sotto.server.config import ServerConfig, ServerTls
from sotto.server.store import Store, open_store

if TYPE_CHECKING:
    from sotto.server.service import create_server

__all__ = ["ServerConfig", "ServerTls", "Store", "create_server", "open_store"]


def __getattr__(name: str) -> Any:
    # The service needs the 'server' extra (health checking, reflection, metrics); imported on first use,
    # so that `sotto-server` can say which extra is missing instead of failing with a traceback.
    if name == "create_server":
        from sotto.server.service import create_server

        return create_server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
