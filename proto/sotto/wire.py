"""The rules both sides of the wire apply: what an id, a region, a day, a weight and an epsilon may be.

The device checks them before a signal is stored in its outbox; the aggregator checks them again before
anything is written. Pure standard library, so that both import it without any model or server runtime.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import importlib.resources
import io
import math
import re
from dataclasses import dataclass

__all__ = [
    "EPOCH",
    "EPSILON_SCALE",
    "MAX_DAY_OFFSET",
    "MAX_EPSILON",
    "MAX_WEIGHT_LEVEL",
    "PROFILE_ID_PATTERN",
    "REGION_ALIASES",
    "REGION_PATTERN",
    "Signal",
    "TAXONOMY_VERSION",
    "WEIGHT_LEVELS",
    "assigned_regions",
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
#: Names in common use that are not the ISO code of their country, mapped on the device before anything is
#: stored. Only ``UK``: ISO 3166 reserves it, at the United Kingdom's request, for the country whose code
#: is ``GB``, so the meaning is certain. Every other non-assigned code is refused, on purpose: ``EU`` is a
#: union whose members have different rules, ``EL`` (the EU's own code for Greece) and user-assigned codes
#: such as ``XX`` or ``ZZ`` mean whatever their user meant. The aggregator applies no alias: the wire only
#: ever carries an assigned code, and ``UK`` arriving there is refused like any other unassigned code.
REGION_ALIASES: dict[str, str] = {"UK": "GB"}
#: The officially assigned ISO 3166-1 alpha-2 codes (code and English short name), package data of
#: ``sotto.models``. Source: Debian's iso-codes 4.15.0, ``/usr/share/iso-codes/json/iso_3166-1.json``
#: (the ISO 3166 Maintenance Agency's list of officially assigned codes), 249 entries.
ISO_3166_FILE = "iso3166_1_alpha2.tsv"
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


@functools.cache
def assigned_regions() -> frozenset[str]:
    """Every officially assigned ISO 3166-1 alpha-2 code (read once from ``sotto.models``)."""
    path = importlib.resources.files("sotto.models") / ISO_3166_FILE
    text = path.read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    codes = frozenset(row["code"] for row in reader)
    if len(codes) < 200 or not all(REGION_PATTERN.fullmatch(c) for c in codes):
        # Fail closed: without the list no region could be placed, and none must be guessed at.
        raise RuntimeError(f"{path}: not a list of ISO 3166-1 alpha-2 codes")
    return codes


def canonical_region(region: str) -> str:
    """The region as it travels: an officially assigned ISO 3166-1 alpha-2 code in upper case (``UK`` is
    mapped to ``GB``, see :data:`REGION_ALIASES`), or ``ValueError``.

    Anything else (``EU``, ``EL``, ``XX``, ``QQ``...) is refused, so a region the region table cannot
    place is never profiled. Whether an assigned region may be profiled is the region table's decision.
    """
    canonical = region.strip().upper() if isinstance(region, str) else ""
    canonical = REGION_ALIASES.get(canonical, canonical)
    if not REGION_PATTERN.fullmatch(canonical) or canonical not in assigned_regions():
        raise ValueError(
            f"region {region!r} must be an officially assigned ISO 3166-1 alpha-2 code such as 'US' or "
            "'GB' ('UK' is taken as 'GB'; EU, EL and user-assigned codes such as XX are refused)"
        )
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


@dataclass(frozen=True, slots=True)
class Signal:
    """One interest signal, as the device keeps and sends it and the aggregator stores it: a category, a
    coarse weight level (``WEIGHT_LEVELS``) and the day it was observed (``day_number``).

    ``epsilon`` is set on the device for a signal that went through randomized response (``edge.ldp``);
    the batch declares it (``SignalBatch.ldp_epsilon_milli``), so the aggregator can de-bias counts.
    """

    category_id: str
    weight_level: int
    day: int
    epsilon: float | None = None

    @property
    def weight(self) -> float:
        """The weight the level stands for (``weight``)."""
        return weight(self.weight_level)


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
