"""Benchmark ``edge-memory``: peak RSS of a process with every model, and the model load time; and the
classifier's own share of a process, on each runtime the machine has (the device ships one)."""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sotto.edge.classifier import BACKENDS
from sotto.edge.pipeline import EdgeModels, Pipeline
from tools.bench.speech import CLIPS, demo_queries, say
from tools.harness import run_module
from tools.paths import SOURCE_MODELS, SPEECH


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


def classifier_texts(count: int) -> list[str]:
    """``count`` held-out query texts (models/reference_outputs.npz), half of them the longest, so that
    every input length the classifier provides for (each TFLite signature) is used."""
    with np.load(SOURCE_MODELS / "reference_outputs.npz") as data:
        texts = sorted((str(t) for t in data["texts"]), key=lambda t: (len(t), t))
    step = max(1, len(texts) // max(1, count - count // 2))
    return texts[len(texts) - count // 2 :] + texts[::step][: count - count // 2]


def classifier_child(backend: str, queries: int) -> dict[str, Any]:
    """In a fresh process: import the runtime, load the classifier on ``backend``, classify ``queries``
    held-out texts; the classifier's share is the resident memory it adds to the imports."""
    import tokenizers  # noqa: F401  (the imports are the baseline, not the classifier's share)

    from sotto.edge.asr import ModelError
    from sotto.edge.classifier import TextClassifier, tflite_interpreter_class

    if backend == "onnx":
        import onnxruntime  # noqa: F401
    else:
        try:
            tflite_interpreter_class()
        except ModelError as exc:
            return {"backend": backend, "error": str(exc)}
    rss_imports = _rss_mb()
    classifier = TextClassifier(backend=backend)
    rss_loaded = _rss_mb()
    texts = classifier_texts(queries)
    for text in texts:
        classifier.classify(text)
    rss_after = _rss_mb()
    return {
        "backend": backend,
        "rss_imports_mb": rss_imports,
        "loaded_mb": rss_loaded - rss_imports,
        "after_queries_mb": rss_after - rss_imports,
        "queries": len(texts),
    }


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    queries = 3 if args.smoke else args.queries
    texts = demo_queries()[: 2 if args.smoke else None]
    with tempfile.TemporaryDirectory(prefix="sotto-bench-") as tmp:
        for n, text in enumerate(texts):
            say(text, Path(tmp) / f"q{n:03d}.wav")
        proc = run_module("tools.bench", "_memory-child", tmp, str(queries), timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"bench: the memory probe failed:\n{proc.stderr}")
    results = json.loads(proc.stdout)
    results["classifier"] = []
    for backend in BACKENDS:
        child = run_module(
            "tools.bench", "_classifier-child", backend, str(20 if args.smoke else 400), timeout=600
        )
        if child.returncode != 0:
            raise SystemExit(f"bench: the {backend} classifier probe failed:\n{child.stderr}")
        results["classifier"].append(json.loads(child.stdout))
    results["figures"] = {"peak_rss_mb": results["peak_rss_mb"]}
    return {"queries": queries, "spoken_queries": len(texts), "clips": len(CLIPS)}, results


def table(document: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    r = document["results"]
    rows = [
        ["RSS at start (MB)", f"{r['rss_start_mb']:.0f}"],
        ["RSS with every model loaded (MB)", f"{r['rss_after_load_mb']:.0f}"],
        [f"peak RSS after {r['queries']} queries (MB)", f"{r['peak_rss_mb']:.0f}"],
        ["model load (s)", f"{r['model_load_s']:.2f}"],
    ]
    share = [
        [c["backend"], f"{c['loaded_mb']:.0f}", f"{c['after_queries_mb']:.0f}", str(c["queries"])]
        if "error" not in c
        else [c["backend"], "-", "-", f"not measured: {c['error']}"]
        for c in r.get("classifier", [])
    ]
    return [
        ("edge memory: one process, every model, real and spoken queries", ["figure", "value"], rows),
        (
            "the classifier's share of a process (MB added to its runtime's imports), per runtime",
            ["runtime", "loaded", "after the queries", "queries"],
            share,
        ),
    ]
