"""Benchmarks: where the time, the memory and the bytes go, on the device and on the aggregator.

    python -m tools.bench edge-latency            # end of audio -> signals ready, per stage, p50/p95
    python -m tools.bench edge-memory             # peak RSS of a process with every model, load time
    python -m tools.bench wire-size               # bytes per batch and per signal, against compact JSON
    python -m tools.bench aggregator --store sqlite --store postgresql   # signals/s, Ingest p50/p99
    python -m tools.bench side-by-side            # the pipeline's defaults against the alternatives
    python -m tools.bench scale --workers 1,2     # signals/s, server CPU s per 10^4 signals, by workers
    python -m tools.bench plot                    # PNG plots from the JSON results
    python -m tools.bench all                     # every benchmark, then the plots

Each benchmark prints a table and writes ``<name>.json`` into ``--out`` (default ``bench-results/``).
``--smoke`` runs a tiny version of it (CI uses that to check that the benchmark runs and that its output
is well-formed; its numbers mean nothing). The JSON shape is checked by ``validate_result``.

Timings depend on what else the machine is doing: every result records the load average before and
after the run, and BENCHMARKS.md says how the published figures were taken.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.asr import AsrOptions
from sotto.edge.audio import SAMPLE_RATE, Audio, load_audio
from sotto.edge.classifier import normalize_text
from sotto.edge.pipeline import EdgeConfig, EdgeModels, Pipeline
from sotto.edge.privacy import Interest
from sotto.edge.signals import encode_batch
from sotto.policy import Policy
from sotto.wire import day_number
from tools import bench_scale
from tools.extras import need
from tools.harness import issue_tokens, start_server, stop_server
from tools.paths import SPEECH, child_env

ROOT = Path(__file__).resolve().parents[1]

SCHEMA_VERSION = 1
DEMO_QUERIES = ROOT / "tools" / "demo" / "queries.txt"
#: Real recordings (file, reference transcript file) from shared/data, shortest first.
CLIPS = (
    "asr_rhasspy_commands/turn_on_the_living_room_lamp.wav",
    "asr_pocketsphinx/cards_005.wav",
    "asr_misc_librispeech/2412-153948-0000.flac",
    "asr_whisper_jfk/jfk.wav",
)
#: Spoken queries for the synthetic utterances: commercial, so that signals come out and get encoded.
SPOKEN = {
    2.0: "play some jazz for the drive",
    5.0: "where can i buy a good pair of trail running shoes for the mountains this summer",
    10.0: "i am looking for a cheap flight to lisbon in may and a hotel near the old town with a pool, "
    "and maybe a rental car for a day trip to the beaches in the south",
}
PROFILE_ID = "bench-profile-0001"
#: Targets of the issue, by figure: (description, comparison, bound).
TARGETS = {
    "edge_5s_p50_ms": ("5 s utterance: end of audio -> signals ready, p50 (ms)", "<=", 400.0),
    "text_p50_ms": ("text query: classify + filter + encode, p50 (ms)", "<=", 10.0),
    "peak_rss_mb": ("peak RSS, edge process with all models loaded (MB)", "<=", 350.0),
    "bytes_per_signal_20": ("bytes per signal in a batch of 20, on the wire", "<=", 12.0),
    "sqlite_signals_per_s": ("aggregator on SQLite: sustained signals/s", ">=", 20_000.0),
    "sqlite_p99_ms": ("aggregator on SQLite: p99 Ingest (ms)", "<=", 50.0),
    "postgresql_signals_per_s": ("aggregator on PostgreSQL: sustained signals/s", ">=", 10_000.0),
    "postgresql_p99_ms": ("aggregator on PostgreSQL: p99 Ingest (ms)", "<=", 100.0),
}
BENCHMARKS = ("edge-latency", "edge-memory", "wire-size", "aggregator", "side-by-side", "scale")


# --- statistics, machine, results ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q * 100))


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99, mean, min, max and n of a list of numbers."""
    return {
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "mean": statistics.fmean(values) if values else math.nan,
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
        "n": len(values),
    }


