"""Fuzz the aggregator's Ingest path with Hypothesis: parse, validate and store hostile ``SignalBatch`` bytes.

Each case is the bytes of one request: a structurally random batch (every field drawn from valid values and
hostile ones: wrong case, control and format characters, huge strings, out-of-range numbers), a mutation of
a valid batch (bit flips, truncation, insertion), random bytes, or a resend of an earlier accepted batch,
as is or with its content changed under the same id. The in-process target does what the service does
(protobuf parsing, ``validate_batch``, ``Store.apply_batch`` on a real SQLite database) and checks, per case,
that the only outcomes are the expected refusals or an acknowledgement, and that an error message never
grows with the request; at the end, that the database holds exactly the batches and signals acknowledged
(no row for a refused batch) and no signal from before the retention cut-off.

    python -m tools.fuzz --cases 1000000 --seed 1

prints a JSON summary (cases, outcomes, crashes, rows for refused batches) and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from sotto.server.config import ServerConfig
from sotto.server.store import BatchConflictError, MinorProfileError, Store, open_store, sqlite_path
from sotto.server.validation import ValidationError, validate_batch
from sotto.v1 import signals_pb2
from sotto.wire import day_number

T = TypeVar("T")

#: A fixed "today", so that a seed replays the same run.
TODAY = dt.date(2026, 3, 1)
TODAY_DAY = day_number(TODAY)
#: The longest error message a refusal may carry (the service bounds what it sends at 512 characters).
MAX_MESSAGE = 512
#: Accepted batches remembered for resends.
REPLAY_POOL = 64

_HOSTILE_TEXT = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["US", "us", "UK", "GB", "DE", "XX", "U\u202es", "US\x00", "\u2028", "3.1", "3.1 ", ""]),
    # Strings far beyond any field's size: an error message must not grow with them.
    st.integers(min_value=100, max_value=60_000).map(lambda n: "\u00e9" * n),
)
_PROFILES = ["profile_0001", "profile_0002", "dev-XYZ_123456789", "short", "p" * 65]
_CATEGORIES = ["338", "632", "324", "286", "1", "9999", "", "338\x00", "\u0663\u0663\u0668"]
_SIGNAL = st.builds(
    signals_pb2.Signal,
    category_id=st.one_of(st.sampled_from(_CATEGORIES), _HOSTILE_TEXT),
    weight_level=st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1)),
    day_offset=st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)),
)
_VALID_SIGNAL = st.builds(
    signals_pb2.Signal,
    category_id=st.sampled_from(["338", "632", "324"]),
    weight_level=st.integers(1, 4),
    day_offset=st.integers(0, 30),
)


@st.composite
def structured(draw: st.DrawFn, today: int = TODAY_DAY) -> bytes:
    """A batch whose fields are valid, except those drawn from hostile values (each with chance 1/4)."""

    def pick(good: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> T:
        return draw(bad if draw(st.integers(0, 3)) == 0 else good)

    signals = pick(st.lists(_VALID_SIGNAL, min_size=1, max_size=4), st.lists(_SIGNAL, max_size=4))
    # Oversize batches: the one signal repeated, which is cheap to draw.
    repeat = pick(st.just(1), st.integers(1, 150))
    batch = signals_pb2.SignalBatch(
        batch_id=pick(st.binary(min_size=16, max_size=16), st.binary(max_size=40)),
        profile_id=pick(st.sampled_from(_PROFILES[:3]), st.one_of(st.sampled_from(_PROFILES), _HOSTILE_TEXT)),
        region=pick(st.just("US"), _HOSTILE_TEXT),
        taxonomy_version=pick(st.just("3.1"), _HOSTILE_TEXT),
        base_day=pick(st.integers(today - 200, today + 2), st.integers(0, 2**32 - 1)),
        ldp_epsilon_milli=pick(st.sampled_from([0, 1000, 2000]), st.integers(0, 2**32 - 1)),
        signals=list(signals) * repeat,
    )
    return batch.SerializeToString()


@st.composite
def mutated(draw: st.DrawFn, today: int = TODAY_DAY) -> bytes:
    """A batch's bytes with bits flipped, cut short, or with bytes inserted."""
    data = bytearray(draw(structured(today)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 2))
        if kind == 0 and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == 1 and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        else:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@dataclass(frozen=True)
class Case:
    """One drawn request: its bytes, or a resend of an accepted batch (``replay`` picks it, ``change``
    alters its content under the same id); ``mutants`` seeds the byte mutations sent after it."""

    data: bytes
    replay: int | None = None
    change: bool = False
    mutants: int = 0


