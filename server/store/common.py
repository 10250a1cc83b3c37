"""What the SQL stores share: the schema, the statements every engine runs alike, the conversion of rows
to domain values, the schema-version and half-life checks, and the ``Store`` calls built on them.

A store engine (``sqlite``, ``postgres``; ``plproxy`` builds on ``postgres``) keeps only what is really its
own: how it connects, runs statements and transactions, applies a batch, and reports driver errors.

Statements here use ``?`` placeholders (SQLite's); the PostgreSQL store rewrites them to ``%s`` (``pg``).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sotto.server.store.base import (
    ApplyResult,
    Batch,
    BatchConflictError,
    Credential,
    HalfLifeMismatchError,
    PurgeResult,
    Role,
    StoreConfigError,
    StoredProfile,
)

#: One statement and its parameters.
Statement = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Dialect:
    """The column types and table options in which the engines' schemas differ."""

    blob: str
    real: str
    #: The type of a counter that only grows (the batch count of a profile).
    counter: str
    #: Appended to the tables that have a primary key.
    table_options: str
    #: The function taking the larger of two values.
    greatest: str


SQLITE = Dialect(blob="BLOB", real="REAL", counter="INTEGER", table_options=" WITHOUT ROWID", greatest="max")
POSTGRES = Dialect(
    blob="BYTEA", real="DOUBLE PRECISION", counter="BIGINT", table_options="", greatest="greatest"
)

SCHEMA_VERSION_TABLE = "CREATE TABLE schema_version (version INTEGER NOT NULL)"


def meta_table(d: Dialect) -> str:
    """The key-value table holding the half-life the stored sums were built with."""
    return f"CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL){d.table_options}"


def credentials_table(d: Dialect) -> tuple[str, ...]:
    """The credentials table (token hashes, roles, bound profiles) and its index."""
    return (
        f"""CREATE TABLE credentials (
            token_sha256 {d.blob} PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('device', 'admin')),
            profile_id TEXT CHECK ((role = 'admin') = (profile_id IS NULL))
        ){d.table_options}""",
        "CREATE INDEX credentials_by_profile ON credentials (profile_id)",
    )


def migrations(d: Dialect) -> tuple[tuple[str, ...], ...]:
    """Schema versions 1 to 3, the same tables on every engine in its own types. Version 4 (batch ids
    unique per profile) changes a primary key, which each engine does its own way."""
    return (
        (
            SCHEMA_VERSION_TABLE,
            meta_table(d),
            f"""CREATE TABLE batches (
            batch_id {d.blob} PRIMARY KEY,
            profile_id TEXT NOT NULL,
            digest {d.blob} NOT NULL,
            base_day INTEGER NOT NULL
        ){d.table_options}""",
            "CREATE TABLE profiles (profile_id TEXT PRIMARY KEY, "
            f"batches {d.counter} NOT NULL){d.table_options}",
            f"""CREATE TABLE scores (
            profile_id TEXT NOT NULL,
            category_id TEXT NOT NULL,
            s {d.real} NOT NULL,
            PRIMARY KEY (profile_id, category_id)
        ){d.table_options}""",
        ),
        (
            # Retention: the day each entry (and each profile) was last reinforced. Version 1 kept no such
            # day; the newest batch of the profile is the closest bound it has.
            "ALTER TABLE scores ADD COLUMN last_day INTEGER NOT NULL DEFAULT 0",
            """UPDATE scores SET last_day = coalesce(
            (SELECT max(base_day) FROM batches b WHERE b.profile_id = scores.profile_id), 0)""",
            "ALTER TABLE profiles ADD COLUMN last_day INTEGER NOT NULL DEFAULT 0",
            """UPDATE profiles SET last_day = coalesce(
            (SELECT max(last_day) FROM scores s WHERE s.profile_id = profiles.profile_id), 0)""",
            "CREATE INDEX scores_by_last_day ON scores (last_day)",
            "CREATE INDEX scores_by_category ON scores (category_id, s)",
            "CREATE INDEX batches_by_profile ON batches (profile_id)",
            "CREATE INDEX batches_by_base_day ON batches (base_day)",
            *credentials_table(d),
        ),
        (
            # Local differential privacy: signals per (profile, category, epsilon, day), so the audience
            # estimate can de-bias each mechanism, and deletion and retention reach them by profile and day.
            f"""CREATE TABLE signal_counts (
            profile_id TEXT NOT NULL,
            category_id TEXT NOT NULL,
            epsilon_milli INTEGER NOT NULL,
            day INTEGER NOT NULL,
            n BIGINT NOT NULL,
            PRIMARY KEY (profile_id, category_id, epsilon_milli, day)
        ){d.table_options}""",
            "CREATE INDEX signal_counts_by_day ON signal_counts (day)",
            # Profiles marked as minors (an admin's decision); the region table says where that stops signals.
            f"CREATE TABLE minors (profile_id TEXT PRIMARY KEY){d.table_options}",
        ),
    )


