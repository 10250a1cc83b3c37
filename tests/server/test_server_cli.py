"""``sotto-server``: a real server process end to end (tokens, admin commands, metrics, TLS, SIGTERM), and
refusals of bad flags and unsafe configurations."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal as signals
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from aggregator_testkit import (
    ELECTRONICS,
    MUSIC,
    PROFILE,
    bearer,
    make_batch,
    row_counts,
    signal,
)

from sotto.server import open_store
from sotto.server.cli import main
from sotto.server.config import utc_today
from sotto.v1 import signals_pb2_grpc
from sotto.wire import day_number
from tools.harness import ThrowawayCA, read_line, start_server, stop_server


def _sotto_server(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sotto.server", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def _issue(db: str, *args: str, cwd: Path) -> str:
    issued = _sotto_server("token", "issue", "--db", db, *args, cwd=cwd)
    assert issued.returncode == 0, issued.stderr
    return issued.stdout


@pytest.mark.e2e
def test_serve_with_tokens_admin_commands_metrics_and_clean_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "data" / "sotto.db"
    db.parent.mkdir()
    url = f"sqlite:///{db}"
    admin_file = tmp_path / "admin.token"
    admin_file.write_text(_issue(url, "--admin", cwd=tmp_path))
    device = json.loads(_issue(url, PROFILE, cwd=tmp_path))[PROFILE]
    admin = ("--admin-token-file", str(admin_file))

    server, target = start_server(url, "--metrics-listen", "127.0.0.1:0", cwd=tmp_path)
    try:
        metrics = re.fullmatch(r"metrics on (http://127\.0\.0\.1:\d+/metrics)\n", read_line(server, 30))
        assert metrics, "expected 'metrics on http://127.0.0.1:PORT/metrics' on stdout"

        batch = make_batch([signal(MUSIC, 4), signal(ELECTRONICS, 2)], base_day=day_number(utc_today()))
        with grpc.insecure_channel(target) as channel:
            stub = signals_pb2_grpc.SignalAggregatorStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Ingest(batch, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            reply = stub.Ingest(batch, timeout=10, metadata=bearer(device))
        assert (reply.duplicate, reply.applied_signals) == (False, 2)

        shown = _sotto_server("profile", "--target", target, *admin, PROFILE, cwd=tmp_path)
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

        top = _sotto_server("profile", "--target", target, *admin, "--top-k", "1", PROFILE, cwd=tmp_path)
        assert [s["id"] for s in json.loads(top.stdout)["scores"]] == [MUSIC]

        audience = _sotto_server("audience", "--target", target, *admin, MUSIC, cwd=tmp_path)
        assert audience.returncode == 0, audience.stderr
        assert json.loads(audience.stdout) == {
            "category_id": MUSIC,
            "min_score": 0.0,
            "as_of_day": day_number(utc_today()),
            "profiles": None,
            "too_small": True,
            "min_audience": 50,
            "estimated_signals": None,
            "estimate_interval": None,
            "confidence": None,
            "noised_signals": None,
        }

        with urllib.request.urlopen(metrics.group(1), timeout=10) as scraped:
            assert 'sotto_batches_total{outcome="applied"} 1.0' in scraped.read().decode()

        missing = _sotto_server("profile", "--target", target, *admin, "nobody_here", cwd=tmp_path)
        assert (missing.returncode, missing.stdout) == (3, "")
        assert "no such profile" in missing.stderr

        malformed = _sotto_server("profile", "--target", target, *admin, "bad id", cwd=tmp_path)
        assert malformed.returncode == 2
        assert "profile_id must be" in malformed.stderr

        device_file = tmp_path / "device.token"
        device_file.write_text(device)
        as_device = _sotto_server(
            "audience", "--target", target, "--admin-token-file", str(device_file), MUSIC, cwd=tmp_path
        )
        assert as_device.returncode == 1
        assert "AudienceSize on 127.0.0.1" in as_device.stderr and "PERMISSION_DENIED" in as_device.stderr

        deleted = _sotto_server("delete", "--target", target, *admin, PROFILE, cwd=tmp_path)
        assert (deleted.returncode, json.loads(deleted.stdout)) == (
            0,
            {"profile_id": PROFILE, "deleted": True},
        )
        gone = _sotto_server("profile", "--target", target, *admin, PROFILE, cwd=tmp_path)
        assert gone.returncode == 3

        started = time.monotonic()
        server.send_signal(signals.SIGTERM)
        assert server.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        log = stop_server(server)
    assert "event=shutdown" in log
    assert "event=profile_deleted" in log
    assert PROFILE not in log and device not in log
    assert not (tmp_path / "sotto.db").exists()  # the default --db was not used
    assert row_counts(db) == {"batches": 0, "profiles": 0, "scores": 0, "credentials": 1}


@pytest.mark.e2e
def test_serve_over_tls(tmp_path: Path) -> None:
    files = ThrowawayCA().write(tmp_path)
    url = f"sqlite:///{tmp_path / 'sotto.db'}"
    admin_file = tmp_path / "admin.token"
    admin_file.write_text(_issue(url, "--admin", cwd=tmp_path))
    server, target = start_server(
        url, "--tls-cert", str(files["server"]), "--tls-key", str(files["server_key"]), cwd=tmp_path
    )
    try:
        admin = ("--target", target, "--admin-token-file", str(admin_file))
        over_tls = _sotto_server("delete", *admin, "--tls-ca", str(files["ca"]), PROFILE, cwd=tmp_path)
        assert (over_tls.returncode, json.loads(over_tls.stdout)["deleted"]) == (0, False)
        plaintext = _sotto_server("delete", *admin, "--timeout", "3", PROFILE, cwd=tmp_path)
        assert plaintext.returncode == 1
        assert "UNAVAILABLE" in plaintext.stderr
    finally:
        stop_server(server)


def test_token_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'sotto.db'}"
    assert main(["token", "issue", "--db", url, PROFILE, "profile_0002"]) == 0
    tokens = json.loads(capsys.readouterr().out)
    assert set(tokens) == {PROFILE, "profile_0002"}
    assert all(re.fullmatch(r"sotto_[A-Za-z0-9_-]{43}", token) for token in tokens.values())
    assert main(["token", "issue", "--db", url, "--admin"]) == 0
    assert re.fullmatch(r"sotto_[A-Za-z0-9_-]{43}\n", capsys.readouterr().out)
    stored = {row[0] for row in _rows(tmp_path / "sotto.db", "SELECT token_sha256 FROM credentials")}
    assert len(stored) == 3 and not any(token.encode() in stored for token in tokens.values())

    assert main(["token", "revoke", "--db", url, PROFILE]) == 0
    assert json.loads(capsys.readouterr().out) == {"revoked": 1}
    assert main(["token", "revoke", "--db", url, "--admin"]) == 0
    assert json.loads(capsys.readouterr().out) == {"revoked": 1}

    for argv, message in (
        (["token", "issue", "--db", url], "give PROFILE_ID arguments (device tokens) or --admin"),
        (["token", "issue", "--db", url, "--admin", PROFILE], "not both"),
        (["token", "issue", "--db", url, "bad id"], "profile id 'bad id' must be 8 to 64 characters"),
        (["token", "revoke", "--db", "mysql://db/x", PROFILE], "unknown store URL scheme 'mysql'"),
    ):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert len(_rows(tmp_path / "sotto.db", "SELECT * FROM credentials")) == 1


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["serve", "--listen", "localhost"], id="listen-no-port"),
        pytest.param(["serve", "--listen", "127.0.0.1:99999"], id="listen-port-range"),
        pytest.param(["serve", "--half-life-days", "0"], id="half-life-zero"),
        pytest.param(["serve", "--half-life-days", "soon"], id="half-life-text"),
        pytest.param(["serve", "--max-signals-per-batch", "0"], id="max-signals"),
        pytest.param(["serve", "--max-message-bytes", "10"], id="message-bytes"),
        pytest.param(["serve", "--rate-per-second", "0"], id="rate"),
        pytest.param(["serve", "--rate-burst", "0"], id="burst"),
        pytest.param(["serve", "--max-concurrent-rpcs", "0"], id="concurrency"),
        pytest.param(["serve", "--request-timeout-seconds", "0"], id="request-timeout"),
        pytest.param(["serve", "--retention-days", "0"], id="retention"),
        pytest.param(["serve", "--min-audience", "1"], id="min-audience"),
        pytest.param(["serve", "--metrics-listen", "9464"], id="metrics-no-host"),
        pytest.param(["serve", "--log-level", "LOUD"], id="log-level"),
        pytest.param(["serve", "--unknown"], id="unknown-flag"),
        pytest.param(["profile"], id="profile-missing-id"),
        pytest.param(["profile", "--top-k", "-1", PROFILE], id="top-k"),
        pytest.param(["profile", "--timeout", "0", PROFILE], id="timeout"),
        pytest.param(["audience"], id="audience-missing-category"),
        pytest.param(["audience", "--min-score", "-1", MUSIC], id="min-score"),
        pytest.param(["delete"], id="delete-missing-id"),
        pytest.param(["token"], id="token-missing-action"),
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
        (
            ["--db", "postgresql://sotto:secret@127.0.0.1:1/sotto"],
            "cannot use PostgreSQL database sotto@127.0.0.1:1/sotto",
        ),
        (["--db", "sqlite:///missing/sotto.db"], "folder missing does not exist"),
        (["--db", "sqlite://host/sotto.db"], "bad SQLite URL"),
        (["--models", "no-such-models"], "no Sotto models folder at no-such-models"),
        (["--tls-cert", "server.pem"], "give both --tls-cert and --tls-key, or neither"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
        (
            ["--tls-cert", "server.pem", "--tls-key", "server.key"],
            "cannot read TLS certificate chain server.pem",
        ),
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


def test_plaintext_off_loopback_needs_insecure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--listen", "0.0.0.0:0", "--db", "sqlite:///:memory:"]) == 2
    assert "refusing to serve plaintext on 0.0.0.0:0" in capsys.readouterr().err


def test_not_pem_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "server.pem").write_text("not a certificate")
    (tmp_path / "server.key").write_text("not a key")
    argv = ["serve", "--listen", "127.0.0.1:0", "--tls-cert", "server.pem", "--tls-key", "server.key"]
    assert main(argv) == 2
    assert (
        "server.pem is not PEM; expected the TLS certificate chain in PEM format" in capsys.readouterr().err
    )


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
    monkeypatch.delenv("SOTTO_HALF_LIFE_DAYS")
    monkeypatch.setenv("SOTTO_DB", "sqlite:///:memory:")
    monkeypatch.setenv("SOTTO_LISTEN", "0.0.0.0:0")
    monkeypatch.setenv("SOTTO_TLS_CERT", "server.pem")
    assert main(["serve"]) == 2
    assert "give both --tls-cert and --tls-key" in capsys.readouterr().err


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
        "[env SOTTO_RETENTION_DAYS] (default: 180)",
        "[env SOTTO_MIN_AUDIENCE] (default: 50)",
        "[env SOTTO_RATE_PER_SECOND] (default: 1)",
        "[env SOTTO_TLS_CERT]",
        "[env SOTTO_INSECURE=1]",
        "[env SOTTO_METRICS_LISTEN]",
        "[env SOTTO_MODELS_DIR]",
    ):
        assert expected in text
    with pytest.raises(SystemExit):
        main(["audience", "--help"])
    assert "[env SOTTO_ADMIN_TOKEN_FILE]" in " ".join(capsys.readouterr().out.split())


def test_admin_command_against_no_server_fails_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "admin.token"
    token.write_text("sotto_whatever\n")
    argv = ["profile", "--target", "127.0.0.1:1", "--timeout", "2", "--admin-token-file", str(token), PROFILE]
    assert main(argv) == 1
    assert "GetProfile on 127.0.0.1:1 failed: UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (None, "an admin token is needed: --admin-token-file FILE"),
        ("", "must hold one token on one line"),
        ("two tokens", "must hold one token on one line"),
    ],
    ids=["no-file", "empty", "two-words"],
)
def test_admin_commands_need_a_token(
    setup: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["delete", "--target", "127.0.0.1:1", PROFILE]
    if setup is not None:
        (tmp_path / "admin.token").write_text(setup)
        argv += ["--admin-token-file", str(tmp_path / "admin.token")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("sotto-server")
    assert script.exists()
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60, env=os.environ)
    assert result.returncode == 0
    for command in ("serve", "profile", "delete", "audience", "token"):
        assert command in result.stdout


def test_serve_warns_loudly_when_the_store_holds_no_device_token(tmp_path: Path) -> None:
    """A typo in a SQLite path serves a new, empty database: every device would be refused in silence."""
    issued_in = f"sqlite:///{tmp_path / 'sotto.db'}"
    device = json.loads(_issue(issued_in, PROFILE, cwd=tmp_path))[PROFILE]
    assert device.startswith("sotto_")
    warning = "sotto-server: warning: the store holds no device token"

    typo, _ = start_server(f"sqlite:///{tmp_path / 'sotoo.db'}", cwd=tmp_path)
    err = stop_server(typo)
    assert typo.returncode == 0, err
    assert warning in err  # on stderr as a plain line, whatever the log level
    assert "level=WARNING logger=sotto.server.cli event=no_device_tokens" in err  # and in the log

    right, _ = start_server(issued_in, cwd=tmp_path)
    err = stop_server(right)
    assert right.returncode == 0, err
    assert "no device token" not in err
