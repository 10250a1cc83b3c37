"""tools/bench/speed.py (``python -m tools.bench speed``): the smoke run measures every figure side by side
and writes a well-formed result and its plot. No timing is asserted (CI machines are slow and shared)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from typing import Any

import pytest

from tools.bench.speed import TARGETS, validate
from tools.paths import REPO, child_env

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("speed")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "speed", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "speed_latency_vs_length.png").stat().st_size > 0
    assert "| utterance |" in proc.stdout
    return dict(json.loads((out / "speed.json").read_text()))


def test_smoke_result_has_every_figure_and_row(document: dict[str, Any]) -> None:
    validate(document)
    assert document["smoke"] is True and document["benchmark"] == "speed"
    assert set(document["figures"]) == set(TARGETS)
    kinds = {row["kind"] for row in document["rows"]}
    assert kinds == {"synthetic", "clip"}
    five = next(r for r in document["rows"] if r["label"] == "synthetic 5 s")
    assert five["end_of_speech_ms"] is not None  # the stream closed the utterance
    assert document["memory"]["queries"] == 3


def test_ratio_and_wer_delta_are_computed_from_the_rows(document: dict[str, Any]) -> None:
    clips = [r for r in document["rows"] if r["kind"] == "clip"]
    ratios = sorted(r["pipeline_ms"]["p50"] / r["bare_ms"]["p50"] for r in clips)
    middle = len(ratios) // 2
    median = ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
    assert document["figures"]["pipeline_over_bare_median"] == pytest.approx(median)
    wer = document["clip_wer"]
    assert document["figures"]["wer_delta_points"] == pytest.approx((wer["pipeline"] - wer["bare"]) * 100)


def test_validate_rejects_malformed_documents(document: dict[str, Any]) -> None:
    broken = copy.deepcopy(document)
    del broken["figures"]["peak_rss_mb"]
    with pytest.raises(ValueError, match="figures"):
        validate(broken)
    broken = copy.deepcopy(document)
    broken["rows"][0]["ratio"] *= 2
    with pytest.raises(ValueError, match="ratio"):
        validate(broken)
    broken = copy.deepcopy(document)
    broken["rows"] = []
    with pytest.raises(ValueError, match="no utterance"):
        validate(broken)