def migration_steps(subject: str, version: int, migrations: Sequence[tuple[str, ...]]) -> list[Statement]:
    """The statements that bring a database at schema ``version`` to ``len(migrations)``, the version
    update included; ``subject`` names the database in the error raised for a newer schema."""
    schema_version = len(migrations)
    if version > schema_version:
        raise StoreConfigError(
            f"{subject} has schema version {version}, newer than this server's {schema_version}; "
            "upgrade the server"
        )
    steps: list[Statement] = [(statement, ()) for batch in migrations[version:] for statement in batch]
    if version == 0:
        steps.append(("INSERT INTO schema_version (version) VALUES (?)", (schema_version,)))
    elif version < schema_version:
        steps.append(("UPDATE schema_version SET version = ?", (schema_version,)))
    return steps


SELECT_HALF_LIFE = "SELECT value FROM meta WHERE key = 'half_life_days'"


def settle_half_life(
    subject: str, stored: str | None, configured: float | None
) -> tuple[float | None, Statement | None]:
    """The database's half-life given the ``stored`` one (None: none yet) and the ``configured`` one
    (None: accept what is stored), with the statement recording it when it is new.

    Raises ``HalfLifeMismatchError`` when both are known and differ: the stored sums depend on it.
    """
    if stored is None:
        if configured is None:
            return None, None
        return configured, ("INSERT INTO meta (key, value) VALUES ('half_life_days', ?)", (repr(configured),))
    recorded = float(stored)
    if configured is not None and recorded != configured:
        raise HalfLifeMismatchError(
            f"{subject} was created with a half-life of {recorded:g} days but {configured:g} is "
            f"configured; the stored sums depend on it, so start with --half-life-days {recorded:g} "
            "or use a new database"
        )
    return recorded, None


def recorded_half_life(subject: str, half_life_days: float | None) -> float:
    """``half_life_days``, or the error saying ``subject`` has none recorded yet."""
    if half_life_days is None:
        raise StoreConfigError(
            f"{subject} has no half-life recorded yet; `sotto-server serve` records it on first start"
        )
    return half_life_days


# --- statements every engine runs alike ----------------------------------------------------------------

INSERT_BATCH = (
    "INSERT INTO batches (batch_id, profile_id, digest, base_day) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (profile_id, batch_id) DO NOTHING"
)
SELECT_DIGEST = "SELECT digest FROM batches WHERE profile_id = ? AND batch_id = ?"
SELECT_MINOR = "SELECT 1 FROM minors WHERE profile_id = ?"


def count_batch(d: Dialect) -> str:
    """Count a batch in its profile's row (created on the first), keeping the newest day."""
    return (
        "INSERT INTO profiles (profile_id, batches, last_day) VALUES (?, 1, ?) ON CONFLICT (profile_id) "
        f"DO UPDATE SET batches = profiles.batches + 1, "
        f"last_day = {d.greatest}(profiles.last_day, excluded.last_day)"
    )


