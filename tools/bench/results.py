"""The result schema of the benchmarks: statistics, the machine, targets, writing and checking a result."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
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


def check_targets(
    figures: dict[str, float], targets: dict[str, tuple[str, str, float]] = TARGETS
) -> list[dict[str, Any]]:
    """The ``targets`` that ``figures`` speaks to, each with its value and whether it is met."""
    rows = []
    for key, value in figures.items():
        description, op, bound = targets[key]
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


def _rows(document: dict[str, Any], key: str, where: str) -> list[tuple[str, Any]]:
    """The rows of the non-empty list ``document[key]``, each with where it is (for messages)."""
    rows = _require(document, key, list, where)
    if not rows:
        raise ResultError(f"{where}.{key}: empty")
    return [(f"{where}.{key}[{n}]", row) for n, row in enumerate(rows)]


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
        for at, row in _rows(results, "utterances", where):
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
        for at, row in _rows(results, "batches", where):
            for key in ("signals", "protobuf_bytes", "grpc_frame_bytes", "json_bytes", "bytes_per_signal"):
                _number(row, key, at, 1e-9)
    elif name == "aggregator":
        for at, run in _rows(results, "runs", where):
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
            _validate_scale(results)
        except ValueError as exc:
            raise ResultError(f"{where}.{exc}") from None
    elif name == "side-by-side":
        for at, row in _rows(results, "variants", where):
            _require(row, "name", str, at)
            _require(row, "setting", str, at)
            _stats(row, "total_ms", at)
            _stats(row, "asr_ms", at)
            _number(row, "wer", at)


def _validate_scale(results: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``results`` has the shape the ``scale`` benchmark writes."""
    runs = results.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError("runs: expected a non-empty list")
    for n, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("store"), str):
            raise ValueError(f"runs[{n}].store: expected a string")
        for key in (
            "workers",
            "calls",
            "signals_per_s",
            "server_signals",
            "server_cpu_s",
            "server_cpu_s_per_1e4_signals",
            "load_generator_cpu_s",
        ):
            value = run.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"runs[{n}].{key}: expected a finite number >= 0, got {value!r}")
        if run["workers"] < 1:
            raise ValueError(f"runs[{n}].workers: expected at least 1")
        spread = run.get("calls_per_worker")
        if not isinstance(spread, list) or len(spread) != run["workers"]:
            raise ValueError(f"runs[{n}].calls_per_worker: expected one count per worker")
        if not isinstance(run.get("errors"), dict):
            raise ValueError(f"runs[{n}].errors: expected an object")
        if "database" in run:
            _validate_database(run, f"runs[{n}]")


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value < float("inf")


def _validate_database(run: dict[str, Any], where: str) -> None:
    """The database figures of a sharded run: one CPU time per shard, finite and not negative."""
    shards, database = run.get("shards"), run["database"]
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"{where}.shards: expected a positive integer")
    if not isinstance(database, dict):
        raise ValueError(f"{where}.database: expected an object")
    for key in (
        "proxy_cpu_s",
        "proxy_cpu_s_per_1e4_signals",
        "shards_cpu_s_per_1e4_signals",
        "db_cpu_s_per_1e4_signals",
    ):
        if not _finite(database.get(key)):
            raise ValueError(f"{where}.database.{key}: expected a finite number >= 0")
    per_shard = database.get("shard_cpu_s")
    if not isinstance(per_shard, list) or len(per_shard) != shards or not all(map(_finite, per_shard)):
        raise ValueError(f"{where}.database.shard_cpu_s: expected one CPU time >= 0 per shard")
    background = database.get("background_cpu_s")
    if not isinstance(background, dict) or not all(map(_finite, background.values())):
        raise ValueError(f"{where}.database.background_cpu_s: expected CPU times >= 0 by server")
    tables = database.get("tables", {})
    if not isinstance(tables, dict) or not all(
        isinstance(sizes, dict) and _finite(sizes.get("rows")) and _finite(sizes.get("bytes"))
        for sizes in tables.values()
    ):
        raise ValueError(f"{where}.database.tables: expected rows and bytes >= 0 per table")
