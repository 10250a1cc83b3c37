"""Options of the aggregator service, grouped in one dataclass."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.policy import Policy
from server.decay import day_number


def utc_today() -> dt.date:
    """Today's date in UTC (the default clock)."""
    return dt.datetime.now(dt.UTC).date()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the service needs besides the store.

    The half-life is not here: it belongs to the stored sums, so the store owns it (see ``open_store``).
    """

    #: Taxonomy, sensitive list and region table; the bundled models folder by default.
    policy: Policy = field(default_factory=Policy.load)
    max_signals_per_batch: int = 100
    max_receive_message_bytes: int = 64 * 1024
    #: Injectable so that tests are deterministic.
    clock: Callable[[], dt.date] = utc_today

    def __post_init__(self) -> None:
        if self.max_signals_per_batch < 1:
            raise ValueError(f"max_signals_per_batch must be at least 1, got {self.max_signals_per_batch}")
        if self.max_receive_message_bytes < 1024:
            raise ValueError(
                f"max_receive_message_bytes must be at least 1024, got {self.max_receive_message_bytes}"
            )

    def today(self) -> int:
        """Today's day number according to the configured clock."""
        return day_number(self.clock())
