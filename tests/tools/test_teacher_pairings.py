"""tools.teacher_pairings: each pairing at the calibration rule's point, decided by the device filter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sotto.edge.classifier import ClassifierMeta
from sotto.policy import Policy
from tools import modeldata, teacher_pairings

MODELS = Path(__file__).resolve().parents[2] / "models"


def _split(
    meta: ClassifierMeta, n_sensitive: int, n_interest: int, model_score: float
) -> teacher_pairings.Split:
    """Interest queries (one category, held clearly by both interest heads), ten no-interest ones and
    sensitive ones. The model's detector gives every query ``model_score``; the teacher's knows which
    is which."""
    category = next(c for c in meta.interest_labels if c != "none")
    examples = [modeldata.Example(f"interest {i}", category, "none", "t", "eval") for i in range(n_interest)]
    examples += [modeldata.Example(f"no interest {i}", "none", "none", "t", "eval") for i in range(10)]
    examples += [modeldata.Example(f"sensitive {i}", None, "health", "t", "eval") for i in range(n_sensitive)]
    n = len(examples)
    p_int = np.full((n, len(meta.interest_labels)), 0.02 / (len(meta.interest_labels) - 2))
    p_int[:, meta.interest_labels.index("none")] = 0.08
    p_int[:, meta.interest_labels.index(category)] = 0.9
    p_int[n_interest : n_interest + 10, meta.interest_labels.index(category)] = 0.0
    p_int[n_interest : n_interest + 10, meta.interest_labels.index("none")] = 0.98
    sensitive = np.array([e.sensitive != "none" for e in examples])
    none, health = meta.sensitive_labels.index("none"), meta.sensitive_labels.index("health")

    def detector(score: np.ndarray) -> np.ndarray:
        p = np.zeros((n, len(meta.sensitive_labels)))
        p[:, none], p[:, health] = 1.0 - score, score
        return p

    model = detector(np.full(n, model_score))
    teacher = detector(np.where(sensitive, 0.99, 0.01))
    # The teacher's interest head is sure of a category of another tier-1 family, wrongly.
    tier1 = Policy.load(MODELS).taxonomy[category].tier1
    wrong = next(
        c for c in meta.interest_labels if c != "none" and Policy.load(MODELS).taxonomy[c].tier1 != tier1
    )
    t_int = p_int.copy()
    t_int[:n_interest, [meta.interest_labels.index(category), meta.interest_labels.index(wrong)]] = [0.0, 0.9]
    return teacher_pairings.Split(examples, (p_int, model), (t_int, teacher))


@pytest.fixture(scope="module")
def setting() -> tuple[teacher_pairings.Split, teacher_pairings.Split, ClassifierMeta, Policy]:
    meta = ClassifierMeta.load(MODELS / "classifier.json")
    # 600 sensitive calibration queries: enough for the 0.8% budget at 95% confidence.
    calib = _split(meta, 600, 300, 0.3)
    held = _split(meta, 200, 200, 0.3)
    return calib, held, meta, Policy.load(MODELS)


def test_a_detector_that_knows_drops_no_benign_query_and_leaks_none(setting) -> None:  # type: ignore[no-untyped-def]
    calib, held, meta, policy = setting
    _, blind = teacher_pairings.price(calib, held, meta, policy, "model", "model")
    _, knows = teacher_pairings.price(calib, held, meta, policy, "teacher", "model")
    # The model's detector cannot tell them apart: the rule must flag every query to keep the budget.
    assert blind["benign_interest_dropped_as_sensitive"] == 1.0
    assert knows["benign_interest_dropped_as_sensitive"] == 0.0
    assert knows["sensitive_leak_rate"] == 0.0
    assert knows["interest_tier1_accuracy"] == 1.0
    assert knows["no_interest_silent_rate"] == 1.0
    assert knows["interest_silent"] == blind["interest_silent"] == 0.0
    assert knows["argmax_tier1_accuracy"] == blind["argmax_tier1_accuracy"] == 1.0
    # The interest head comes from the source asked for.
    _, misled = teacher_pairings.price(calib, held, meta, policy, "teacher", "teacher")
    assert misled["benign_interest_dropped_as_sensitive"] == 0.0
    assert misled["interest_tier1_accuracy"] == misled["argmax_tier1_accuracy"] == 0.0


def test_a_cascade_asks_the_teacher_only_inside_its_band(setting) -> None:  # type: ignore[no-untyped-def]
    calib, held, meta, policy = setting
    assert held.asked((0.2, 0.4)).all() and not held.asked((0.4, 0.6)).any()
    _, inside = teacher_pairings.price(calib, held, meta, policy, "model", "model", (0.2, 0.4))
    _, outside = teacher_pairings.price(calib, held, meta, policy, "model", "model", (0.4, 0.6))
    assert inside["benign_interest_dropped_as_sensitive"] == 0.0
    assert outside["benign_interest_dropped_as_sensitive"] == 1.0


def test_an_unknown_head_source_or_a_cascade_of_the_teacher_is_refused(setting) -> None:  # type: ignore[no-untyped-def]
    calib = setting[0]
    with pytest.raises(ValueError, match="unknown head source"):
        calib.heads("oracle", "model")
    with pytest.raises(ValueError, match="a cascade asks the teacher inside the band"):
        calib.heads("teacher", "model", (0.2, 0.4))


def test_a_bad_band_is_a_usage_error(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        teacher_pairings.main(["--band", "0.5", "0.2"])
    assert exc.value.code == 2
    assert "need 0 <= LOW < HIGH <= 1" in capsys.readouterr().err
