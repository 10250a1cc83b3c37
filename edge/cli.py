"""`sotto-edge`: run the on-device pipeline from a shell.

    sotto-edge analyze --text "where can i buy trail running shoes" --json
    sotto-edge analyze --text-file queries.txt --region US
    sotto-edge analyze --audio clip.wav --audio other.flac
    sotto-edge ledger [--json] [--clear]     # what this device has sent (never a transcript)
    sotto-edge ledger --html page.html       # the wearer's page: what left, what never left and why

Each query prints one JSON object on stdout (the stable contract):
{"input", "transcript", "signals": [{"id", "name", "tier1", "weight"}],
 "dropped": null | {"reason", "detail"}}
reason: sensitive, region, opt_out, minor, no_speech, no_interest, or too_long (audio longer than 30 s:
not decoded, not transcribed). Text is classified as a person reads it: Unicode format characters
(bidi overrides, zero-width characters, line separators) are resolved or removed first, and "input" and
"transcript" show that text. --text-file splits on "\\n" only.

"signals" is the privacy filter's decision, before any noise. With --show-noised each object also has
"sent" (the signals after local differential privacy: the daily budget, then randomized response with
--ldp-epsilon) and "withheld_by_budget".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from sotto.edge.asr import COMPUTE_TYPES, AsrOptions, ModelError
from sotto.edge.audio import SAMPLE_RATE, AudioError
from sotto.edge.classifier import BACKENDS
from sotto.edge.client import DeletionStatus, deletion_state
from sotto.edge.ldp import DEFAULT_DAILY_BUDGET, DEFAULT_EPSILON, LdpOptions, LocalPrivacy
from sotto.edge.outbox import STATE_LOST_KEY, Outbox, OutboxError
from sotto.edge.pipeline import MAX_UTTERANCE_S, Analysis, EdgeConfig, EdgeModels, Pipeline, too_long
from sotto.edge.stream import analyze_pcm
from sotto.edge.transparency import write_page
from sotto.policy import Policy, PolicyError, models_dir

#: Where the device keeps its outbox unless told otherwise.
DEFAULT_OUTBOX = Path.home() / ".local" / "share" / "sotto" / "outbox.db"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sotto-edge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    analyze = sub.add_parser(
        "analyze",
        help="analyse queries and print what would be sent",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = analyze.add_argument_group("input (at least one; may be repeated)")
    src.add_argument(
        "--text", action="append", default=[], metavar="QUERY", help="a typed query or transcript"
    )
    src.add_argument(
        "--text-file",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a UTF-8 text file with one query per line",
    )
    src.add_argument(
        "--audio",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="an audio file (WAV, FLAC, ...; any rate and channel count)",
    )
    src.add_argument(
        "--pcm",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="raw 16 kHz mono little-endian int16 PCM, as firmware records it",
    )
    analyze.add_argument("--json", action="store_true", help="JSON lines on stdout (the default output)")
    analyze.add_argument("--region", default="US", help="the device's ISO 3166-1 alpha-2 region")
    analyze.add_argument("--opt-out", action="store_true", help="act as if the wearer opted out")
    analyze.add_argument(
        "--minor", action="store_true", help="act as if the wearer is marked as a minor (region table rule)"
    )
    analyze.add_argument(
        "--show-noised",
        action="store_true",
        help="also print what would be sent after local differential privacy ('sent', 'withheld_by_budget')",
    )
    analyze.add_argument(
        "--ldp-epsilon", type=float, default=DEFAULT_EPSILON, help="epsilon per signal for --show-noised"
    )
    analyze.add_argument(
        "--daily-budget",
        type=int,
        default=DEFAULT_DAILY_BUDGET,
        help="signals per day for --show-noised (counted in memory: the device's own budget is untouched)",
    )
    analyze.add_argument("--models", default=None, help="models folder (default: the shipped models/)")
    analyze.add_argument("--backend", default="onnx", choices=BACKENDS, help="classifier runtime")
    analyze.add_argument("--threads", type=int, default=1, help="classifier CPU threads")
    analyze.add_argument(
        "--asr-model", default=None, help="a CTranslate2 Whisper directory (default: bundled tiny.en)"
    )
    analyze.add_argument("--asr-sha256", default=None, help="expected SHA-256 of the ASR model.bin")
    analyze.add_argument("--compute-type", default="int8", choices=COMPUTE_TYPES, help="ASR precision")
    analyze.add_argument("--beam-size", type=int, default=1, help="ASR beam size")
    ledger = sub.add_parser(
        "ledger",
        help="show (or clear) the signals this device has sent",
        description="Every signal the aggregator acknowledged: category, weight, day, batch id, when it "
        "was sent. The ledger never holds a transcript or audio.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ledger.add_argument(
        "--outbox",
        type=Path,
        default=Path(os.environ.get("SOTTO_OUTBOX", DEFAULT_OUTBOX)),
        help="the device's outbox file ($SOTTO_OUTBOX)",
    )
    ledger.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    ledger.add_argument("--clear", action="store_true", help="erase the ledger (the wearer's choice)")
    ledger.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the wearer's page (one self-contained HTML file) to FILE",
    )
    ledger.add_argument("--models", default=None, help="models folder, for category names")
    return parser


def _ledger(args: argparse.Namespace) -> int:
    """`sotto-edge ledger`: the transparency ledger as a table or JSON, or clear it.

    Reading never creates, moves or changes a file (the outbox is opened read-only); a file that cannot
    be read is an error that names it. Only ``--clear`` writes, and only to an outbox that reads cleanly.
    """
    notes: list[str] = []
    if args.html is not None:
        return _ledger_html(args)
    if not args.outbox.exists():  # nothing was ever sent; do not create a file just to say so
        entries = []
    else:
        try:
            with Outbox(args.outbox, read_only=True) as box:
                entries = box.ledger()
                notes = _ledger_notes(box)
            if args.clear:
                with Outbox(args.outbox) as box:
                    print(f"cleared {box.clear_ledger()} ledger entries")
                return 0
        except (OutboxError, OSError) as exc:
            print(f"sotto-edge: error: {exc}", file=sys.stderr)
            return 2
    if args.clear:
        print("cleared 0 ledger entries")
        return 0
    try:
        taxonomy = Policy.load(models_dir(args.models)).taxonomy
    except PolicyError as exc:
        print(f"sotto-edge: error: {exc}", file=sys.stderr)
        return 2
    rows = [
        {
            "sent_at": dt.datetime.fromtimestamp(e.sent_at, dt.UTC).isoformat(timespec="seconds"),
            "day": e.date.isoformat(),
            "category_id": e.category_id,
            "name": taxonomy[e.category_id].name if e.category_id in taxonomy else None,
            "tier1": taxonomy[e.category_id].tier1 if e.category_id in taxonomy else None,
            "weight": e.weight,
            "batch_id": e.batch_id.hex(),
        }
        for e in entries
    ]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for note in notes:
        print(note)
    if not rows:
        print("No signals have been sent from this device.")
        return 0
    header = ("sent (UTC)", "day", "category", "tier 1", "weight", "batch")
    table = [
        (
            r["sent_at"],
            r["day"],
            f"{r['name'] or '?'} ({r['category_id']})",
            r["tier1"] or "?",
            f"{r['weight']:.2f}",
            str(r["batch_id"])[:8],
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=True)]
    for line in (header, *table):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _ledger_notes(box: Outbox) -> list[str]:
    """Lines about the device's state the wearer should see above the ledger: a deletion request and
    where it stands, and a state that failed closed after damage."""
    notes = []
    deletion = deletion_state(box)
    if deletion is not None:
        when = dt.datetime.fromtimestamp(deletion.at, dt.UTC).isoformat(timespec="seconds")
        if deletion.status is DeletionStatus.PENDING:
            last = f", last refused: {deletion.last_code}" if deletion.last_code else ""
            notes.append(
                f"Deletion requested {when}: pending ({deletion.attempts} attempts{last}); nothing is sent "
                "until the aggregator confirms it"
            )
        else:
            notes.append(f"Deletion confirmed {when}: {deletion.status.value.replace('_', ' ')}")
    lost = box.get_state(STATE_LOST_KEY)
    if lost is not None:
        when = dt.datetime.fromtimestamp(float(lost), dt.UTC).isoformat(timespec="seconds")
        notes.append(
            f"The device's settings were damaged ({when}) and failed closed: opted out and marked as a "
            "minor until the wearer chooses again; a deletion requested before then must be asked again"
        )
    return notes


def _ledger_html(args: argparse.Namespace) -> int:
    """`sotto-edge ledger --html FILE`: the wearer's page."""
    if args.clear or args.json:
        print("sotto-edge: error: --html cannot be combined with --json or --clear", file=sys.stderr)
        return 2
    try:
        taxonomy = Policy.load(models_dir(args.models)).taxonomy
        # A device that never sent anything has no file: show an empty page without creating one.
        with Outbox(args.outbox if args.outbox.exists() else None) as box:
            written = write_page(box, taxonomy, args.html)
    except (OutboxError, PolicyError, OSError, ValueError) as exc:
        print(f"sotto-edge: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


def _queries(args: argparse.Namespace) -> list[tuple[str, str | Path]]:
    """All inputs (texts, then text files, audio, PCM), checked before any model loads."""
    items: list[tuple[str, str | Path]] = [("text", t) for t in args.text]
    for path in args.text_file:
        try:
            # "\n" only: splitlines() would also split on U+2028, "\x1c" and others inside one query.
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read as UTF-8 text ({exc.__class__.__name__})") from None
        items += [("text", line.strip()) for line in lines if line.strip()]
    for kind in ("audio", "pcm"):
        for path in getattr(args, kind):
            if not path.is_file():
                raise ValueError(f"{path}: no such {kind} file")
            items.append((kind, path))
    if not items:
        raise ValueError("nothing to analyse: give --text, --text-file, --audio or --pcm")
    return items


def _analyze(pipeline: Pipeline, items: list[tuple[str, str | Path]]) -> Iterator[Analysis | str]:
    for kind, item in items:
        try:
            if kind == "text":
                yield pipeline.analyze_text(str(item))
            elif kind == "audio":
                yield pipeline.analyze_file(item)
            else:
                seconds = Path(item).stat().st_size / (2 * SAMPLE_RATE)
                if seconds > MAX_UTTERANCE_S:  # not read at all: a long file would sit in memory whole
                    yield Analysis(str(item), None, [], too_long(seconds))
                    continue
                # The device's own path: frames through the speech gate, one answer per utterance.
                yield from analyze_pcm(pipeline, Path(item).read_bytes(), label=str(item))
        except AudioError as exc:
            yield str(exc)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "ledger":
        return _ledger(args)
    if args.threads < 1 or args.beam_size < 1:
        parser.error("--threads and --beam-size must be at least 1")
    if args.daily_budget < 1:
        parser.error("--daily-budget must be at least 1")
    try:
        items = _queries(args)
        config = EdgeConfig(
            models_dir=args.models,
            classifier_backend=args.backend,
            classifier_threads=args.threads,
            asr=AsrOptions(
                model_dir=args.asr_model,
                sha256=args.asr_sha256,
                compute_type=args.compute_type,
                beam_size=args.beam_size,
            ),
        )
        ldp_options = LdpOptions(args.ldp_epsilon, args.daily_budget) if args.show_noised else None
        models = EdgeModels(config)
        pipeline = Pipeline(
            models,
            region=args.region,
            opted_out=args.opt_out,
            minor=args.minor,
            ldp=None if ldp_options is None else LocalPrivacy(models.policy.interest_ids, ldp_options),
        )
    except (ValueError, PolicyError, ModelError) as exc:
        print(f"sotto-edge: error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for result in _analyze(pipeline, items):
        if isinstance(result, str):
            failures += 1
            print(f"sotto-edge: error: {result}", file=sys.stderr)
            continue
        document = result.to_json(models.policy)
        if args.show_noised:
            document.update(result.noised_json(models.policy))
        print(json.dumps(document, ensure_ascii=False), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
