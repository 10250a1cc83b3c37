"""``sotto-server``: a real server process end to end, and refusals of bad flags."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal as signals
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import ELECTRONICS, MUSIC, PROFILE, make_batch, signal

from server import open_store
from server.cli import main
from server.config import utc_today
from server.decay import day_number
from sotto.v1 import signals_pb2_grpc


def _sotto_server(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s; stderr: {proc.stderr.read() if proc.stderr else ''}"
    return proc.stdout.readline()


@pytest.mark.e2e
def test_serve_ingest_profile_and_clean_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "data" / "sotto.db"
    db.parent.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--listen", "127.0.0.1:0", "--db", f"sqlite:///{db}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", _read_line(server, timeout=30))
        assert match, "expected 'listening on 127.0.0.1:PORT' on stdout"
        target = f"127.0.0.1:{match.group(1)}"

        batch = make_batch([signal(MUSIC, 4), signal(ELECTRONICS, 2)], base_day=day_number(utc_today()))
        with grpc.insecure_channel(target) as channel:
            reply = signals_pb2_grpc.SignalAggregatorStub(channel).Ingest(batch, timeout=10)
        assert (reply.duplicate, reply.applied_signals) == (False, 2)

        shown = _sotto_server("profile", "--target", target, PROFILE, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        document = json.loads(shown.stdout)
        assert document["profile_id"] == PROFILE
        assert document["taxonomy_version"] == "3.1"
        assert document["as_of_day"] == day_number(utc_today())
        assert document["batches"] == 1
        assert [(s["id"], s["name"], s["tier1"]) for s in document["scores"]] == [
            (MUSIC, "Music", "Entertainment"),
            (ELECTRONICS, "Consumer Electronics", "Technology & Computing"),
        ]
        assert [s["score"] for s in document["scores"]] == pytest.approx([1.0, 0.5])

        top = _sotto_server("profile", "--target", target, "--top-k", "1", PROFILE, cwd=tmp_path)
        assert [s["id"] for s in json.loads(top.stdout)["scores"]] == [MUSIC]

        missing = _sotto_server("profile", "--target", target, "nobody_here", cwd=tmp_path)
        assert (missing.returncode, missing.stdout) == (3, "")
        assert "no such profile" in missing.stderr

        malformed = _sotto_server("profile", "--target", target, "bad id", cwd=tmp_path)
        assert malformed.returncode == 2
        assert "profile_id must be" in malformed.stderr

        started = time.monotonic()
        server.send_signal(signals.SIGTERM)
        assert server.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert "event=shutdown" in (server.stderr.read() if server.stderr else "")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()
    assert not (tmp_path / "sotto.db").exists()  # the default --db was not used


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["serve", "--listen", "localhost"], id="listen-no-port"),
        pytest.param(["serve", "--listen", "127.0.0.1:99999"], id="listen-port-range"),
        pytest.param(["serve", "--half-life-days", "0"], id="half-life-zero"),
        pytest.param(["serve", "--half-life-days", "soon"], id="half-life-text"),
        pytest.param(["serve", "--max-signals-per-batch", "0"], id="max-signals"),
        pytest.param(["serve", "--max-message-bytes", "10"], id="message-bytes"),
        pytest.param(["serve", "--log-level", "LOUD"], id="log-level"),
        pytest.param(["serve", "--unknown"], id="unknown-flag"),
        pytest.param(["profile"], id="profile-missing-id"),
        pytest.param(["profile", "--top-k", "-1", PROFILE], id="top-k"),
        pytest.param(["profile", "--timeout", "0", PROFILE], id="timeout"),
        pytest.param([], id="no-command"),
    ],
)
def test_bad_flags_exit_2(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--db", "mysql://root:secret@db/sotto"], "unknown store URL scheme 'mysql'"),
        (["--db", "postgresql://db/sotto"], "postgresql:// stores are not available in this build yet"),
        (["--db", "sqlite:///missing/sotto.db"], "folder missing does not exist"),
        (["--db", "sqlite://host/sotto.db"], "bad SQLite URL"),
        (["--models", "no-such-models"], "no Sotto models folder at no-such-models"),
    ],
)
def test_bad_configuration_exits_2_without_creating_anything(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--listen", "127.0.0.1:0", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "secret" not in err
    assert list(tmp_path.iterdir()) == []


def test_environment_variables_set_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOTTO_DB", "mysql://db/sotto")
    assert main(["serve", "--listen", "127.0.0.1:0"]) == 2
    assert "unknown store URL scheme 'mysql'" in capsys.readouterr().err
    monkeypatch.setenv("SOTTO_HALF_LIFE_DAYS", "-3")
    with pytest.raises(SystemExit) as info:
        main(["serve"])
    assert info.value.code == 2
    assert "--half-life-days: must be greater than 0" in capsys.readouterr().err


def test_half_life_mismatch_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    async def create() -> None:
        await (await open_store("sqlite:///sotto.db", 30)).close()

    asyncio.run(create())
    assert main(["serve", "--listen", "127.0.0.1:0", "--half-life-days", "14"]) == 2
    assert "created with a half-life of 30 days but 14 is configured" in capsys.readouterr().err


def test_help_shows_defaults_and_environment_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "(default: sqlite:///sotto.db)",
        "(default: 127.0.0.1:50051)",
        "[env SOTTO_HALF_LIFE_DAYS] (default: 30)",
        "[env SOTTO_MAX_SIGNALS_PER_BATCH] (default: 100)",
        "[env SOTTO_MODELS_DIR]",
    ):
        assert expected in text


def test_profile_against_no_server_fails_with_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--target", "127.0.0.1:1", "--timeout", "2", PROFILE]) == 1
    assert "GetProfile on 127.0.0.1:1 failed: UNAVAILABLE" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("sotto-server")
    assert script.exists()
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60, env=os.environ)
    assert result.returncode == 0
    assert "serve" in result.stdout
