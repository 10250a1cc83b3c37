"""The rule that sets the device's sensitivity threshold (tools/build_models.py): recall first.

The threshold is the privacy promise in one number: it decides how many sensitive queries may still come
out as a signal. These tests hold the rule to its statement: no more calibration leaks than a 95%
Clopper-Pearson bound allows under the 1% budget, counted only where the filter would emit, and no
threshold at all from a calibration split too small to show the budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tools.build_models import LEAK_BUDGET, LEAK_CONFIDENCE, allowed_leaks, pick_threshold

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n", [300, 460, 1000, 1300, 6598, 10000])
def test_allowed_leaks_is_the_largest_count_the_budget_admits(n: int) -> None:
    from scipy.stats import binom

    k = allowed_leaks(n)
    # Clopper-Pearson upper bound <= budget  <=>  P(X <= k | n, budget) <= 1 - confidence.
    assert binom.cdf(k, n, LEAK_BUDGET) <= 1 - LEAK_CONFIDENCE
    assert binom.cdf(k + 1, n, LEAK_BUDGET) > 1 - LEAK_CONFIDENCE
    assert k / n < LEAK_BUDGET  # always stricter than the budget itself


def test_allowed_leaks_grows_with_the_calibration_split_and_refuses_a_tiny_one() -> None:
    counts = [allowed_leaks(n) for n in (100, 300, 1300, 10000)]
    assert counts == sorted(counts)
    assert counts[0] == -1  # 100 queries cannot show 0.8% at 95% even with no leak
    assert allowed_leaks(1300) == 4
    assert allowed_leaks(1300, budget=0.01) == 6
    assert allowed_leaks(2105) == 9


def _calibration(n_sensitive: int, n_benign: int, seed: int = 7) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.beta(5, 1, n_sensitive), rng.beta(1, 20, n_benign)])
    emits = rng.random(n_sensitive + n_benign) < 0.7
    is_sensitive = np.arange(n_sensitive + n_benign) < n_sensitive
    return p, emits, is_sensitive


def test_threshold_lets_through_no_more_than_the_allowed_leaks() -> None:
    p, emits, is_sensitive = _calibration(1300, 5000)
    threshold = pick_threshold(p, emits, is_sensitive)
    leaked = is_sensitive & emits & (p < threshold)
    assert leaked.sum() == allowed_leaks(1300)
    # The next at-risk query up is flagged: the threshold is not lower than it needs to be.
    at_risk = np.sort(p[is_sensitive & emits])
    assert at_risk[allowed_leaks(1300)] >= threshold


def test_queries_the_filter_would_not_emit_do_not_pull_the_threshold_down() -> None:
    p, emits, is_sensitive = _calibration(1300, 5000)
    before = pick_threshold(p, emits, is_sensitive)
    # A sensitive query with a very low score that would produce no signal anyway changes nothing.
    p2 = np.append(p, 1e-6)
    assert pick_threshold(p2, np.append(emits, False), np.append(is_sensitive, True)) >= before
    # The same query when it would emit is a leak unless flagged, so the threshold must move for it.
    assert pick_threshold(p2, np.append(emits, True), np.append(is_sensitive, True)) <= before


def test_threshold_never_exceeds_one_half() -> None:
    p = np.array([0.9] * 400 + [0.01] * 100)
    emits = np.ones(500, dtype=bool)
    is_sensitive = np.arange(500) < 400
    assert pick_threshold(p, emits, is_sensitive) == 0.5


def test_too_few_sensitive_calibration_queries_is_an_error() -> None:
    p, emits, is_sensitive = _calibration(100, 1000)
    with pytest.raises(ValueError, match="cannot show a leak rate"):
        pick_threshold(p, emits, is_sensitive)


def test_would_emit_asks_the_filter_share_and_no_interest_rules_not_the_threshold() -> None:
    from sotto.edge.classifier import ClassifierOutput
    from sotto.policy import Policy
    from tools.build_models import would_emit

    policy = Policy.load(ROOT / "models")
    cid = sorted(policy.interest_ids)[0]
    other = sorted(policy.interest_ids)[1]

    def output(top: float, second: float, none: float, sensitive: float) -> ClassifierOutput:
        return ClassifierOutput([(cid, top), (other, second)], none, sensitive, "health")

    emits = would_emit(
        policy,
        [
            output(0.8, 0.1, 0.1, 0.0),  # commercial and sharp
            output(0.8, 0.1, 0.1, 0.99),  # flagged: still "would emit" (the leak counts need that)
            output(0.1, 0.05, 0.85, 0.0),  # "no interest"
            output(0.2, 0.2, 0.1, 0.0),  # commercial but no category at the filter's 30% share
        ],
    )
    assert emits.tolist() == [True, True, False, False]


def test_the_gate_drops_fewest_benign_queries_first_then_keeps_no_interest_silent_then_is_loosest() -> None:
    from tools.build_models import SILENT_TARGET, OperatingPoint, pick_gate

    def point(gate: float, dropped: int, silent: float) -> OperatingPoint:
        return OperatingPoint(gate, 0.1, dropped, 1000, silent, 0, 1300)

    loud = point(0.5, 120, SILENT_TARGET - 0.01)
    fewer_drops_loud = point(0.45, 100, SILENT_TARGET - 0.01)
    fewer_drops_silent = point(0.3, 100, SILENT_TARGET)
    stricter_silent = point(0.2, 100, SILENT_TARGET + 0.02)
    assert pick_gate([loud, fewer_drops_loud]) == fewer_drops_loud
    assert pick_gate([loud, fewer_drops_loud, fewer_drops_silent, stricter_silent]) == fewer_drops_silent
    assert pick_gate([loud, point(0.2, 119, 0.5)]).max_no_interest == 0.2


def test_each_gate_gets_its_own_threshold_under_the_same_budget() -> None:
    from sotto.edge.classifier import ClassifierOutput
    from sotto.policy import Policy
    from tools import modeldata
    from tools.build_models import allowed_leaks, operating_points

    policy = Policy.load(ROOT / "models")
    cid = sorted(policy.interest_ids)[0]
    rng = np.random.default_rng(7)
    n_sensitive = 1300  # allows 4 leaks
    calib, outputs, flagged = [], [], []
    for i in range(n_sensitive):
        # Sensitive queries the detector scores low on, half of them plainly commercial, half only at
        # P(no interest) 0.4: the 0.5 gate lets them emit, the 0.3 gate does not.
        no_interest = 0.1 if i % 2 else 0.4
        calib.append(modeldata.Example(f"s{i}", None, "health", "test", "train"))
        outputs.append(ClassifierOutput([(cid, 1 - no_interest)], no_interest, 0.0, "health"))
        flagged.append(rng.uniform(0.0, 0.5))
    for i in range(400):
        calib.append(modeldata.Example(f"b{i}", cid, "none", "test", "train"))
        outputs.append(ClassifierOutput([(cid, 0.9)], 0.1, 0.0, "health"))
        flagged.append(rng.uniform(0.0, 0.2))
    points = {
        p.max_no_interest: p for p in operating_points(np.array(flagged), outputs, calib, policy, (0.5, 0.3))
    }
    assert allowed_leaks(n_sensitive) == 4
    # Fewer sensitive queries emit under the stricter gate, so its threshold is looser (higher), and it
    # drops no more benign queries.
    assert points[0.3].threshold > points[0.5].threshold
    assert points[0.3].interest_dropped <= points[0.5].interest_dropped
    for gate, p in points.items():
        at_risk = [
            f
            for f, o, e in zip(flagged, outputs, calib, strict=True)
            if e.sensitive != "none" and o.no_interest < gate
        ]
        assert sum(f < p.threshold for f in at_risk) == p.leaked <= 4
        assert p.sensitive_total == n_sensitive
