"""Local differential privacy on the device: randomized response over the allowed interest categories and
a daily budget (the de-biasing the aggregator applies is in ``sotto.ldp_math``).

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sotto.ldp_math import grr_probabilities
from sotto.wire import MAX_WEIGHT_LEVEL, epsilon_milli

if TYPE_CHECKING:
    from sotto.wire import Signal

log = logging.getLogger(__name__)

#: Weight level of every noised signal (the full level: the weight must not depend on the utterance).
NOISED_WEIGHT_LEVEL = MAX_WEIGHT_LEVEL
DEFAULT_EPSILON = 2.0
DEFAULT_DAILY_BUDGET = 20


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


#: Day marker of an unreadable budget: nothing may be spent until it is rewritten.
_UNREADABLE = -2
#: The key of the budget in a device's state (``Outbox.get_state``/``set_state``).
BUDGET_STATE_KEY = "privacy_budget"


class StateStore(Protocol):
    """Small persisted key-value state; the device's outbox is one (``Outbox.get_state``/``set_state``)."""

    def get_state(self, key: str) -> str | None: ...

    def set_state(self, key: str, value: str | None) -> None: ...


class JsonFileState:
    """A :class:`StateStore` of one value in a file of its own, for callers without an outbox.

    Written with write-then-rename, so a crash leaves the old value or the new one, never a torn file;
    the folder is created on the first write.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def get_state(self, key: str) -> str | None:
        return self.path.read_text(encoding="utf-8") if self.path.exists() else None

    def set_state(self, key: str, value: str | None) -> None:
        if value is None:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".budget-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(value)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class DailyBudget:
    """How many signals the device may still send today, persisted so that a restart does not reset it:
    in the device's state (its outbox), or in a JSON file of its own when ``state`` is a path.

    The count resets only when the UTC day moves forward; a clock set back keeps the newest day's count.
    A stored budget that cannot be read fails closed: today's budget counts as spent.
    """

    def __init__(self, per_day: int, state: StateStore | str | os.PathLike[str] | None = None) -> None:
        if per_day < 1:
            raise ValueError(f"a daily budget must be at least 1, got {per_day}")
        self.per_day = per_day
        self.state: StateStore | None = (
            JsonFileState(state) if isinstance(state, str | os.PathLike) else state
        )
        self._day, self._spent = self._load()

    def _load(self) -> tuple[int, int]:
        raw = None
        try:
            raw = None if self.state is None else self.state.get_state(BUDGET_STATE_KEY)
            if raw is None:
                return -1, 0
            document = json.loads(raw)
            day, spent = int(document["day"]), int(document["spent"])
            if spent < 0:
                raise ValueError("negative count")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("the privacy budget is unreadable (%s): today's budget counts as spent", exc)
            return _UNREADABLE, 0
        return day, spent

    def _save(self) -> None:
        if self.state is not None:
            self.state.set_state(BUDGET_STATE_KEY, json.dumps({"day": self._day, "spent": self._spent}))

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
                # Replace the bad value by "today is spent": tomorrow starts afresh from a good one.
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
        budget: StateStore | str | os.PathLike[str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``budget`` is where the daily budget persists: the device's outbox (what ``Device`` passes), a
        JSON file of its own, or None (in memory only)."""
        self.options = options or LdpOptions()
        self.mechanism = RandomizedResponse(categories, self.options.epsilon, rng)
        self.budget = DailyBudget(self.options.daily_budget, budget)

    def privatize(self, signals: Sequence[Signal]) -> tuple[list[Signal], int]:
        """The signals to send for ``signals`` (which passed the filter) and how many were withheld
        because the day's budget is spent. Nothing is created: at most one output per input."""
        sent: list[Signal] = []
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