# One statement reads one snapshot: the batch count and the sums always belong together.
SELECT_PROFILE = (
    "SELECT p.batches, s.category_id, s.s, s.last_day FROM profiles p "
    "LEFT JOIN scores s ON s.profile_id = p.profile_id WHERE p.profile_id = ?"
)
SELECT_SIGNAL_COUNTS = (
    "SELECT epsilon_milli, sum(CASE WHEN category_id = ? THEN n ELSE 0 END), sum(n) FROM signal_counts "
    "WHERE day >= ? GROUP BY epsilon_milli ORDER BY epsilon_milli"
)
SELECT_AUDIENCE = "SELECT count(*) FROM scores WHERE category_id = ? AND s >= ? AND last_day >= ?"
SELECT_MINORS = "SELECT profile_id FROM minors ORDER BY profile_id"

#: Tables holding a profile's signals, in locking order (profiles first: a concurrent batch of the profile
#: waits on that row): what marking it as a minor erases. Deletion also erases its credentials.
SIGNAL_TABLES = ("profiles", "scores", "signal_counts", "batches")
PROFILE_TABLES = (*SIGNAL_TABLES, "credentials")


def erase(profile_id: str, tables: Iterable[str]) -> list[Statement]:
    """The statements deleting the profile's rows from ``tables``, in order."""
    return [(f"DELETE FROM {table} WHERE profile_id = ?", (profile_id,)) for table in tables]


def mark_minor(profile_id: str, minor: bool) -> list[Statement]:
    """Mark the profile as a minor and erase its signals, or lift the mark (which erases nothing)."""
    if not minor:
        return [("DELETE FROM minors WHERE profile_id = ?", (profile_id,))]
    return [
        ("INSERT INTO minors (profile_id) VALUES (?) ON CONFLICT DO NOTHING", (profile_id,)),
        *erase(profile_id, SIGNAL_TABLES),
    ]


def purge(before_day: int) -> list[Statement]:
    """The retention purge: entries, profiles, batch ids and signal counts older than ``before_day``.

    A profile's own last_day (the newest of its entries') decides, not "has no entries left": that stays
    right when a batch of the profile commits concurrently (PostgreSQL re-checks the updated row before
    deleting it).
    """
    return [
        ("DELETE FROM scores WHERE last_day < ?", (before_day,)),
        ("DELETE FROM profiles WHERE last_day < ?", (before_day,)),
        ("DELETE FROM batches WHERE base_day < ?", (before_day,)),
        ("DELETE FROM signal_counts WHERE day < ?", (before_day,)),
    ]


def revoke(profile_id: str | None) -> Statement:
    """Delete the profile's device credentials, or every admin credential for None."""
    if profile_id is None:
        return "DELETE FROM credentials WHERE role = 'admin'", ()
    return "DELETE FROM credentials WHERE profile_id = ?", (profile_id,)


# --- rows to domain values -----------------------------------------------------------------------------


def profile_from_rows(profile_id: str, rows: Sequence[Sequence[Any]]) -> StoredProfile | None:
    """A profile from ``(batches, category_id, sum, last_day)`` rows (a category of None: no entries)."""
    if not rows:
        return None
    entries = [row for row in rows if row[1] is not None]
    return StoredProfile(
        profile_id=profile_id,
        batches=int(rows[0][0]),
        sums={cid: s for _, cid, s, _ in entries},
        last_days={cid: day for _, cid, _, day in entries},
    )


def signal_counts_from_rows(rows: Iterable[Sequence[Any]]) -> list[tuple[int, int, int]]:
    """``(epsilon_milli, category signals, all signals)`` rows as integers (sums come back as numerics)."""
    return [(int(e), int(c), int(n)) for e, c, n in rows]


def purge_result(counts: Sequence[int]) -> PurgeResult:
    """The rows the statements of ``purge`` removed, in their order."""
    entries, profiles, batches, signal_counts = counts
    return PurgeResult(entries=entries, profiles=profiles, batches=batches, signal_counts=signal_counts)


def resend(stored_digest: bytes | None, batch: Batch) -> ApplyResult:
    """The outcome of a batch whose id is stored already with ``stored_digest``: a resend of the same
    content changes nothing; other content under that id is refused. None (the profile was erased
    between the two statements) counts as a resend: nothing is applied."""
    if stored_digest is not None and bytes(stored_digest) != batch.digest:
        raise BatchConflictError()
    return ApplyResult(duplicate=True, applied_signals=0)


