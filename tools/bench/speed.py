"""On-device speed, side by side with bare faster-whisper in one process and on the same threads.

For synthetic spoken queries of 2, 5 and 10 s (espeak-ng, padded with silence to the length) and the real
clips of shared/data (every read-speech and command clip, and a few spoken digits), each run measures:

* **bare**: ``WhisperModel.transcribe`` of faster-whisper tiny.en int8 on the whole utterance, beam 1,
  without timestamps and without conditioning on previous text (what firmware would write in ten lines);
* **pipeline**: ``Pipeline.analyze_audio`` (speech gate, ASR with the fitted window, classifier, filter)
  plus encoding the signal batch;
* **end of speech -> signals ready**: the utterance pushed into ``UtteranceStream`` in 20 ms frames at
  the pace a microphone delivers them (each frame once it has been recorded), so the stream's early ASR
  has the time it has on a device; the time of the push that returns the analysis, i.e. from the moment
  the speech gate has seen the end of the speech to a serialised batch. How often the close took the
  early transcript is reported beside it.

Reported per utterance: p50/p95 of each, the pipeline/bare ratio of medians, and both transcripts' word
error rate; overall: the median ratio over the real clips, the 5 s end-of-speech p50, and the model load
and peak RSS of a fresh process that analyses 50 utterances (``tools.bench edge-memory``'s probe).

    python -m tools.bench speed --repeats 7 --out docs/bench/results
    python -m tools.bench speed --smoke --out /tmp/speed          # shape only (the tests run this)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sotto.edge.asr import AsrOptions, resolve_model
from sotto.edge.audio import SAMPLE_RATE
from sotto.edge.pipeline import EdgeConfig, EdgeModels, Pipeline
from sotto.edge.signals import encode_batch
from sotto.edge.stream import FRAME_BYTES, UtteranceStream, audio_to_pcm
from tools.asr_eval import Spoken, corpus_wer, real_clips
from tools.bench import edge_memory
from tools.bench.results import check_targets
from tools.bench.speech import PROFILE_ID, synthetic

#: Targets of the speed work, by figure: (description, comparison, bound).
TARGETS = {
    "end_of_speech_5s_p50_ms": ("5 s utterance: end of speech -> signals ready, p50 (ms)", "<=", 200.0),
    "pipeline_over_bare_median": ("pipeline time / bare faster-whisper, real clips, median", "<=", 0.6),
    "wer_delta_points": ("WER on the timed real clips, pipeline - bare (points)", "<=", 1.0),
    "peak_rss_mb": ("peak RSS, all models, 50 utterances (MB)", "<=", 300.0),
    "model_load_s": ("model load, cold (s)", "<=", 0.6),
}
DAY = dt.date(2026, 1, 15)
#: Spoken digits timed (of 300): the shortest utterances a device hears.
DIGITS = 4


def timed_utterances(smoke: bool, folder: Path) -> list[tuple[str, Spoken]]:
    """(kind, utterance): synthetic queries of 2/5/10 s, then the real clips."""
    lengths = [5.0] if smoke else [2.0, 5.0, 10.0]
    out = []
    for seconds in lengths:
        u = synthetic(seconds, folder)
        out.append(("synthetic", Spoken(u.label, u.audio, u.reference)))
    clips = real_clips(limit_per_folder=1 if smoke else None)
    digits = [c for c in clips if "fsdd" in c.label]
    others = [c for c in clips if "fsdd" not in c.label]
    out += [("clip", c) for c in others + digits[: 1 if smoke else DIGITS]]
    return out


def _bare(model: Any, spoken: Spoken, options: AsrOptions) -> str:
    segments, _ = model.transcribe(
        spoken.audio.samples,
        language=options.language,
        beam_size=1,
        vad_filter=False,
        condition_on_previous_text=False,
        without_timestamps=True,
    )
    return " ".join(s.text.strip() for s in segments).strip()


def _pipeline(pipeline: Pipeline, spoken: Spoken) -> str:
    analysis = pipeline.analyze_audio(spoken.audio, label=spoken.label, today=DAY)
    if analysis.signals:
        encode_batch(PROFILE_ID, pipeline.region, analysis.signals).SerializeToString()
    return analysis.transcript or ""


def _end_of_speech(pipeline: Pipeline, pcm: bytes, paced: bool = True) -> tuple[float, bool] | None:
    """(milliseconds of the push that closed the utterance, whether the close took the early transcript);
    None if the gate never closed it. ``paced``: each frame is pushed once it would have been recorded."""
    frame_s = FRAME_BYTES / 2 / SAMPLE_RATE
    with UtteranceStream(pipeline) as stream:
        begin = time.perf_counter()
        for n, start in enumerate(range(0, len(pcm), FRAME_BYTES)):
            if paced:
                time.sleep(max(0.0, begin + (n + 1) * frame_s - time.perf_counter()))
            t0 = time.perf_counter()
            done = stream.push(pcm[start : start + FRAME_BYTES], today=DAY)
            if done:
                if done[0].signals:
                    encode_batch(PROFILE_ID, pipeline.region, done[0].signals).SerializeToString()
                return (time.perf_counter() - t0) * 1000, stream.early_used > 0
    return None


def _stats(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "mean": statistics.fmean(ordered),
    }


def measure(repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    """Every figure but memory, in this process."""
    from faster_whisper import WhisperModel

    options = replace(AsrOptions(), cpu_threads=threads)
    models = EdgeModels(EdgeConfig(asr=options))
    models.load_audio_models()
    pipeline = Pipeline(models, region="US")
    bare_model = WhisperModel(
        os.fspath(resolve_model(options)),
        device="cpu",
        compute_type=options.compute_type,
        cpu_threads=threads,
        local_files_only=True,
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sotto-speed-") as tmp:
        utterances = timed_utterances(smoke, Path(tmp))
    for kind, spoken in utterances:
        pcm = audio_to_pcm(spoken.audio) + bytes(2 * 16_000)  # a second of silence after the speech
        bare_text, pipe_text = _bare(bare_model, spoken, options), _pipeline(pipeline, spoken)  # warm-up
        _end_of_speech(pipeline, pcm, paced=False)
        bare_ms, pipe_ms, eos_ms, early = [], [], [], 0
        for _ in range(repeats):  # interleaved, so that a busy moment hits both alike
            t0 = time.perf_counter()
            bare_text = _bare(bare_model, spoken, options)
            t1 = time.perf_counter()
            pipe_text = _pipeline(pipeline, spoken)
            t2 = time.perf_counter()
            bare_ms.append((t1 - t0) * 1000)
            pipe_ms.append((t2 - t1) * 1000)
            closed = _end_of_speech(pipeline, pcm)
            if closed is not None:
                eos_ms.append(closed[0])
                early += closed[1]
        bare_s, pipe_s = _stats(bare_ms), _stats(pipe_ms)
        rows.append(
            {
                "label": spoken.label,
                "kind": kind,
                "audio_s": round(spoken.audio.duration_s, 3),
                "bare_ms": bare_s,
                "pipeline_ms": pipe_s,
                "end_of_speech_ms": _stats(eos_ms) if eos_ms else None,
                # Of the end-of-speech runs, those whose close took the transcript started early.
                "end_of_speech_early": early,
                "ratio": pipe_s["p50"] / bare_s["p50"],
                "reference": spoken.reference,
                "bare": bare_text,
                "pipeline": pipe_text,
                "bare_wer": corpus_wer([(spoken.reference, bare_text)]),
                "pipeline_wer": corpus_wer([(spoken.reference, pipe_text)]),
            }
        )
    clip_rows = [r for r in rows if r["kind"] == "clip"]
    five = next((r for r in rows if r["label"] == "synthetic 5 s" and r["end_of_speech_ms"]), None)
    bare_wer = corpus_wer([(r["reference"], r["bare"]) for r in clip_rows])
    pipe_wer = corpus_wer([(r["reference"], r["pipeline"]) for r in clip_rows])
    return {
        "rows": rows,
        "fallbacks": models.transcriber.fallbacks,
        "figures": {
            "end_of_speech_5s_p50_ms": five["end_of_speech_ms"]["p50"] if five else float("nan"),
            "pipeline_over_bare_median": statistics.median(float(r["ratio"]) for r in clip_rows),
            "wer_delta_points": (pipe_wer - bare_wer) * 100,
        },
        "clip_wer": {"bare": bare_wer, "pipeline": pipe_wer},
    }


def memory(smoke: bool) -> dict[str, Any]:
    """Model load and peak RSS from ``tools.bench edge-memory``'s fresh-process probe (50 utterances)."""
    args = argparse.Namespace(smoke=smoke, queries=50)
    _config, results = edge_memory.run(args)
    results.pop("figures", None)
    return results


