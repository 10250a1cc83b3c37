"""tools/evaluate.py: the per-class upper bound, the leak / benign-dropped curve, the final-exam reader,
and one whole run on a small sample with the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sotto.policy import SENSITIVE_CLASSES
from tools import evaluate, modeldata


def test_upper_bound_is_the_clopper_pearson_one() -> None:
    # None of n seen: the bound solves (1 - p)^n = 0.05.
    assert evaluate.upper_bound(0, 200) == pytest.approx(1 - 0.05 ** (1 / 200), rel=1e-9)
    assert evaluate.upper_bound(0, 200) < 0.015 < evaluate.upper_bound(1, 200)
    assert evaluate.upper_bound(3, 1000) > 0.003
    assert evaluate.upper_bound(0, 0) == 1.0


def _ex(interest: str | None, sensitive: str = "none") -> modeldata.Example:
    return modeldata.Example("q", interest, sensitive, "test", "eval")


def test_curve_counts_what_the_filter_would_do() -> None:
    examples = [_ex("151"), _ex("151"), _ex("none"), _ex(None, "health"), _ex(None, "religion")]
    score = np.array([0.9, 0.1, 0.5, 0.3, 0.05])
    named = np.array([False, False, False, False, True])  # the gazetteer drops the second sensitive one
    emits = np.array([True, True, False, True, True])
    dropped, leaked = evaluate.leak_dropped_curve(examples, (score, named, emits), np.array([0.0, 0.2, 0.95]))
    # Threshold 0: everything flagged. 0.2: the first interest query and the health one. 0.95: none by
    # the model; the health query leaks, the religion one is named by the gazetteer.
    assert dropped.tolist() == [1.0, 0.5, 0.0]
    assert leaked.tolist() == [0.0, 0.0, 0.5]


def test_final_exam_reads_every_label_kind(tmp_path: Path) -> None:
    exam = evaluate.final_exam()
    assert len(exam) >= 1500
    assert {e.sensitive for e in exam} == {"none", *SENSITIVE_CLASSES}
    assert any(e.interest == "none" for e in exam) and any(e.mixed for e in exam)
    bad = tmp_path / "exam.tsv"
    bad.write_text("text\tlabel\tmixed\nsome query\t\t0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no label"):
        evaluate.final_exam(bad)


def test_a_whole_run_on_a_sample(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = modeldata.load_all()
    evals = [e for e in examples if e.split == "eval"]
    sample = (
        [e for e in evals if e.sensitive != "none"][:40]
        + [e for e in evals if e.interest not in (None, "none")][:40]
        + [e for e in evals if e.interest == "none"][:20]
    )
    monkeypatch.setattr(modeldata, "load_all", lambda: sample)
    monkeypatch.setattr(evaluate, "final_exam", lambda: sample[::2])
    # The shipped model without its reference outputs: the parity check (every held-out query) is
    # tests/edge/test_edge_classifier_parity.py's.
    models = tmp_path / "models"
    models.mkdir()
    for path in (evaluate.ROOT / "models").iterdir():
        if path.name != "reference_outputs.npz":
            (models / path.name).symlink_to(path)
    png, out = tmp_path / "curve.png", tmp_path / "figures.json"
    argv = ["--models", str(models), "--backend", "onnx", "--final-exam", "--json", str(out)]
    assert evaluate.main([*argv, "--curve", str(png), "--previous", str(models)]) == 0
    report = capsys.readouterr().out
    assert "final exam, ONNX Runtime" in report and "95% upper bound" in report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = json.loads(out.read_text())
    assert set(figures["curve"]) == {"previous model", "new model"}
    assert figures["final_exam"]["onnx"]["counts"]["sensitive"] == 20


def test_bad_models_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        evaluate.main(["--models", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate.main(["--previous", str(evaluate.ROOT / "models")])


def test_verdicts_name_the_set_when_held_out_and_final_exam_differ() -> None:
    metrics: dict[str, object] = {key: 0.0 for _, key in evaluate.METRIC_ROWS}
    metrics |= {
        "counts": {"interest": 1, "no_interest": 1, "sensitive": 1, "benign": 2},
        "leak_by_class": {},
        "tier1_confusion": [],
    }
    held = {**metrics, "sensitive_leak_rate_worst_class": 0.011}
    exam = {**metrics, "sensitive_leak_rate_worst_class": 0.041}
    results = {"onnx": {"metrics": held, "latency_ms": (1.0, 2.0), "size_mb": 1.0}}
    report = evaluate.render(results, None, None, "cmd", {"onnx": exam})
    row = next(line for line in report.splitlines() if "leak, worst class" in line)
    assert row.endswith("| held-out: meets <= 0.015; final exam: MISSES <= 0.015 |")
    both = evaluate.render(results, None, None, "cmd", {"onnx": held})
    row = next(line for line in both.splitlines() if "leak, worst class" in line)
    assert row.endswith("| meets <= 0.015 |")
