"""The rules both sides of the wire apply: what an id, a region, a day, a weight and an epsilon may be.

The device checks them before a signal is stored in its outbox; the aggregator checks them again before
anything is written. Pure standard library, so that both import it without any model or server runtime.
"""

from __future__ import annotations

import datetime as dt
import math
import re

__all__ = [
    "EPOCH",
    "EPSILON_SCALE",
    "MAX_DAY_OFFSET",
    "MAX_EPSILON",
    "MAX_WEIGHT_LEVEL",
    "PROFILE_ID_PATTERN",
    "REGION_PATTERN",
    "TAXONOMY_VERSION",
    "WEIGHT_LEVELS",
    "canonical_region",
    "check_profile_id",
    "date_of",
    "day_number",
    "epsilon_milli",
    "weight",
]

#: The IAB Content Taxonomy version of every category id; it travels with every batch.
TAXONOMY_VERSION = "3.1"

#: A profile id: 8 to 64 characters of ``[A-Za-z0-9_-]``.
PROFILE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")
#: The shape of a region code (ISO 3166-1 alpha-2, upper case); the region table decides what it means.
REGION_PATTERN = re.compile(r"[A-Z]{2}")
#: A batch may carry signals at most this many days older than its base_day.
MAX_DAY_OFFSET = 30

#: Day 0 of the day numbers on the wire.
EPOCH = dt.date(1970, 1, 1)

#: The coarse weight levels a signal may carry; level ``n`` stands for the weight ``n / 4``.
WEIGHT_LEVELS = (1, 2, 3, 4)
MAX_WEIGHT_LEVEL = WEIGHT_LEVELS[-1]

#: Epsilon travels on the wire in thousandths (``SignalBatch.ldp_epsilon_milli``); 0 means "not noised".
EPSILON_SCALE = 1000
#: Above this a randomized response is nearly the truth (k = 89: 99.6% kept); refused as a misconfiguration.
MAX_EPSILON = 10.0


def check_profile_id(profile_id: str) -> str:
    """``profile_id`` itself when it is well formed, else ``ValueError`` saying what is expected."""
    if not isinstance(profile_id, str) or not PROFILE_ID_PATTERN.fullmatch(profile_id):
        raise ValueError(
            f"profile id {profile_id!r} must be 8 to 64 characters of A-Z, a-z, 0-9, '_' and '-'"
        )
    return profile_id


def canonical_region(region: str) -> str:
    """The region as it travels (upper case), or ``ValueError`` when it is not shaped like an ISO 3166-1
    alpha-2 code. Whether the region may be profiled is the region table's decision, not this one's."""
    canonical = region.strip().upper() if isinstance(region, str) else ""
    if not REGION_PATTERN.fullmatch(canonical):
        raise ValueError(f"region {region!r} must be an ISO 3166-1 alpha-2 code such as 'US'")
    return canonical


def day_number(date: dt.date) -> int:
    """Days since 1970-01-01 UTC: the only time resolution that leaves the device (``base_day``)."""
    return (date - EPOCH).days


def date_of(day: int) -> dt.date:
    """The calendar date of a day number."""
    return EPOCH + dt.timedelta(days=day)


def weight(level: int) -> float:
    """The weight a coarse weight level stands for: ``level / 4``."""
    if level not in WEIGHT_LEVELS:
        raise ValueError(f"weight level must be one of {WEIGHT_LEVELS}, got {level}")
    return level / MAX_WEIGHT_LEVEL


def epsilon_milli(epsilon: float) -> int:
    """``epsilon`` in the wire's thousandths; ``ValueError`` unless it is in (0, MAX_EPSILON] with at most
    three decimals (the device must use exactly the value it declares)."""
    if not (math.isfinite(epsilon) and 0 < epsilon <= MAX_EPSILON):
        raise ValueError(f"epsilon must be greater than 0 and at most {MAX_EPSILON:g}, got {epsilon}")
    milli = round(epsilon * EPSILON_SCALE)
    if abs(milli - epsilon * EPSILON_SCALE) > 1e-6:
        raise ValueError(
            f"epsilon must have at most three decimals (it travels in thousandths), got {epsilon}"
        )
    return milli