_MUTANT_SEEDS = st.integers(0, 2**32 - 1)
CASES: st.SearchStrategy[Case] = st.one_of(
    st.builds(Case, structured(), mutants=_MUTANT_SEEDS),
    st.builds(Case, mutated(), mutants=_MUTANT_SEEDS),
    st.builds(Case, st.binary(max_size=200), mutants=_MUTANT_SEEDS),
    # Before anything was accepted, a resend is an empty request.
    st.builds(Case, st.just(b""), st.integers(0, REPLAY_POOL - 1), st.booleans(), _MUTANT_SEEDS),
)


def mutants(data: bytes, seed_value: int, count: int) -> list[bytes]:
    """``count`` byte mutations of ``data`` (bit flips, cuts, insertions, duplicated spans), from a PRNG
    seeded by Hypothesis: cheap extra requests around each drawn one, so a run reaches millions of cases."""
    rng = random.Random(seed_value)
    out = []
    for _ in range(count):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(4)
            if kind == 0 and buf:
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            elif kind == 1 and buf:
                del buf[rng.randrange(len(buf)) :]
            elif kind == 2 and buf:
                start = rng.randrange(len(buf))
                buf[start:start] = buf[start : start + rng.randint(1, 16)]
            else:
                at = rng.randint(0, len(buf))
                buf[at:at] = rng.randbytes(rng.randint(1, 8))
        out.append(bytes(buf))
    return out


def draw_requests(count: int, seed_value: int, today: int) -> list[bytes]:
    """``count`` request bodies drawn by Hypothesis (structured, mutated and random) around day ``today``,
    for sending to a real server over gRPC."""
    drawn: list[bytes] = []

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate])
    @seed(seed_value)
    @given(st.one_of(structured(today), mutated(today), st.binary(max_size=200)))
    def collect(data: bytes) -> None:
        drawn.append(data)

    collect()
    return drawn


@dataclass
class Stats:
    """What a run saw."""

    cases: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    applied_signals: int = 0
    crashes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    longest_message: int = 0

    def summary(self) -> dict[str, object]:
        """The figures of the run, as JSON-ready values."""
        return {
            "cases": self.cases,
            "outcomes": dict(sorted(self.outcomes.items())),
            "applied_signals": self.applied_signals,
            "crashes": len(self.crashes),
            "first_crashes": self.crashes[:5],
            "violations": len(self.violations),
            "first_violations": self.violations[:5],
            "longest_error_message": self.longest_message,
        }


class IngestTarget:
    """The service's Ingest path in process: parse, validate, apply; one event loop, one SQLite store."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, store: Store, config: ServerConfig, mutants: int = 0
    ) -> None:
        self._loop = loop
        self._mutants = mutants
        self._store = store
        self._config = config
        self._accepted: list[bytes] = []
        self.stats = Stats()

    def feed(self, case: Case) -> None:
        """Run one drawn case and its mutants; crashes and unbounded messages are recorded in ``stats``."""
        data = case.data
        if case.replay is not None and self._accepted:
            data = self._accepted[case.replay % len(self._accepted)]
            if case.change:  # the same id with other content: must be refused, never merged
                batch = signals_pb2.SignalBatch.FromString(data)
                batch.signals[0].weight_level = batch.signals[0].weight_level % 4 + 1
                data = batch.SerializeToString()
        outcome = self.request(data)
        if case.replay is not None and self._accepted:
            # A resend is acknowledged as a duplicate; the same id with other content is refused.
            expected = "conflict" if case.change else "duplicate"
            if outcome != expected:
                self.stats.violations.append(
                    f"a resend (changed={case.change}) ended {outcome}, not {expected}"
                )
        for mutant in mutants(data, case.mutants, self._mutants):
            self.request(mutant)

    def request(self, data: bytes) -> str:
        """Run one request's bytes through the Ingest path; its outcome."""
        self.stats.cases += 1
        try:
            outcome = self._loop.run_until_complete(self._ingest(data))
        except Exception as exc:  # anything else is a crash: the service would answer INTERNAL
            outcome = "crash"
            self.stats.crashes.append(f"{type(exc).__name__}: {exc!s:.200} on {data[:120]!r}")
        self.stats.outcomes[outcome] += 1
        return outcome

    async def _ingest(self, data: bytes) -> str:
        try:
            request = signals_pb2.SignalBatch.FromString(data)
        except DecodeError:
            return "unparseable"
        try:
            batch = validate_batch(request, self._config)
        except ValidationError as exc:
            self._message(str(exc))
            return "invalid"
        try:
            result = await self._store.apply_batch(batch)
        except (BatchConflictError, MinorProfileError) as exc:
            self._message(str(exc))
            return "conflict"
        if result.duplicate:
            return "duplicate"
        self.stats.applied_signals += result.applied_signals
        if len(self._accepted) < REPLAY_POOL:
            self._accepted.append(data)
        return "applied"

    def _message(self, message: str) -> None:
        self.stats.longest_message = max(self.stats.longest_message, len(message))
        if len(message) > MAX_MESSAGE:
            raise AssertionError(f"an error message of {len(message)} characters: {message[:100]!r}...")


