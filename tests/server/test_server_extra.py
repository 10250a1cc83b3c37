"""``sotto-server`` installed without the 'server' extra says which extra to install, without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: Loaded by Python at start from $PYTHONPATH: makes the 'server' extra's modules unimportable, as they are
#: when `pip install sotto` ran without `[server]`.
BLOCKER = """
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"grpc_health", "grpc_reflection", "prometheus_client"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    script = Path(sys.executable).with_name("sotto-server")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def test_serve_without_the_server_extra_names_the_extra(tmp_path: Path) -> None:
    db = tmp_path / "sotto.db"
    result = _run(tmp_path, "serve", "--db", f"sqlite:///{db}", "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "sotto-server: error: serving needs the 'server' extra, which is not installed "
        "(no module named 'grpc_health'): pip install 'sotto[server]'"
    ]
    assert result.stdout == ""
    assert not db.exists()


def test_the_blocker_is_real_and_token_commands_work_without_the_extra(tmp_path: Path) -> None:
    blocked = _run(tmp_path, "token", "issue", "--db", f"sqlite:///{tmp_path / 'sotto.db'}", "profile_0001")
    assert blocked.returncode == 0, blocked.stderr
    assert set(json.loads(blocked.stdout)) == {"profile_0001"}
    probe = subprocess.run(
        [sys.executable, "-c", "import grpc_health"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ModuleNotFoundError: No module named 'grpc_health'" in probe.stderr
