"""Fixtures of the aggregator tests (helpers live in aggregator_testkit, a uniquely named module)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aggregator_testkit import TODAY, Clock

from edge.policy import Policy
from server import ServerConfig


@pytest.fixture(scope="session")
def policy() -> Policy:
    return Policy.load()


@pytest.fixture
def clock() -> Clock:
    return Clock(TODAY)


@pytest.fixture
def config(policy: Policy, clock: Clock) -> ServerConfig:
    return ServerConfig(policy=policy, clock=clock)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sotto.db"


@pytest.fixture(params=["sqlite-file", "sqlite-memory"])
def store_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """Every backend the store tests run against."""
    return f"sqlite:///{db_path}" if request.param == "sqlite-file" else "sqlite:///:memory:"
