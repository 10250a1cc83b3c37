"""Benchmark ``scale``: aggregator throughput and server CPU per signal for 1 and N worker processes.

    python -m tools.bench scale --store sqlite --store postgresql --workers 1,2
    python -m tools.bench scale --store sharded --shards 1,2,4 --workers 1,2  # fresh PL/Proxy clusters
    python -m tools.bench scale --db given=plproxy://... --workers 1,2,4      # any store URL

For every store and every worker count it starts ``sotto-server serve --workers W`` with merged metrics,
drives it with ``tools.bench_load`` in closed loops (each device sends its next batch when the last is
answered) over enough HTTP/2 connections for the kernel to spread them over the workers, and measures:

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
(``tools.bench_shards``); ``--db LABEL=URL`` benchmarks any store URL ``sotto-server serve --db``
accepts, as it is (tokens and batches are written into it). Runs are sequential, so workers never
compete with another run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tools import bench_shards
from tools.harness import issue_tokens, start_server, stop_server
from tools.paths import child_env

ROOT = Path(__file__).resolve().parents[1]
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
    bench_shards.add_arguments(parser)


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


# --- processes ------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc); 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (the workers of ``serve --workers``), from /proc."""
    tree = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                tree.append(int(entry))
    return tree


@contextmanager
def fresh_store(store: str, postgres_url: str | None, folder: Path) -> Iterator[str]:
    """A URL of an empty store of kind ``store`` (SQLite file in ``folder``, or a scratch schema)."""
    if store == "sqlite":
        yield f"sqlite:///{folder / 'bench.db'}"
        return
    base = (
        postgres_url
        or os.environ.get("SOTTO_BENCH_POSTGRES_URL")
        or os.environ.get("SOTTO_TEST_POSTGRES_URL")
    )
    if not base:
        raise SystemExit(
            "bench: --store postgresql needs --postgres-url (or $SOTTO_BENCH_POSTGRES_URL, "
            "$SOTTO_TEST_POSTGRES_URL); bash tools/postgres.sh prints one for the local server"
        )
    from sotto.server.store.postgres import scratch_schema

    with scratch_schema(base, prefix="bench") as url:
        yield url


@contextmanager
def serve(url: str, workers: int, devices: int) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """``sotto-server serve --workers W`` on a free loopback port: the process, target and metrics URL.

    On leaving, SIGTERM and the exit code are checked: a benchmark whose server did not stop cleanly
    fails rather than publish figures.
    """
    proc, target = start_server(
        url,
        "--metrics-listen",
        "127.0.0.1:0",
        "--workers",
        str(workers),
        "--log-level",
        "WARNING",
        # One device here stands for a busy gateway: the per-device limit (1/s) is not under test.
        "--rate-per-second",
        "1000000",
        "--rate-burst",
        "1000000",
        "--max-concurrent-rpcs",
        str(max(1000, devices * 10)),
    )
    try:
        # Printed right after "listening on", so it may already sit in the pipe's read buffer, where
        # select would not see it: read it directly.
        assert proc.stdout is not None
        metrics = re.fullmatch(r"metrics on (http://\S+/metrics)\n", proc.stdout.readline())
        if not metrics:
            raise SystemExit("bench: unexpected output from sotto-server serve")
        yield proc, target, metrics.group(1)
        proc.terminate()
        code = proc.wait(timeout=60)
        if code != 0:
            raise SystemExit(
                f"bench: the aggregator exited {code}: {proc.stderr.read() if proc.stderr else ''}"
            )
    finally:
        stop_server(proc)


def scrape(url: str) -> tuple[float, dict[str, float]]:
    """(signals merged so far, calls answered per worker pid) from the server's merged metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    signals, calls = 0.0, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sotto_signals_total":
                signals = sample.value
            elif sample.name == "sotto_process_calls":
                calls[sample.labels.get("pid", "single")] = sample.value
    return signals, calls


def _load(target: str, tokens: Path, workers: int, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Run the load generator to completion: its report and its own CPU-seconds."""
    command = [
        sys.executable,
        "-m",
        "tools.bench_load",
        "--target",
        target,
        "--tokens",
        str(tokens),
        "--batch-size",
        str(args.batch_size),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--channels",
        # Devices are spread over the connections in turn: a connection without a device carries nothing.
        str(min(CONNECTIONS_PER_WORKER * workers, args.devices)),
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"bench: the load generator failed:\n{err.read()}")
        out.seek(0)
        return json.loads(out.read()), usage.ru_utime + usage.ru_stime


