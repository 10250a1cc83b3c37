"""Fixtures of the edge tests (helpers live in edge_testkit, a uniquely named module).

Models are loaded once per session: the classifier (~0.3 s), the speech gate and faster-whisper
tiny.en (~1.5 s) are shared by every test through one ``EdgeModels``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from edge_testkit import TODAY

from sotto.edge.asr import Transcriber
from sotto.edge.pipeline import EdgeModels, Pipeline
from sotto.edge.vad import SpeechGate
from sotto.policy import Policy
from sotto.server import ServerConfig


@pytest.fixture(scope="session")
def policy() -> Policy:
    return Policy.load()


@pytest.fixture(scope="session")
def edge_models() -> EdgeModels:
    return EdgeModels()


@pytest.fixture(scope="session")
def speech_gate(edge_models: EdgeModels) -> SpeechGate:
    return edge_models.speech_gate


@pytest.fixture(scope="session")
def transcriber(edge_models: EdgeModels) -> Transcriber:
    """The real tiny.en model, loaded once and shared with ``edge_models``."""
    return edge_models.transcriber


@pytest.fixture
def pipeline(edge_models: EdgeModels) -> Pipeline:
    """A fresh device (cheap: the models are shared) in an unrestricted region."""
    return Pipeline(edge_models, region="US")


@pytest.fixture
def server_config(policy: Policy) -> ServerConfig:
    return ServerConfig(policy=policy, clock=lambda: TODAY)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'aggregator.db'}"
