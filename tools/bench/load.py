"""Load generator for the aggregator benchmark: many emulated devices calling Ingest over grpc.aio.

    python -m tools.bench load --target 127.0.0.1:50051 --tokens tokens.json --devices 100 --duration 10

It runs in a process of its own (the ``aggregator`` and ``scale`` benchmarks start it next to a
``sotto-server`` process), so the server's event loop never shares a GIL with the load. Each device is a
task that sends one batch, waits for the answer, and sends the next (a closed loop); concurrency is
therefore the number of devices. Prints one JSON object on stdout: calls, signals, errors by status, and
the Ingest latencies seen by the devices.

Requests are serialised once per device and only the 16 batch-id bytes are replaced for each call: the
load generator shares the machine's cores with the server, and every microsecond it spends building
protobuf objects is a microsecond the server does not get. Every request still carries a new random
batch id, so the server applies every batch (no duplicate fast path).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from sotto.edge.signals import encode_batch
from sotto.policy import Policy
from sotto.wire import Signal, day_number

INGEST = "/sotto.v1.SignalAggregator/Ingest"
BATCH_ID_BYTES = 16


def batch_template(profile_id: str, size: int, rng: random.Random, policy: Policy) -> tuple[bytes, bytes]:
    """A serialised SignalBatch of ``size`` signals split around its batch id: (before, after).

    The batch id is the first field of the message (tag, length 16, bytes), so ``before + new_id +
    after`` is a valid batch with another id and the same content.
    """
    today = day_number(dt.datetime.now(dt.UTC).date())
    interests = [
        Signal(rng.choice(sorted(policy.interest_ids)), rng.randint(1, 4), today - rng.choice((0, 0, 0, 1)))
        for _ in range(size)
    ]
    marker = b"\x00" * BATCH_ID_BYTES
    data = encode_batch(profile_id, "US", interests, batch_id=marker).SerializeToString()
    at = data.index(marker)
    return data[:at], data[at + BATCH_ID_BYTES :]


async def _device(
    channel: grpc.aio.Channel,
    token: str,
    template: tuple[bytes, bytes],
    interval_s: float,
    start_at: float,
    stop_at: float,
    latencies: list[float],
    errors: Counter[str],
    timeout_s: float,
) -> None:
    """One device until ``stop_at``. ``interval_s`` 0: closed loop (next batch when the last is answered);
    otherwise open loop: a batch every ``interval_s`` seconds, whether or not earlier ones were answered."""
    # Identity serialisers: the request is already bytes, the response is not needed beyond its status.
    call = channel.unary_unary(INGEST, request_serializer=None, response_deserializer=None)
    metadata = (("authorization", f"Bearer {token}"),)
    before, after = template

    async def one(scheduled: float) -> None:
        try:
            await call(before + os.urandom(BATCH_ID_BYTES) + after, metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if scheduled >= start_at:
                errors[exc.code().name] += 1
            return
        if scheduled >= start_at:  # calls started during the warm-up are not counted
            # From when the call was due, not when it went out: a late send is latency too.
            latencies.append(time.perf_counter() - scheduled)

    if not interval_s:
        while (now := time.perf_counter()) < stop_at:
            await one(now)
        return
    pending: set[asyncio.Task[None]] = set()
    # Devices start at random phases, so the load is spread over each interval instead of arriving at once.
    due = time.perf_counter() + random.random() * interval_s
    while due < stop_at:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        due += interval_s
    if pending:
        await asyncio.gather(*pending)


async def run_load(
    target: str,
    tokens: dict[str, str],
    batch_size: int,
    duration_s: float,
    warmup_s: float,
    channels: int,
    timeout_s: float,
    seed: int,
    rate: float = 0.0,
) -> dict[str, Any]:
    """Drive every device in ``tokens`` for ``warmup_s + duration_s``; the report covers ``duration_s``.

    ``rate`` 0 runs closed loops (capacity); otherwise the devices together offer ``rate`` batches per
    second (latency at a given load).
    """
    policy = Policy.load()
    rng = random.Random(seed)
    # A few HTTP/2 connections, as many devices behind a few NAT gateways would look; one connection would
    # serialise every call through one socket, one per device would measure connection handling instead.
    # A local subchannel pool makes each channel a TCP connection of its own (gRPC would otherwise share
    # one between channels with the same target), which also lets SO_REUSEPORT spread them over workers.
    options = [("grpc.use_local_subchannel_pool", 1)]
    pool = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, channels))]
    try:
        for channel in pool:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        begin = time.perf_counter()
        start_at, stop_at = begin + warmup_s, begin + warmup_s + duration_s
        tasks = [
            _device(
                pool[n % len(pool)],
                token,
                batch_template(profile, batch_size, rng, policy),
                len(tokens) / rate if rate else 0.0,
                start_at,
                stop_at,
                latencies,
                errors,
                timeout_s,
            )
            for n, (profile, token) in enumerate(sorted(tokens.items()))
        ]
        await asyncio.gather(*tasks)
        # The last calls end a little after stop_at; measure over the time they actually took.
        elapsed = max(time.perf_counter() - start_at, 1e-9)
    finally:
        for channel in pool:
            await channel.close()
    return {
        "devices": len(tokens),
        "batch_size": batch_size,
        "offered_batches_per_s": rate or None,
        "duration_s": elapsed,
        "calls": len(latencies),
        "signals": len(latencies) * batch_size,
        "errors": dict(errors),
        "latencies_ms": [round(x * 1000, 3) for x in latencies],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", required=True, help="aggregator HOST:PORT")
    parser.add_argument("--tokens", required=True, type=Path, help="JSON {profile_id: token}")
    parser.add_argument("--devices", type=int, default=0, help="use the first N tokens (0 = all)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--channels", type=int, default=4, help="HTTP/2 connections shared by the devices")
    parser.add_argument("--timeout", type=float, default=10.0, help="Ingest deadline in seconds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="batches/s offered by all devices together (0 = closed loop)"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.duration <= 0 or args.warmup < 0 or args.devices < 0 or args.rate < 0:
        parser.error(
            "--batch-size must be at least 1, --duration positive, --warmup and --devices not negative"
        )
    try:
        document = json.loads(args.tokens.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"--tokens {args.tokens}: expected JSON {{profile_id: token}} ({exc})")
    tokens = dict(sorted(document.items()))
    if args.devices:
        if args.devices > len(tokens):
            parser.error(f"--devices {args.devices}: only {len(tokens)} tokens in {args.tokens}")
        tokens = dict(list(tokens.items())[: args.devices])
    report = asyncio.run(
        run_load(
            args.target,
            tokens,
            args.batch_size,
            args.duration,
            args.warmup,
            args.channels,
            args.timeout,
            args.seed,
            args.rate,
        )
    )
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0
