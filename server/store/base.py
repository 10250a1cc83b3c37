"""The storage interface every backend implements, and the domain values it works on."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from sotto.server import decay
from sotto.wire import Signal


class StoreError(Exception):
    """A store operation failed."""


class StoreConfigError(StoreError, ValueError):
    """The store cannot be opened as configured (bad URL, wrong half-life, unusable file or database)."""


class HalfLifeMismatchError(StoreConfigError):
    """The database was created with a different half-life; its stored sums would be read wrongly."""


class StoreUnavailableError(StoreError):
    """The database could not do the operation right now (connection lost, locked, disk full).

    Nothing was committed; the same call may succeed later.
    """


class BatchConflictError(StoreError):
    """A batch id was reused with different content."""

    def __init__(self, message: str = "batch id reused with different content") -> None:
        super().__init__(message)


class MinorProfileError(StoreError):
    """The batch's profile is marked as a minor and the policy forbids storing its signals."""

    def __init__(
        self, message: str = "this profile is marked as a minor: no interest signals are accepted"
    ) -> None:
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Entry:
    """What one batch adds to one (profile, category) row: an increment of the stored sum and the day of
    the newest signal, which is when the entry was last reinforced (retention counts from it)."""

    category_id: str
    increment: float
    last_day: int


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
    #: Epsilon (thousandths) of the randomized response the categories went through; 0: not noised.
    epsilon_milli: int = 0
    #: The region table forbids interest signals of minors here today: refuse the batch, inside the
    #: transaction, if the profile is marked as a minor.
    refuse_minor: bool = False

    def counts(self) -> list[tuple[str, int, int]]:
        """``(category_id, day, signals)`` per category and day, sorted: what the audience estimate reads."""
        counts: dict[tuple[str, int], int] = {}
        for s in self.signals:
            counts[s.category_id, s.day] = counts.get((s.category_id, s.day), 0) + 1
        return [(cid, day, n) for (cid, day), n in sorted(counts.items())]

    def entries(self, half_life_days: float) -> list[Entry]:
        """One entry per category (its signals merged), sorted by category id.

        The order matters for PostgreSQL: every transaction locks a profile's rows in the same order, so
        concurrent batches of one profile cannot deadlock on each other.
        """
        sums: dict[str, float] = {}
        days: dict[str, int] = {}
        for s in self.signals:
            sums[s.category_id] = sums.get(s.category_id, 0.0) + decay.increment(
                s.weight_level, s.day, half_life_days
            )
            days[s.category_id] = max(days.get(s.category_id, s.day), s.day)
        return [Entry(cid, sums[cid], days[cid]) for cid in sorted(sums)]


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
    #: Per category, the day of the newest signal that reinforced it.
    last_days: dict[str, int]


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """Rows removed by ``Store.purge``."""

    entries: int
    profiles: int
    batches: int
    #: (profile, category, epsilon, day) signal counts of the audience estimate.
    signal_counts: int = 0


class Role(StrEnum):
    """What a credential may do: a device writes to (and reads or erases) the one profile it is bound to;
    an admin reads and erases any profile and asks for audience sizes, but never writes signals."""

    DEVICE = "device"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Credential:
    """A bearer token as stored: only its SHA-256, the role and, for a device, the bound profile."""

    token_sha256: bytes
    role: Role
    profile_id: str | None = None

    def __post_init__(self) -> None:
        if len(self.token_sha256) != 32:
            raise ValueError(f"token_sha256 must be 32 bytes, got {len(self.token_sha256)}")
        if (self.role is Role.DEVICE) != (self.profile_id is not None):
            raise ValueError("a device credential needs a profile id and an admin credential has none")


class Store(Protocol):
    """Interest profile storage. Implementations never block the event loop.

    Driver errors that a retry may cure surface as ``StoreUnavailableError``.
    """

    @property
    def half_life_days(self) -> float:
        """The half-life the stored sums were built with (``StoreConfigError`` if none is recorded yet)."""
        ...

    async def apply_batch(self, batch: Batch) -> ApplyResult:
        """Record the batch id and add its entries in one transaction.

        A resend with the same digest returns ``ApplyResult(duplicate=True, applied_signals=0)`` and changes
        nothing; the same id with another digest raises ``BatchConflictError`` and changes nothing.
        """
        ...

    async def get_profile(self, profile_id: str) -> StoredProfile | None:
        """The stored profile, or None when nothing is stored for it."""
        ...

    async def delete_profile(self, profile_id: str) -> bool:
        """Erase every row of the profile (scores, signal counts, batch ids, device tokens) in one
        transaction; a minor mark stays, because it only ever stops data.

        Returns True when there was something to erase.
        """
        ...

    async def audience_size(self, category_id: str, min_sum: float, since_day: int) -> int:
        """Distinct profiles whose stored sum for the category is at least ``min_sum`` and whose entry was
        reinforced on ``since_day`` or later."""
        ...

    async def signal_counts(self, category_id: str, since_day: int) -> list[tuple[int, int, int]]:
        """Per epsilon (thousandths; 0 = not noised) of the signals observed on ``since_day`` or later:
        ``(epsilon_milli, signals of the category, signals of every category)``, sorted by epsilon."""
        ...

    async def mark_minor(self, profile_id: str, minor: bool) -> int:
        """Mark (or unmark) the profile as a minor. Marking erases, in the same transaction, every stored
        signal of the profile (scores, signal counts, batch ids; not its credentials). Returns how many
        rows were erased."""
        ...

    async def minors(self) -> list[str]:
        """Profiles marked as minors, sorted."""
        ...

    async def purge(self, before_day: int) -> PurgeResult:
        """Remove entries last reinforced before ``before_day``, profiles left without entries, signal
        counts of days before it, and batch ids with a base day before it (a resend of those is refused as
        too old anyway)."""
        ...

    async def add_credential(self, credential: Credential) -> None:
        """Store a credential (its token hash must be new)."""
        ...

    async def find_credential(self, token_sha256: bytes) -> Credential | None:
        """The credential with this token hash, or None."""
        ...

    async def count_credentials(self, role: Role) -> int:
        """How many credentials of ``role`` are stored."""
        ...

    async def revoke_credentials(self, profile_id: str | None) -> int:
        """Remove every device credential bound to ``profile_id``, or every admin credential for None.

        Returns how many were removed.
        """
        ...

    async def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
        ...