def run(repeats: int, threads: int, smoke: bool) -> dict[str, Any]:
    """The whole benchmark as a JSON-ready document."""
    load_before = list(os.getloadavg())
    started = time.time()
    # Memory first: the probe's peak RSS is the kernel's high-water mark, which a child started from a
    # process that already holds every model would inherit at exec.
    mem = memory(smoke)
    speed = measure(1 if smoke else repeats, threads, smoke)
    figures = {**speed["figures"], "peak_rss_mb": mem["peak_rss_mb"], "model_load_s": mem["model_load_s"]}
    return {
        "benchmark": "speed",
        "smoke": smoke,
        "command": " ".join(["python", "-m", "tools.bench", *sys.argv[1:]]),
        "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
        "seconds": time.time() - started,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "repeats": 1 if smoke else repeats,
        "figures": figures,
        "targets": check_targets(figures, TARGETS),
        "memory": mem,
        "fallbacks": speed["fallbacks"],
        "clip_wer": speed["clip_wer"],
        "rows": speed["rows"],
    }


def validate(document: dict[str, Any]) -> None:
    """Raise ValueError when ``document`` does not have the shape :func:`run` writes."""
    for key in ("benchmark", "smoke", "figures", "targets", "rows", "memory", "load_average_before"):
        if key not in document:
            raise ValueError(f"speed result: missing {key!r}")
    if set(document["figures"]) != set(TARGETS) or len(document["targets"]) != len(TARGETS):
        raise ValueError("speed result: figures and targets must name every target")
    if not document["rows"]:
        raise ValueError("speed result: no utterance was measured")
    for row in document["rows"]:
        for key in ("bare_ms", "pipeline_ms"):
            if set(row[key]) != {"p50", "p95", "mean"}:
                raise ValueError(f"speed result: {row['label']}: {key} needs p50, p95 and mean")
        if row["ratio"] != row["pipeline_ms"]["p50"] / row["bare_ms"]["p50"]:
            raise ValueError(f"speed result: {row['label']}: ratio is not pipeline p50 / bare p50")


