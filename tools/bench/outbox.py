"""Measure the device outbox: the cost of a durable add, and the disk it takes when full.

    python -m tools.bench outbox            # prints JSON; the README's outbox figures come from here

A durable add is one SQLite transaction with a rollback journal and synchronous=FULL (the journal and
the database synced, the journal deleted); the full outbox is the default bound (1,000 batches of 20
signals) on disk, side files included, and again after it has drained.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

from sotto.edge.outbox import Outbox, OutboxLimits
from sotto.wire import Signal, day_number

CATEGORIES = ["338", "324", "425", "424", "275", "551", "632"]


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench outbox",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adds", type=int, default=200, help="durable adds to time (default: 200)")
    args = parser.parse_args(argv)
    if args.adds < 1:
        parser.error("--adds must be at least 1")
    day = day_number(dt.datetime.now(dt.UTC).date())
    limits = OutboxLimits()
    with tempfile.TemporaryDirectory(prefix="sotto-bench-") as tmp:
        path = Path(tmp) / "outbox.db"
        with Outbox(path, limits) as box:
            timings = []
            for i in range(args.adds):
                started = time.perf_counter()
                box.add("US", [Signal(CATEGORIES[i % len(CATEGORIES)], 1 + i % 4, day)])
                timings.append((time.perf_counter() - started) * 1000)
            box.purge()
            # Fill to the bound: 1,000 batches of 20 signals (and 20 more, which push the oldest out).
            batch = 20
            for _ in range(limits.max_batches + 1):
                box.add("US", [Signal(CATEGORIES[j % len(CATEGORIES)], 1 + j % 4, day) for j in range(batch)])
                box.seal("bench-device-0001", batch)
            stats = box.stats()
            full = _disk(path)
            for stored in box.batches():
                box.acknowledge(stored.batch_id)
            box.clear_ledger()
        drained = _disk(path)
    print(
        json.dumps(
            {
                "durable_add_ms_p50": round(statistics.median(timings), 3),
                "durable_add_ms_p95": round(sorted(timings)[int(0.95 * (len(timings) - 1))], 3),
                "full_outbox_batches": stats.queued_batches,
                "full_outbox_signals": stats.queued_signals,
                "dropped_batches": stats.get("batches_dropped_overflow"),
                "full_outbox_bytes_on_disk": full,
                "drained_outbox_bytes_on_disk": drained,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
