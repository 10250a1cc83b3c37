"""The README's Python examples run as written, against a real aggregator process on localhost:50051."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sotto.edge.audio import load_audio
from tools.harness import ThrowawayCA, issue_tokens, start_server, stop_server
from tools.paths import REPO

PROFILE = "profile-id-1234"  # the id the examples use
LISTEN = "127.0.0.1:50051"  # the examples' target is localhost:50051


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)


def block_with(marker: str) -> str:
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"expected one README python block with {marker!r}, found {len(found)}"
    return found[0]


def run_block(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def enrolled(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A working folder holding device.token for PROFILE, and the aggregator's database URL."""
    url = f"sqlite:///{tmp_path / 'aggregator.db'}"
    (tmp_path / "device.token").write_text(json.loads(issue_tokens(url, PROFILE))[PROFILE] + "\n")
    yield tmp_path, url


def test_every_python_block_is_exercised() -> None:
    """A new example must get a test here: each block is claimed by exactly one marker."""
    markers = ["device.listen(frame)", "TlsOptions.from_files"]
    assert sorted(sum(m in b for m in markers) for b in python_blocks()) == [1] * len(python_blocks())


def test_the_firmware_example_runs_as_written(enrolled: tuple[Path, str]) -> None:
    folder, url = enrolled
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is needed to speak the example's query (tools/bootstrap.sh installs it)")
    wav = folder / "query.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "book me a flight to paris for next week"], check=True)
    audio = load_audio(wav)
    pcm = (np.clip(audio.samples, -1, 1) * 32767).astype("<i2").tobytes()
    pcm += bytes(2 * 16000)  # a second of silence after the query: the speech gate closes the utterance
    (folder / "utterance.raw").write_bytes(pcm)

    proc, _ = start_server(url, listen=LISTEN)
    try:
        done = run_block(block_with("device.listen(frame)"), folder)
    finally:
        stop_server(proc)

    assert done.returncode == 0, done.stderr
    assert "Signal(category_id=" in done.stdout  # the spoken query gave a signal
    with sqlite3.connect(folder / "sotto-data" / "outbox.db") as db:
        state = dict(db.execute("SELECT key, value FROM state"))
    assert "opted_out" in state and "privacy_budget" in state  # one state, in the outbox


def test_the_tls_deletion_example_runs_as_written(enrolled: tuple[Path, str]) -> None:
    folder, url = enrolled
    paths = ThrowawayCA().write(folder)
    proc, _ = start_server(
        url, "--tls-cert", str(paths["server"]), "--tls-key", str(paths["server_key"]), listen=LISTEN
    )
    try:
        done = run_block(block_with("TlsOptions.from_files"), folder)
    finally:
        stop_server(proc)

    assert done.returncode == 0, done.stderr
    with sqlite3.connect(folder / "aggregator.db") as db:  # the deletion revoked the device's token
        assert db.execute("SELECT COUNT(*) FROM credentials WHERE role = 'device'").fetchone() == (0,)
