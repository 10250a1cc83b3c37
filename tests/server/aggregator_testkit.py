"""Helpers of the aggregator tests: a fixed clock, batch builders and a running server."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path

import grpc

from server import ServerConfig, Store, create_server, open_store
from server.decay import day_number
from sotto.v1 import signals_pb2, signals_pb2_grpc

TODAY = dt.date(2026, 3, 1)
TODAY_DAY = day_number(TODAY)
PROFILE = "profile_0001"
MUSIC, ELECTRONICS, MOVIES = "338", "632", "324"
SENSITIVE = "286"  # Medical Health (subtree)


class Clock:
    """A settable clock for ``ServerConfig.clock``."""

    def __init__(self, date: dt.date) -> None:
        self.date = date

    def __call__(self) -> dt.date:
        return self.date


def signal(category_id: str = MUSIC, weight_level: int = 4, day_offset: int = 0) -> signals_pb2.Signal:
    return signals_pb2.Signal(category_id=category_id, weight_level=weight_level, day_offset=day_offset)


def make_batch(
    signals: Iterable[signals_pb2.Signal] | None = None, **fields: object
) -> signals_pb2.SignalBatch:
    """A valid batch (new random id, two signals on TODAY) with ``fields`` overridden."""
    values: dict[str, object] = {
        "batch_id": os.urandom(16),
        "profile_id": PROFILE,
        "region": "US",
        "taxonomy_version": "3.1",
        "base_day": TODAY_DAY,
    }
    values.update(fields)
    chosen = [signal(MUSIC, 4), signal(ELECTRONICS, 2, 1)] if signals is None else list(signals)
    return signals_pb2.SignalBatch(signals=chosen, **values)  # type: ignore[arg-type]


def row_counts(path: Path) -> dict[str, int]:
    """Rows per data table, read with plain sqlite3 (independent of the store under test)."""
    with closing(sqlite3.connect(path)) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("batches", "profiles", "scores")
        }


@dataclass
class Running:
    """A started in-process aggregator and a client channel to it."""

    server: grpc.aio.Server
    port: int
    store: Store
    channel: grpc.aio.Channel

    @property
    def stub(self) -> signals_pb2_grpc.SignalAggregatorStub:
        return signals_pb2_grpc.SignalAggregatorStub(self.channel)


@asynccontextmanager
async def running(url: str, config: ServerConfig, half_life_days: float = 30) -> AsyncIterator[Running]:
    """Open a store at ``url``, serve it on a free port and connect to it; tear everything down after."""
    store = await open_store(url, half_life_days)
    try:
        server, port = await create_server("127.0.0.1:0", store, config)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield Running(server, port, store, channel)
        finally:
            await server.stop(None)
    finally:
        await store.close()
