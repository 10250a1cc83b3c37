"""``python -m tools.attack_streams`` runs end to end (the shape of its report, never its timings)."""

from __future__ import annotations

import json

import pytest

from tools.harness import run_module

pytestmark = pytest.mark.e2e


def test_attack_streams_reports_valid_ingest_under_the_attack() -> None:
    result = run_module(
        "tools.attack_streams",
        "--seconds",
        "2",
        "--baseline-seconds",
        "1",
        *("--streams", "200", "--target-p99-ms", "1000000"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["under_attack"]["calls"] > 0
    assert set(report["under_attack"]["codes"]) == {"OK"}
    # The attack ran: its header-only streams were refused (UNAUTHENTICATED), none was left open.
    assert report["attack"]["stream_outcomes"]["UNAUTHENTICATED"] > 0
    assert set(report["attack"]["stream_outcomes"]) <= {"UNAUTHENTICATED", "UNAVAILABLE"}
    assert {"p50_ms", "p99_ms", "max_ms"} <= set(report["under_attack"])
    assert len(report["load_average_1min"]) == 2
