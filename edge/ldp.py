"""Local differential privacy: randomized response over the allowed interest categories, a daily budget,
and the de-biasing the aggregator applies to what it receives.

Generalized (k-ary) randomized response: a signal for category ``c`` is reported as ``c`` with
probability ``p = e^ε / (e^ε + k − 1)`` and as each of the ``k − 1`` other allowed categories with
probability ``q = 1 / (e^ε + k − 1)``, so any two inputs produce any output with probabilities within a
factor ``p / q = e^ε`` of each other: one report is ε-locally differentially private with respect to
the category the filter chose. The output domain is the allowed interest list
(models/interest_categories.tsv): the noise can never produce a sensitive category, and it only ever
replaces the category of a signal that passed the privacy filter, so it never creates a signal.

A noised signal always carries the full weight level, so its weight says nothing about the utterance
either. What is *not* protected: that a signal was sent at all on a day (the wearer made some
commercial query), how many (capped by the daily budget), the day, and the region.

Standard library only: the aggregator imports this module for ``debias`` without any model runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import secrets
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.privacy import Interest

log = logging.getLogger(__name__)

#: Epsilon travels on the wire in thousandths (``SignalBatch.ldp_epsilon_milli``); 0 means "not noised".
EPSILON_SCALE = 1000
#: Above this a randomized response is nearly the truth (k = 89: 99.6% kept); refused as a misconfiguration.
MAX_EPSILON = 10.0
#: Weight level of every noised signal (the full level: the weight must not depend on the utterance).
NOISED_WEIGHT_LEVEL = 4
DEFAULT_EPSILON = 2.0
DEFAULT_DAILY_BUDGET = 20
#: Confidence level of the intervals ``debias`` returns.
CONFIDENCE = 0.95


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


def grr_probabilities(epsilon: float, k: int) -> tuple[float, float]:
    """``(p, q)`` of k-ary randomized response: keep the true category with p, report each other with q."""
    if k < 2:
        raise ValueError(f"randomized response needs at least 2 categories, got {k}")
    e = math.exp(epsilon)
    return e / (e + k - 1), 1.0 / (e + k - 1)


@dataclass(frozen=True, slots=True)
class LdpOptions:
    """Per-deployment settings of local differential privacy on the device."""

    #: Privacy loss of one signal (natural-log units). Smaller: more noise, stronger protection.
    epsilon: float = DEFAULT_EPSILON
    #: At most this many signals leave the device per UTC day; the rest are withheld. A day's total
    #: privacy loss is at most ``epsilon * daily_budget`` (sequential composition).
    daily_budget: int = DEFAULT_DAILY_BUDGET

    def __post_init__(self) -> None:
        epsilon_milli(self.epsilon)
        if self.daily_budget < 1:
            raise ValueError(f"daily_budget must be at least 1 signal per day, got {self.daily_budget}")

    @property
    def daily_epsilon(self) -> float:
        """The most privacy loss one wearer can incur in a day."""
        return self.epsilon * self.daily_budget


class RandomizedResponse:
    """k-ary randomized response over a fixed category list.

    ``rng`` defaults to the operating system's CSPRNG: a predictable generator would let an observer
    undo the noise. Tests pass a seeded ``random.Random``.
    """

    def __init__(self, categories: Iterable[str], epsilon: float, rng: random.Random | None = None) -> None:
        self.categories = tuple(sorted(set(categories)))
        self.epsilon = epsilon
        self.p, self.q = grr_probabilities(epsilon, len(self.categories))
        self._index = {c: i for i, c in enumerate(self.categories)}
        self._rng = rng if rng is not None else secrets.SystemRandom()

    def perturb(self, category_id: str) -> str:
        """The category to report for a true ``category_id`` (which must be in the list)."""
        index = self._index.get(category_id)
        if index is None:
            raise ValueError(
                f"category {category_id!r} is not one of the {len(self.categories)} allowed ones"
            )
        if self._rng.random() < self.p:
            return category_id
        other = self._rng.randrange(len(self.categories) - 1)  # uniform over the k - 1 others
        return self.categories[other if other < index else other + 1]


#: Day marker of an unreadable budget file: nothing may be spent until the file is rewritten.
_UNREADABLE = -2


class DailyBudget:
    """How many signals the device may still send today, kept in a small JSON file so that a restart does
    not reset it.

    The count resets only when the UTC day moves forward; a clock set back keeps the newest day's count.
    A file that cannot be read fails closed: today's budget counts as spent.
    """

    def __init__(self, per_day: int, path: str | os.PathLike[str] | None = None) -> None:
        if per_day < 1:
            raise ValueError(f"a daily budget must be at least 1, got {per_day}")
        self.per_day = per_day
        self.path = None if path is None else Path(path)
        self._day, self._spent = self._load()

    def _load(self) -> tuple[int, int]:
        if self.path is None or not self.path.exists():
            return -1, 0
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            day, spent = int(state["day"]), int(state["spent"])
            if spent < 0:
                raise ValueError("negative count")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "privacy budget file %s is unreadable (%s): today's budget counts as spent", self.path, exc
            )
            return _UNREADABLE, 0
        return day, spent

    def _save(self) -> None:
        if self.path is None:
            return
        # Write-then-rename: a crash leaves the old count or the new one, never a torn file.
        fd, tmp = tempfile.mkstemp(prefix=".budget-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"day": self._day, "spent": self._spent}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remaining(self, day: int) -> int:
        """Signals still allowed on ``day``."""
        if self._day == _UNREADABLE:
            return 0
        if day > self._day:
            return self.per_day
        return max(0, self.per_day - self._spent)

    def take(self, day: int) -> bool:
        """Spend one signal of ``day``'s budget; False (and nothing spent) when it is used up."""
        if self.remaining(day) == 0:
            if self._day == _UNREADABLE:
                # Replace the bad file by "today is spent": tomorrow starts afresh from a good file.
                self._day, self._spent = day, self.per_day
                self._save()
            return False
        if day > self._day:
            self._day, self._spent = day, 0
        self._spent += 1
        self._save()
        return True


class LocalPrivacy:
    """What the device applies after the privacy filter: the daily budget, then randomized response."""

    def __init__(
        self,
        categories: Iterable[str],
        options: LdpOptions | None = None,
        budget_path: str | os.PathLike[str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or LdpOptions()
        self.mechanism = RandomizedResponse(categories, self.options.epsilon, rng)
        self.budget = DailyBudget(self.options.daily_budget, budget_path)

    def privatize(self, signals: Sequence[Interest]) -> tuple[list[Interest], int]:
        """The signals to send for ``signals`` (which passed the filter) and how many were withheld
        because the day's budget is spent. Nothing is created: at most one output per input."""
        sent: list[Interest] = []
        withheld = 0
        for signal in signals:
            if not self.budget.take(signal.day):
                withheld += 1
                continue
            sent.append(
                dataclasses.replace(
                    signal,
                    category_id=self.mechanism.perturb(signal.category_id),
                    weight_level=NOISED_WEIGHT_LEVEL,
                    epsilon=self.options.epsilon,
                )
            )
        return sent, withheld


# --- the aggregator's side ------------------------------------------------------------------------------


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
