"""The storage interface every backend implements, and the domain values it works on."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

from server import decay


class StoreError(Exception):
    """A store operation failed."""


class StoreConfigError(StoreError, ValueError):
    """The store cannot be opened as configured (bad URL, wrong half-life, unusable file)."""


class HalfLifeMismatchError(StoreConfigError):
    """The database was created with a different half-life; its stored sums would be read wrongly."""


class BatchConflictError(StoreError):
    """A batch id was reused with different content."""


@dataclass(frozen=True, slots=True)
class Signal:
    """One validated signal: a category, a weight level (1-4) and the day it was observed."""

    category_id: str
    weight_level: int
    day: int


@dataclass(frozen=True, slots=True)
class Batch:
    """One validated batch, ready to be applied exactly once."""

    batch_id: bytes
    profile_id: str
    region: str
    base_day: int
    signals: tuple[Signal, ...]
    #: SHA-256 of the canonical content; tells a resend from a reused id.
    digest: bytes

    def increments(self, half_life_days: float) -> dict[str, float]:
        """The amount to add to each category's stored sum (signals of one category merged)."""
        sums: defaultdict[str, float] = defaultdict(float)
        for s in self.signals:
            sums[s.category_id] += decay.increment(s.weight_level, s.day, half_life_days)
        return dict(sums)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The outcome of ``Store.apply_batch``."""

    duplicate: bool
    applied_signals: int


@dataclass(frozen=True, slots=True)
class StoredProfile:
    """A profile as stored: undecayed sums per category (see ``server.decay``) and the batch count."""

    profile_id: str
    batches: int
    sums: dict[str, float]


class Store(Protocol):
    """Interest profile storage. Implementations never block the event loop."""

    @property
    def half_life_days(self) -> float:
        """The half-life the stored sums were built with."""
        ...

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        """Record the batch id and add its increments in one transaction.

        A resend with the same digest returns ``ApplyResult(duplicate=True, applied_signals=0)`` and changes
        nothing; the same id with another digest raises ``BatchConflictError`` and changes nothing.
        """
        ...

    async def get_profile(self, profile_id: str) -> StoredProfile | None:
        """The stored profile, or None when no batch was ever applied to it."""
        ...

    async def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
        ...
