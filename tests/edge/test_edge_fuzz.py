"""The device fuzz harness (tools/fuzz_device.py), bounded: 10,000 cases over the outbox file, the text
inputs and the audio decoders, with a fixed seed so that a failure reproduces. The long run is
``python -m tools.fuzz_device`` (docs/reliability-device.md has its figures)."""

from __future__ import annotations

import pytest

from sotto.edge.pipeline import EdgeModels, Pipeline
from tools.fuzz_device import Counts, run

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
