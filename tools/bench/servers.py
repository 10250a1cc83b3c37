"""The processes of the aggregator benchmarks: a fresh store, a server, tokens, the load generator, and
the CPU time and metrics read from them.

Servers start and stop through ``tools.harness`` (as in the test kits); this adds what only benchmarks
need: limits that let the load through, CPU accounting, and the load generator in a process of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tools.harness import issue_tokens, start_server, stop_server
from tools.paths import REPO, child_env


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc); 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (the workers of ``serve --workers``), from /proc."""
    tree = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                tree.append(int(entry))
    return tree


@contextmanager
def fresh_store(store: str, postgres_url: str | None, folder: Path) -> Iterator[str]:
    """A URL of an empty store of kind ``store`` (SQLite file in ``folder``, or a scratch schema)."""
    if store == "sqlite":
        yield f"sqlite:///{folder / 'bench.db'}"
        return
    base = (
        postgres_url
        or os.environ.get("SOTTO_BENCH_POSTGRES_URL")
        or os.environ.get("SOTTO_TEST_POSTGRES_URL")
    )
    if not base:
        raise SystemExit(
            "bench: --store postgresql needs --postgres-url (or $SOTTO_BENCH_POSTGRES_URL, "
            "$SOTTO_TEST_POSTGRES_URL); bash tools/postgres.sh prints one for the local server"
        )
    from sotto.server.store.postgres import scratch_schema

    with scratch_schema(base, prefix="bench") as url:
        yield url


def write_tokens(url: str, profiles: list[str], path: Path) -> None:
    """Issue a device token per profile in the store at ``url``; write ``{profile: token}`` to ``path``."""
    try:
        path.write_text(issue_tokens(url, *profiles))
    except RuntimeError as exc:
        raise SystemExit(f"bench: {exc}") from None


@contextmanager
def serve(
    url: str, devices: int, workers: int | None = None
) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """``sotto-server serve`` on a free loopback port (``--workers`` when given) with merged metrics:
    the process, the target and the metrics URL.

    On leaving, SIGTERM and the exit code are checked: a benchmark whose server did not stop cleanly
    fails rather than publish figures.
    """
    try:
        proc, target = start_server(
            url,
            "--metrics-listen",
            "127.0.0.1:0",
            *(("--workers", str(workers)) if workers is not None else ()),
            "--log-level",
            "WARNING",
            # One device here stands for a busy gateway: the per-device limit (1/s) is not under test.
            "--rate-per-second",
            "1000000",
            "--rate-burst",
            "1000000",
            "--max-concurrent-rpcs",
            str(max(1000, devices * 10)),
        )
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"bench: {exc}") from None
    try:
        # Printed right after "listening on", so it may already sit in the pipe's read buffer, where
        # select would not see it: read it directly.
        assert proc.stdout is not None
        metrics = re.fullmatch(r"metrics on (http://\S+/metrics)\n", proc.stdout.readline())
        if not metrics:
            raise SystemExit("bench: unexpected output from sotto-server serve")
        yield proc, target, metrics.group(1)
        proc.terminate()
        code = proc.wait(timeout=60)
        if code != 0:
            raise SystemExit(
                f"bench: the aggregator exited {code}: {proc.stderr.read() if proc.stderr else ''}"
            )
    finally:
        stop_server(proc)


def scrape(url: str) -> tuple[float, dict[str, float]]:
    """(signals merged so far, calls answered per worker pid) from the server's merged metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    signals, calls = 0.0, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sotto_signals_total":
                signals = sample.value
            elif sample.name == "sotto_process_calls":
                calls[sample.labels.get("pid", "single")] = sample.value
    return signals, calls


def run_load(target: str, tokens: Path, *options: str) -> tuple[dict[str, Any], float]:
    """Run the load generator (``python -m tools.bench load``, options as its command line takes them)
    against ``target`` to completion, in a process of its own: its report and its own CPU-seconds."""
    command = [
        sys.executable,
        "-m",
        "tools.bench",
        "load",
        "--target",
        target,
        "--tokens",
        str(tokens),
        *options,
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [*command, *options], cwd=REPO, env=child_env(), stdout=out, stderr=err, text=True
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"bench: the load generator failed:\n{err.read()}")
        out.seek(0)
        return json.loads(out.read()), usage.ru_utime + usage.ru_stime
