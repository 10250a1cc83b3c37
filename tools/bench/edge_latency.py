"""Benchmark ``edge-latency``: end of audio -> signals ready, per stage, p50/p95."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sotto.edge.asr import AsrOptions
from sotto.edge.pipeline import EdgeConfig, EdgeModels, Pipeline
from sotto.edge.signals import encode_batch
from tools.bench.results import summary
from tools.bench.speech import CLIPS, PROFILE_ID, Utterance, clips, demo_queries, synthetic, word_error_rate


def _time_utterance(
    pipeline: Pipeline, utterance: Utterance, today: dt.date
) -> tuple[float, dict[str, float], str]:
    """One run: wall time from the end of the audio to a serialised batch, per-stage times, transcript."""
    started = time.perf_counter()
    analysis = pipeline.analyze_audio(utterance.audio, label=utterance.label, today=today)
    t0 = time.perf_counter()
    if analysis.signals:
        encode_batch(PROFILE_ID, pipeline.region, analysis.signals).SerializeToString()
    ended = time.perf_counter()
    stages = {stage: analysis.timings_ms.get(stage, 0.0) for stage in ("vad", "asr", "classify", "filter")}
    stages["encode"] = (ended - t0) * 1000
    return (ended - started) * 1000, stages, analysis.transcript or ""


def measure_utterances(
    models: EdgeModels, utterances: Sequence[Utterance], repeats: int, today: dt.date
) -> list[dict[str, Any]]:
    """Per utterance: total and per-stage p50/p95 over ``repeats`` runs (after one warm-up run each)."""
    pipeline = Pipeline(models, region="US")
    rows = []
    for utterance in utterances:
        _time_utterance(pipeline, utterance, today)  # first-call allocations are not what we measure
        totals: list[float] = []
        stages: dict[str, list[float]] = {s: [] for s in ("vad", "asr", "classify", "filter", "encode")}
        transcript = ""
        for _ in range(repeats):
            total, per_stage, transcript = _time_utterance(pipeline, utterance, today)
            totals.append(total)
            for stage, ms in per_stage.items():
                stages[stage].append(ms)
        rows.append(
            {
                "label": utterance.label,
                "kind": utterance.kind,
                "audio_s": round(utterance.audio.duration_s, 3),
                "runs": repeats,
                "total_ms": summary(totals),
                "stages_ms": {stage: summary(v) for stage, v in stages.items()},
                "wer": word_error_rate(utterance.reference, transcript) if utterance.reference else None,
            }
        )
    return rows


def measure_text(models: EdgeModels, queries: Sequence[str], repeats: int, today: dt.date) -> dict[str, Any]:
    """Typed or transcribed text: classify + filter + encode, over every query ``repeats`` times."""
    pipeline = Pipeline(models, region="US")
    pipeline.analyze_text(queries[0], today=today)
    totals, classify, filt, encode = [], [], [], []
    for _ in range(repeats):
        for query in queries:
            started = time.perf_counter()
            analysis = pipeline.analyze_text(query, today=today)
            t0 = time.perf_counter()
            if analysis.signals:
                encode_batch(PROFILE_ID, "US", analysis.signals).SerializeToString()
            ended = time.perf_counter()
            totals.append((ended - started) * 1000)
            classify.append(analysis.timings_ms.get("classify", 0.0))
            filt.append(analysis.timings_ms.get("filter", 0.0))
            encode.append((ended - t0) * 1000)
    return {
        "queries": len(queries),
        "runs": len(totals),
        "total_ms": summary(totals),
        "stages_ms": {"classify": summary(classify), "filter": summary(filt), "encode": summary(encode)},
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    lengths = [2.0] if args.smoke else [float(x) for x in args.lengths.split(",")]
    repeats = 1 if args.smoke else args.repeats
    config = EdgeConfig(asr=replace(AsrOptions(), cpu_threads=args.threads))
    today = dt.datetime.now(dt.UTC).date()
    with tempfile.TemporaryDirectory(prefix="sotto-bench-") as tmp:
        utterances = [synthetic(s, Path(tmp)) for s in lengths]
    utterances += clips(CLIPS[:1] if args.smoke else CLIPS)
    models = EdgeModels(config)
    models.load_audio_models()
    rows = measure_utterances(models, utterances, repeats, today)
    queries = demo_queries()[: 3 if args.smoke else None]
    text = measure_text(models, queries, 1 if args.smoke else args.repeats, today)
    results: dict[str, Any] = {
        "threads": {
            "asr": config.asr.cpu_threads,
            "classifier": config.classifier_threads,
            "cpu_count": os.cpu_count(),
        },
        "asr": {"compute_type": config.asr.compute_type, "beam_size": config.asr.beam_size},
        "utterances": rows,
        "text": text,
    }
    figures = {"text_p50_ms": text["total_ms"]["p50"]}
    five = [r for r in rows if r["kind"] == "synthetic" and abs(r["audio_s"] - 5.0) < 0.01]
    if five:
        figures["edge_5s_p50_ms"] = five[0]["total_ms"]["p50"]
    results["figures"] = figures
    return {"lengths_s": lengths, "repeats": repeats, "clips": [u.label for u in utterances]}, results


def table(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    results = document["results"]
    rows = []
    for row in results["utterances"]:
        st = row["stages_ms"]
        rows.append(
            [
                row["label"],
                f"{row['audio_s']:.1f}",
                *(f"{st[s]['p50']:.1f}" for s in ("vad", "asr", "classify", "filter", "encode")),
                f"{row['total_ms']['p50']:.0f}",
                f"{row['total_ms']['p95']:.0f}",
                "-" if row["wer"] is None else f"{row['wer']:.2f}",
            ]
        )
    text = results["text"]
    rows.append(
        [
            f"text ({text['queries']} queries)",
            "-",
            "-",
            "-",
            f"{text['stages_ms']['classify']['p50']:.2f}",
            f"{text['stages_ms']['filter']['p50']:.3f}",
            f"{text['stages_ms']['encode']['p50']:.3f}",
            f"{text['total_ms']['p50']:.2f}",
            f"{text['total_ms']['p95']:.2f}",
            "-",
        ]
    )
    threads = results["threads"]
    title = (
        f"edge latency: end of audio -> signals ready (ms; ASR {threads['asr']} threads, classifier "
        f"{threads['classifier']}, {threads['cpu_count']} CPUs; stage columns are p50)"
    )
    header = ["utterance", "audio s", "vad", "asr", "classify", "filter", "encode", "p50", "p95", "WER"]
    return [(title, header, rows)]
