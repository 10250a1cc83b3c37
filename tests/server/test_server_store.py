"""The store interface (against every backend), SQLite specifics and URL selection."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from aggregator_testkit import ELECTRONICS, MUSIC, PROFILE, make_batch, signal

from server import ServerConfig, open_store
from server.decay import increment
from server.store import HalfLifeMismatchError, StoreConfigError, sqlite_path
from server.validation import validate_batch


def test_round_trip(store_url: str, config: ServerConfig) -> None:
    one = validate_batch(make_batch([signal(MUSIC, 4), signal(MUSIC, 2, 1), signal(ELECTRONICS, 1)]), config)
    two = validate_batch(make_batch([signal(ELECTRONICS, 3)]), config)
    other = validate_batch(make_batch([signal(MUSIC, 1)], profile_id="profile_0002"), config)

    async def scenario() -> None:
        store = await open_store(store_url, 30)
        try:
            assert await store.get_profile(PROFILE) is None
            for batch in (one, two, other):
                result = await store.apply_batch(batch)
                assert (result.duplicate, result.applied_signals) == (False, len(batch.signals))
            profile = await store.get_profile(PROFILE)
            assert profile is not None
            assert (profile.profile_id, profile.batches) == (PROFILE, 2)
            day = one.base_day
            assert profile.sums == pytest.approx(
                {
                    MUSIC: increment(4, day, 30) + increment(2, day - 1, 30),
                    ELECTRONICS: increment(1, day, 30) + increment(3, day, 30),
                }
            )
        finally:
            await store.close()

    asyncio.run(scenario())


def test_data_and_batch_ids_survive_a_restart(db_path: Path, config: ServerConfig) -> None:
    batch = validate_batch(make_batch(), config)

    async def first_run() -> None:
        store = await open_store(f"sqlite:///{db_path}", 30)
        await store.apply_batch(batch)
        await store.close()

    async def second_run() -> None:
        store = await open_store(str(db_path), 30)  # a bare path is SQLite too
        try:
            profile = await store.get_profile(PROFILE)
            assert profile is not None
            assert profile.batches == 1
            assert set(profile.sums) == {MUSIC, ELECTRONICS}
            assert (await store.apply_batch(batch)).duplicate
        finally:
            await store.close()

    asyncio.run(first_run())
    asyncio.run(second_run())


def test_new_database_uses_wal_and_records_schema_and_half_life(db_path: Path) -> None:
    async def create() -> None:
        await (await open_store(f"sqlite:///{db_path}", 21.5)).close()

    asyncio.run(create())
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        assert conn.execute("SELECT value FROM meta WHERE key = 'half_life_days'").fetchone() == ("21.5",)


def test_other_half_life_is_refused(db_path: Path) -> None:
    async def scenario() -> None:
        await (await open_store(f"sqlite:///{db_path}", 30)).close()
        with pytest.raises(
            HalfLifeMismatchError, match="created with a half-life of 30 days but 14 is configured"
        ):
            await open_store(f"sqlite:///{db_path}", 14)
        await (await open_store(f"sqlite:///{db_path}", 30.0)).close()  # the same value still opens

    asyncio.run(scenario())


def test_foreign_sqlite_database_is_refused(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(StoreConfigError, match="is not a Sotto database"):
        asyncio.run(open_store(str(db_path), 30))


def test_file_that_is_not_sqlite_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"definitely not a database" * 100)
    with pytest.raises(StoreConfigError, match="cannot use .* as a Sotto SQLite database"):
        asyncio.run(open_store(str(db_path), 30))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://sotto:secret@db/sotto", "postgresql:// stores are not available in this build yet"),
        (
            "mysql://user:secret@host/db",
            "unknown store URL scheme 'mysql'; expected one of: sqlite, postgresql",
        ),
        ("sqlite://host/sotto.db", "bad SQLite URL"),
        ("sqlite:///sotto.db?mode=ro", "bad SQLite URL"),
        ("sqlite:///", "the database path is empty"),
        ("sqlite:///{tmp}/missing/sotto.db", "folder {tmp}/missing does not exist"),
        ("{tmp}", "is a folder; expected a SQLite database file"),
    ],
)
def test_bad_urls_are_refused_without_creating_anything(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError) as info:
        asyncio.run(open_store(url.format(tmp=tmp_path), 30))
    assert message.format(tmp=tmp_path) in str(info.value)
    assert "secret" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("half_life", [0.0, -1.0, float("nan"), float("inf")])
def test_half_life_must_be_positive_and_finite(half_life: float, db_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="half_life_days must be a positive number"):
        asyncio.run(open_store(f"sqlite:///{db_path}", half_life))
    assert not db_path.exists()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///sotto.db", "sotto.db"),
        ("sqlite:////var/lib/sotto.db", "/var/lib/sotto.db"),
        ("sqlite:///:memory:", ":memory:"),
        ("/var/lib/sotto.db", "/var/lib/sotto.db"),
    ],
)
def test_sqlite_url_forms(url: str, path: str) -> None:
    assert sqlite_path(url) == path


def test_close_is_idempotent(store_url: str) -> None:
    async def scenario() -> None:
        store = await open_store(store_url, 30)
        await store.close()
        await store.close()

    asyncio.run(scenario())
