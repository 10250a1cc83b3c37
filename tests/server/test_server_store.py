"""The store interface against every backend, schema migrations, backend specifics and URL selection."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from aggregator_testkit import (
    ELECTRONICS,
    MOVIES,
    MUSIC,
    OTHER,
    PROFILE,
    TODAY_DAY,
    dump_tables,
    make_batch,
    row_counts,
    signal,
)

from sotto.server import ServerConfig, open_store
from sotto.server.auth import admin_credential, device_credential, hash_token
from sotto.server.decay import increment
from sotto.server.store import (
    BatchConflictError,
    Credential,
    HalfLifeMismatchError,
    PurgeResult,
    Role,
    StoreConfigError,
    sqlite_path,
)
from sotto.server.store import postgres as postgres_backend
from sotto.server.store import sqlite as sqlite_backend
from sotto.server.validation import validate_batch


def test_round_trip(store_url: str, config: ServerConfig) -> None:
    one = validate_batch(make_batch([signal(MUSIC, 4), signal(MUSIC, 2, 1), signal(ELECTRONICS, 1)]), config)
    two = validate_batch(make_batch([signal(ELECTRONICS, 3, 2)]), config)
    other = validate_batch(make_batch([signal(MUSIC, 1)], profile_id=OTHER), config)

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
                    ELECTRONICS: increment(1, day, 30) + increment(3, day - 2, 30),
                }
            )
            assert profile.last_days == {MUSIC: day, ELECTRONICS: day}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_data_and_batch_ids_survive_a_restart(db_url: str, config: ServerConfig) -> None:
    batch = validate_batch(make_batch(), config)

    async def first_run() -> None:
        store = await open_store(db_url, 30)
        await store.apply_batch(batch)
        await store.close()

    async def second_run() -> None:
        store = await open_store(db_url, 30)
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


def test_bare_path_is_sqlite(db_path: Path, config: ServerConfig) -> None:
    async def scenario() -> None:
        store = await open_store(str(db_path), 30)
        await store.apply_batch(validate_batch(make_batch(), config))
        await store.close()

    asyncio.run(scenario())
    assert row_counts(db_path)["batches"] == 1


def test_new_database_records_schema_version_and_half_life(single_db_url: str) -> None:
    async def create() -> None:
        await (await open_store(single_db_url, 21.5)).close()

    asyncio.run(create())
    tables = dump_tables(single_db_url)
    assert tables["schema_version"] == [(4,)]
    assert tables["meta"] == [("half_life_days", "21.5")]
    assert set(tables) == {
        "schema_version",
        "meta",
        "batches",
        "profiles",
        "scores",
        "credentials",
        "signal_counts",
        "minors",
    }


def test_new_sqlite_database_uses_wal(db_path: Path) -> None:
    async def create() -> None:
        await (await open_store(f"sqlite:///{db_path}", 30)).close()

    asyncio.run(create())
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_other_half_life_is_refused(db_url: str) -> None:
    async def scenario() -> None:
        await (await open_store(db_url, 30)).close()
        with pytest.raises(
            HalfLifeMismatchError, match="created with a half-life of 30 days but 14 is configured"
        ):
            await open_store(db_url, 14)
        await (await open_store(db_url, 30.0)).close()  # the same value still opens

    asyncio.run(scenario())


def test_half_life_is_recorded_by_the_first_open_that_names_one(db_url: str) -> None:
    async def scenario() -> None:
        admin_tool = await open_store(db_url, None)  # `sotto-server token issue` before the first serve
        with pytest.raises(StoreConfigError, match="no half-life recorded yet"):
            _ = admin_tool.half_life_days
        await admin_tool.close()
        await (await open_store(db_url, 14)).close()
        later = await open_store(db_url, None)
        assert later.half_life_days == 14
        await later.close()

    asyncio.run(scenario())


def _create_version_1(db_url: str) -> None:
    """A database as the first release left it: schema version 1 with one profile."""
    rows = [
        ("INSERT INTO schema_version (version) VALUES (1)", ()),
        ("INSERT INTO meta (key, value) VALUES ('half_life_days', '30.0')", ()),
        (
            "INSERT INTO batches (batch_id, profile_id, digest, base_day) VALUES ({p}, {p}, {p}, {p})",
            (bytes(16), PROFILE, bytes(32), TODAY_DAY - 3),
        ),
        (
            "INSERT INTO batches (batch_id, profile_id, digest, base_day) VALUES ({p}, {p}, {p}, {p})",
            (b"\x01" * 16, PROFILE, bytes(32), TODAY_DAY - 1),
        ),
        ("INSERT INTO profiles (profile_id, batches) VALUES ({p}, 2)", (PROFILE,)),
        ("INSERT INTO scores (profile_id, category_id, s) VALUES ({p}, {p}, 1.5)", (PROFILE, MUSIC)),
    ]
    if db_url.startswith("postgresql://"):
        with psycopg.connect(db_url) as conn:
            for statement in postgres_backend.MIGRATIONS[0]:
                conn.execute(statement)
            for sql, params in rows:
                conn.execute(sql.format(p="%s"), params)
        return
    with closing(sqlite3.connect(sqlite_path(db_url))) as conn, conn:
        for statement in sqlite_backend.MIGRATIONS[0]:
            conn.execute(statement)
        for sql, params in rows:
            conn.execute(sql.format(p="?"), params)


def test_version_1_database_is_migrated_on_open(single_db_url: str, config: ServerConfig) -> None:
    _create_version_1(single_db_url)

    async def scenario() -> None:
        store = await open_store(single_db_url, 30)
        try:
            profile = await store.get_profile(PROFILE)
            assert profile is not None
            assert (profile.batches, profile.sums) == (2, {MUSIC: 1.5})
            # v1 kept no day per entry; the newest batch of the profile is the bound the migration uses.
            assert profile.last_days == {MUSIC: TODAY_DAY - 1}
            await store.add_credential(device_credential("sotto_token", PROFILE))
            await store.apply_batch(validate_batch(make_batch(), config))
            # Version 4 keys batch ids per profile: the ids kept from version 1 still refuse a reuse by
            # their own profile, and no longer by another one.
            with pytest.raises(BatchConflictError):
                await store.apply_batch(validate_batch(make_batch(batch_id=bytes(16)), config))
            other = validate_batch(make_batch(profile_id=OTHER, batch_id=bytes(16)), config)
            assert not (await store.apply_batch(other)).duplicate
        finally:
            await store.close()

    asyncio.run(scenario())
    tables = dump_tables(single_db_url)
    assert tables["schema_version"] == [(4,)]
    assert sorted(row[1:] for row in tables["profiles"]) == [(1, TODAY_DAY), (3, TODAY_DAY)]
    assert len(tables["credentials"]) == 1
    assert len(tables["batches"]) == 4


def test_newer_schema_is_refused(single_db_url: str) -> None:
    asyncio.run(_open_and_close(single_db_url))
    if single_db_url.startswith("postgresql://"):
        with psycopg.connect(single_db_url) as conn:
            conn.execute("UPDATE schema_version SET version = 99")
    else:
        with closing(sqlite3.connect(sqlite_path(single_db_url))) as conn, conn:
            conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreConfigError, match="schema version 99, newer than this server's 4"):
        asyncio.run(_open_and_close(single_db_url))


async def _open_and_close(url: str) -> None:
    await (await open_store(url, 30)).close()


@pytest.mark.parametrize("shared", ["postgres_url", "plproxy_url"], ids=["postgresql", "plproxy"])
def test_processes_starting_together_migrate_once(shared: str, request: pytest.FixtureRequest) -> None:
    url = str(request.getfixturevalue(shared))

    async def scenario() -> None:
        stores = await asyncio.gather(*(open_store(url, 30) for _ in range(4)))
        for store in stores:
            await store.close()

    asyncio.run(scenario())
    # One row per database: the proxy's own schema has one version, every partition the store's.
    versions = dump_tables(url)["schema_version"]
    assert versions == ([(1,)] + [(4,)] * 4 if shared == "plproxy_url" else [(4,)])


def test_foreign_sqlite_database_is_refused(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(StoreConfigError, match="is not a Sotto database"):
        asyncio.run(open_store(str(db_path), 30))


def test_file_that_is_not_sqlite_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"definitely not a database" * 100)
    with pytest.raises(StoreConfigError, match="cannot use .* as a Sotto SQLite database"):
        asyncio.run(open_store(str(db_path), 30))


def test_unreachable_postgresql_is_refused_without_the_password() -> None:
    with pytest.raises(StoreConfigError) as info:
        asyncio.run(open_store("postgresql://sotto:secret@127.0.0.1:1/sotto", 30))
    assert "cannot use PostgreSQL database sotto@127.0.0.1:1/sotto" in str(info.value)
    assert "secret" not in str(info.value)


def test_postgresql_with_a_wrong_password_is_refused(postgres_server: str) -> None:
    parts = urlsplit(postgres_server)
    netloc = f"{parts.username}:not-the-password-42@{parts.hostname}:{parts.port or 5432}"
    with pytest.raises(StoreConfigError, match="password authentication failed") as info:
        asyncio.run(open_store(urlunsplit(parts._replace(netloc=netloc)), 30))
    assert "not-the-password-42" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
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


def test_delete_profile_erases_its_rows_and_nothing_else(store_url: str, config: ServerConfig) -> None:
    async def scenario() -> None:
        store = await open_store(store_url, 30)
        try:
            for profile in (PROFILE, OTHER):
                await store.apply_batch(validate_batch(make_batch(profile_id=profile), config))
                await store.add_credential(device_credential(f"token-{profile}", profile))
            kept = await store.get_profile(OTHER)

            assert await store.delete_profile(PROFILE) is True

            assert await store.get_profile(PROFILE) is None
            assert await store.find_credential(hash_token(f"token-{PROFILE}")) is None
            assert await store.get_profile(OTHER) == kept
            assert await store.find_credential(hash_token(f"token-{OTHER}")) is not None
            assert await store.delete_profile(PROFILE) is False  # nothing left to erase
        finally:
            await store.close()

    asyncio.run(scenario())


def test_purge_removes_what_was_not_reinforced(store_url: str, config: ServerConfig) -> None:
    old = validate_batch(make_batch([signal(MUSIC), signal(MOVIES)], base_day=TODAY_DAY - 100), config)
    reinforced = validate_batch(make_batch([signal(MUSIC)], base_day=TODAY_DAY - 10), config)
    forgotten = validate_batch(
        make_batch([signal(MOVIES)], profile_id=OTHER, base_day=TODAY_DAY - 50), config
    )

    async def scenario() -> None:
        store = await open_store(store_url, 30)
        try:
            for batch in (old, reinforced, forgotten):
                await store.apply_batch(batch)

            result = await store.purge(TODAY_DAY - 20)

            # Signal counts: (MUSIC, -100), (MOVIES, -100), (MOVIES, -50) are past; (MUSIC, -10) stays.
            assert result == PurgeResult(entries=2, profiles=1, batches=2, signal_counts=3)
            profile = await store.get_profile(PROFILE)
            assert profile is not None
            assert list(profile.sums) == [MUSIC]  # reinforced 10 days ago; MOVIES last seen 100 days ago
            assert profile.sums[MUSIC] == pytest.approx(
                increment(4, TODAY_DAY - 100, 30) + increment(4, TODAY_DAY - 10, 30)
            )
            assert await store.get_profile(OTHER) is None
            assert (await store.apply_batch(reinforced)).duplicate  # its batch id is kept
            assert await store.purge(TODAY_DAY - 20) == PurgeResult(entries=0, profiles=0, batches=0)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_audience_size_counts_distinct_profiles_above_the_threshold(
    store_url: str, config: ServerConfig
) -> None:
    async def scenario() -> None:
        store = await open_store(store_url, 30)
        try:
            for n, level in enumerate((1, 2, 3, 4, 4)):
                batch = make_batch(
                    [signal(MUSIC, level), signal(MUSIC, level)], profile_id=f"profile_{n:04d}"
                )
                await store.apply_batch(validate_batch(batch, config))
            stale = make_batch([signal(MUSIC, 4)], profile_id="profile_0009", base_day=TODAY_DAY - 90)
            await store.apply_batch(validate_batch(stale, config))
            today_sum = increment(4, TODAY_DAY, 30)  # what a weight-1.0 signal today adds

            assert await store.audience_size(MUSIC, 0.0, TODAY_DAY - 100) == 6
            assert await store.audience_size(MUSIC, 0.0, TODAY_DAY - 30) == 5  # the stale one is out
            assert await store.audience_size(MUSIC, 1.5 * today_sum, TODAY_DAY - 30) == 3  # 2 x 0.75 and up
            assert await store.audience_size(MUSIC, 2.0 * today_sum, TODAY_DAY - 30) == 2
            assert await store.audience_size(ELECTRONICS, 0.0, TODAY_DAY - 30) == 0
        finally:
            await store.close()

    asyncio.run(scenario())


def test_credentials_are_found_by_hash_and_revoked(store_url: str) -> None:
    device = device_credential("device-token", PROFILE)
    admin = admin_credential("admin-token")

    async def scenario() -> None:
        store = await open_store(store_url, 30)
        try:
            await store.add_credential(device)
            await store.add_credential(device_credential("second-device", PROFILE))
            await store.add_credential(admin)
            assert (
                await store.count_credentials(Role.DEVICE),
                await store.count_credentials(Role.ADMIN),
            ) == (2, 1)
            assert await store.find_credential(hash_token("device-token")) == Credential(
                hash_token("device-token"), Role.DEVICE, PROFILE
            )
            assert await store.find_credential(hash_token("admin-token")) == admin
            assert await store.find_credential(hash_token("unknown")) is None

            assert await store.revoke_credentials(PROFILE) == 2
            assert await store.find_credential(device.token_sha256) is None
            assert await store.find_credential(admin.token_sha256) == admin
            assert await store.revoke_credentials(None) == 1
            assert await store.find_credential(admin.token_sha256) is None
            assert (
                await store.count_credentials(Role.DEVICE),
                await store.count_credentials(Role.ADMIN),
            ) == (0, 0)
        finally:
            await store.close()

    asyncio.run(scenario())
    if store_url != "sqlite:///:memory:":
        assert row_counts(store_url)["credentials"] == 0


@pytest.mark.parametrize(
    ("role", "profile_id"), [(Role.DEVICE, None), (Role.ADMIN, PROFILE)], ids=["device-without", "admin-with"]
)
def test_credential_role_and_profile_must_agree(role: Role, profile_id: str | None) -> None:
    with pytest.raises(ValueError, match="a device credential needs a profile id"):
        Credential(hash_token("x"), role, profile_id)


def test_two_stores_on_one_database_apply_each_batch_once(db_url: str, config: ServerConfig) -> None:
    """What two aggregator processes do: the same batches through two stores (two connection pools, or
    two SQLite writers) at once."""
    batches = [validate_batch(make_batch([signal(MUSIC, 1 + n % 4)]), config) for n in range(30)]

    async def scenario() -> list[bool]:
        first, second = await open_store(db_url, 30), await open_store(db_url, 30)
        try:
            results = await asyncio.gather(
                *(store.apply_batch(b) for b in batches for store in (first, second))
            )
            profile = await first.get_profile(PROFILE)
            assert profile is not None
            assert profile.batches == len(batches)
            assert profile.sums[MUSIC] == pytest.approx(
                sum(increment(b.signals[0].weight_level, TODAY_DAY, 30) for b in batches)
            )
            return [r.duplicate for r in results]
        finally:
            await first.close()
            await second.close()

    duplicates = asyncio.run(scenario())
    assert sorted(duplicates) == [False] * len(batches) + [True] * len(batches)


def test_postgres_scheme_is_accepted_like_postgresql(postgres_url: str, config: ServerConfig) -> None:
    """libpq takes ``postgres://`` as well as ``postgresql://``; so does the store."""
    url = "postgres://" + postgres_url.removeprefix("postgresql://")
    assert url != postgres_url

    async def scenario() -> None:
        store = await open_store(url, 30)
        try:
            await store.apply_batch(validate_batch(make_batch(), config))
        finally:
            await store.close()

    asyncio.run(scenario())
    assert row_counts(postgres_url)["batches"] == 1
