"""sotto.edge.privacy: the filter between the classifier and the outbox, on hand-made classifier outputs."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from edge_testkit import CATS, DOGS, MOVIES, MUSIC, REPO, TODAY, output

from sotto.edge.privacy import (
    DROP_REASONS,
    Dropped,
    FilterOptions,
    PrivacyFilter,
    day_number,
    weight_level,
)
from sotto.policy import Policy
from sotto.wire import Signal

THRESHOLD = 0.8


def _filter(policy: Policy, **options: object) -> PrivacyFilter:
    return PrivacyFilter(policy, THRESHOLD, FilterOptions(**options), max_no_interest=0.5)  # type: ignore[arg-type]


# --- sensitivity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("score", [THRESHOLD, 0.95, 1.0])
def test_sensitive_at_or_above_threshold_is_dropped_with_its_class(policy: Policy, score: float) -> None:
    decision = _filter(policy).decide(
        output([(MUSIC, 0.9)], sensitive=score, sensitive_class="religion"), TODAY
    )
    assert decision == Dropped("sensitive", "religion")


def test_sensitive_just_below_threshold_passes(policy: Policy) -> None:
    decision = _filter(policy).decide(output([(MUSIC, 0.9)], sensitive=THRESHOLD - 1e-6), TODAY)
    assert decision == [Signal(MUSIC, 4, day_number(TODAY))]


def test_options_threshold_overrides_the_model_threshold(policy: Policy) -> None:
    strict = _filter(policy, sensitive_threshold=0.3)
    assert strict.sensitive_threshold == 0.3
    assert strict.decide(output([(MUSIC, 0.9)], sensitive=0.5), TODAY) == Dropped("sensitive", "health")


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01])
def test_threshold_outside_unit_interval_is_refused(policy: Policy, bad: float) -> None:
    with pytest.raises(ValueError, match="sensitive threshold"):
        PrivacyFilter(policy, bad, max_no_interest=0.5)


# --- gate: opt-out and region ---------------------------------------------------------------------


def test_gate_passes_an_unrestricted_region(policy: Policy) -> None:
    assert _filter(policy).gate("US", TODAY) is None


def test_gate_drops_opted_out_wearer_and_lets_them_back(policy: Policy) -> None:
    privacy = _filter(policy)
    privacy.set_opt_out(True)
    dropped = privacy.gate("US", TODAY)
    assert dropped is not None and dropped.reason == "opt_out"
    privacy.set_opt_out(False)
    assert privacy.gate("US", TODAY) is None


def test_opt_out_wins_over_region(policy: Policy) -> None:
    privacy = _filter(policy)
    privacy.set_opt_out(True)
    dropped = privacy.gate("DE", TODAY)
    assert dropped is not None and dropped.reason == "opt_out"


@pytest.mark.parametrize("region", ["DE", "de", "FR", "GB", "KR"])
def test_gate_drops_blocked_region(policy: Policy, region: str) -> None:
    dropped = _filter(policy).gate(region, TODAY)
    assert dropped is not None
    assert dropped.reason == "region"
    assert dropped.detail is not None and region.upper() in dropped.detail


def test_gate_respects_region_effective_date(policy: Policy) -> None:
    # The shipped EU rules start on 2025-01-01.
    assert _filter(policy).gate("DE", dt.date(2024, 12, 31)) is None


# --- interests ------------------------------------------------------------------------------------


def test_signals_are_best_first_with_coarse_weight_and_day(policy: Policy) -> None:
    decision = _filter(policy).decide(output([(MUSIC, 0.6), (MOVIES, 0.4)]), TODAY)
    assert decision == [
        Signal(MUSIC, 3, day_number(TODAY)),
        Signal(MOVIES, 2, day_number(TODAY)),
    ]


def test_max_signals_is_respected(policy: Policy) -> None:
    ranked = [(MUSIC, 0.9), (MOVIES, 0.8), (DOGS, 0.7), (CATS, 0.6)]
    for limit in (1, 2, 3):
        decision = _filter(policy, max_signals=limit, min_share=0.1).decide(output(ranked), TODAY)
        assert isinstance(decision, list)
        assert [s.category_id for s in decision] == [cid for cid, _ in ranked[:limit]]


def test_min_share_is_respected(policy: Policy) -> None:
    privacy = _filter(policy, min_share=0.5, max_signals=5)
    decision = privacy.decide(output([(MUSIC, 0.7), (MOVIES, 0.5), (DOGS, 0.49)], no_interest=0.0), TODAY)
    assert isinstance(decision, list)
    assert [s.category_id for s in decision] == [MUSIC, MOVIES]
    assert privacy.decide(output([(MUSIC, 0.49)], no_interest=0.0), TODAY) == Dropped("no_interest", None)


def test_share_is_of_the_interest_mass(policy: Policy) -> None:
    # Related categories split the mass ("running shoes": Sports Equipment and Fitness); the leader
    # still counts as a clear interest because P(no interest) is tiny.
    ranked = [(MUSIC, 0.33), (MOVIES, 0.18), (DOGS, 0.05)]
    decision = _filter(policy).decide(output(ranked, no_interest=0.003), TODAY)
    assert isinstance(decision, list)
    assert [(s.category_id, s.weight_level) for s in decision] == [(MUSIC, 2)]


@pytest.mark.parametrize("no_interest", [0.5, 0.8])
def test_mostly_no_interest_is_dropped(policy: Policy, no_interest: float) -> None:
    decision = _filter(policy).decide(output([(MUSIC, 1 - no_interest)], no_interest=no_interest), TODAY)
    assert decision == Dropped("no_interest", None)


def test_the_models_commercial_gate_is_applied_and_options_can_only_override_it(policy: Policy) -> None:
    # P(no interest) 0.35: commercial under the old 0.5 gate, not under a model calibrated at 0.3.
    query = output([(MUSIC, 0.65)], no_interest=0.35)
    model_gate = PrivacyFilter(policy, THRESHOLD, max_no_interest=0.3)
    assert model_gate.max_no_interest == 0.3
    assert model_gate.decide(query, TODAY) == Dropped("no_interest", None)
    assert model_gate.decide(output([(MUSIC, 0.75)], no_interest=0.25), TODAY) == [
        Signal(MUSIC, 4, day_number(TODAY))
    ]
    looser = PrivacyFilter(policy, THRESHOLD, FilterOptions(max_no_interest=0.5), max_no_interest=0.3)
    assert looser.max_no_interest == 0.5
    assert looser.decide(query, TODAY) == [Signal(MUSIC, 4, day_number(TODAY))]


def test_a_filter_for_the_model_takes_its_threshold_and_gate_together(policy: Policy) -> None:
    from sotto.edge.classifier import ClassifierMeta

    meta = ClassifierMeta([MUSIC, "none"], ["none", "health"], 0.07, 64, {}, {}, max_no_interest=0.3)
    device = PrivacyFilter.for_model(policy, meta)
    assert (device.sensitive_threshold, device.max_no_interest) == (0.07, 0.3)
    # Commercial under the filter's fallback gate of 0.5, not at the gate this model was calibrated at.
    assert device.decide(output([(MUSIC, 0.65)], no_interest=0.35), TODAY) == Dropped("no_interest", None)
    assert device.decide(output([(MUSIC, 0.9)], sensitive=0.08), TODAY) == Dropped("sensitive", "health")
    stricter = PrivacyFilter.for_model(policy, meta, FilterOptions(sensitive_threshold=0.01))
    assert (stricter.sensitive_threshold, stricter.max_no_interest) == (0.01, 0.3)
    # No silent fallback: a filter built by hand must be told its gate.
    with pytest.raises(TypeError, match="max_no_interest"):
        PrivacyFilter(policy, 0.07)  # type: ignore[call-arg]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_commercial_gate_outside_unit_interval_is_refused(policy: Policy, bad: float) -> None:
    with pytest.raises(ValueError, match="max_no_interest"):
        PrivacyFilter(policy, THRESHOLD, max_no_interest=bad)
    with pytest.raises(ValueError, match="max_no_interest"):
        PrivacyFilter(policy, THRESHOLD, FilterOptions(max_no_interest=bad), max_no_interest=0.5)


def test_the_shipped_gate_comes_from_classifier_json_and_reaches_the_pipeline(tmp_path: Path) -> None:
    from sotto.edge.asr import ModelError
    from sotto.edge.classifier import DEFAULT_MAX_NO_INTEREST, ClassifierMeta
    from sotto.edge.pipeline import EdgeConfig, EdgeModels, Pipeline
    from sotto.policy import models_dir

    shipped = Path(models_dir()) / "classifier.json"
    raw = json.loads(shipped.read_text(encoding="utf-8"))
    meta = ClassifierMeta.load(shipped)
    assert meta.max_no_interest == raw["max_no_interest"]
    assert Pipeline(EdgeModels(EdgeConfig()), region="US").filter.max_no_interest == meta.max_no_interest
    # The README states the shipped gate.
    assert f"{meta.max_no_interest:g} today" in (REPO / "README.md").read_text(encoding="utf-8")
    # A model calibrated before the gate was part of calibration was calibrated at the old gate.
    del raw["max_no_interest"]
    (tmp_path / "old.json").write_text(json.dumps(raw), encoding="utf-8")
    assert ClassifierMeta.load(tmp_path / "old.json").max_no_interest == DEFAULT_MAX_NO_INTEREST
    for bad in (0, 1.5, "0.3", True, None):
        raw["max_no_interest"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(raw), encoding="utf-8")
        with pytest.raises(ModelError, match="max_no_interest"):
            ClassifierMeta.load(tmp_path / "bad.json")


def test_empty_ranking_is_no_interest(policy: Policy) -> None:
    assert _filter(policy).decide(output([], no_interest=0.99), TODAY) == Dropped("no_interest", None)


@pytest.mark.parametrize(
    "top",
    [
        "286",  # Medical Health, listed itself
        "305",  # Pregnancy, sensitive through its ancestor 286
        "453",  # Religion & Spirituality
        "223",  # Healthy Living (listed without subtree)
        "2",  # Auto Body Styles: a real category, but not an interest category
        "no-such-id",  # not even in the taxonomy
    ],
)
def test_sensitive_or_non_interest_top_category_is_never_emitted(policy: Policy, top: str) -> None:
    privacy = _filter(policy)
    # Even with a confident model and a low sensitivity score, only the allowed category may pass.
    decision = privacy.decide(output([(top, 0.95), (MUSIC, 0.6)], sensitive=0.1), TODAY)
    assert decision == [Signal(MUSIC, 3, day_number(TODAY))]
    alone = privacy.decide(output([(top, 0.99)], sensitive=0.1), TODAY)
    assert alone == Dropped("no_interest", None)


def test_skipped_categories_do_not_count_against_max_signals(policy: Policy) -> None:
    decision = _filter(policy, max_signals=1).decide(output([("286", 0.9), ("305", 0.8), (DOGS, 0.7)]), TODAY)
    assert decision == [Signal(DOGS, 3, day_number(TODAY))]


def test_drop_reasons_are_the_documented_set() -> None:
    assert set(DROP_REASONS) == {
        "sensitive",
        "region",
        "opt_out",
        "minor",
        "no_speech",
        "no_interest",
        "too_long",
    }


# --- quantization and days ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probability", "level"),
    [(0.0, 1), (0.1, 1), (0.25, 1), (0.26, 2), (0.5, 2), (0.51, 3), (0.75, 3), (0.76, 4), (1.0, 4)],
)
def test_weight_level_boundaries(probability: float, level: int) -> None:
    assert weight_level(probability) == level


def test_interest_weight_is_level_over_four() -> None:
    assert [Signal(MUSIC, n, 0).weight for n in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]


def test_day_number() -> None:
    assert day_number(dt.date(1970, 1, 1)) == 0
    assert day_number(dt.date(1970, 1, 2)) == 1
    assert day_number(dt.date(2000, 1, 1)) == 10957
    assert day_number(TODAY) == (TODAY - dt.date(1970, 1, 1)).days == 20513