def plot(document: dict[str, Any], out: Path) -> Path:
    """Latency against utterance length, bare and pipeline (and end of speech for the pipeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(document["rows"], key=lambda r: r["audio_s"])
    x = [r["audio_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r["bare_ms"]["p50"] for r in rows], "o-", label="bare faster-whisper (beam 1)")
    ax.plot(
        x, [r["pipeline_ms"]["p50"] for r in rows], "s-", label="pipeline (gate, fitted window, classifier)"
    )
    eos = [(r["audio_s"], r["end_of_speech_ms"]["p50"]) for r in rows if r["end_of_speech_ms"]]
    if eos:
        ax.plot(*zip(*eos, strict=True), "^:", label="pipeline, end of speech -> signals (stream)")
    ax.set_xlabel("utterance length (s)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Edge latency against utterance length ({document['threads']} ASR threads)")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speed_latency_vs_length.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(document: dict[str, Any]) -> None:
    """The side-by-side table as Markdown (what BENCHMARKS.md shows), then the targets."""
    header = (
        "utterance",
        "audio s",
        "bare p50 ms",
        "pipeline p50 ms",
        "ratio",
        "end of speech p50 ms",
        "early ASR taken",
    )
    print("| " + " | ".join((*header, "WER bare", "WER pipeline")) + " |")
    print("|" + " --- |" * (len(header) + 2))
    for r in document["rows"]:
        eos = f"{r['end_of_speech_ms']['p50']:.0f}" if r["end_of_speech_ms"] else "–"
        taken = f"{r.get('end_of_speech_early', 0)}/{document['repeats']}" if r["end_of_speech_ms"] else "–"
        cells = (
            r["label"],
            f"{r['audio_s']:.1f}",
            f"{r['bare_ms']['p50']:.0f}",
            f"{r['pipeline_ms']['p50']:.0f}",
            f"{r['ratio']:.2f}",
            eos,
            taken,
            f"{r['bare_wer']:.2f}",
            f"{r['pipeline_wer']:.2f}",
        )
        print("| " + " | ".join(cells) + " |")
    for t in document["targets"]:
        print(
            f"target {t['description']}: {t['value']:.3g} ({t['target']}) {'met' if t['met'] else 'missed'}"
        )
    if document["smoke"]:
        print("(smoke run: the numbers say nothing)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for speed.json")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the plot (default: --out)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per utterance")
    parser.add_argument("--threads", type=int, default=AsrOptions().cpu_threads, help="ASR CPU threads")
    parser.add_argument("--smoke", action="store_true", help="one run of three utterances (shape only)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    document = run(args.repeats, args.threads, args.smoke)
    validate(document)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    plot(document, args.plots or args.out)
    print_table(document)
    return 0