@functools.cache
def pg(statement: str) -> str:
    """``statement`` with psycopg's ``%s`` placeholders for SQLite's ``?``."""
    return statement.replace("?", "%s")


class SQLStore(ABC):
    """The ``Store`` calls every SQL engine runs alike, on top of three of the engine's own: read rows,
    run statements in one transaction, and apply a batch.

    ``_subject`` names the database in messages (never with a password).
    """

    _subject: str
    _half_life_days: float | None

    @abstractmethod
    async def _fetch(self, statement: Statement) -> list[tuple[Any, ...]]:
        """The rows of one query (``?`` placeholders)."""

    @abstractmethod
    async def _write(self, statements: Sequence[Statement]) -> list[int]:
        """Run ``statements`` in one transaction; the rows each changed, in order."""

    @abstractmethod
    async def apply_batch(self, batch: Batch) -> ApplyResult:
        """Record the batch id and add its entries in one transaction (see ``Store.apply_batch``)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and threads."""

    @property
    def half_life_days(self) -> float:
        """The half-life the stored sums were built with."""
        return recorded_half_life(self._subject, self._half_life_days)

    async def _count(self, statement: Statement) -> int:
        rows = await self._fetch(statement)
        return int(rows[0][0]) if rows else 0

    async def get_profile(self, profile_id: str) -> StoredProfile | None:
        """The stored profile, or None when nothing is stored for it."""
        return profile_from_rows(profile_id, await self._fetch((SELECT_PROFILE, (profile_id,))))

    async def delete_profile(self, profile_id: str) -> bool:
        """Erase every row of the profile in one transaction; True when there was something."""
        return sum(await self._write(erase(profile_id, PROFILE_TABLES))) > 0

    async def audience_size(self, category_id: str, min_sum: float, since_day: int) -> int:
        """Distinct profiles with at least ``min_sum`` in the category, reinforced since ``since_day``."""
        return await self._count((SELECT_AUDIENCE, (category_id, min_sum, since_day)))

    async def signal_counts(self, category_id: str, since_day: int) -> list[tuple[int, int, int]]:
        """Per epsilon: signals of the category and of every category since ``since_day``."""
        return signal_counts_from_rows(await self._fetch((SELECT_SIGNAL_COUNTS, (category_id, since_day))))

    async def mark_minor(self, profile_id: str, minor: bool) -> int:
        """Mark or unmark a minor; marking erases the profile's signals (see ``Store.mark_minor``)."""
        counts = await self._write(mark_minor(profile_id, minor))
        return sum(counts[1:])  # the first statement sets or lifts the mark itself

    async def minors(self) -> list[str]:
        """Profiles marked as minors."""
        return [row[0] for row in await self._fetch((SELECT_MINORS, ()))]

    async def purge(self, before_day: int) -> PurgeResult:
        """Remove what was last reinforced before ``before_day`` (see ``Store.purge``)."""
        return purge_result(await self._write(purge(before_day)))

    async def add_credential(self, credential: Credential) -> None:
        """Store a credential."""
        await self._write(
            [
                (
                    "INSERT INTO credentials (token_sha256, role, profile_id) VALUES (?, ?, ?)",
                    (credential.token_sha256, credential.role.value, credential.profile_id),
                )
            ]
        )

    async def find_credential(self, token_sha256: bytes) -> Credential | None:
        """The credential with this token hash, or None."""
        rows = await self._fetch(
            ("SELECT role, profile_id FROM credentials WHERE token_sha256 = ?", (token_sha256,))
        )
        return Credential(token_sha256, Role(rows[0][0]), rows[0][1]) if rows else None

    async def count_credentials(self, role: Role) -> int:
        """How many credentials of ``role`` are stored."""
        return await self._count(("SELECT count(*) FROM credentials WHERE role = ?", (role.value,)))

    async def revoke_credentials(self, profile_id: str | None) -> int:
        """Remove the profile's device credentials, or every admin credential for None."""
        (removed,) = await self._write([revoke(profile_id)])
        return removed
