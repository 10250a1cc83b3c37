"""tools/bench (``python -m tools.bench``): every benchmark runs in its smoke size and writes a
well-formed result.

These are CI's smoke check of the benchmark suite. They never assert a timing (CI machines are slow and
shared); they check that each benchmark runs end to end through its real processes and that its JSON has
the documented shape, and that the shape check itself rejects broken documents.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tools.bench import BENCHMARKS, ResultError, validate_result

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.bench

POSTGRES_ENV = "SOTTO_TEST_POSTGRES_URL"


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def smoke(tmp_path: Path, name: str, *extra: str) -> dict[str, Any]:
    proc = run_bench(name, "--smoke", "--out", str(tmp_path), *extra)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / f"{name}.json"
    document = json.loads(path.read_text())
    validate_result(document)
    assert document["benchmark"] == name
    assert document["smoke"] is True
    return document


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke run of every benchmark into one folder, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    url = os.environ.get(POSTGRES_ENV)
    assert url, f"${POSTGRES_ENV} must name a PostgreSQL server (bash tools/postgres.sh prints one)"
    for name in BENCHMARKS:
        extra: tuple[str, ...] = ()
        if name in ("aggregator", "scale"):
            extra = ("--store", "sqlite", "--store", "postgresql", "--postgres-url", url)
        if name == "scale":
            extra += ("--workers", "1,2")
        smoke(out, name, *extra)
    return out


def load(results: Path, name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
    return document


@pytest.mark.parametrize(
    ("name", "figures"),
    [
        ("edge-latency", {"text_p50_ms"}),
        ("edge-memory", {"peak_rss_mb"}),
        ("wire-size", {"bytes_per_signal_20"}),
        (
            # The p99 figures need the open-loop run at the target rate, which a smoke run leaves out.
            "aggregator",
            {"sqlite_signals_per_s", "postgresql_signals_per_s"},
        ),
        ("side-by-side", set()),
        ("scale", set()),
    ],
)
def test_every_benchmark_writes_a_valid_result(results: Path, name: str, figures: set[str]) -> None:
    document = load(results, name)
    validate_result(document)
    assert {t["figure"] for t in document["targets"]} == figures
    assert document["machine"]["cpu_count"] >= 1


def test_edge_latency_splits_every_stage(results: Path) -> None:
    document = load(results, "edge-latency")
    rows = document["results"]["utterances"]
    assert document["results"]["threads"]["asr"] >= 1
    spoken = [r for r in rows if r["kind"] == "synthetic"]
    assert spoken and spoken[0]["audio_s"] == pytest.approx(2.0)
    assert any(r["kind"] == "clip" for r in rows)
    # The total covers the stages it is split into.
    row = spoken[0]
    stage_sum = sum(row["stages_ms"][s]["p50"] for s in ("vad", "asr", "classify", "filter", "encode"))
    assert row["total_ms"]["p50"] >= stage_sum * 0.99


def test_edge_memory_loads_every_model(results: Path) -> None:
    memory = load(results, "edge-memory")["results"]
    assert memory["queries"] == 3
    assert memory["peak_rss_mb"] >= memory["rss_after_load_mb"] > memory["rss_start_mb"] > 0
    # The classifier's own share, measured in a fresh process per runtime.
    shares = {c["backend"]: c for c in memory["classifier"]}
    assert set(shares) == {"onnx", "tflite"}
    assert "error" not in shares["onnx"]
    for share in shares.values():
        assert "error" in share or (share["loaded_mb"] > 0 and share["queries"] == 20)


def test_wire_size_compares_with_json(results: Path) -> None:
    rows = load(results, "wire-size")["results"]["batches"]
    assert [r["signals"] for r in rows] == [1, 10, 20, 50]
    for row in rows:
        assert row["grpc_frame_bytes"] == row["protobuf_bytes"] + 5
        assert row["json_bytes"] > row["protobuf_bytes"]


def test_aggregator_runs_on_sqlite_and_postgresql(results: Path) -> None:
    runs = load(results, "aggregator")["results"]["runs"]
    assert {r["store"] for r in runs} == {"sqlite", "postgresql"}
    for run in runs:
        # Every measured call was applied: the load generator sends new batch ids, none is refused.
        assert run["calls"] > 0 and run["errors"] == {}
        assert run["signals"] == run["calls"] * 20


def test_scale_measures_cpu_per_signal_for_each_store_and_worker_count(results: Path) -> None:
    runs = load(results, "scale")["results"]["runs"]
    assert [(r["store"], r["workers"]) for r in runs] == [
        ("sqlite", 1),
        ("sqlite", 2),
        ("postgresql", 1),
        ("postgresql", 2),
    ]
    for run in runs:
        assert run["calls"] > 0 and run["errors"] == {}
        # The server counted what the devices sent, warm-up included; CPU is a ratio over that count.
        assert run["server_signals"] >= run["signals"] == run["calls"] * 20
        assert run["server_cpu_s"] > 0
        assert run["server_cpu_s_per_1e4_signals"] == pytest.approx(
            run["server_cpu_s"] / run["server_signals"] * 1e4
        )
        # Every worker answered calls: the 16 connections were spread over both (all on one: p = 2^-15).
        assert len(run["calls_per_worker"]) == run["workers"]
        assert all(calls > 0 for calls in run["calls_per_worker"])


def test_scale_takes_any_store_url_as_it_is(tmp_path: Path) -> None:
    # The form a sharded store plugs in with (--db sharded=plproxy://...); here a SQLite file.
    database = tmp_path / "given.db"
    out = tmp_path / "out"
    document = smoke(out, "scale", "--db", f"given=sqlite:///{database}", "--workers", "2")
    assert document["config"]["stores"] == ["given"]
    [run] = document["results"]["runs"]
    assert (run["store"], run["workers"], run["errors"]) == ("given", 2, {})
    assert run["calls"] > 0 and len(run["calls_per_worker"]) == 2
    assert database.stat().st_size > 0  # the benchmark wrote into the store it was given


def test_scale_refuses_bad_worker_counts_and_store_labels(tmp_path: Path) -> None:
    for extra in (("--workers", "0"), ("--workers", "two"), ("--db", "plproxy://host/proxy")):
        proc = run_bench("scale", "--smoke", "--out", str(tmp_path), *extra)
        assert proc.returncode != 0 and "bench: --" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())


def test_side_by_side_compares_with_the_default(results: Path) -> None:
    variants = load(results, "side-by-side")["results"]["variants"]
    assert [v["name"] for v in variants] == ["default", "beam 5"]
    assert [v["beam_size"] for v in variants] == [1, 5]


def test_plot_writes_pngs(results: Path, tmp_path: Path) -> None:
    proc = run_bench("plot", "--results", str(results), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for name in ("edge_latency_vs_length.png", "aggregator_latency_vs_load.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_exit_2_and_write_nothing(tmp_path: Path) -> None:
    proc = run_bench("wire-size", "--repeats", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--repeats" in proc.stderr
    assert not any(tmp_path.iterdir())
    assert run_bench("no-such-benchmark").returncode == 2


def _valid_wire_document() -> dict[str, Any]:
    row = {
        "signals": 20,
        "protobuf_bytes": 180.0,
        "grpc_frame_bytes": 185.0,
        "json_bytes": 900.0,
        "bytes_per_signal": 9.25,
    }
    return {
        "schema": 1,
        "benchmark": "wire-size",
        "smoke": True,
        "created": "2026-01-01T00:00:00+00:00",
        "duration_s": 0.5,
        "machine": {"cpu_count": 2},
        "config": {},
        "results": {"batches": [row]},
        "targets": [{"figure": "bytes_per_signal_20", "value": 9.25, "met": True}],
    }


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.pop("machine"),
        lambda d: d.update(benchmark="unknown"),
        lambda d: d.update(smoke="yes"),
        lambda d: d["results"].update(batches=[]),
        lambda d: d["results"]["batches"][0].update(json_bytes=float("nan")),
        lambda d: d["results"]["batches"][0].update(protobuf_bytes=-1),
        lambda d: d["targets"][0].update(met=1),
    ],
)
def test_validate_result_rejects_malformed_documents(breakage: Any) -> None:
    document = _valid_wire_document()
    validate_result(copy.deepcopy(document))  # the unbroken one passes
    breakage(document)
    with pytest.raises(ResultError):
        validate_result(document)
