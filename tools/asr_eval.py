"""Is speed bought with words? Word error rate of bare faster-whisper and of the edge pipeline.

For every real clip in shared/data/speech (each folder's transcripts.tsv; the two channels of the stereo
clip separately) and for held-out classifier queries spoken by espeak-ng, this transcribes the audio
twice in one process:

* **bare**: faster-whisper tiny.en int8, beam 1, its own 30 s window, no speech gate
  (``WhisperModel.transcribe`` with ``without_timestamps`` and ``condition_on_previous_text`` off);
* **pipeline**: the edge pipeline as shipped (speech gate, then the ASR settings of ``AsrOptions``).

It reports corpus WER (edits over reference words, on the classifier's normalised text) for both, and for
the spoken queries how many of the classifier's decisions (signals kept, or the reason for dropping)
differ between the two transcripts. The acceptance rule: pipeline WER at most 1 point above bare on the
real clips, and at most 1% of spoken queries with a changed decision.

Two figures put the changed decisions in proportion. Each query is transcribed bare a second time with
0.1 s of silence before it (where a recording starts is never exact), and the decisions that differ
between the two bare runs are reported (``bare_shifted``): how much bare faster-whisper's own decisions
move on a change that carries no information. And every decision is compared with the one the classifier
makes on the typed query: the pipeline may agree with it for at most 1% fewer queries than bare does
(``decisions_vs_typed``). faster-whisper's temperature fallback samples; the sampling is seeded per
utterance, so that a re-run gives the same transcripts.

    python -m tools.asr_eval --queries 300 --json docs/bench/results/asr-eval.json
    python -m tools.asr_eval --smoke        # a few clips and queries (what the tests run)
    python -m tools.asr_eval --no-clips --window full       # the speech gate's trimming alone
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.asr import WINDOWS, AsrOptions, Transcriber
from sotto.edge.audio import SAMPLE_RATE, Audio, load_audio
from sotto.edge.classifier import normalize_text
from sotto.edge.pipeline import EdgeConfig, EdgeModels, Pipeline
from tools.paths import SPEECH

#: Acceptance bounds of the comparison.
MAX_WER_DELTA_POINTS = 1.0
MAX_CHANGED_DECISIONS = 0.01
#: A fixed day, so that the daily budget and the date never make two runs differ.
DAY = dt.date(2026, 1, 15)
#: The random seed of every transcription (faster-whisper samples when a greedy pass looks wrong).
SEED = 14
#: Silence before the audio of the second bare run of each query.
SHIFT_S = 0.1


@dataclass(frozen=True, slots=True)
class Spoken:
    """One utterance and the words in it."""

    label: str
    audio: Audio
    reference: str


def _reference_column(header: list[str]) -> int:
    return header.index("reference_text") if "reference_text" in header else 1


def real_clips(limit_per_folder: int | None = None, root: Path = SPEECH) -> list[Spoken]:
    """Every clip listed in a ``transcripts.tsv`` under ``root`` (``file#left``/``#right`` name a channel)."""
    from faster_whisper.audio import decode_audio

    out: list[Spoken] = []
    for table in sorted(root.glob("*/transcripts.tsv")):
        lines = table.read_text(encoding="utf-8").splitlines()
        if not lines:
            continue
        column = _reference_column(lines[0].split("\t"))
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        for parts in rows[:limit_per_folder]:
            name, _, channel = parts[0].partition("#")
            path = table.parent / name
            if channel:
                left, right = decode_audio(str(path), sampling_rate=SAMPLE_RATE, split_stereo=True)
                samples = left if channel == "left" else right
                audio = Audio(samples.astype("float32"))
            else:
                audio = load_audio(path)
            out.append(Spoken(f"{table.parent.name}/{parts[0]}", audio, parts[column]))
    return out


def spoken_queries(count: int, folder: Path, seed: int = 14) -> list[Spoken]:
    """``count`` held-out classifier queries (a seeded sample of the eval split), spoken by espeak-ng."""
    from tools import modeldata

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("asr_eval: espeak-ng is needed for the spoken queries (apt-get install espeak-ng)")
    texts = sorted({e.text for e in modeldata.load_all() if e.split == "eval"})
    out = []
    for i, text in enumerate(random.Random(seed).sample(texts, min(count, len(texts)))):
        path = folder / f"query-{i:04d}.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "160", "-w", str(path), text], check=True, timeout=60)
        out.append(Spoken(f"query {i}", load_audio(path), text))
    return out


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
)
_ONES += "seventeen eighteen nineteen"
_UNITS = _ONES.split()
_TENS = ["-", "-", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def spell_number(token: str) -> str:
    """A whole number below 1,000 in words ("8" -> "eight", "150" -> "one hundred fifty"); else as it is."""
    if not token.isdigit() or len(token) > 3 or (len(token) > 1 and token[0] == "0"):
        return token
    n = int(token)
    words = []
    if n >= 100:
        words += [_UNITS[n // 100], "hundred"]
        n %= 100
        if n == 0:
            return " ".join(words)
    if n < 20:
        words.append(_UNITS[n])
    else:
        words.append(_TENS[n // 10])
        if n % 10:
            words.append(_UNITS[n % 10])
    return " ".join(words)


def scoring_words(text: str) -> list[str]:
    """The words WER compares: the classifier's normalised text with numerals spelled out, so that "8 of
    spades" and "eight of spades" (both right; Whisper writes either) count the same."""
    return " ".join(spell_number(t) for t in normalize_text(text).split()).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edit distance, reference words) on :func:`scoring_words`."""
    ref, hyp = scoring_words(reference), scoring_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def corpus_wer(pairs: Sequence[tuple[str, str]]) -> float:
    """Edits over reference words, summed over (reference, hypothesis) pairs."""
    edits = words = 0
    for reference, hypothesis in pairs:
        e, n = word_errors(reference, hypothesis)
        edits, words = edits + e, words + n
    return edits / words if words else 0.0


def decision(pipeline: Pipeline, transcript: str) -> str:
    """The classifier's and filter's decision on a transcript, as a comparable string."""
    if not transcript.strip():
        return "dropped:no_speech"
    analysis = pipeline.analyze_text(transcript, today=DAY)
    if analysis.dropped is not None:
        return f"dropped:{analysis.dropped.reason}"
    return "signals:" + ",".join(sorted(s.category_id for s in analysis.signals))


def _seed(seed: int) -> None:
    """Seed CTranslate2's sampling (faster-whisper's temperature fallback draws from it)."""
    import ctranslate2

    ctranslate2.set_random_seed(seed)


def transcribe_both(
    bare: Transcriber, pipeline: Pipeline, utterances: Sequence[Spoken], shifted: bool = False
) -> list[dict[str, Any]]:
    """Per utterance: the bare and the pipeline transcript (and with ``shifted`` a second bare one of the
    audio with :data:`SHIFT_S` of silence before it)."""
    rows = []
    for u in utterances:
        _seed(SEED)
        bare_text = bare.transcribe(u.audio).text
        _seed(SEED)
        pipe_text = pipeline.analyze_audio(u.audio, label=u.label, today=DAY).transcript or ""
        row = {
            "label": u.label,
            "audio_s": round(u.audio.duration_s, 3),
            "reference": u.reference,
            "bare": bare_text,
            "pipeline": pipe_text,
        }
        if shifted:
            _seed(SEED)
            silence = np.zeros(int(SHIFT_S * SAMPLE_RATE), dtype=np.float32)
            row["bare_shifted"] = bare.transcribe(Audio(np.concatenate([silence, u.audio.samples]))).text
        rows.append(row)
    return rows


def compare(
    clips: Sequence[Spoken], queries: Sequence[Spoken], asr: AsrOptions, models_dir: str | None = None
) -> dict[str, Any]:
    """The whole comparison as a JSON-ready document (see the module docstring)."""
    models = EdgeModels(EdgeConfig(models_dir=models_dir, asr=asr))
    pipeline = Pipeline(models, region="US")
    bare = Transcriber(replace(asr, window="full"))
    clip_rows = transcribe_both(bare, pipeline, clips)
    query_rows = transcribe_both(bare, pipeline, queries, shifted=True)
    for row in query_rows:
        for who in ("bare", "pipeline", "reference", "bare_shifted"):
            row[f"{who}_decision"] = decision(pipeline, row[who])
    transcriber = models.transcriber
    gate = models.config.speech_gate
    document: dict[str, Any] = {
        "asr": {"window": asr.window, "min_window_s": asr.min_window_s, "margin_s": asr.window_margin_s},
        "speech_gate": {"min_speech_ms": gate.min_speech_ms, "min_total_speech_ms": gate.min_total_speech_ms},
        "threads": asr.cpu_threads,
        "fallbacks": transcriber.fallbacks,
        "clip_rows": clip_rows,
        "query_rows": query_rows,
    }
    return summarise(document)


def summarise(document: dict[str, Any]) -> dict[str, Any]:
    """Add the summaries and the verdict to a document's rows (also re-scores a stored document)."""
    clip_rows, query_rows = document["clip_rows"], document["query_rows"]
    for row in clip_rows + query_rows:
        row["bare_errors"], row["words"] = word_errors(row["reference"], row["bare"])
        row["pipeline_errors"] = word_errors(row["reference"], row["pipeline"])[0]

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        bare_wer = corpus_wer([(r["reference"], r["bare"]) for r in rows])
        pipe_wer = corpus_wer([(r["reference"], r["pipeline"]) for r in rows])
        return {
            "count": len(rows),
            "words": sum(r["words"] for r in rows),
            "bare_wer": bare_wer,
            "pipeline_wer": pipe_wer,
            "delta_points": (pipe_wer - bare_wer) * 100,
            "same_transcript": sum(normalize_text(r["bare"]) == normalize_text(r["pipeline"]) for r in rows),
            "pipeline_empty": sum(not r["pipeline"].strip() for r in rows),
        }

    clip_summary, query_summary = summary(clip_rows), summary(query_rows)
    changed = sum(r["bare_decision"] != r["pipeline_decision"] for r in query_rows)
    query_summary["changed_decisions"] = changed
    query_summary["changed_share"] = changed / len(query_rows) if query_rows else 0.0
    query_summary["reference_agreement"] = agreement = {
        who: sum(r[f"{who}_decision"] == r["reference_decision"] for r in query_rows)
        for who in ("bare", "pipeline")
    }
    shifted = [r for r in query_rows if "bare_shifted_decision" in r]
    query_summary["bare_shifted"] = {
        "count": len(shifted),
        "changed_decisions": sum(r["bare_decision"] != r["bare_shifted_decision"] for r in shifted),
        "same_transcript": sum(
            normalize_text(r["bare"]) == normalize_text(r["bare_shifted"]) for r in shifted
        ),
    }
    folders: dict[str, list[dict[str, Any]]] = {}
    for row in clip_rows:
        folders.setdefault(row["label"].split("/")[0], []).append(row)
    document["clips"] = clip_summary
    document["clip_folders"] = {name: summary(rows) for name, rows in sorted(folders.items())}
    document["queries"] = query_summary
    document["passes"] = {
        "clip_wer": clip_summary["delta_points"] <= MAX_WER_DELTA_POINTS,
        "decisions": query_summary["changed_share"] <= MAX_CHANGED_DECISIONS,
        "decisions_vs_typed": agreement["pipeline"]
        >= agreement["bare"] - MAX_CHANGED_DECISIONS * len(query_rows),
    }
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=300, help="held-out queries to speak (default 300)")
    parser.add_argument("--threads", type=int, default=2, help="ASR CPU threads")
    parser.add_argument(
        "--window", choices=WINDOWS, default=AsrOptions().window, help="the pipeline's ASR window"
    )
    parser.add_argument(
        "--min-window",
        type=float,
        default=AsrOptions().min_window_s,
        help="with --window fit: the shortest encoder window, seconds",
    )
    parser.add_argument("--no-clips", action="store_true", help="the spoken queries only")
    parser.add_argument("--smoke", action="store_true", help="2 clips per folder and 3 queries")
    parser.add_argument("--json", type=Path, help="write the document here")
    parser.add_argument("--rescore", type=Path, help="re-score the transcripts of a stored document instead")
    args = parser.parse_args(argv)
    if args.queries < 0 or args.threads < 1:
        parser.error("--queries must be >= 0 and --threads >= 1")
    if not 0 < args.min_window <= 30:
        parser.error("--min-window must be in (0, 30]")
    if args.rescore:
        document = summarise(json.loads(args.rescore.read_text(encoding="utf-8")))
        return _report(document, args.json)
    clips = [] if args.no_clips else real_clips(limit_per_folder=2 if args.smoke else None)
    with tempfile.TemporaryDirectory(prefix="sotto-asr-eval-") as tmp:
        queries = spoken_queries(3 if args.smoke else args.queries, Path(tmp))
        asr = AsrOptions(cpu_threads=args.threads, window=args.window, min_window_s=args.min_window)
        document = compare(clips, queries, asr)
    document["smoke"] = args.smoke
    return _report(document, args.json)


def _report(document: dict[str, Any], path: Path | None) -> int:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    c, q = document["clips"], document["queries"]
    print(
        f"real clips ({c['count']}, {c['words']} words): WER bare {c['bare_wer']:.2%}, pipeline "
        f"{c['pipeline_wer']:.2%} ({c['delta_points']:+.2f} points); "
        f"spoken queries ({q['count']}): WER bare {q['bare_wer']:.2%}, pipeline {q['pipeline_wer']:.2%}, "
        f"decisions changed {q['changed_decisions']} ({q['changed_share']:.1%}), "
        f"bare against bare {SHIFT_S:g} s later {q['bare_shifted']['changed_decisions']}; "
        "decisions as on the typed query: "
        f"bare {q['reference_agreement']['bare']}, pipeline {q['reference_agreement']['pipeline']}; "
        f"short-window passes redone in full: {document['fallbacks']}"
    )
    return 0 if all(document["passes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
