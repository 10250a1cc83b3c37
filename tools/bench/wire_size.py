"""Benchmark ``wire-size``: bytes per batch and per signal, against compact JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
from typing import Any

from sotto.edge.signals import encode_batch
from sotto.policy import Policy
from sotto.wire import Signal, day_number
from tools.bench.speech import PROFILE_ID

#: gRPC puts a 5-byte prefix (compressed flag, 4-byte length) in front of every message.
GRPC_PREFIX_BYTES = 5


def wire_batch(size: int, rng: random.Random, policy: Policy, today: int) -> tuple[bytes, bytes]:
    """A batch of ``size`` realistic signals as protobuf and as compact JSON with the same content."""
    ids = sorted(policy.interest_ids)
    interests = [
        Signal(rng.choice(ids), rng.randint(1, 4), today - (rng.randint(1, 3) if rng.random() < 0.1 else 0))
        for _ in range(size)
    ]
    batch = encode_batch(PROFILE_ID, "US", interests)
    as_json = {
        "batch_id": batch.batch_id.hex(),
        "profile_id": PROFILE_ID,
        "region": "US",
        "taxonomy_version": batch.taxonomy_version,
        "base_day": batch.base_day,
        "signals": [
            {
                "category_id": i.category_id,
                "weight_level": i.weight_level,
                "day_offset": batch.base_day - i.day,
            }
            for i in interests
        ],
    }
    return batch.SerializeToString(), json.dumps(as_json, separators=(",", ":")).encode()


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    sizes = [1, 10, 20, 50]
    samples = 3 if args.smoke else 200
    policy = Policy.load()
    today = day_number(dt.datetime.now(dt.UTC).date())
    rng = random.Random(args.seed)
    rows = []
    for size in sizes:
        pb, js = zip(*(wire_batch(size, rng, policy, today) for _ in range(samples)), strict=True)
        proto_bytes = statistics.fmean(len(b) for b in pb)
        json_bytes = statistics.fmean(len(b) for b in js)
        frame = proto_bytes + GRPC_PREFIX_BYTES
        rows.append(
            {
                "signals": size,
                "protobuf_bytes": proto_bytes,
                "grpc_frame_bytes": frame,
                "bytes_per_signal": frame / size,
                "protobuf_bytes_per_signal": proto_bytes / size,
                "json_bytes": json_bytes,
                "json_bytes_per_signal": json_bytes / size,
                "json_over_protobuf": json_bytes / proto_bytes,
            }
        )
    per_20 = next(r for r in rows if r["signals"] == 20)
    results: dict[str, Any] = {
        "batches": rows,
        "figures": {"bytes_per_signal_20": per_20["bytes_per_signal"]},
    }
    config = {
        "sizes": sizes,
        "samples_per_size": samples,
        "profile_id_chars": len(PROFILE_ID),
        "categories": "uniform over the interest categories; 10% of signals 1-3 days old",
        "on_the_wire": "protobuf message + the 5-byte gRPC message prefix (HTTP/2 and TLS framing excluded)",
    }
    return config, results


def table(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    rows = [
        [
            str(r["signals"]),
            f"{r['protobuf_bytes']:.1f}",
            f"{r['grpc_frame_bytes']:.1f}",
            f"{r['bytes_per_signal']:.2f}",
            f"{r['json_bytes']:.1f}",
            f"{r['json_bytes_per_signal']:.2f}",
            f"{r['json_over_protobuf']:.1f}x",
        ]
        for r in document["results"]["batches"]
    ]
    header = ["signals", "protobuf B", "gRPC frame B", "B/signal", "JSON B", "JSON B/signal", "JSON/pb"]
    return [("wire size: one SignalBatch (mean over random batches)", header, rows)]
