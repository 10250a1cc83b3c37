"""Benchmark ``edge-memory``: peak RSS of a process with every model, and the model load time."""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from sotto.edge.pipeline import EdgeModels, Pipeline
from tools.bench.speech import CLIPS, demo_queries, say
from tools.harness import run_module
from tools.paths import SPEECH


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
    return [("edge memory: one process, every model, real and spoken queries", ["figure", "value"], rows)]
