"""Fixtures of the aggregator tests (helpers live in aggregator_testkit, a uniquely named module).

Store tests run against every backend. The PostgreSQL ones need ``$SOTTO_TEST_POSTGRES_URL`` (tools/test.sh
sets it); without it they fail rather than skip, because a skipped backend is an untested one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aggregator_testkit import (
    TODAY,
    Clock,
    plproxy_cluster,
    plproxy_servers,
    postgres_base_url,
    postgres_schema,
)

from sotto.policy import Policy
from sotto.server import ServerConfig


@pytest.fixture(scope="session")
def policy() -> Policy:
    return Policy.load()


@pytest.fixture
def clock() -> Clock:
    return Clock(TODAY)


@pytest.fixture
def config(policy: Policy, clock: Clock) -> ServerConfig:
    """Authentication off (these tests are about everything else); see ``auth_config``."""
    return ServerConfig(policy=policy, clock=clock)


@pytest.fixture
def auth_config(policy: Policy, clock: Clock) -> ServerConfig:
    """What ``sotto-server serve`` runs: every call needs a credential."""
    return ServerConfig(policy=policy, clock=clock, require_auth=True)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sotto.db"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    try:
        return postgres_base_url()
    except RuntimeError as exc:
        missing = str(exc)
    pytest.fail(missing, pytrace=False)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL of an empty schema of its own on the test PostgreSQL server."""
    with postgres_schema(postgres_server) as url:
        yield url


@pytest.fixture(scope="session")
def plproxy_server() -> tuple[str, list[str]]:
    try:
        return plproxy_servers()
    except RuntimeError as exc:
        missing = str(exc)
    pytest.fail(missing, pytrace=False)


@pytest.fixture
def plproxy_url(plproxy_server: tuple[str, list[str]]) -> Iterator[str]:
    """The ``plproxy://`` URL of a sharded store of its own: partitions over both test shard servers."""
    with plproxy_cluster(*plproxy_server) as url:
        yield url


@pytest.fixture(params=["sqlite-file", "sqlite-memory", "postgresql", "plproxy"])
def store_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """Every backend the store tests run against."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    if request.param == "plproxy":
        return str(request.getfixturevalue("plproxy_url"))
    return f"sqlite:///{db_path}" if request.param == "sqlite-file" else "sqlite:///:memory:"


@pytest.fixture(params=["sqlite", "postgresql", "plproxy"])
def db_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """Every backend, as a database that outlives the store (for plain-SQL checks and restarts)."""
    if request.param == "plproxy":
        return str(request.getfixturevalue("plproxy_url"))
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{db_path}"


@pytest.fixture(params=["sqlite", "postgresql"])
def single_db_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """The single-database backends, for tests of their schema as such (the sharded store's partitions
    hold the same schema: ``test_server_sharded.py`` checks that)."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{db_path}"
