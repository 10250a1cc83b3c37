"""Fuzz the device's inputs: the outbox file, typed text and audio bytes (hypothesis).

    python -m tools.fuzz_device                              # 215,000 cases: outbox, text, audio
    python -m tools.fuzz_device --target outbox --cases 50000 --seed 7

What must hold, case after case:

- **outbox**: a real outbox file (signals queued, some acknowledged into the ledger, the wearer opted out)
  with random bytes overwritten, pages wiped or the file cut short. Opening it never raises anything but
  ``OutboxError``; when it opens, the wearer is still opted out (kept, or failed closed), the counters
  balance (``added == acknowledged + set aside + dropped + purged + quarantined + lost + queued``), and
  sealing what is queued never raises. Opening it read-only raises only ``OutboxError``.
- **text**: the Unicode normalisation and the whole text pipeline (classifier and privacy filter) never
  raise on any string; and a query the classifier drops as sensitive stays dropped with format
  characters (zero-width, bidi controls, separators) sprinkled into it or with it typed backwards inside
  a right-to-left override.
- **audio**: random bytes as PCM, as a file, or behind a valid WAV header: the decoders either return
  audio or raise ``AudioError``, never anything else.

Each target counts its cases; a failing case is shrunk by hypothesis and printed, and the run stops there
(exit 1). ``tests/edge/test_edge_fuzz.py`` runs the same checks, bounded, in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import random
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from sotto.edge.audio import AudioError, load_audio, pcm16_to_audio, probe_duration
from sotto.edge.outbox import SIGNAL_EXITS, Outbox, OutboxError
from sotto.edge.pipeline import EdgeModels, Pipeline
from sotto.edge.text import normalize_text, readings
from sotto.wire import Signal, day_number
from tools.paths import REPO

PROFILE = "fuzz-device-0001"
TARGETS = ("outbox", "text", "audio")

#: Characters an attacker would sprinkle into a query: Unicode format characters (removed before
#: classifying) and separators (made spaces, so only put where a space already is).
FORMAT_CHARS = (
    "\u200b\u200c\u200d\u2060\ufeff\u00ad\u200e\u200f\u061c"
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\U000e0041"
)
SEPARATORS = "\u2028\u2029\x1c\x1d\x1e\x1f\x85\x0b\x0c\t"


@dataclass
class Counts:
    """Cases run per target."""

    cases: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0))


# --- the outbox ---------------------------------------------------------------------------------------


def outbox_template(folder: Path) -> bytes:
    """The bytes of a real outbox: queued signals and batches, a ledger, the wearer opted out at the end
    (the opt-out erases the queue, so signals are added again after it, straight into the outbox)."""
    path = folder / "template.db"
    day = day_number(dt.datetime.now(dt.UTC).date())
    with Outbox(path) as box:
        for n in range(60):
            box.add("US", [Signal(("338", "324", "425")[n % 3], 1 + n % 4, day - n % 5)])
        box.seal(PROFILE, 5)
        for batch in box.batches()[:6]:
            box.acknowledge(batch.batch_id)
        box.set_state("opted_out", "1")
        box.set_state("privacy_budget", json.dumps({"day": day, "spent": 3}))
        box.add("US", [Signal("275", 2, day)] * 7)
        box.seal(PROFILE, 5)
    data = path.read_bytes()
    path.unlink()
    return data


@dataclass(frozen=True)
class Damage:
    """Overwrites (offset, bytes), pages wiped (page numbers), and a length to cut the file to."""

    writes: tuple[tuple[int, bytes], ...]
    wiped_pages: tuple[int, ...]
    cut_to: int | None


def damage_strategy(size: int, page: int = 4096) -> st.SearchStrategy[Damage]:
    pages = max(1, size // page)
    return st.builds(
        Damage,
        writes=st.lists(
            st.tuples(st.integers(0, size - 1), st.binary(min_size=1, max_size=64)), max_size=6
        ).map(tuple),
        wiped_pages=st.lists(st.integers(0, pages - 1), max_size=2).map(tuple),
        cut_to=st.one_of(st.none(), st.integers(0, size - 1)),
    )


def damaged(template: bytes, damage: Damage, page: int = 4096) -> bytes:
    data = bytearray(template)
    for number in damage.wiped_pages:
        data[number * page : (number + 1) * page] = random.Random(number).randbytes(page)
    for offset, chunk in damage.writes:
        data[offset : offset + len(chunk)] = chunk
    if damage.cut_to is not None:
        del data[damage.cut_to :]
    return bytes(data[: len(template)])


def check_outbox(folder: Path, data: bytes) -> None:
    """Open a damaged outbox every way the device does; raise AssertionError when an invariant breaks."""
    for stale in folder.glob("outbox.db*"):
        stale.unlink()
    path = folder / "outbox.db"
    path.write_bytes(data)
    try:
        with Outbox(path, read_only=True) as box:
            box.ledger()
            box.get_state("opted_out")
    except OutboxError:
        pass
    path.write_bytes(data)
    try:
        box = Outbox(path)
    except OutboxError:
        return  # a clear refusal (e.g. a schema version from the future): allowed, nothing changed
    with box:
        assert box.get_state("opted_out") is not None, "the damaged outbox forgot the opt-out"
        stats = box.stats()
        assert stats.get("signals_added") == stats.signals_gone + stats.queued_signals, stats
        box.seal(PROFILE, 5, partial=True)
        stats = box.stats()
        assert stats.get("signals_added") == stats.signals_gone + stats.queued_signals, stats
        assert set(SIGNAL_EXITS) >= {n for n in stats.counters if n.startswith("signals_")} - {
            "signals_added"
        }


# --- text -----------------------------------------------------------------------------------------------


def sensitive_queries(pipeline: Pipeline, limit: int = 200) -> list[str]:
    """Reviewed sensitive queries (tools/data) that the classifier drops as sensitive as they are."""
    import csv

    rows: list[str] = []
    for path in sorted((REPO / "tools" / "data" / "handwritten").glob("sensitive_queries_*.tsv")):
        with path.open(encoding="utf-8", newline="") as fh:
            rows += [r["text"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    picked = rows[:: max(1, len(rows) // (limit * 2))]
    kept = []
    for query in picked:
        result = pipeline.analyze_text(query)
        if result.dropped is not None and result.dropped.reason == "sensitive":
            kept.append(query)
    return kept[:limit]


def check_any_text(pipeline: Pipeline, text: str) -> None:
    """Normalisation and the text pipeline never raise, and never print a format character."""
    for reading in readings(text):
        assert reading == normalize_text(reading)
    result = pipeline.analyze_text(text)
    assert not any(c in FORMAT_CHARS or c in SEPARATORS for c in result.input)


def disguised(query: str, inserts: list[tuple[int, str]], reverse: bool) -> str:
    """``query`` with format characters inserted anywhere and separators only where a space is, or typed
    backwards inside a right-to-left override."""
    chars = list(query)
    for position, char in sorted(inserts, reverse=True):
        at = position % (len(chars) + 1)
        if char in SEPARATORS:
            spaces = [i for i, c in enumerate(chars) if c == " "]
            if not spaces:
                continue
            chars[spaces[at % len(spaces)]] = char
        else:
            chars.insert(at, char)
    text = "".join(chars)
    return f"\u202e{query[::-1]}\u202c" if reverse else text


def check_sensitive_text(pipeline: Pipeline, query: str, text: str) -> None:
    result = pipeline.analyze_text(text)
    assert result.dropped is not None and result.dropped.reason == "sensitive", (query, text, result)


# --- audio ----------------------------------------------------------------------------------------------


def wav_header(payload: int, rate: int, channels: int, bits: int) -> bytes:
    block = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", 36 + payload)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, min(rate * block, 2**32 - 1), block, bits)
        + b"data"
        + struct.pack("<I", payload)
    )


def check_audio(folder: Path, data: bytes, header: bool, rate: int, channels: int) -> None:
    """The decoders return audio or raise AudioError, nothing else."""
    try:
        audio = pcm16_to_audio(data)
        assert audio.samples.dtype.name == "float32"
    except AudioError:
        pass
    path = folder / "input.wav"
    path.write_bytes((wav_header(len(data), rate, channels, 16) if header else b"") + data)
    try:
        duration = probe_duration(path)
        assert duration is None or duration >= 0
    except AudioError:
        pass
    with contextlib.suppress(AudioError):
        load_audio(path)


# --- running --------------------------------------------------------------------------------------------


#: The kinds of case and the share of ``--cases`` each gets (text through the classifier costs tens of
#: milliseconds a case, the normalisation alone microseconds).
KINDS: dict[str, tuple[str, float]] = {
    "outbox": ("outbox", 1.0),
    "text_normalize": ("text", 1.0),
    "text_pipeline": ("text", 0.1),
    "text_sensitive": ("text", 0.2),
    "audio": ("audio", 1.0),
}


def plan(targets: tuple[str, ...], cases: int) -> dict[str, int]:
    """Cases per kind for ``cases`` per target."""
    return {k: max(1, round(cases * share)) for k, (t, share) in KINDS.items() if t in targets}


def run(
    cases: dict[str, int],
    seed_value: int,
    pipeline: Pipeline | None = None,
    counts: Counts | None = None,
) -> Counts:
    """Run ``cases[kind]`` cases of each kind named; raises the first failing case (shrunk), as
    hypothesis does. ``counts`` (also returned) counts the cases run per target, also when one fails."""
    counts = counts if counts is not None else Counts()
    common = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

    def case(kind: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
        def decorate(test: Callable[..., None]) -> Callable[..., None]:
            return seed(seed_value)(settings(common, max_examples=cases[kind])(test))

        return decorate

    # In memory when the system has it: every outbox commit is synced, and the disk is not under test.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="sotto-fuzz-", dir=shm if shm.is_dir() else None) as tmp:
        folder = Path(tmp)
        if "outbox" in cases:
            template = outbox_template(folder)

            @case("outbox")
            @given(damage_strategy(len(template)))
            def outbox_case(damage: Damage) -> None:
                counts.cases["outbox"] += 1
                check_outbox(folder, damaged(template, damage))

            outbox_case()
        any_text = st.text(
            alphabet=st.one_of(st.characters(), st.sampled_from(FORMAT_CHARS + SEPARATORS)), max_size=300
        )
        if "text_normalize" in cases:

            @case("text_normalize")
            @given(any_text)
            def normalize_case(text: str) -> None:
                counts.cases["text"] += 1
                for reading in readings(text):
                    assert reading == normalize_text(reading)
                    assert not any(c in FORMAT_CHARS or c in SEPARATORS for c in reading)

            normalize_case()
        if "text_pipeline" in cases or "text_sensitive" in cases:
            pipeline = pipeline or Pipeline(EdgeModels())
        if "text_pipeline" in cases:
            assert pipeline is not None

            @case("text_pipeline")
            @given(any_text)
            def text_case(text: str) -> None:
                counts.cases["text"] += 1
                check_any_text(pipeline, text)

            text_case()
        if "text_sensitive" in cases:
            assert pipeline is not None
            queries = sensitive_queries(pipeline)

            @case("text_sensitive")
            @given(
                st.sampled_from(queries),
                st.lists(
                    st.tuples(st.integers(0, 500), st.sampled_from(FORMAT_CHARS + SEPARATORS)), max_size=8
                ),
                st.booleans(),
            )
            def sensitive_case(query: str, inserts: list[tuple[int, str]], reverse: bool) -> None:
                counts.cases["text"] += 1
                check_sensitive_text(pipeline, query, disguised(query, inserts, reverse))

            sensitive_case()
        if "audio" in cases:

            @case("audio")
            @given(
                st.binary(max_size=4096),
                st.booleans(),
                st.sampled_from([0, 1, 8000, 16000, 44100, 2**31 - 1]),
                st.integers(0, 9),
            )
            def audio_case(data: bytes, header: bool, rate: int, channels: int) -> None:
                counts.cases["audio"] += 1
                check_audio(folder, data, header, rate, channels)

            audio_case()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target", action="append", choices=TARGETS, help="what to fuzz (may be repeated; default: all)"
    )
    parser.add_argument(
        "--cases",
        type=int,
        default=50_000,
        help="cases per target (text: as many normalised, a tenth through the pipeline, a fifth disguised "
        "sensitive queries)",
    )
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be at least 1")
    seed_value = args.seed if args.seed is not None else random.randrange(2**32)
    # The outbox logs every recovery loudly, as it should on a device; here they are the point.
    logging.disable(logging.CRITICAL)
    targets = tuple(args.target or TARGETS)
    started = time.monotonic()
    counts = Counts()
    crash: str | None = None
    try:
        run(plan(targets, args.cases), seed_value, counts=counts)
    except Exception as exc:  # the shrunk failing case: reported, and the exit code says so
        parts = list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else [exc]
        crash = "\n".join(
            line for e in parts for line in (f"{type(e).__name__}: {e}", *getattr(e, "__notes__", []))
        )
    report = {
        "targets": list(targets),
        "seed": seed_value,
        "cases": counts.cases,
        "crashes": 0 if crash is None else 1,
        "failure": crash,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(report, indent=2))
    return 0 if crash is None else 1


if __name__ == "__main__":
    sys.exit(main())
