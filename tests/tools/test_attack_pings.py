"""``python -m tools.attack_pings`` runs end to end (the shape of its report, never its timings)."""

from __future__ import annotations

import json

import pytest

from tools.harness import run_module

pytestmark = pytest.mark.e2e


def test_attack_pings_reports_valid_ingest_under_the_storm() -> None:
    result = run_module(
        "tools.attack_pings",
        "--seconds",
        "2",
        "--baseline-seconds",
        "1",
        *("--attackers", "1", "--parallel", "10", "--target-p99-ms", "1000000"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for window in ("baseline", "under_attack"):
        for kind in ("established_connection", "new_connection_per_batch"):
            figures = report[window][kind]
            assert figures["calls"] > 0 and set(figures["codes"]) == {"OK"}, report
            assert {"p50_ms", "p99_ms", "max_ms"} <= set(figures)
    # The storm ran, and every connection of it met gRPC's ping policy: GOAWAY after a few pings.
    storm = report["storm"]
    assert storm["connections"] > 0
    assert storm["pings_sent"] == 20 * storm["connections"]
    assert storm["connection_outcomes"] == {"goaway_ENHANCE_YOUR_CALM": storm["connections"]}
    assert report["server_cpu_cores_busy"]["under_attack"] is not None
    assert len(report["load_average_1min"]) == 2