def stored_figures(db: str | Path, cutoff: int) -> dict[str, int]:
    """Batches and signals in the database (plain SQL, independent of the store code), and the signals
    observed before ``cutoff``."""
    with closing(sqlite3.connect(db)) as conn:
        batches = conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        signals, expired = conn.execute(
            "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(CASE WHEN day < ? THEN n ELSE 0 END), 0) "
            "FROM signal_counts",
            (cutoff,),
        ).fetchone()
    return {"batches": batches, "signals": signals, "expired_signals": expired}


def run(
    cases: int,
    seed_value: int,
    db: Path,
    mutants_per_case: int = 0,
    progress: Callable[[Stats], None] | None = None,
) -> dict[str, object]:
    """Fuzz at least ``cases`` requests (Hypothesis draws ``cases / (1 + mutants_per_case)`` of them, each
    followed by its mutants) with ``seed_value`` into a new SQLite database at ``db``; the summary."""
    config = ServerConfig(clock=lambda: TODAY, retention_days=180)
    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(open_store(f"sqlite:///{db.resolve()}", 30))
    target = IngestTarget(loop, store, config, mutants_per_case)
    drawn = -(-cases // (1 + mutants_per_case))

    @settings(
        max_examples=drawn,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(seed_value)
    @given(CASES)
    def one(case: Case) -> None:
        before = target.stats.cases
        target.feed(case)
        if progress is not None and before // 50_000 != target.stats.cases // 50_000:
            progress(target.stats)

    started = time.perf_counter()
    try:
        one()
    finally:
        loop.run_until_complete(store.close())
        loop.close()
    stats = target.stats
    stored = stored_figures(sqlite_path(f"sqlite:///{db.resolve()}"), config.retention_cutoff())
    summary = stats.summary()
    summary.update(
        seed=seed_value,
        drawn_by_hypothesis=drawn,
        mutants_per_case=mutants_per_case,
        seconds=round(time.perf_counter() - started, 1),
        stored_batches=stored["batches"],
        stored_signals=stored["signals"],
        # Acknowledged batches are the only ones that may leave a row; anything beyond is a refused batch's.
        rows_for_refused_batches=stored["batches"] - stats.outcomes["applied"],
        signals_not_acknowledged=stored["signals"] - stats.applied_signals,
        signals_before_retention=stored["expired_signals"],
    )
    return summary


def failed(summary: dict[str, object]) -> bool:
    """Whether a run's summary shows a crash, a broken invariant, a row of a refused batch or an expired
    signal."""
    return bool(
        summary["crashes"]
        or summary["violations"]
        or summary["rows_for_refused_batches"]
        or summary["signals_not_acknowledged"]
        or summary["signals_before_retention"]
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tools.fuzz``."""
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="requests to generate")
    parser.add_argument("--seed", type=int, default=1, help="Hypothesis seed (a seed replays a run)")
    parser.add_argument(
        "--mutants", type=int, default=15, help="byte mutations sent after each case Hypothesis draws"
    )
    parser.add_argument("--db", type=Path, help="SQLite file to create (default: a temporary one)")
    args = parser.parse_args(argv)

    def progress(stats: Stats) -> None:
        print(f"{stats.cases} cases, {len(stats.crashes)} crashes", file=sys.stderr, flush=True)

    # A memory file system when there is one: the run tests logic, not the disk, and fsyncs would dominate.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        db = args.db or Path(tmp) / "fuzz.db"
        if db.exists():
            parser.error(f"{db} exists; give a new file")
        summary = run(args.cases, args.seed, db, args.mutants, progress)
    print(json.dumps(summary, indent=2))
    return 1 if failed(summary) else 0


if __name__ == "__main__":
    sys.exit(main())