def machine() -> dict[str, Any]:
    """What the numbers ran on: CPU model and count, memory, Python and library versions, load."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    with suppress(ValueError, OSError):
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    versions = {}
    for name in ("ctranslate2", "faster_whisper", "onnxruntime", "grpc", "google.protobuf", "psycopg"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            versions[name] = "not installed"
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": versions,
        "load_average": list(os.getloadavg()),
    }


def check_targets(figures: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's targets that ``figures`` speaks to, each with its value and whether it is met."""
    rows = []
    for key, value in figures.items():
        description, op, bound = TARGETS[key]
        met = value <= bound if op == "<=" else value >= bound
        rows.append(
            {
                "figure": key,
                "description": description,
                "target": f"{op} {bound:g}",
                "value": value,
                "met": met,
            }
        )
    return rows


def write_result(
    out: Path, name: str, smoke: bool, config: dict[str, Any], results: dict[str, Any], started: float
) -> dict[str, Any]:
    """Assemble the JSON document of one benchmark run and write it to ``out/<name>.json``."""
    figures = results.pop("figures", {})
    info = machine()
    document = {
        "schema": SCHEMA_VERSION,
        "benchmark": name,
        "smoke": smoke,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 3),
        "command": " ".join(["python", "-m", "tools.bench", *sys.argv[1:]]),
        "machine": info,
        "config": config,
        "results": results,
        "targets": check_targets(figures),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(document, indent=1, allow_nan=False, default=_json_default) + "\n")
    return document


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class ResultError(ValueError):
    """A benchmark result document does not have the expected shape."""


