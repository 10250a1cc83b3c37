"""Every shell command in the README runs as written: each line of each ```bash block is either run here,
in a folder holding the files it names and against a real aggregator where it needs one, or named in
NOT_RUN_HERE with the reason and the test that covers it instead."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sotto.edge.audio import load_audio
from sotto.edge.outbox import Outbox
from tools.harness import ThrowawayCA, start_server, stop_server
from tools.paths import REPO, SPEECH

LISTEN = "127.0.0.1:50051"
JFK = SPEECH / "asr_whisper_jfk" / "jfk.wav"
FLAC = SPEECH / "asr_misc_librispeech" / "2412-153948-0000.flac"
LAMP = SPEECH / "asr_rhasspy_commands" / "turn_on_the_living_room_lamp.wav"

#: Command prefixes this test does not run, and why (each is covered elsewhere).
NOT_RUN_HERE = {
    "bash tools/demo.sh": "the demo has a test of its own",
    "bash tools/test.sh": "it is the test command: CI runs it",
    "pip install": "installs: CI's set-up (tools/bootstrap.sh) and tests/e2e/test_wheel.py",
    "python -m tools.build_models": "a 20-minute model build; its pieces have tests in tests/tools",
    "python -m tools.evaluate": "rewrites the model card from a full evaluation; tests/edge parity tests",
    "python -m tools.fuzz ": "the long fuzz run (10^6 cases); tests/tools/test_fuzz.py runs it bounded",
    "python -m tools.attack_streams": "a timed attack; tests/tools/test_attack_streams.py runs it short",
}


#: A block holding one of these is a production template (hosts, /etc paths): its commands are not run
#: here; the same commands run above with a local store, tests/server covers TLS, PostgreSQL and the
#: metrics, and tests/server/test_server_sharded.py the cluster commands on real PostgreSQL servers.
PRODUCTION_TEMPLATES = ("db.internal", "proxy.internal")


def commands() -> list[str]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped), except
    those of production templates."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S):
        if any(marker in block for marker in PRODUCTION_TEMPLATES):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(shlex.join(words) if ">" not in line and "&&" not in line else line.split(" #")[0])
    return out


def _skipped(command: str) -> bool:
    return any(command.startswith(prefix) for prefix in NOT_RUN_HERE)


class Shell:
    """Runs README lines in one folder, with the installed commands and the checkout's tools."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.env["SOTTO_OUTBOX"] = str(folder / "sotto-data" / "outbox.db")
        self.ran: list[str] = []

    def run(
        self, command: str, timeout: float = 300, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=cwd or self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"README command failed ({done.returncode}): {command}\n{done.stderr}"
        self.ran.append(command)
        return done


def _pcm(path: Path) -> bytes:
    return (np.clip(load_audio(path).samples, -1, 1) * 32767).astype("<i2").tobytes()


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    (tmp_path / "queries.txt").write_text("where can i buy trail running shoes\nset an alarm for seven\n")
    (tmp_path / "my_queries.txt").write_text(
        "book me a flight to paris for next week\ncheap hotels in rome\n"
    )
    shutil.copy(JFK, tmp_path / "clip.wav")
    shutil.copy(FLAC, tmp_path / "other.flac")
    (tmp_path / "recording.raw").write_bytes(_pcm(LAMP))
    (tmp_path / "clips").mkdir()
    for clip in (JFK, LAMP):
        shutil.copy(clip, tmp_path / "clips" / clip.name)
    Outbox(tmp_path / "sotto-data" / "outbox.db").close()  # the device's outbox, as a device leaves it
    yield Shell(tmp_path)


def test_every_readme_command_runs(shell: Shell) -> None:
    lines = commands()
    runnable = [c for c in lines if not _skipped(c)]
    device = [c for c in runnable if c.startswith("sotto-edge")]
    issue = [c for c in runnable if c.startswith("sotto-server token issue")]
    serve = [c for c in runnable if c.startswith("sotto-server serve --db sqlite")]
    emulate = [c for c in runnable if c.startswith("python -m tools.emulate_device")]
    admin = [c for c in runnable if re.match(r"sotto-server (profile|audience|delete|minor)", c)]
    # The operator's alerting rules, checked from the checkout as the README shows.
    rules = [c for c in runnable if re.match(r"(cd deploy/prometheus && )?promtool ", c)]
    unclaimed = set(runnable) - set(device + issue + serve + emulate + admin + rules)
    assert not unclaimed, f"README commands this test does not know how to run: {sorted(unclaimed)}"
    assert device and len(serve) == 1 and emulate and admin and rules

    for command in rules:
        shell.run(command, cwd=REPO)
    for command in device:
        shell.run(command)

    for command in issue:
        shell.run(command)
    url = shlex.split(serve[0])[shlex.split(serve[0]).index("--db") + 1]
    assert shlex.split(serve[0])[-1] == LISTEN
    tls = [c for c in emulate if "--tls-ca" in c]
    proc, _ = start_server(url, listen=LISTEN, cwd=shell.folder)
    try:
        for command in emulate:
            if command not in tls:
                shell.run(command)
    finally:
        stop_server(proc)

    paths = ThrowawayCA().write(shell.folder)
    tls_options = ("--tls-cert", str(paths["server"]), "--tls-key", str(paths["server_key"]))
    proc, _ = start_server(url, *tls_options, listen=LISTEN, cwd=shell.folder)
    try:
        for command in tls:
            shell.run(command)
    finally:
        stop_server(proc)

    proc, _ = start_server(url, listen=LISTEN, cwd=shell.folder)
    try:
        for command in admin:  # last: they delete a profile (and its token) and mark a minor
            done = shell.run(command)
            if " profile " in command:  # the emulated glasses' signals were merged into the profile
                assert json.loads(done.stdout)["scores"], done.stdout
    finally:
        stop_server(proc)
    assert len(shell.ran) == len(device + issue + emulate + admin + rules)


@pytest.mark.parametrize("prefix", sorted(NOT_RUN_HERE))
def test_what_is_not_run_here_is_in_the_readme(prefix: str) -> None:
    """The exemptions stay honest: each names a command the README shows."""
    assert any(c.startswith(prefix) for c in commands())
