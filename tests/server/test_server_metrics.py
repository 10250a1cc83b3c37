"""Prometheus metrics: the /metrics endpoint exposes the counters, and they move with the traffic."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import (
    OTHER,
    PROFILE,
    TODAY_DAY,
    bearer,
    issue_admin_token,
    issue_device_token,
    make_batch,
    running,
)
from prometheus_client.parser import text_string_to_metric_families

from sotto.server import ServerConfig
from sotto.v1 import signals_pb2

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:PORT/metrics, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers.get_content_type() == "text/plain"
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_endpoint_counts_batches_signals_rejections_and_latency(
    auth_config: ServerConfig, db_path: Path
) -> None:
    async def scenario() -> tuple[Samples, Samples]:
        async with running(f"sqlite:///{db_path}", auth_config) as r:
            exporter = r.server.metrics.serve("127.0.0.1", 0)
            try:
                device = bearer(await issue_device_token(r.store, PROFILE))
                admin = bearer(await issue_admin_token(r.store))
                before = await asyncio.to_thread(scrape, exporter.port)
                batch = make_batch()
                for _ in range(2):  # applied, then a duplicate
                    await r.stub.Ingest(batch, timeout=5, metadata=device)
                for bad, metadata in (
                    (make_batch(region="DE"), device),  # invalid
                    (make_batch(), bearer("sotto_nope")),  # unauthenticated
                    (make_batch(profile_id=OTHER), device),  # permission denied
                    (make_batch(base_day=TODAY_DAY - 999), device),  # invalid again
                ):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await r.stub.Ingest(bad, timeout=5, metadata=metadata)
                request = signals_pb2.AudienceSizeRequest(category_id="338")
                await r.stub.AudienceSize(request, timeout=5, metadata=admin)
                await r.stub.DeleteProfile(
                    signals_pb2.DeleteProfileRequest(profile_id=PROFILE), timeout=5, metadata=admin
                )
                after = await asyncio.to_thread(scrape, exporter.port)
            finally:
                exporter.close()
            return before, after

    before, after = asyncio.run(scenario())

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("sotto_batches_total", outcome="applied") == 1
    assert moved("sotto_batches_total", outcome="duplicate") == 1
    assert moved("sotto_signals_total") == 2
    assert moved("sotto_rejections_total", method="Ingest", reason="invalid_argument") == 2
    assert moved("sotto_rejections_total", method="Ingest", reason="unauthenticated") == 1
    assert moved("sotto_rejections_total", method="Ingest", reason="permission_denied") == 1
    assert moved("sotto_rpc_duration_seconds_count", method="Ingest") == 6
    assert moved("sotto_rpc_duration_seconds_count", method="AudienceSize") == 1
    assert moved("sotto_audience_queries_total", result="too_small") == 1
    assert moved("sotto_profile_deletions_total") == 1
    # Exposed from the start, at zero, so that an operator can alert on them before the first incident.
    for operation in ("apply_batch", "find_credential", "purge"):
        assert before[("sotto_store_errors_total", (("operation", operation),))] == 0
    assert PROFILE not in repr(after)
