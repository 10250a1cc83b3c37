"""Benchmark ``side-by-side``: the pipeline's defaults against the alternatives."""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sotto.edge.asr import AsrOptions
from sotto.edge.pipeline import EdgeConfig, EdgeModels, Pipeline
from sotto.edge.signals import encode_batch
from tools.bench.results import summary
from tools.bench.speech import CLIPS, PROFILE_ID, Utterance, clips, synthetic, word_error_rate


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    setting: str
    config: EdgeConfig
    #: False runs ASR on the whole utterance, without the speech gate in front.
    gate: bool = True


def variants(threads: int) -> list[Variant]:
    """The shipped defaults and, for each choice in them, the alternative."""
    base = EdgeConfig(asr=replace(AsrOptions(), cpu_threads=threads))
    asr = base.asr
    return [
        Variant("default", f"beam {asr.beam_size}, {asr.compute_type}, {threads} threads, VAD on", base),
        Variant("beam 5", "beam_size", replace(base, asr=replace(asr, beam_size=5))),
        Variant("float32", "compute_type", replace(base, asr=replace(asr, compute_type="float32"))),
        Variant("int8_float32", "compute_type", replace(base, asr=replace(asr, compute_type="int8_float32"))),
        Variant("1 thread", "cpu_threads", replace(base, asr=replace(asr, cpu_threads=1))),
        Variant("VAD off", "speech gate", base, gate=False),
    ]


def _run_variant(
    variant: Variant, utterances: Sequence[Utterance], repeats: int, today: dt.date
) -> dict[str, Any]:
    models = EdgeModels(variant.config)
    started = time.perf_counter()
    models.load_audio_models()
    load_s = time.perf_counter() - started
    pipeline = Pipeline(models, region="US")
    totals: list[float] = []
    asr: list[float] = []
    errors = []
    signals = 0
    for utterance in utterances:
        transcript = ""
        for n in range(repeats + 1):  # the first run of each utterance warms up and is not counted
            t0 = time.perf_counter()
            if variant.gate:
                analysis = pipeline.analyze_audio(utterance.audio, label=utterance.label, today=today)
                transcript, asr_ms, found = (
                    analysis.transcript or "",
                    analysis.timings_ms.get("asr", 0.0),
                    analysis.signals,
                )
            else:
                t1 = time.perf_counter()
                transcript = models.transcriber.transcribe(utterance.audio).text
                asr_ms = (time.perf_counter() - t1) * 1000
                found = pipeline.analyze_text(transcript, today=today).signals if transcript else []
            if found:
                encode_batch(PROFILE_ID, "US", found).SerializeToString()
            if n:
                totals.append((time.perf_counter() - t0) * 1000)
                asr.append(asr_ms)
        signals += len(found)
        errors.append(word_error_rate(utterance.reference, transcript))
    return {
        "name": variant.name,
        "setting": variant.setting,
        "compute_type": variant.config.asr.compute_type,
        "beam_size": variant.config.asr.beam_size,
        "cpu_threads": variant.config.asr.cpu_threads,
        "speech_gate": variant.gate,
        "model_load_s": load_s,
        "total_ms": summary(totals),
        "asr_ms": summary(asr),
        "wer": statistics.fmean(errors),
        "signals": signals,
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    today = dt.datetime.now(dt.UTC).date()
    chosen = variants(args.threads)
    if args.smoke:
        chosen = chosen[:2]
    with tempfile.TemporaryDirectory(prefix="sotto-bench-") as tmp:
        lengths = [2.0] if args.smoke else [2.0, 5.0, 10.0]
        utterances = [synthetic(s, Path(tmp)) for s in lengths]
    utterances += clips([] if args.smoke else CLIPS)
    repeats = 1 if args.smoke else max(1, args.repeats // 2)
    rows = [_run_variant(v, utterances, repeats, today) for v in chosen]
    config = {"utterances": [u.label for u in utterances], "repeats": repeats}
    return config, {"variants": rows}


def table(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    rows = [
        [
            r["name"],
            r["setting"],
            f"{r['asr_ms']['p50']:.0f}",
            f"{r['total_ms']['p50']:.0f}",
            f"{r['total_ms']['p95']:.0f}",
            f"{r['total_ms']['mean']:.0f}",
            f"{r['wer']:.3f}",
            str(r["signals"]),
            f"{r['model_load_s']:.2f}",
        ]
        for r in document["results"]["variants"]
    ]
    header = ["variant", "changes", "ASR p50", "total p50", "total p95", "mean", "WER", "signals", "load s"]
    n = len(document["config"]["utterances"])
    return [(f"side by side: the same {n} utterances, one setting changed (ms)", header, rows)]
