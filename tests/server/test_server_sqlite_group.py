"""The SQLite writer's group commit: batches queued together share a transaction, each all-or-nothing."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from aggregator_testkit import ELECTRONICS, MUSIC, OTHER, PROFILE, make_batch, row_counts, signal

from sotto.server import ServerConfig
from sotto.server.decay import increment
from sotto.server.store import ApplyResult, Batch, BatchConflictError, StoreUnavailableError
from sotto.server.store import sqlite as sqlite_backend
from sotto.server.validation import validate_batch


def _open(path: Path) -> sqlite3.Connection:
    conn, _ = sqlite_backend._open_writer(str(path), 30.0)
    return conn


def test_group_commits_each_batch_and_isolates_a_conflict(db_path: Path, config: ServerConfig) -> None:
    first = validate_batch(make_batch([signal(MUSIC, 4)]), config)
    reused = validate_batch(make_batch([signal(ELECTRONICS, 1)], batch_id=first.batch_id), config)
    resent = validate_batch(make_batch([signal(MUSIC, 4)], batch_id=first.batch_id), config)
    other = validate_batch(make_batch([signal(MUSIC, 2)], profile_id=OTHER), config)
    with closing(_open(db_path)) as conn:
        outcomes = sqlite_backend._apply_group(conn, [(b, 30.0) for b in (first, reused, resent, other)])
        assert outcomes[0] == ApplyResult(duplicate=False, applied_signals=1)
        assert isinstance(outcomes[1], BatchConflictError)  # same id, other content: refused alone
        assert outcomes[2] == ApplyResult(duplicate=True, applied_signals=0)  # seen within the group
        assert outcomes[3] == ApplyResult(duplicate=False, applied_signals=1)
        scores = dict(conn.execute("SELECT profile_id || '/' || category_id, s FROM scores").fetchall())
    assert scores == pytest.approx(
        {
            f"{PROFILE}/{MUSIC}": increment(4, first.base_day, 30),
            f"{OTHER}/{MUSIC}": increment(2, other.base_day, 30),
        }
    )
    assert row_counts(db_path)["batches"] == 2


def test_a_failing_group_commits_nothing(db_path: Path, config: ServerConfig) -> None:
    batches = [validate_batch(make_batch([signal(MUSIC, 3)]), config) for _ in range(3)]
    with closing(_open(db_path)) as conn:
        # Another connection holds the write lock: BEGIN IMMEDIATE fails for the whole group.
        conn.execute("PRAGMA busy_timeout = 0")
        with closing(sqlite3.connect(db_path, isolation_level=None)) as blocker:
            blocker.execute("BEGIN IMMEDIATE")
            outcomes = sqlite_backend._apply_group(conn, [(b, 30.0) for b in batches])
            blocker.execute("ROLLBACK")
    assert all(isinstance(o, sqlite3.OperationalError) for o in outcomes)
    assert row_counts(db_path)["batches"] == 0


def test_concurrent_batches_through_the_store(db_path: Path, config: ServerConfig) -> None:
    """Many batches in flight at once (as under load, where they are grouped) are each applied once."""
    batches: list[Batch] = [
        validate_batch(make_batch([signal(MUSIC, 4), signal(ELECTRONICS, 2)]), config) for _ in range(200)
    ]
    conflict = validate_batch(make_batch([signal(ELECTRONICS, 1)], batch_id=batches[0].batch_id), config)

    async def scenario() -> list[object]:
        store = await sqlite_backend.SQLiteStore.open(str(db_path), 30)
        try:
            calls = [store.apply_batch(b) for b in batches] + [store.apply_batch(conflict)]
            calls += [store.apply_batch(b) for b in batches[:50]]  # resends
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await store.close()

    outcomes = asyncio.run(scenario())
    assert outcomes[:200] == [ApplyResult(duplicate=False, applied_signals=2)] * 200
    assert isinstance(outcomes[200], BatchConflictError)
    assert outcomes[201:] == [ApplyResult(duplicate=True, applied_signals=0)] * 50
    assert not any(isinstance(o, StoreUnavailableError) for o in outcomes)
    counts = row_counts(db_path)
    assert counts["batches"] == 200
    with closing(sqlite3.connect(db_path)) as conn:
        (batches_counted,) = conn.execute(
            "SELECT batches FROM profiles WHERE profile_id = ?", (PROFILE,)
        ).fetchone()
    assert batches_counted == 200
