"""Exponential decay of interest scores, stored as increment-only sums.

A signal of weight ``w`` observed on day ``d`` is worth ``w * 2 ** (-(t - d) / H)`` on day ``t`` (``H`` is the
half-life in days). Rewriting that as ``w * 2 ** ((d - R) / H) * 2 ** (-(t - R) / H)`` for a fixed reference
day ``R`` splits it into a part that depends only on the signal and a part that depends only on ``t``. The
store therefore keeps, per (profile, category), the plain sum ``S = sum(w_i * 2 ** ((d_i - R) / H))``:
applying a signal is an addition, which commutes, so several aggregator processes may increment the same
row in any order. The score on day ``t`` is ``S * 2 ** (-(t - R) / H)``.

Float range: a double holds values up to about ``2 ** 1024``. Each stored term is at most
``2 ** ((d - R) / H)``; keeping the exponent within ``±MAX_EXPONENT`` (1000) leaves ``2 ** 23`` (about
8 million full-weight signals on the newest day) of headroom in one sum before overflow, and terms at the
low end stay normal doubles with full precision. So days in ``R ± 1000 * H`` are supported: with the
default half-life of 30 days that is 1943-11 to 2108-02; with a half-life of 1 day only 2023-04 to 2028-09.
``supported_days`` gives the exact window and the server refuses to start outside it.
"""

from __future__ import annotations

from sotto.wire import weight

__all__ = [
    "REFERENCE_DAY",
    "increment",
    "score",
    "stored_sum",
    "supported_days",
]

#: Day number (days since 1970-01-01) of 2026-01-01, the reference day ``R`` of every stored sum.
REFERENCE_DAY = 20454
MAX_EXPONENT = 1000


def supported_days(half_life_days: float) -> tuple[int, int]:
    """The first and last day number whose terms stay within the safe float range (see module doc)."""
    span = int(MAX_EXPONENT * half_life_days)
    return REFERENCE_DAY - span, REFERENCE_DAY + span


def increment(level: int, day: int, half_life_days: float) -> float:
    """What one signal of weight ``level`` observed on ``day`` adds to the stored sum."""
    return weight(level) * 2.0 ** ((day - REFERENCE_DAY) / half_life_days)


def score(stored_sum: float, day: int, half_life_days: float) -> float:
    """The decayed score on ``day`` of a stored sum."""
    return stored_sum * 2.0 ** (-(day - REFERENCE_DAY) / half_life_days)


def stored_sum(score_value: float, day: int, half_life_days: float) -> float:
    """The stored sum whose decayed score on ``day`` is ``score_value`` (the inverse of ``score``)."""
    return score_value * 2.0 ** ((day - REFERENCE_DAY) / half_life_days)
