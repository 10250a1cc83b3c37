"""The refusal log: one line per method and reason per interval, with the count of those left out."""

from __future__ import annotations

import logging

import grpc
import pytest

from sotto.server.guard import RefusalLog, bounded


def test_one_line_per_reason_per_interval_with_the_count_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = RefusalLog(interval_s=10, clock=lambda: now[0])
    code = grpc.StatusCode.UNAUTHENTICATED
    with caplog.at_level(logging.INFO, logger="sotto.server.guard"):
        for _ in range(1000):
            refusals.refused("Ingest", code, "no_credential")
        refusals.refused("Ingest", code, "unknown_token")
        now[0] = 10.0
        refusals.refused("Ingest", code, "no_credential")
    assert [r.getMessage() for r in caplog.records] == [
        "event=rpc_refused method=Ingest code=UNAUTHENTICATED reason=no_credential suppressed=0",
        "event=rpc_refused method=Ingest code=UNAUTHENTICATED reason=unknown_token suppressed=0",
        "event=rpc_refused method=Ingest code=UNAUTHENTICATED reason=no_credential suppressed=999",
    ]


def test_status_messages_are_bounded() -> None:
    assert bounded("short") == "short"
    long = bounded("x" * 20_000)
    assert len(long) <= 512
    assert long.endswith("... (20000 characters)")
