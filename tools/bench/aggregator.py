"""Benchmark ``aggregator``: signals/s and Ingest p50/p99 against a real server, per store."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench.results import summary
from tools.bench.servers import cpu_seconds, fresh_store, run_load, serve, write_tokens

#: Offered load (signals/s) at which each store's p99 target applies.
TARGET_RATE = {"sqlite": 20_000, "postgresql": 10_000}


def run_aggregator(
    store: str, devices: int, rates: Sequence[float], args: argparse.Namespace, duration: float, warmup: float
) -> list[dict[str, Any]]:
    """One server; a closed-loop run (capacity), then one open-loop run per offered rate (latency under a
    given load), each load in a process of its own."""
    runs = []
    with (
        tempfile.TemporaryDirectory(prefix="sotto-bench-") as tmp,
        fresh_store(store, args.postgres_url, Path(tmp)) as url,
    ):
        tokens = Path(tmp) / "tokens.json"
        write_tokens(url, [f"bench-device-{n:05d}" for n in range(devices)], tokens)
        with serve(url, devices) as (proc, target, _):
            for rate in (0.0, *rates):
                cpu_before = cpu_seconds(proc.pid)
                report, _ = run_load(
                    target,
                    tokens,
                    *("--batch-size", str(args.batch_size), "--duration", str(duration)),
                    *("--warmup", str(warmup), "--rate", str(rate / args.batch_size)),
                )
                cpu_s = cpu_seconds(proc.pid) - cpu_before
                latencies = report["latencies_ms"]
                runs.append(
                    {
                        "store": store,
                        "mode": "open" if rate else "closed",
                        "devices": devices,
                        "offered_signals_per_s": rate or None,
                        "batch_size": report["batch_size"],
                        "duration_s": report["duration_s"],
                        "calls": report["calls"],
                        "signals": report["signals"],
                        "signals_per_s": report["signals"] / report["duration_s"],
                        "batches_per_s": report["calls"] / report["duration_s"],
                        "latency_ms": summary(latencies),
                        "errors": report["errors"],
                        # Includes the warm-up: CPU per signal is a ratio over the whole run.
                        "server_cpu_s": cpu_s,
                    }
                )
    return runs


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    stores = args.store or ["sqlite"]
    if args.smoke:
        devices, rates, duration, warmup = 4, [200.0], 1.0, 0.3
    else:
        devices, duration, warmup = args.devices, args.duration, args.warmup
        rates = [float(x) for x in args.rates.split(",") if x]
    runs = []
    for store in stores:
        wanted = sorted(set(rates) | ({float(TARGET_RATE[store])} if not args.smoke else set()))
        runs += run_aggregator(store, devices, wanted, args, duration, warmup)
    figures = {}
    for store in stores:
        closed = next(r for r in runs if r["store"] == store and r["mode"] == "closed")
        figures[f"{store}_signals_per_s"] = closed["signals_per_s"]
        at_target = [
            r for r in runs if r["store"] == store and r["offered_signals_per_s"] == TARGET_RATE[store]
        ]
        if at_target:
            figures[f"{store}_p99_ms"] = at_target[0]["latency_ms"]["p99"]
    config = {
        "stores": stores,
        "devices": devices,
        "offered_signals_per_s": rates,
        "batch_size": args.batch_size,
        "duration_s": duration,
        "warmup_s": warmup,
        "load": "separate process, grpc.aio, 4 HTTP/2 connections, a bearer token per device, a new batch "
        "id per call. closed: each device sends its next batch when the last is answered (capacity). "
        "open: the devices together offer a fixed rate and latency counts from when a call was due "
        "(the p99 targets apply at 20,000 signals/s on SQLite and 10,000 on PostgreSQL)",
    }
    return config, {"runs": runs, "figures": figures}


def table(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    rows = []
    for r in document["results"]["runs"]:
        lat = r["latency_ms"]
        cpu = r["server_cpu_s"]
        offered = r["offered_signals_per_s"]
        rows.append(
            [
                r["store"],
                str(r["devices"]),
                "closed loop" if offered is None else f"{offered:.0f}",
                f"{r['signals_per_s']:.0f}",
                f"{r['batches_per_s']:.0f}",
                f"{lat['p50']:.1f}",
                f"{lat['p99']:.1f}",
                f"{cpu:.1f}",
                ", ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0",
            ]
        )
    header = [
        "store",
        "devices",
        "offered/s",
        "signals/s",
        "batches/s",
        "p50 ms",
        "p99 ms",
        "server CPU s",
        "errors",
    ]
    size = document["config"]["batch_size"]
    return [(f"aggregator: Ingest of {size}-signal batches, loopback", header, rows)]