def run_one(
    label: str,
    url: str,
    workers: int,
    args: argparse.Namespace,
    folder: Path,
    databases: list[bench_shards.Database] | None = None,
) -> dict[str, Any]:
    """One server with ``workers`` processes on ``url``, one closed-loop load run against it; with
    ``databases`` (a fresh sharded cluster's), their PostgreSQL CPU time over the same window."""
    tokens = folder / f"tokens-{label}-{workers}.json"
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", label)[:40]
    profiles = [f"bench-{stem}-{workers}-{n:05d}" for n in range(args.devices)]
    tokens.write_text(issue_tokens(url, *profiles))
    with serve(url, workers, args.devices) as (proc, target, metrics):
        load_before = os.getloadavg()[0]
        tree = process_tree(proc.pid)
        database_cpu = bench_shards.DatabaseCpu(databases) if databases else None
        signals_before, _ = scrape(metrics)
        if database_cpu:
            database_cpu.start()
        cpu_before = sum(cpu_seconds(pid) for pid in tree)
        report, load_cpu_s = _load(target, tokens, workers, args)
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


def bench_scale(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runner of ``python -m tools.bench scale``: (config, results) for ``tools.bench``."""
    try:
        counts = parse_workers(args.workers)
        extra = [parse_db(text) for text in args.db]
        stores = args.store or ([] if extra else ["sqlite"])
        shard_counts: list[int] = []
        if "sharded" in stores:
            shard_counts = bench_shards.parse_shards(args.shards)
            proxy_url, shard_urls = bench_shards.servers(args)
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
                        with bench_shards.fresh_cluster(proxy_url, shard_urls, shards) as cluster:
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
        "load": "tools.bench_load in a process of its own on the same machine, closed loops",
    }
    if "sharded" in stores:
        config["database_cpu"] = (
            "sharded runs: a fresh cluster per run, one scratch database (one partition) per shard "
            "round-robin over the shard servers, a scratch proxy database; user+system seconds of each "
            "database's client backends (/proc, sampled every "
            f"{bench_shards.SAMPLE_INTERVAL_S} s) over the same window as server_cpu_s; background_cpu_s "
            "is each server's background processes, shared with whatever else the server runs"
        )
    return config, {"runs": runs}


def validate(results: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``results`` has the shape ``bench_scale`` writes."""
    runs = results.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError("runs: expected a non-empty list")
    for n, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("store"), str):
            raise ValueError(f"runs[{n}].store: expected a string")
        for key in (
            "workers",
            "calls",
            "signals_per_s",
            "server_signals",
            "server_cpu_s",
            "server_cpu_s_per_1e4_signals",
            "load_generator_cpu_s",
        ):
            value = run.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"runs[{n}].{key}: expected a finite number >= 0, got {value!r}")
        if run["workers"] < 1:
            raise ValueError(f"runs[{n}].workers: expected at least 1")
        spread = run.get("calls_per_worker")
        if not isinstance(spread, list) or len(spread) != run["workers"]:
            raise ValueError(f"runs[{n}].calls_per_worker: expected one count per worker")
        if not isinstance(run.get("errors"), dict):
            raise ValueError(f"runs[{n}].errors: expected an object")
        if "database" in run:
            _validate_database(run, f"runs[{n}]")


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value < float("inf")


def _validate_database(run: dict[str, Any], where: str) -> None:
    """The database figures of a sharded run: one CPU time per shard, finite and not negative."""
    shards, database = run.get("shards"), run["database"]
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"{where}.shards: expected a positive integer")
    if not isinstance(database, dict):
        raise ValueError(f"{where}.database: expected an object")
    for key in (
        "proxy_cpu_s",
        "proxy_cpu_s_per_1e4_signals",
        "shards_cpu_s_per_1e4_signals",
        "db_cpu_s_per_1e4_signals",
    ):
        if not _finite(database.get(key)):
            raise ValueError(f"{where}.database.{key}: expected a finite number >= 0")
    per_shard = database.get("shard_cpu_s")
    if not isinstance(per_shard, list) or len(per_shard) != shards or not all(map(_finite, per_shard)):
        raise ValueError(f"{where}.database.shard_cpu_s: expected one CPU time >= 0 per shard")
    background = database.get("background_cpu_s")
    if not isinstance(background, dict) or not all(map(_finite, background.values())):
        raise ValueError(f"{where}.database.background_cpu_s: expected CPU times >= 0 by server")
    tables = database.get("tables", {})
    if not isinstance(tables, dict) or not all(
        isinstance(sizes, dict) and _finite(sizes.get("rows")) and _finite(sizes.get("bytes"))
        for sizes in tables.values()
    ):
        raise ValueError(f"{where}.database.tables: expected rows and bytes >= 0 per table")


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
