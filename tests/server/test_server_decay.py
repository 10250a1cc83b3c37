"""Decay math, and decay as seen through GetProfile when the clock moves."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import math
from pathlib import Path

import pytest
from aggregator_testkit import ELECTRONICS, MUSIC, PROFILE, TODAY_DAY, Clock, make_batch, running, signal

from sotto.server import ServerConfig, create_server, open_store
from sotto.server.decay import REFERENCE_DAY, increment, score, supported_days
from sotto.server.validation import validate_batch
from sotto.v1 import signals_pb2
from sotto.wire import date_of, day_number, weight


def test_reference_day_is_2026_01_01() -> None:
    assert date_of(REFERENCE_DAY) == dt.date(2026, 1, 1)
    assert day_number(dt.date(2026, 1, 1)) == REFERENCE_DAY


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_weight_is_level_over_four(level: int) -> None:
    assert weight(level) == level / 4


@pytest.mark.parametrize("level", [0, 5])
def test_weight_rejects_levels_outside_1_to_4(level: int) -> None:
    with pytest.raises(ValueError, match=r"one of \(1, 2, 3, 4\)"):
        weight(level)


@pytest.mark.parametrize("half_life", [1, 7, 30, 91])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_each_half_life_halves_the_score(half_life: int, where: int) -> None:
    low, high = supported_days(half_life)
    day = (low, REFERENCE_DAY, high - 3 * half_life)[where]
    stored = increment(4, day, half_life)
    assert score(stored, day, half_life) == pytest.approx(1.0)
    assert score(stored, day + half_life, half_life) == pytest.approx(0.5)
    assert score(stored, day + 3 * half_life, half_life) == pytest.approx(0.125)


def test_order_of_application_does_not_matter() -> None:
    signals = [
        (4, REFERENCE_DAY + 10),
        (1, REFERENCE_DAY - 200),
        (3, REFERENCE_DAY + 300),
        (2, REFERENCE_DAY),
    ]
    totals = {sum(increment(w, d, 30.0) for w, d in order) for order in itertools.permutations(signals)}
    assert max(totals) == pytest.approx(min(totals), rel=1e-15)
    expected = sum(w / 4 * 2 ** (-(REFERENCE_DAY + 300 - d) / 30) for w, d in signals)
    assert score(min(totals), REFERENCE_DAY + 300, 30.0) == pytest.approx(expected)


def test_supported_window_stays_in_float_range() -> None:
    low, high = supported_days(30.0)
    assert date_of(high).year == 2108
    assert math.isfinite(increment(4, high, 30.0) * 2**23)
    assert increment(1, low, 30.0) > 2.0**-1022  # still a normal double: full precision


def test_server_refuses_a_half_life_too_short_for_todays_dates(config: ServerConfig) -> None:
    async def scenario() -> None:
        store = await open_store("sqlite:///:memory:", 0.1)
        try:
            with pytest.raises(ValueError, match="keeps scores in float range only from"):
                await create_server("127.0.0.1:0", store, config)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_profile_score_halves_after_one_half_life(config: ServerConfig, clock: Clock, db_path: Path) -> None:
    async def scenario() -> None:
        async with running(f"sqlite:///{db_path}", config, half_life_days=10) as r:
            await r.stub.Ingest(
                make_batch([signal(MUSIC, 4), signal(ELECTRONICS, 2, day_offset=10)]), timeout=5
            )
            request = signals_pb2.GetProfileRequest(profile_id=PROFILE)
            now = await r.stub.GetProfile(request, timeout=5)
            assert now.as_of_day == TODAY_DAY
            assert {s.category_id: s.score for s in now.scores} == pytest.approx(
                {MUSIC: 1.0, ELECTRONICS: 0.25}
            )
            clock.date += dt.timedelta(days=10)
            later = await r.stub.GetProfile(request, timeout=5)
            assert later.as_of_day == TODAY_DAY + 10
            assert {s.category_id: s.score for s in later.scores} == pytest.approx(
                {MUSIC: 0.5, ELECTRONICS: 0.125}
            )

    asyncio.run(scenario())


def test_batches_applied_in_any_order_give_the_same_scores(config: ServerConfig, tmp_path: Path) -> None:
    batches = [
        validate_batch(make_batch([signal(MUSIC, 4, day_offset=d)], base_day=TODAY_DAY - 7 * k), config)
        for k, d in ((0, 0), (1, 3), (2, 30), (5, 1))
    ]

    async def apply_all(order: list[int], name: str) -> dict[str, float]:
        store = await open_store(f"sqlite:///{tmp_path / name}", 30)
        try:
            for i in order:
                await store.apply_batch(batches[i])
            profile = await store.get_profile(PROFILE)
            assert profile is not None
            return profile.sums
        finally:
            await store.close()

    forward = asyncio.run(apply_all([0, 1, 2, 3], "a.db"))
    backward = asyncio.run(apply_all([3, 2, 1, 0], "b.db"))
    assert backward == pytest.approx(forward, rel=1e-15)
    expected = sum(increment(4, b.signals[0].day, 30) for b in batches)
    assert forward[MUSIC] == pytest.approx(expected, rel=1e-15)
