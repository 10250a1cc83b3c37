"""Re-run the stalled-streams attack of issue 17 against ``sotto-server serve`` and time valid Ingest calls.

An attacker keeps ``--streams`` Ingest streams open on each of ``--connections`` connections, sending only
headers (no token, no message) and opening a new one whenever the server ends one. Meanwhile devices send
valid batches one after another; the tool reports their latency (p50, p99, max) and status codes during the
attack, and the same figures without it first (the baseline), with the machine's load average.

    python -m tools.attack_streams --seconds 20

starts its own server (a temporary SQLite database, default limits except the per-device rate limit, which
is lifted because a handful of devices stand in for many) unless ``--target HOST:PORT --token-file FILE``
names a running one. Prints JSON; exits 1 when a valid call failed or the p99 is above ``--target-p99-ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np

from sotto.v1 import signals_pb2, signals_pb2_grpc
from sotto.wire import day_number

INGEST = "/sotto.v1.SignalAggregator/Ingest"
PROFILE = "attack_profile_0001"


@contextmanager
def serve(folder: Path) -> Iterator[tuple[str, str]]:
    """``sotto-server serve`` on a free loopback port with a new database: its address and a device token."""
    db = f"sqlite:///{(folder / 'attack.db').resolve()}"
    issued = subprocess.run(
        [sys.executable, "-m", "sotto.server", "token", "issue", "--db", db, PROFILE],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    token = json.loads(issued.stdout)[PROFILE]
    command = [sys.executable, "-m", "sotto.server", "serve", "--db", db, "--listen", "127.0.0.1:0"]
    command += ["--rate-per-second", "1000000", "--rate-burst", "1000000", "--log-level", "WARNING"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"listening on (127\.0\.0\.1:\d+)\n", line)
        if not match:
            raise SystemExit(f"attack_streams: the aggregator did not start: {line!r}")
        yield match.group(1), token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def _never() -> AsyncIterator[bytes]:
    await asyncio.sleep(3600)
    yield b""


async def attack(
    target: str, connections: int, streams: int, stop: asyncio.Event
) -> collections.Counter[str]:
    """Hold ``streams`` header-only Ingest streams open per connection until ``stop``; their outcomes."""
    outcomes: collections.Counter[str] = collections.Counter()

    async def hold(channel: grpc.aio.Channel) -> None:
        open_stream = channel.stream_unary(INGEST)
        while not stop.is_set():
            call = open_stream(_never())
            try:
                await call
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
            except asyncio.CancelledError:
                call.cancel()
                raise

    channels = [grpc.aio.insecure_channel(target) for _ in range(connections)]
    tasks = [asyncio.create_task(hold(channel)) for channel in channels for _ in range(streams)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    return outcomes


def device_batch(today: int) -> signals_pb2.SignalBatch:
    """One well-formed batch of the device under load: a new id, one signal, dated ``today``."""
    return signals_pb2.SignalBatch(
        batch_id=os.urandom(16),
        profile_id=PROFILE,
        region="US",
        taxonomy_version="3.1",
        base_day=today,
        signals=[signals_pb2.Signal(category_id="338", weight_level=4)],
    )


async def devices(
    target: str, token: str, seconds: float, concurrency: int
) -> tuple[list[float], collections.Counter[str]]:
    """Send valid batches for ``seconds`` from ``concurrency`` senders, one call at a time each."""
    latencies: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    today = day_number(dt.datetime.now(dt.UTC).date())
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = signals_pb2_grpc.SignalAggregatorStub(channel)
        await channel.channel_ready()
        deadline = time.perf_counter() + seconds

        async def sender() -> None:
            while time.perf_counter() < deadline:
                batch = device_batch(today)
                started = time.perf_counter()
                try:
                    await stub.Ingest(batch, timeout=10, metadata=metadata)
                    codes["OK"] += 1
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                await asyncio.sleep(0.01)

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return latencies, codes


def figures(latencies: list[float], codes: collections.Counter[str]) -> dict[str, object]:
    """p50, p99 and max in milliseconds, and the status codes."""
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {
        "calls": sum(codes.values()),
        "codes": dict(codes),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(np.max(ms)), 2),
    }


async def _attack_only(target: str, connections: int, streams: int) -> None:
    """The attacker's process: attack until SIGTERM, then print the streams' outcomes as JSON."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    outcomes = await attack(target, connections, streams, stop)
    print(json.dumps(dict(outcomes)), flush=True)


async def measure(args: argparse.Namespace, target: str, token: str) -> dict[str, object]:
    """The baseline, then the same traffic under attack. The attacker runs in a process of its own, as it
    would on another machine, so that its client work does not slow the timed calls' event loop."""
    baseline = figures(*await devices(target, token, args.baseline_seconds, args.senders))
    attacker = subprocess.Popen(
        [sys.executable, "-m", "tools.attack_streams", "--attack-only", target]
        + ["--connections", str(args.connections), "--streams", str(args.streams)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        await asyncio.sleep(3)  # let the attack build up before timing anything
        load_before = os.getloadavg()
        under_attack = figures(*await devices(target, token, args.seconds, args.senders))
        load_after = os.getloadavg()
    finally:
        attacker.terminate()
        out, _ = attacker.communicate(timeout=60)
    return {
        "attack": {
            "connections": args.connections,
            "streams_per_connection": args.streams,
            "stream_outcomes": json.loads(out) if out.strip() else None,
        },
        "baseline": baseline,
        "under_attack": under_attack,
        "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "cpus": os.cpu_count(),
        "target_p99_ms": args.target_p99_ms,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tools.attack_streams``."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.attack_streams", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--connections", type=int, default=1, help="attacking connections")
    parser.add_argument("--streams", type=int, default=1000, help="header-only streams held per connection")
    parser.add_argument("--seconds", type=float, default=20, help="time valid Ingest calls are measured")
    parser.add_argument("--baseline-seconds", type=float, default=5, help="the same without the attack")
    parser.add_argument("--senders", type=int, default=4, help="devices sending valid batches at once")
    parser.add_argument("--target", help="HOST:PORT of a running aggregator (default: start one)")
    parser.add_argument("--token-file", type=Path, help="a device token for --target (JSON of token issue)")
    parser.add_argument("--target-p99-ms", type=float, default=100.0, help="fail above this p99")
    parser.add_argument("--attack-only", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack_only:
        asyncio.run(_attack_only(args.attack_only, args.connections, args.streams))
        return 0
    if (args.target is None) != (args.token_file is None):
        parser.error("give --target and --token-file together")
    if args.target is not None:
        tokens = json.loads(args.token_file.read_text())
        result = asyncio.run(measure(args, args.target, next(iter(tokens.values()))))
    else:
        with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp)) as (target, token):
            result = asyncio.run(measure(args, target, token))
    print(json.dumps(result, indent=2))
    under = result["under_attack"]
    assert isinstance(under, dict)
    failed = set(under["codes"]) != {"OK"} or not under["p99_ms"] < args.target_p99_ms
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
