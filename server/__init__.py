"""Sotto aggregator: validates on-device interest signals and merges them into decaying profiles."""

from sotto.server.config import ServerConfig, ServerTls
from sotto.server.service import create_server
from sotto.server.store import Store, open_store

__all__ = ["ServerConfig", "ServerTls", "Store", "create_server", "open_store"]
