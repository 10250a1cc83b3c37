"""sotto.edge.ldp: randomized response over the allowed categories, the persisted daily budget, and the
de-biasing the aggregator applies, checked on simulated populations (seeded, so deterministic)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from edge_testkit import MOVIES, MUSIC, PROFILE, TODAY

from sotto.edge.ldp import NOISED_WEIGHT_LEVEL, DailyBudget, LdpOptions, LocalPrivacy, RandomizedResponse
from sotto.edge.pipeline import EdgeModels, Pipeline
from sotto.edge.signals import encode_batch
from sotto.ldp_math import debias, grr_probabilities
from sotto.policy import Policy
from sotto.wire import Signal, day_number, epsilon_milli

DAY = day_number(TODAY)


# --- the mechanism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0, 4.0])
def test_probability_ratio_is_exactly_e_to_the_epsilon(epsilon: float) -> None:
    p, q = grr_probabilities(epsilon, 89)
    assert p / q == pytest.approx(math.exp(epsilon))
    assert p + 88 * q == pytest.approx(1.0)


def test_noise_only_ever_picks_allowed_categories(policy: Policy) -> None:
    rr = RandomizedResponse(policy.interest_ids, 0.5, random.Random(1))
    outputs = Counter(rr.perturb(MUSIC) for _ in range(20000))
    assert set(outputs) <= policy.interest_ids
    assert not any(cid in policy.sensitive for cid in outputs)
    # At epsilon 0.5 almost every category shows up: the noise really spreads over the whole list.
    assert len(outputs) == len(policy.interest_ids)


def test_a_category_outside_the_list_is_refused_not_noised(policy: Policy) -> None:
    rr = RandomizedResponse(policy.interest_ids, 2.0, random.Random(1))
    for cid in ("286", "305", "1", "nope"):  # sensitive, sensitive subtree, not an interest, unknown
        with pytest.raises(ValueError, match="not one of the 89 allowed"):
            rr.perturb(cid)


def test_kept_and_swapped_frequencies_match_p_and_q(policy: Policy) -> None:
    n = 40000
    rr = RandomizedResponse(policy.interest_ids, 2.0, random.Random(2))
    outputs = Counter(rr.perturb(MUSIC) for _ in range(n))
    for cid, prob in ((MUSIC, rr.p), (MOVIES, rr.q)):
        sd = math.sqrt(n * prob * (1 - prob))
        assert abs(outputs[cid] - n * prob) < 4 * sd, (cid, outputs[cid], n * prob)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, 10.5, math.inf, math.nan, 1.0005])
def test_bad_epsilon_is_refused(epsilon: float) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        LdpOptions(epsilon=epsilon)


def test_epsilon_travels_in_thousandths() -> None:
    assert epsilon_milli(2.0) == 2000
    assert epsilon_milli(0.125) == 125
    assert epsilon_milli(10) == 10000


# --- privatize: after the filter, never more than it let through -------------------------------------


def _local(policy: Policy, tmp_path: Path, budget: int = 20, seed: int = 3) -> LocalPrivacy:
    return LocalPrivacy(
        policy.interest_ids, LdpOptions(2.0, budget), tmp_path / "budget.json", random.Random(seed)
    )


def test_privatize_noises_category_fixes_weight_and_declares_epsilon(policy: Policy, tmp_path: Path) -> None:
    local = _local(policy, tmp_path)
    signals = [Signal(MUSIC, 1, DAY), Signal(MOVIES, 3, DAY)]
    sent, withheld = local.privatize(signals)
    assert withheld == 0 and len(sent) == 2
    for s in sent:
        assert s.category_id in policy.interest_ids
        assert s.weight_level == NOISED_WEIGHT_LEVEL
        assert s.epsilon == 2.0 and s.day == DAY
    batch = encode_batch(PROFILE, "US", sent)
    assert batch.ldp_epsilon_milli == 2000
    assert local.privatize([]) == ([], 0)  # nothing in, nothing out


def test_a_batch_cannot_mix_mechanisms() -> None:
    with pytest.raises(ValueError, match="cannot mix"):
        encode_batch(PROFILE, "US", [Signal(MUSIC, 4, DAY, 2.0), Signal(MUSIC, 4, DAY)])
    assert encode_batch(PROFILE, "US", [Signal(MUSIC, 4, DAY)]).ldp_epsilon_milli == 0


def test_pipeline_applies_ldp_only_to_what_passed_the_filter(edge_models: EdgeModels, tmp_path: Path) -> None:
    local = LocalPrivacy(edge_models.policy.interest_ids, LdpOptions(1.0, 20), tmp_path / "b.json")
    device = Pipeline(edge_models, region="US", ldp=local)
    commercial = device.analyze_text("book me a flight to paris for next week", today=TODAY)
    assert commercial.signals and commercial.noised is not None
    assert len(commercial.outgoing) == len(commercial.signals)
    assert all(s.epsilon == 1.0 for s in commercial.outgoing)
    for text in ("i need a doctor for my back pain", "what time is it", "ok thanks"):
        result = device.analyze_text(text, today=TODAY)
        assert result.dropped is not None and result.outgoing == [], text
    blocked = Pipeline(edge_models, region="DE", ldp=local).analyze_text("buy running shoes", today=TODAY)
    assert blocked.outgoing == []
    # Only the commercial query spent budget.
    assert json.loads((tmp_path / "b.json").read_text()) == {"day": DAY, "spent": len(commercial.signals)}


# --- the daily budget ---------------------------------------------------------------------------------


def test_budget_caps_signals_per_day_and_survives_a_restart(policy: Policy, tmp_path: Path) -> None:
    local = _local(policy, tmp_path, budget=3)
    sent, withheld = local.privatize([Signal(MUSIC, 2, DAY)] * 2)
    assert (len(sent), withheld) == (2, 0)
    restarted = _local(policy, tmp_path, budget=3)  # same file: a reboot does not reset the day
    sent, withheld = restarted.privatize([Signal(MUSIC, 2, DAY)] * 2)
    assert (len(sent), withheld) == (1, 1)
    assert restarted.privatize([Signal(MUSIC, 2, DAY)]) == ([], 1)
    # The next day starts afresh.
    sent, withheld = restarted.privatize([Signal(MUSIC, 2, DAY + 1)] * 4)
    assert (len(sent), withheld) == (3, 1)


def test_clock_set_back_does_not_reset_the_budget(tmp_path: Path) -> None:
    budget = DailyBudget(2, tmp_path / "b.json")
    assert budget.take(DAY) and budget.take(DAY)
    assert not budget.take(DAY - 1)
    assert not DailyBudget(2, tmp_path / "b.json").take(DAY - 5)


@pytest.mark.parametrize(
    "content", ["", "{", '{"day": "x", "spent": 1}', '{"day": 1}', '{"day": 1, "spent": -4}']
)
def test_unreadable_budget_file_fails_closed_for_the_day(tmp_path: Path, content: str) -> None:
    path = tmp_path / "b.json"
    path.write_text(content, encoding="utf-8")
    budget = DailyBudget(5, path)
    assert budget.remaining(DAY) == 0
    assert not budget.take(DAY)
    assert json.loads(path.read_text()) == {"day": DAY, "spent": 5}  # the bad file is replaced
    assert DailyBudget(5, path).take(DAY + 1)


def test_in_memory_budget_writes_nothing(tmp_path: Path, policy: Policy) -> None:
    local = LocalPrivacy(policy.interest_ids, LdpOptions(2.0, 1), None, random.Random(1))
    assert local.privatize([Signal(MUSIC, 2, DAY)] * 2)[1] == 1
    assert list(tmp_path.iterdir()) == []


# --- de-biasing on simulated populations ------------------------------------------------------------------


def _population(rng: random.Random, categories: list[str], n: int) -> list[str]:
    """True categories of ``n`` signals: a skewed popularity (a few popular categories, a long tail)."""
    weights = [1.0 / (rank + 1) for rank in range(len(categories))]
    return rng.choices(categories, weights=weights, k=n)


def _coverage(policy: Policy, fleets: list[tuple[float | None, int]], trials: int, seed: int) -> float:
    """Share of (trial, category) pairs whose stated interval holds the true count."""
    rng = random.Random(seed)
    categories = sorted(policy.interest_ids)
    watched = categories[:3] + categories[40:42]  # popular and tail categories
    covered = total = 0
    for _ in range(trials):
        observed: dict[int, Counter[str]] = {}
        sizes: dict[int, int] = {}
        truth: Counter[str] = Counter()
        for epsilon, n in fleets:
            true = _population(rng, categories, n)
            truth.update(true)
            milli = 0 if epsilon is None else epsilon_milli(epsilon)
            if epsilon is None:
                reports = true
            else:
                rr = RandomizedResponse(categories, epsilon, rng)
                reports = [rr.perturb(c) for c in true]
            observed.setdefault(milli, Counter()).update(reports)
            sizes[milli] = sizes.get(milli, 0) + n
        for cid in watched:
            est = debias([(m, observed[m][cid], sizes[m]) for m in sorted(sizes)], len(categories))
            covered += est.low <= truth[cid] <= est.high
            total += 1
    return covered / total


def test_debiased_estimates_fall_in_their_intervals_at_the_stated_rate(policy: Policy) -> None:
    rate = _coverage(policy, [(2.0, 3000)], trials=400, seed=11)
    # 2000 intervals at 95%: the binomial spread is about ±0.5 percentage points. The plug-in variance
    # (clamped at 0 for tail categories) errs on the wide side, so coverage may exceed 95% a little.
    assert 0.93 <= rate <= 0.985, rate


def test_mixed_fleet_is_debiased_per_epsilon(policy: Policy) -> None:
    rate = _coverage(policy, [(1.0, 1500), (3.0, 1500), (None, 300)], trials=400, seed=12)
    assert 0.93 <= rate <= 0.985, rate


def test_estimate_is_unbiased_and_naive_count_is_not(policy: Policy) -> None:
    rng = random.Random(13)
    categories = sorted(policy.interest_ids)
    rr = RandomizedResponse(categories, 1.0, rng)
    target, n, trials = categories[0], 2000, 60
    estimates, naive, truths = [], [], []
    for _ in range(trials):
        true = _population(rng, categories, n)
        reports = Counter(rr.perturb(c) for c in true)
        estimates.append(debias([(1000, reports[target], n)], len(categories)).estimate)
        naive.append(reports[target])
        truths.append(true.count(target))
    mean_truth = sum(truths) / trials
    errors = [e - t for e, t in zip(estimates, truths, strict=True)]
    sd_of_mean = math.sqrt(sum(x * x for x in errors) / trials) / math.sqrt(trials)
    assert abs(sum(estimates) / trials - mean_truth) < 4 * sd_of_mean
    assert sum(naive) / trials < mean_truth * 0.5  # without de-biasing the popular category is undercounted


def test_unnoised_counts_are_exact(policy: Policy) -> None:
    est = debias([(0, 70, 200)], len(policy.interest_ids))
    assert (est.estimate, est.low, est.high, est.total) == (70, 70, 70, 200)


def test_debias_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="outside"):
        debias([(2000, 5, 4)], 89)
