"""The wheel as a firmware or backend team consumes it: built with ``python -m build``, installed with the
``server`` extra into a fresh virtual environment, and run from a folder outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.paths import REPO, SPEECH

JFK = SPEECH / "asr_whisper_jfk" / "jfk.wav"


def run(*args: str | os.PathLike[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SOTTO_MODELS_DIR", "VIRTUAL_ENV")}
    return subprocess.run(
        [os.fspath(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = run(sys.executable, "-m", "build", "--wheel", "--outdir", out, REPO, cwd=out)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("sotto-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment (no system packages, no checkout on its path) with the wheel."""
    folder = tmp_path_factory.mktemp("venv")
    assert run(sys.executable, "-m", "venv", folder / "env", cwd=folder).returncode == 0
    installed = run(folder / "env" / "bin" / "pip", "install", "--quiet", f"{wheel}[server]", cwd=folder)
    assert installed.returncode == 0, installed.stderr[-3000:]
    yield folder / "env" / "bin"


def test_the_wheel_holds_only_the_project_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/", 1)[0] for n in names} == {"sotto", f"{wheel.name.split('-py3')[0]}.dist-info"}
    assert "sotto/models/classifier.onnx" in names and "sotto/models/region_policy.tsv" in names
    assert not [n for n in names if n.endswith("reference_outputs.npz")]  # build-only


def test_the_installed_device_analyses_text_and_audio(venv: Path, tmp_path: Path) -> None:
    text = run(
        venv / "sotto-edge",
        "analyze",
        "--text",
        "where can i buy a new laptop",
        "--json",
        cwd=tmp_path,
    )
    assert text.returncode == 0, text.stderr
    (line,) = text.stdout.splitlines()
    assert json.loads(line)["signals"], line

    audio = run(venv / "sotto-edge", "analyze", "--audio", JFK, "--json", cwd=tmp_path)
    assert audio.returncode == 0, audio.stderr
    assert "ask not what your country" in json.loads(audio.stdout)["transcript"].lower()


_INGEST = """
import sys
from sotto.edge import Device

target, token = sys.argv[1], sys.argv[2]
with Device("wheel-device-0001", "US", target=target, token=token, outbox="outbox.db") as device:
    assert device.hear_text("book me a flight to paris for next week").signals
    assert device.flush(), "not delivered"
    print(len(device.ledger()))
"""


def test_the_installed_aggregator_serves_and_ingests_a_batch(venv: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'aggregator.db'}"
    issued = run(venv / "sotto-server", "token", "issue", "--db", url, "wheel-device-0001", cwd=tmp_path)
    assert issued.returncode == 0, issued.stderr
    token = json.loads(issued.stdout)["wheel-device-0001"]
    server = subprocess.Popen(
        [venv / "sotto-server", "serve", "--db", url, "--listen", "127.0.0.1:0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on "), server.stderr.read() if server.stderr else line
        sent = run(venv / "python", "-c", _INGEST, line.split()[-1], token, cwd=tmp_path, timeout=300)
        assert sent.returncode == 0, sent.stderr
        assert int(sent.stdout) >= 1  # the aggregator acknowledged the batch
    finally:
        server.terminate()
        server.wait(timeout=20)
