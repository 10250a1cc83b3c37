"""Prometheus metrics of one aggregator, in a registry of its own, served over HTTP on request.

No label ever holds a profile id, a token or a category: label values come from fixed sets (method
names, status codes, outcomes), so the number of time series stays bounded.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

#: The store operations whose failures are counted (``sotto_store_errors_total{operation=...}``).
STORE_OPERATIONS = (
    "apply_batch",
    "get_profile",
    "delete_profile",
    "audience_size",
    "find_credential",
    "purge",
)
#: Seconds; Ingest is a millisecond-scale transaction, the tail is what an operator looks for.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The aggregator's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batches = Counter(
            "sotto_batches",
            "Batches acknowledged, by outcome (applied, or duplicate of an applied one)",
            ["outcome"],
            registry=self.registry,
        )
        self.signals = Counter("sotto_signals", "Signals merged into profiles", registry=self.registry)
        self.rejections = Counter(
            "sotto_rejections",
            "Calls answered with an error status, by method and reason (the status code, lower case)",
            ["method", "reason"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "sotto_refusals",
            "Calls the aggregator refused, by method and reason (a fixed label: no_credential, "
            "unknown_token, rate_limited, overloaded, unparseable, invalid_argument, ...)",
            ["method", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sotto_rpc_duration_seconds",
            "Time to answer a call, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "sotto_store_errors",
            "Store operations that failed (the call was answered UNAVAILABLE), by operation",
            ["operation"],
            registry=self.registry,
        )
        self.purged = Counter(
            "sotto_purged_rows",
            "Rows removed by the retention purge, by kind (entries, profiles, batches)",
            ["kind"],
            registry=self.registry,
        )
        # A timestamp rather than a counter of runs, so that an alert can say "no purge for N hours"
        # whether the purge loop died, hangs on the store or was never started.
        self.last_purge = Gauge(
            "sotto_purge_last_success_timestamp_seconds",
            "Unix time of the last retention purge that completed (0: none yet in this process)",
            registry=self.registry,
            # Under `serve --workers N` only worker 0 purges: the latest purge of any worker, one series.
            multiprocess_mode="max",
        )
        self.audiences = Counter(
            "sotto_audience_queries",
            "AudienceSize answers, by result (answered, too_small)",
            ["result"],
            registry=self.registry,
        )
        self.deletions = Counter(
            "sotto_profile_deletions", "DeleteProfile calls that erased a profile", registry=self.registry
        )
        # Under `serve --workers N` the counters above are summed over the workers; this one keeps a
        # series per live worker (the collector adds a pid label), so an operator sees the spread.
        self.process_calls = Gauge(
            "sotto_process_calls",
            "Calls answered by this process since it started (one series per worker process, labelled "
            "pid, under serve --workers)",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        # Series that exist from the start, at 0, so that rates and alerts work before the first event.
        for outcome in ("applied", "duplicate"):
            self.batches.labels(outcome)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)

    def observe(self, method: str, code: grpc.StatusCode | None, seconds: float) -> None:
        """Record one finished call; ``code`` None or OK is a success."""
        self.latency.labels(method).observe(seconds)
        self.process_calls.inc()
        if code is not None and code is not grpc.StatusCode.OK:
            self.rejections.labels(method, code.name.lower()).inc()

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` over HTTP on ``host:port`` (port 0 picks one) from a daemon thread."""
        return _serve(self.registry, host, port)


def serve_merged(directory: str, host: str, port: int) -> MetricsServer:
    """Serve ``/metrics`` merged over every process that writes into ``directory`` (prometheus-client's
    multiprocess mode: the worker processes ran with ``PROMETHEUS_MULTIPROC_DIR=directory``)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return _serve(registry, host, port)


def _serve(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    try:
        httpd, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise RuntimeError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    return MetricsServer(httpd, thread)


class MetricsServer:
    """A running ``/metrics`` endpoint."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