def _require(document: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in document:
        raise ResultError(f"{where}: missing {key!r}")
    value = document[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ResultError(f"{where}.{key}: expected {kind}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _number(document: dict[str, Any], key: str, where: str, minimum: float = 0.0) -> float:
    value = float(_require(document, key, (int, float), where))
    if not math.isfinite(value) or value < minimum:
        raise ResultError(f"{where}.{key}: expected a finite number >= {minimum:g}, got {value}")
    return value


def _stats(document: dict[str, Any], key: str, where: str) -> None:
    stats = _require(document, key, dict, where)
    for name in ("p50", "p95", "mean"):
        _number(stats, name, f"{where}.{key}")


def validate_result(document: dict[str, Any]) -> None:
    """Raise ``ResultError`` unless ``document`` is a well-formed result of a known benchmark.

    It checks shape and sanity (every timing a finite non-negative number, every table non-empty), never
    whether a number is good: that is what the targets are for.
    """
    where = "result"
    if _require(document, "schema", int, where) != SCHEMA_VERSION:
        raise ResultError(f"result.schema: expected {SCHEMA_VERSION}")
    name = _require(document, "benchmark", str, where)
    if name not in BENCHMARKS:
        raise ResultError(f"result.benchmark: unknown benchmark {name!r}")
    _require(document, "smoke", bool, where)
    _require(document, "created", str, where)
    _number(document, "duration_s", where)
    info = _require(document, "machine", dict, where)
    _number(info, "cpu_count", "result.machine", 1)
    _require(document, "config", dict, where)
    results = _require(document, "results", dict, where)
    for n, target in enumerate(_require(document, "targets", list, where)):
        _require(target, "figure", str, f"result.targets[{n}]")
        _require(target, "met", bool, f"result.targets[{n}]")
        _number(target, "value", f"result.targets[{n}]")
    where = f"result.results ({name})"
    if name == "edge-latency":
        rows = _require(results, "utterances", list, where)
        if not rows:
            raise ResultError(f"{where}.utterances: empty")
        for n, row in enumerate(rows):
            at = f"{where}.utterances[{n}]"
            _require(row, "label", str, at)
            _number(row, "audio_s", at)
            _stats(row, "total_ms", at)
            stages = _require(row, "stages_ms", dict, at)
            for stage in ("vad", "asr", "classify", "filter", "encode"):
                _stats(stages, stage, f"{at}.stages_ms")
        text = _require(results, "text", dict, where)
        _stats(text, "total_ms", f"{where}.text")
        _number(_require(results, "threads", dict, where), "asr", f"{where}.threads", 1)
    elif name == "edge-memory":
        for key in ("peak_rss_mb", "rss_after_load_mb", "model_load_s", "queries"):
            _number(results, key, where)
    elif name == "wire-size":
        rows = _require(results, "batches", list, where)
        if not rows:
            raise ResultError(f"{where}.batches: empty")
        for n, row in enumerate(rows):
            at = f"{where}.batches[{n}]"
            for key in ("signals", "protobuf_bytes", "grpc_frame_bytes", "json_bytes", "bytes_per_signal"):
                _number(row, key, at, 1e-9)
    elif name == "aggregator":
        runs = _require(results, "runs", list, where)
        if not runs:
            raise ResultError(f"{where}.runs: empty")
        for n, run in enumerate(runs):
            at = f"{where}.runs[{n}]"
            if _require(run, "store", str, at) not in ("sqlite", "postgresql"):
                raise ResultError(f"{at}.store: expected sqlite or postgresql")
            if _require(run, "mode", str, at) not in ("open", "closed"):
                raise ResultError(f"{at}.mode: expected open or closed")
            for key in ("devices", "batch_size", "calls", "signals_per_s", "server_cpu_s"):
                _number(run, key, at)
            _stats(run, "latency_ms", at)
            _require(run, "errors", dict, at)
    elif name == "scale":
        try:
            bench_scale.validate(results)
        except ValueError as exc:
            raise ResultError(f"{where}.{exc}") from None
    elif name == "side-by-side":
        rows = _require(results, "variants", list, where)
        if not rows:
            raise ResultError(f"{where}.variants: empty")
        for n, row in enumerate(rows):
            at = f"{where}.variants[{n}]"
            _require(row, "name", str, at)
            _require(row, "setting", str, at)
            _stats(row, "total_ms", at)
            _stats(row, "asr_ms", at)
            _number(row, "wer", at)


# --- utterances -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Utterance:
    """One utterance of the benchmark: its audio and the words spoken in it."""

    label: str
    kind: str
    audio: Audio
    reference: str


def _espeak() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise SystemExit("bench: espeak-ng is needed for synthetic utterances (apt-get install espeak-ng)")
    return binary


def speak(text: str, folder: Path, speed: int = 160) -> Audio:
    """``text`` spoken by espeak-ng (American English) at ``speed`` words per minute, as 16 kHz audio."""
    path = folder / f"tts-{uuid.uuid4().hex[:8]}.wav"
    subprocess.run(
        [_espeak(), "-v", "en-us", "-s", str(speed), "-w", str(path), text],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return load_audio(path)


def synthetic(seconds: float, folder: Path) -> Utterance:
    """A spoken query about ``seconds`` long (the speaking rate is adjusted), padded with silence to it.

    The trailing silence is what a device sees before it decides the wearer has stopped talking.
    """
    text = SPOKEN.get(seconds) or _words_for(seconds)
    audio = speak(text, folder)
    if abs(audio.duration_s - seconds) > 0.25:
        speed = int(max(80, min(450, 160 * audio.duration_s / seconds)))
        audio = speak(text, folder, speed)
    target = int(seconds * SAMPLE_RATE)
    samples = audio.samples[:target]
    if len(samples) < target:
        samples = np.concatenate([samples, np.zeros(target - len(samples), dtype=np.float32)])
    return Utterance(f"synthetic {seconds:g} s", "synthetic", Audio(samples), text)


def _words_for(seconds: float) -> str:
    base = SPOKEN[10.0].split()
    # About 2.7 words a second at a natural rate.
    count = max(3, int(seconds * 2.7))
    return " ".join((base * (count // len(base) + 1))[:count])


def _reference(path: Path) -> str:
    table = path.parent / "transcripts.tsv"
    if table.is_file():
        lines = table.read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t") if lines else []
        column = header.index("reference_text") if "reference_text" in header else 1
        for line in lines[1:]:
            parts = line.split("\t")
            if len(parts) > column and Path(parts[0]).name == path.name:
                return parts[column]
    return ""


def clips(names: Sequence[str]) -> list[Utterance]:
    """Real recordings from shared/data (those that exist), with their reference transcripts."""
    out = []
    for name in names:
        path = SPEECH / name
        if path.is_file():
            out.append(Utterance(path.name, "clip", load_audio(path), _reference(path)))
    return out


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference length, on the classifier's normalised text."""
    ref, hyp = normalize_text(reference).split(), normalize_text(hypothesis).split()
    if not ref:
        return 0.0 if not hyp else 1.0
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)


# --- edge latency ---------------------------------------------------------------------------------------


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


def demo_queries() -> list[str]:
    return [line.strip() for line in DEMO_QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()]


def bench_edge_latency(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
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


def table_edge_latency(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
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


# --- edge memory ----------------------------------------------------------------------------------------


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def memory_child(folder: Path, queries: int) -> dict[str, Any]:
    """In a fresh process: load every model, analyse ``queries`` utterances, report RSS and load time."""
    rss_start = _rss_mb()
    started = time.perf_counter()
    models = EdgeModels()
    models.load_audio_models()
    load_s = time.perf_counter() - started
    rss_loaded = _rss_mb()
    files = sorted(folder.glob("*.wav")) + [SPEECH / c for c in CLIPS if (SPEECH / c).is_file()]
    if not files:
        raise SystemExit(f"bench: no audio in {folder}")
    pipeline = Pipeline(models, region="US")
    signals = 0
    for n in range(queries):
        analysis = pipeline.analyze_file(files[n % len(files)])
        signals += len(analysis.signals)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {
        "rss_start_mb": rss_start,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": peak_kb / 1024,
        "model_load_s": load_s,
        "queries": queries,
        "distinct_utterances": len(files),
        "signals": signals,
    }


def bench_edge_memory(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    queries = 3 if args.smoke else args.queries
    texts = demo_queries()[: 2 if args.smoke else None]
    with tempfile.TemporaryDirectory(prefix="sotto-bench-") as tmp:
        for n, text in enumerate(texts):
            subprocess.run(
                [_espeak(), "-v", "en-us", "-s", "160", "-w", str(Path(tmp) / f"q{n:03d}.wav"), text],
                check=True,
                capture_output=True,
                timeout=60,
            )
        proc = subprocess.run(
            [sys.executable, "-m", "tools.bench", "_memory-child", tmp, str(queries)],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0:
        raise SystemExit(f"bench: the memory probe failed:\n{proc.stderr}")
    results = json.loads(proc.stdout)
    results["figures"] = {"peak_rss_mb": results["peak_rss_mb"]}
    return {"queries": queries, "spoken_queries": len(texts), "clips": len(CLIPS)}, results


def table_edge_memory(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    r = document["results"]
    rows = [
        ["RSS at start (MB)", f"{r['rss_start_mb']:.0f}"],
        ["RSS with every model loaded (MB)", f"{r['rss_after_load_mb']:.0f}"],
        [f"peak RSS after {r['queries']} queries (MB)", f"{r['peak_rss_mb']:.0f}"],
        ["model load (s)", f"{r['model_load_s']:.2f}"],
    ]
    return [("edge memory: one process, every model, real and spoken queries", ["figure", "value"], rows)]


# --- wire size ------------------------------------------------------------------------------------------

#: gRPC puts a 5-byte prefix (compressed flag, 4-byte length) in front of every message.
GRPC_PREFIX_BYTES = 5


def wire_batch(size: int, rng: random.Random, policy: Policy, today: int) -> tuple[bytes, bytes]:
    """A batch of ``size`` realistic signals as protobuf and as compact JSON with the same content."""
    ids = sorted(policy.interest_ids)
    interests = [
        Interest(rng.choice(ids), rng.randint(1, 4), today - (rng.randint(1, 3) if rng.random() < 0.1 else 0))
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


def bench_wire_size(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
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


def table_wire_size(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
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


# --- aggregator -----------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _store_url(store: str, args: argparse.Namespace, folder: Path) -> Iterator[str]:
    if store == "sqlite":
        yield f"sqlite:///{folder / 'bench.db'}"
        return
    base = (
        args.postgres_url
        or os.environ.get("SOTTO_BENCH_POSTGRES_URL")
        or os.environ.get("SOTTO_TEST_POSTGRES_URL")
    )
    if not base:
        raise SystemExit(
            "bench: --store postgresql needs --postgres-url (or $SOTTO_BENCH_POSTGRES_URL, "
            "$SOTTO_TEST_POSTGRES_URL); bash tools/postgres.sh prints one for the local server"
        )
    from sotto.server.store.postgres import scratch_schema

    with scratch_schema(base, prefix="bench") as url:
        yield url


@contextmanager
def _server(url: str, devices: int) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``sotto-server serve`` on a free loopback port, with limits that let the load through."""
    calls = str(max(1000, devices * 10))
    try:
        proc, target = start_server(
            url,
            "--log-level",
            "WARNING",
            # One device here stands for a busy gateway: the per-device limit (1/s) is not under test.
            "--rate-per-second",
            "1000000",
            "--rate-burst",
            "1000000",
            "--max-concurrent-rpcs",
            calls,
        )
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"bench: {exc}") from None
    try:
        yield proc, target
    finally:
        stop_server(proc)


def _issue_tokens(url: str, profiles: list[str], path: Path) -> None:
    try:
        path.write_text(issue_tokens(url, *profiles))
    except RuntimeError as exc:
        raise SystemExit(f"bench: {exc}") from None


#: Offered load (signals/s) at which each store's p99 target applies.
TARGET_RATE = {"sqlite": 20_000, "postgresql": 10_000}


def run_aggregator(
    store: str, devices: int, rates: Sequence[float], args: argparse.Namespace, duration: float, warmup: float
) -> list[dict[str, Any]]:
    """One server; a closed-loop run (capacity), then one open-loop run per offered rate (latency under a
    given load), each load in a process of its own."""
    runs = []
    with (
        tempfile.TemporaryDirectory(prefix="sotto-bench-") as tmp,
        _store_url(store, args, Path(tmp)) as url,
        _server(url, devices) as (proc, target),
    ):
        tokens = Path(tmp) / "tokens.json"
        _issue_tokens(url, [f"bench-device-{n:05d}" for n in range(devices)], tokens)
        for rate in (0.0, *rates):
            cpu_before = _cpu_seconds(proc.pid)
            command = [
                sys.executable,
                "-m",
                "tools.bench_load",
                "--target",
                target,
                "--tokens",
                str(tokens),
                "--batch-size",
                str(args.batch_size),
                "--duration",
                str(duration),
                "--warmup",
                str(warmup),
                "--rate",
                str(rate / args.batch_size),
            ]
            load = subprocess.run(
                command,
                cwd=ROOT,
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=duration + warmup + 120,
            )
            cpu_s = _cpu_seconds(proc.pid) - cpu_before
            if load.returncode != 0:
                raise SystemExit(f"bench: the load generator failed:\n{load.stderr}")
            report = json.loads(load.stdout)
            latencies = report["latencies_ms"]
            runs.append(
                {
                    "store": store,
                    "mode": "open" if rate else "closed",
                    "devices": devices,
                    "offered_signals_per_s": rate or None,
                    "batch_size": report["batch_size"],
                    "duration_s": report["duration_s"],
                    "calls": report["calls"],
                    "signals": report["signals"],
                    "signals_per_s": report["signals"] / report["duration_s"],
                    "batches_per_s": report["calls"] / report["duration_s"],
                    "latency_ms": summary(latencies),
                    "errors": report["errors"],
                    # Includes the warm-up: CPU per signal is a ratio over the whole run.
                    "server_cpu_s": cpu_s,
                }
            )
    return runs


def bench_aggregator(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    stores = args.store or ["sqlite"]
    if args.smoke:
        devices, rates, duration, warmup = 4, [200.0], 1.0, 0.3
    else:
        devices, duration, warmup = args.devices, args.duration, args.warmup
        rates = [float(x) for x in args.rates.split(",") if x]
    runs = []
    for store in stores:
        wanted = sorted(set(rates) | ({float(TARGET_RATE[store])} if not args.smoke else set()))
        runs += run_aggregator(store, devices, wanted, args, duration, warmup)
    figures = {}
    for store in stores:
        closed = next(r for r in runs if r["store"] == store and r["mode"] == "closed")
        figures[f"{store}_signals_per_s"] = closed["signals_per_s"]
        at_target = [
            r for r in runs if r["store"] == store and r["offered_signals_per_s"] == TARGET_RATE[store]
        ]
        if at_target:
            figures[f"{store}_p99_ms"] = at_target[0]["latency_ms"]["p99"]
    config = {
        "stores": stores,
        "devices": devices,
        "offered_signals_per_s": rates,
        "batch_size": args.batch_size,
        "duration_s": duration,
        "warmup_s": warmup,
        "load": "separate process, grpc.aio, 4 HTTP/2 connections, a bearer token per device, a new batch "
        "id per call. closed: each device sends its next batch when the last is answered (capacity). "
        "open: the devices together offer a fixed rate and latency counts from when a call was due "
        "(the p99 targets apply at 20,000 signals/s on SQLite and 10,000 on PostgreSQL)",
    }
    return config, {"runs": runs, "figures": figures}


def table_aggregator(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    rows = []
    for r in document["results"]["runs"]:
        lat = r["latency_ms"]
        cpu = r["server_cpu_s"]
        offered = r["offered_signals_per_s"]
        rows.append(
            [
                r["store"],
                str(r["devices"]),
                "closed loop" if offered is None else f"{offered:.0f}",
                f"{r['signals_per_s']:.0f}",
                f"{r['batches_per_s']:.0f}",
                f"{lat['p50']:.1f}",
                f"{lat['p99']:.1f}",
                f"{cpu:.1f}",
                ", ".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0",
            ]
        )
    header = [
        "store",
        "devices",
        "offered/s",
        "signals/s",
        "batches/s",
        "p50 ms",
        "p99 ms",
        "server CPU s",
        "errors",
    ]
    size = document["config"]["batch_size"]
    return [(f"aggregator: Ingest of {size}-signal batches, loopback", header, rows)]


# --- side by side ---------------------------------------------------------------------------------------


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


def bench_side_by_side(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
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


def table_side_by_side(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
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


# --- plots ----------------------------------------------------------------------------------------------


def _save(fig, ax, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Legend, layout, PNG, and the figure closed: the same finish for every plot."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: Path, out: Path) -> list[Path]:
    """PNG plots from the JSON results in ``results``: latency vs utterance length, and aggregator
    latency vs load. Returns the files written (a plot whose results are missing is skipped)."""
    need("matplotlib", "tools", "python -m tools.bench plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    latency = results / "edge-latency.json"
    if latency.is_file():
        rows = sorted(json.loads(latency.read_text())["results"]["utterances"], key=lambda r: r["audio_s"])
        fig, ax = plt.subplots(figsize=(7, 4.2))
        x = [r["audio_s"] for r in rows]
        bottom = np.zeros(len(rows))
        for stage in ("vad", "asr", "classify", "filter", "encode"):
            values = np.array([r["stages_ms"][stage]["p50"] for r in rows])
            ax.bar(x, values, width=0.35, bottom=bottom, label=f"{stage} (p50)")
            bottom += values
        ax.errorbar(
            x,
            [r["total_ms"]["p50"] for r in rows],
            yerr=[[0] * len(rows), [r["total_ms"]["p95"] - r["total_ms"]["p50"] for r in rows]],
            fmt="ko",
            capsize=3,
            label="total p50 (bar to p95)",
        )
        ax.axhline(400, color="grey", linestyle="--", linewidth=1, label="target for 5 s: 400 ms")
        ax.set_xlabel("utterance length (s)")
        ax.set_ylabel("end of audio -> signals ready (ms)")
        ax.set_title("Edge latency against utterance length")
        written.append(_save(fig, ax, out / "edge_latency_vs_length.png"))
    aggregator = results / "aggregator.json"
    if aggregator.is_file():
        runs = json.loads(aggregator.read_text())["results"]["runs"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for store in sorted({r["store"] for r in runs}):
            mine = sorted(
                (r for r in runs if r["store"] == store and r["mode"] == "open"),
                key=lambda r: r["signals_per_s"],
            )
            thr = [r["signals_per_s"] for r in mine]
            line = ax.plot(thr, [r["latency_ms"]["p50"] for r in mine], "o-", label=f"{store} p50")[0]
            ax.plot(
                thr,
                [r["latency_ms"]["p99"] for r in mine],
                "s--",
                color=line.get_color(),
                label=f"{store} p99",
            )
            closed = [r for r in runs if r["store"] == store and r["mode"] == "closed"]
            for r in closed:
                ax.axvline(r["signals_per_s"], color=line.get_color(), linestyle=":", linewidth=1)
                ax.annotate(
                    f"{store} capacity",
                    (r["signals_per_s"], 1),
                    rotation=90,
                    fontsize=7,
                    color=line.get_color(),
                )
        ax.set_xlabel("offered signals/s (open loop; dotted: closed-loop capacity)")
        ax.set_ylabel("Ingest latency (ms)")
        ax.set_yscale("log")
        ax.set_title("Aggregator latency against load")
        written.append(_save(fig, ax, out / "aggregator_latency_vs_load.png"))
    return written


# --- command line ---------------------------------------------------------------------------------------

Runner = Callable[[argparse.Namespace], tuple[dict[str, Any], dict[str, Any]]]
Table = Callable[[dict[str, Any]], list[tuple[str, list[str], list[list[str]]]]]
REGISTRY: dict[str, tuple[Runner, Table]] = {
    "edge-latency": (bench_edge_latency, table_edge_latency),
    "edge-memory": (bench_edge_memory, table_edge_memory),
    "wire-size": (bench_wire_size, table_wire_size),
    "aggregator": (bench_aggregator, table_aggregator),
    "side-by-side": (bench_side_by_side, table_side_by_side),
    "scale": (bench_scale.bench_scale, bench_scale.table),
}


def print_tables(document: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    # Wide enough for every table when the output is a file or a pipe (CI logs, tee).
    console = Console(width=None if sys.stdout.isatty() else 140)
    _, table = REGISTRY[document["benchmark"]]
    for title, header, rows in table(document):
        view = RichTable(title=title, title_justify="left")
        for n, name in enumerate(header):
            view.add_column(name, justify="left" if n == 0 else "right")
        for row in rows:
            view.add_row(*row)
        console.print(view)
    for target in document["targets"]:
        mark = "[green]met[/green]" if target["met"] else "[red]missed[/red]"
        console.print(f"  target {target['description']}: {target['value']:.2f} ({target['target']}) {mark}")
    if document["smoke"]:
        console.print("  (smoke run: the numbers say nothing)")


def run_benchmark(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark, write its JSON into ``args.out``, print its table; returns the document."""
    started = time.time()
    runner, _ = REGISTRY[name]
    load_before = list(os.getloadavg())
    config, results = runner(args)
    config["load_average_before"] = load_before
    document = write_result(args.out, name, args.smoke, config, results, started)
    validate_result(document)
    print_tables(document)
    return document


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny run that checks the benchmark works")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per utterance")
    parser.add_argument("--threads", type=int, default=AsrOptions().cpu_threads, help="ASR CPU threads")
    parser.add_argument("--seed", type=int, default=7)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in (*BENCHMARKS, "all"):
        sub = commands.add_parser(name, help=f"run {'every benchmark' if name == 'all' else name}")
        _add_common(sub)
        if name in ("edge-latency", "all"):
            sub.add_argument("--lengths", default="2,5,10", help="synthetic utterance lengths in seconds")
        if name in ("edge-memory", "all"):
            sub.add_argument("--queries", type=int, default=50, help="utterances analysed")
        if name in ("aggregator", "all"):
            sub.add_argument(
                "--store",
                action="append",
                choices=("sqlite", "postgresql"),
                help="store to benchmark (repeatable; default sqlite; `all` runs both)",
            )
            sub.add_argument("--devices", type=int, default=100, help="concurrent devices")
            sub.add_argument(
                "--rates",
                default="2000,5000,10000,15000,20000,25000",
                help="offered signals/s of the open-loop runs (the target rate is always added)",
            )
            sub.add_argument("--batch-size", type=int, default=20)
            sub.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
            sub.add_argument("--warmup", type=float, default=2.0)
            sub.add_argument("--postgres-url", help="PostgreSQL server (a fresh schema is used and dropped)")
        if name in ("scale", "all"):
            bench_scale.add_arguments(sub, load_options=name == "scale")
    plot_cmd = commands.add_parser("plot", help="PNG plots from JSON results")
    plot_cmd.add_argument("--results", type=Path, default=Path("bench-results"))
    plot_cmd.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: --results)")
    child = commands.add_parser("_memory-child", help=argparse.SUPPRESS)
    child.add_argument("folder", type=Path)
    child.add_argument("queries", type=int)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["speed"]:  # on-device speed, side by side with bare faster-whisper: tools/bench_speed.py
        from tools.bench_speed import main as speed

        return speed(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "_memory-child":
        json.dump(memory_child(args.folder, args.queries), sys.stdout)
        return 0
    if args.command == "plot":
        for path in plot(args.results, args.out or args.results):
            print(path)
        return 0
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    if getattr(args, "devices", 1) < 1 or getattr(args, "batch_size", 1) < 1:
        parser.error("--devices and --batch-size must be at least 1")
    names = BENCHMARKS if args.command == "all" else (args.command,)
    if args.command == "all" and not args.store:
        args.store = ["sqlite", "postgresql"]
    for name in names:
        run_benchmark(name, args)
    if args.command == "all":
        for path in plot(args.out, args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
