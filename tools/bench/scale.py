"""Benchmark ``scale``: aggregator throughput and server CPU per signal for 1 and N worker processes.

    python -m tools.bench scale --store sqlite --store postgresql --workers 1,2
    python -m tools.bench scale --store sharded --shards 1,2,4 --workers 1,2  # fresh PL/Proxy clusters
    python -m tools.bench scale --db given=plproxy://... --workers 1,2,4      # any store URL

For every store and every worker count it starts ``sotto-server serve --workers W`` with merged metrics,
drives it with the load generator (``tools.bench load``) in closed loops (each device sends its next
batch when the last is answered) over enough HTTP/2 connections for the kernel to spread them over the
workers, and measures:

- signals/s as the devices saw them (the load generator shares the machine's cores with the server, so
  on a small machine this is the machine's figure, not the server's);
- server CPU-seconds per 10^4 signals: user + system time of the server's processes (the parent and
  every worker, from /proc) over the run, divided by the signals the server itself counted in the same
  window (``sotto_signals_total`` from its merged metrics). This is the figure that transfers to a
  machine with more cores: cores needed = signals/s x CPU-seconds per signal;
- how the calls were spread over the workers (``sotto_process_calls`` per worker pid).

``--store sqlite|postgresql`` benchmarks a fresh database (a scratch schema for PostgreSQL, dropped
afterwards); ``--store sharded`` a fresh PL/Proxy cluster of each of ``--shards`` shard databases, and
reports besides the **database CPU-seconds per 10^4 signals**, proxy and shards apart
(``tools.bench.shards``); ``--db LABEL=URL`` benchmarks any store URL ``sotto-server serve --db``
accepts, as it is (tokens and batches are written into it). Runs are sequential, so workers never
compete with another run.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from tools.bench import shards as sharding
from tools.bench.servers import cpu_seconds, fresh_store, process_tree, run_load, scrape, serve, write_tokens

#: HTTP/2 connections per worker: the kernel hands each new connection to one worker (SO_REUSEPORT
#: hashes the 4-tuple), so a few per worker keep the spread even.
CONNECTIONS_PER_WORKER = 8
STORE_NAMES = ("sqlite", "postgresql", "sharded")


def add_arguments(parser: argparse.ArgumentParser, load_options: bool = True) -> None:
    """The options of ``scale``; ``load_options`` False leaves out the ones ``aggregator`` also defines."""
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated worker counts to compare (serve --workers)"
    )
    parser.add_argument(
        "--db",
        action="append",
        default=[],
        metavar="LABEL=URL",
        help="benchmark this store URL as it is, under LABEL (repeatable; e.g. a plproxy:// cluster)",
    )
    if not load_options:
        return
    parser.add_argument(
        "--store",
        action="append",
        choices=STORE_NAMES,
        help="a fresh store to benchmark (repeatable; default sqlite unless --db is given)",
    )
    parser.add_argument("--devices", type=int, default=100, help="concurrent devices (closed loops)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--postgres-url", help="PostgreSQL server (a fresh schema is used and dropped)")
    sharding.add_arguments(parser)


def parse_workers(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; ``ValueError`` for anything but positive integers."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--workers: expected comma-separated positive integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--workers: expected comma-separated positive integers, got {text!r}")
    return counts


def parse_db(text: str) -> tuple[str, str]:
    """``"LABEL=URL"`` -> ``(LABEL, URL)``."""
    label, sep, url = text.partition("=")
    if not (sep and label and url) or "://" in label:
        raise ValueError(f"--db: expected LABEL=URL, for example sharded=plproxy://host/proxy; got {text!r}")
    return label, url


def run_one(
    label: str,
    url: str,
    workers: int,
    args: argparse.Namespace,
    folder: Path,
    databases: list[sharding.Database] | None = None,
) -> dict[str, Any]:
    """One server with ``workers`` processes on ``url``, one closed-loop load run against it; with
    ``databases`` (a fresh sharded cluster's), their PostgreSQL CPU time over the same window."""
    tokens = folder / f"tokens-{label}-{workers}.json"
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", label)[:40]
    profiles = [f"bench-{stem}-{workers}-{n:05d}" for n in range(args.devices)]
    write_tokens(url, profiles, tokens)
    # Devices are spread over the connections in turn: a connection without a device carries nothing.
    channels = str(min(CONNECTIONS_PER_WORKER * workers, args.devices))
    with serve(url, args.devices, workers) as (proc, target, metrics):
        load_before = os.getloadavg()[0]
        tree = process_tree(proc.pid)
        database_cpu = sharding.DatabaseCpu(databases) if databases else None
        signals_before, _ = scrape(metrics)
        if database_cpu:
            database_cpu.start()
        cpu_before = sum(cpu_seconds(pid) for pid in tree)
        report, load_cpu_s = run_load(
            target,
            tokens,
            *("--batch-size", str(args.batch_size), "--duration", str(args.duration)),
            *("--warmup", str(args.warmup), "--channels", channels),
        )
        cpu_s = sum(cpu_seconds(pid) for pid in tree) - cpu_before
        if database_cpu:
            database_cpu.stop()
        signals_after, calls = scrape(metrics)
        load_after = os.getloadavg()[0]
    served = signals_after - signals_before
    run = {
        "store": label,
        "workers": workers,
        "devices": report["devices"],
        "batch_size": report["batch_size"],
        "duration_s": report["duration_s"],
        "calls": report["calls"],
        "signals": report["signals"],
        "signals_per_s": report["signals"] / report["duration_s"],
        "errors": report["errors"],
        # Over the warm-up and the measured window alike: a ratio of two counts over the same window.
        "server_signals": served,
        "server_cpu_s": cpu_s,
        "server_cpu_s_per_1e4_signals": cpu_s / served * 1e4 if served else 0.0,
        "load_generator_cpu_s": load_cpu_s,
        "calls_per_worker": sorted(calls.values(), reverse=True),
        "load_average_1m_before": load_before,
        "load_average_1m_after": load_after,
    }
    if database_cpu:
        run["shards"] = sum(1 for db in databases or [] if db.role == "shard")
        run["database"] = database_cpu.report(served)
    return run


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runner of ``python -m tools.bench scale``: (config, results) for ``tools.bench``."""
    try:
        counts = parse_workers(args.workers)
        extra = [parse_db(text) for text in args.db]
        stores = args.store or ([] if extra else ["sqlite"])
        shard_counts: list[int] = []
        if "sharded" in stores:
            shard_counts = sharding.parse_shards(args.shards)
            proxy_url, shard_urls = sharding.servers(args)
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None
    if args.smoke:
        # Enough devices to keep every connection busy (they are spread over the connections in turn).
        devices = CONNECTIONS_PER_WORKER * max(counts)
        args = argparse.Namespace(**{**vars(args), "devices": devices, "duration": 1.0, "warmup": 0.3})
    runs = []
    with tempfile.TemporaryDirectory(prefix="sotto-bench-scale-") as tmp:
        for store in stores:
            if store == "sharded":
                for shards in shard_counts:
                    for workers in counts:
                        folder = Path(tmp) / f"sharded-{shards}-{workers}"
                        folder.mkdir()
                        with sharding.fresh_cluster(proxy_url, shard_urls, shards) as cluster:
                            run = run_one(store, cluster.url, workers, args, folder, cluster.databases)
                            run["database"]["tables"] = cluster.tables()
                            runs.append(run)
                continue
            for workers in counts:
                folder = Path(tmp) / f"{store}-{workers}"
                folder.mkdir()
                with fresh_store(store, args.postgres_url, folder) as url:
                    runs.append(run_one(store, url, workers, args, folder))
        for label, url in extra:
            for workers in counts:
                runs.append(run_one(label, url, workers, args, Path(tmp)))
    config = {
        "stores": [*stores, *(label for label, _ in extra)],
        "workers": counts,
        **({"shards": shard_counts, "shard_servers": len(shard_urls)} if "sharded" in stores else {}),
        "devices": args.devices,
        "batch_size": args.batch_size,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections_per_worker": CONNECTIONS_PER_WORKER,
        "cpu": "server_cpu_s: user+system seconds of the serve parent and all its workers (/proc), over "
        "warm-up and measured window; per 10^4 of the signals the server counted in that window",
        "load": "tools.bench load in a process of its own on the same machine, closed loops",
    }
    if "sharded" in stores:
        config["database_cpu"] = (
            "sharded runs: a fresh cluster per run, one scratch database (one partition) per shard "
            "round-robin over the shard servers, a scratch proxy database; user+system seconds of each "
            "database's client backends (/proc, sampled every "
            f"{sharding.SAMPLE_INTERVAL_S} s) over the same window as server_cpu_s; background_cpu_s "
            "is each server's background processes, shared with whatever else the server runs"
        )
    return config, {"runs": runs}


def table(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The printed table of a ``scale`` result."""
    rows = []
    for r in document["results"]["runs"]:
        spread = "/".join(f"{c:.0f}" for c in r["calls_per_worker"])
        db = r.get("database")
        rows.append(
            [
                r["store"],
                str(r.get("shards", "-")),
                str(r["workers"]),
                f"{r['signals_per_s']:.0f}",
                f"{r['server_cpu_s_per_1e4_signals']:.3f}",
                f"{db['proxy_cpu_s_per_1e4_signals']:.3f}" if db else "-",
                f"{db['shards_cpu_s_per_1e4_signals']:.3f}" if db else "-",
                "/".join(f"{c:.1f}" for c in db["shard_cpu_s"]) if db else "-",
                f"{r['server_cpu_s']:.1f}",
                f"{r['load_generator_cpu_s']:.1f}",
                spread,
                f"{r['load_average_1m_before']:.1f}-{r.get('load_average_1m_after', float('nan')):.1f}",
                ", ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0",
            ]
        )
    header = [
        "store",
        "shards",
        "workers",
        "signals/s",
        "server CPU s / 10^4 signals",
        "proxy DB CPU s / 10^4",
        "shards DB CPU s / 10^4",
        "CPU s per shard",
        "server CPU s",
        "load gen CPU s",
        "calls per worker",
        "load avg",
        "errors",
    ]
    size = document["config"]["batch_size"]
    return [(f"scale: Ingest of {size}-signal batches, closed loops, loopback", header, rows)]
