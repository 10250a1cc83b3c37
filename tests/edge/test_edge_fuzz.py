"""The device fuzz harness (tools/fuzz_device.py), bounded: 10,000 cases over the outbox file, the text
inputs and the audio decoders, with a fixed seed so that a failure reproduces. The long run is
``python -m tools.fuzz_device`` (docs/reliability-device.md has its figures)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sotto.edge.pipeline import EdgeModels, Pipeline
from tools.fuzz_device import Counts, run
from tools.paths import REPO, child_env

#: Cases per kind: ~10,000 in all, about three minutes on a busy two-core machine (the classifier costs
#: tens of milliseconds a case, the normalisation alone microseconds).
CASES = {
    "outbox": 2000,
    "text_normalize": 6500,
    "text_pipeline": 200,
    "text_sensitive": 500,
    "audio": 800,
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_fuzz(kind: str, edge_models: EdgeModels) -> None:
    counts = Counts()
    run({kind: CASES[kind]}, seed_value=17, pipeline=Pipeline(edge_models), counts=counts)
    assert sum(counts.cases.values()) >= CASES[kind]


def test_the_long_run_command_reports_its_cases() -> None:
    # The documented command, as a process (a few cases: the long run is for the operator).
    proc = subprocess.run(
        [sys.executable, "-m", "tools.fuzz_device", "--target", "audio", "--cases", "5", "--seed", "1"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cases"]["audio"] >= 5 and report["crashes"] == 0 and report["seed"] == 1
