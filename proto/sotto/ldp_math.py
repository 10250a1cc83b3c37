"""The maths of k-ary randomized response that the device and the aggregator share: the probabilities
of the mechanism (the device draws from them) and the de-biasing of counts (the aggregator estimates
with them). Standard library only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from sotto.wire import EPSILON_SCALE

__all__ = ["CONFIDENCE", "Estimate", "debias", "grr_probabilities"]

#: Confidence level of the intervals ``debias`` returns.
CONFIDENCE = 0.95


def grr_probabilities(epsilon: float, k: int) -> tuple[float, float]:
    """``(p, q)`` of k-ary randomized response: keep the true category with p, report each other with q."""
    if k < 2:
        raise ValueError(f"randomized response needs at least 2 categories, got {k}")
    e = math.exp(epsilon)
    return e / (e + k - 1), 1.0 / (e + k - 1)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A de-biased count with its normal-approximation confidence interval (clamped to [0, total])."""

    estimate: float
    low: float
    high: float
    confidence: float
    #: Reports that went into the estimate, noised or not.
    total: int


def debias(groups: Iterable[tuple[int, int, int]], k: int, confidence: float = CONFIDENCE) -> Estimate:
    """Estimate how many reports truly were of one category.

    ``groups`` holds ``(epsilon_milli, observed, total)`` per mechanism: ``observed`` reports of the
    category among ``total`` reports made with that epsilon (0: not noised, counted exactly). Devices
    with different epsilons can be mixed: each group is de-biased with its own ``(p, q)`` and the
    estimates and variances add up. Per group, ``(observed − total·q) / (p − q)`` is unbiased, with
    variance ``(t·p(1−p) + (total−t)·q(1−q)) / (p−q)²`` evaluated at the estimate ``t`` (clamped).
    """
    point = 0.0
    variance = 0.0
    total = 0
    for milli, observed, n in groups:
        if not 0 <= observed <= n:
            raise ValueError(f"observed count {observed} outside 0..{n}")
        total += n
        if milli == 0:
            point += observed
            continue
        p, q = grr_probabilities(milli / EPSILON_SCALE, k)
        t = (observed - n * q) / (p - q)
        point += t
        t_c = min(max(t, 0.0), float(n))
        variance += (t_c * p * (1 - p) + (n - t_c) * q * (1 - q)) / (p - q) ** 2
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * math.sqrt(variance)
    return Estimate(
        estimate=point,
        low=max(0.0, point - half),
        high=min(float(total), point + half),
        confidence=confidence,
        total=total,
    )
