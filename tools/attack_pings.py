"""Re-run the ping storm of issue 17 (finding 6) against ``sotto-server serve`` and time valid Ingest calls.

Attacker processes open TCP connections as fast as they can; each sends the HTTP/2 preface, its SETTINGS and
``--pings`` PING frames in one write (built with the ``h2`` library), reads what the server answers until it
closes the connection, has acknowledged every ping or ``--read-timeout`` passes, then closes and starts
again (with ``--hold`` it keeps each connection the server answered open until the end, and opens the
next). Meanwhile devices send valid batches, on a connection opened before the storm (``--senders``) and on
a new connection for every batch (``--reconnecting-senders``, as a device that wakes up, connects and
flushes); the tool reports their latency (p50, p99, max) and status codes without the storm first, then
under it, with the storm's size, what the server did with its connections, the server's CPU time and the
machine's load average.

    python -m tools.attack_pings --seconds 20

starts its own server (a temporary SQLite database, default limits except the per-device rate limit, which
is lifted because a handful of devices stand in for many; ``--serve-arg=--max-connections=500`` passes an
option on) unless ``--target HOST:PORT --token-file FILE`` names a running one. Prints JSON; exits 1 when
a valid call on the established connection failed or its p99 is above ``--target-p99-ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions

from sotto.v1 import signals_pb2_grpc
from sotto.wire import day_number
from tools.attack_streams import PROFILE, device_batch, devices, figures
from tools.harness import issue_tokens, read_line, stop_server
from tools.paths import REPO, child_env

#: A channel with a connection of its own (gRPC shares one between channels to the same target otherwise).
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def _client(pings: int) -> tuple[h2.connection.H2Connection, bytes]:
    """A client-side HTTP/2 state machine that has sent the preface, SETTINGS and ``pings`` PINGs, and
    those bytes."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    for n in range(pings):
        conn.ping(n.to_bytes(8, "big"))
    return conn, conn.data_to_send()


async def ping_once(
    host: str, port: int, pings: int, read_timeout: float, held: list[asyncio.StreamWriter] | None = None
) -> str:
    """One connection of the storm; how it ended:

    ``goaway_<CODE>``: the server sent GOAWAY with that error code (``ENHANCE_YOUR_CALM`` for too many
    pings); ``acked``: every ping was acknowledged and the attacker closed; ``closed_unanswered``: the
    server closed the connection without a word (no SETTINGS: refused as soon as it was accepted);
    ``closed``: closed after SETTINGS without GOAWAY; ``reset``, ``connect_error``, ``timeout``. With
    ``held``, a connection whose pings were all acknowledged is not closed but added to it (``held``).
    """
    conn, data = _client(pings)
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        # Refused, or out of file descriptors: pause a moment, or the loop would never yield to its
        # SIGTERM handler (a failed connect returns without waiting).
        await asyncio.sleep(0.01)
        return "connect_error"
    settings = False
    acked = 0
    keep = False
    try:
        writer.write(data)
        async with asyncio.timeout(read_timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return "closed" if settings else "closed_unanswered"
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.RemoteSettingsChanged):
                        settings = True
                    elif isinstance(event, h2.events.PingAckReceived):
                        acked += 1
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        code = event.error_code
                        return f"goaway_{getattr(code, 'name', code)}"
                if acked == pings and settings:
                    keep = held is not None
                    return "held" if keep else "acked"
    except TimeoutError:
        return "timeout"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except h2.exceptions.ProtocolError:
        return "protocol_error"
    finally:
        if keep:
            assert held is not None
            held.append(writer)
        else:
            writer.close()


async def storm(
    target: str, parallel: int, pings: int, read_timeout: float, stop: asyncio.Event, hold: bool = False
) -> dict[str, int]:
    """``parallel`` loops of ``ping_once`` until ``stop``: the count of each outcome. With ``hold``, the
    connections the server kept open stay open until ``stop``."""
    host, _, port = target.rpartition(":")
    outcomes: collections.Counter[str] = collections.Counter()
    held: list[asyncio.StreamWriter] | None = [] if hold else None

    async def loop() -> None:
        while not stop.is_set():
            outcomes[await ping_once(host, int(port), pings, read_timeout, held)] += 1

    tasks = [asyncio.create_task(loop()) for _ in range(parallel)]
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    for writer in held or ():
        writer.close()
    return dict(outcomes)


async def reconnecting_devices(
    target: str, token: str, seconds: float, concurrency: int
) -> tuple[list[float], collections.Counter[str]]:
    """Like ``tools.attack_streams.devices``, but every batch on a new connection (connect, send, close):
    the latency includes connecting."""
    latencies: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    today = day_number(dt.datetime.now(dt.UTC).date())
    metadata = (("authorization", f"Bearer {token}"),)
    deadline = time.perf_counter() + seconds

    async def sender() -> None:
        while time.perf_counter() < deadline:
            batch = device_batch(today)
            started = time.perf_counter()
            async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
                try:
                    await signals_pb2_grpc.SignalAggregatorStub(channel).Ingest(
                        batch, timeout=10, metadata=metadata
                    )
                    codes["OK"] += 1
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
            await asyncio.sleep(0.05)

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return latencies, codes


def _log_summary(text: str) -> dict[str, object]:
    """Size of the server's log and its distinct messages (timestamps and numbers taken out), most frequent
    first: what a storm made the server write."""
    lines = text.splitlines()
    kinds = collections.Counter(re.sub(r"[0-9]+", "N", line.split(" level=", 1)[-1])[:160] for line in lines)
    return {"lines": len(lines), "bytes": len(text.encode()), "messages": dict(kinds.most_common(5))}


def _open_files(pid: int | None) -> dict[str, int] | None:
    """How many file descriptors process ``pid`` has open, and its soft limit (Linux), None when unknown."""
    if pid is None:
        return None
    try:
        count = len(os.listdir(f"/proc/{pid}/fd"))
        limits = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None
    match = re.search(r"^Max open files\s+(\d+)", limits, re.M)
    return {"open": count, "soft_limit": int(match.group(1)) if match else -1}


def _cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU time of process ``pid`` so far (Linux), None when unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _window(args: argparse.Namespace, target: str, token: str, seconds: float) -> dict[str, object]:
    """Valid Ingest for ``seconds``: on an established connection and, at once, on new connections."""
    (steady, steady_codes), (fresh, fresh_codes) = await asyncio.gather(
        devices(target, token, seconds, args.senders),
        reconnecting_devices(target, token, seconds, args.reconnecting_senders),
    )
    return {
        "established_connection": figures(steady, steady_codes),
        "new_connection_per_batch": figures(fresh, fresh_codes),
    }


async def measure(
    args: argparse.Namespace, target: str, token: str, server_pid: int | None
) -> dict[str, object]:
    """The baseline, then the same traffic under the storm. The storm runs in processes of its own, as it
    would on other machines, so that its work does not slow the timed calls' event loop."""
    cpu_0 = _cpu_seconds(server_pid)
    baseline = await _window(args, target, token, args.baseline_seconds)
    cpu_1 = _cpu_seconds(server_pid)
    attackers = [
        subprocess.Popen(
            [sys.executable, "-m", "tools.attack_pings", "--attack-only", target]
            + ["--parallel", str(args.parallel), "--pings", str(args.pings)]
            + ["--read-timeout", str(args.read_timeout)]
            + (["--hold"] if args.hold else []),
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(args.attackers)
    ]
    try:
        await asyncio.sleep(2)  # let the storm build up before timing anything
        load_before = os.getloadavg()
        cpu_2 = _cpu_seconds(server_pid)
        under_attack = await _window(args, target, token, args.seconds)
        cpu_3 = _cpu_seconds(server_pid)
        files = _open_files(server_pid)
        load_after = os.getloadavg()
    finally:
        for attacker in attackers:
            attacker.send_signal(signal.SIGTERM)
        outs = []
        for attacker in attackers:
            try:
                outs.append(attacker.communicate(timeout=60)[0])
            except subprocess.TimeoutExpired:
                attacker.kill()
                outs.append(attacker.communicate()[0])
    outcomes: collections.Counter[str] = collections.Counter()
    for out in outs:
        if out.strip():
            outcomes.update(json.loads(out))
    connections = sum(outcomes.values())
    storm_seconds = args.seconds + 2

    def cpu(a: float | None, b: float | None, seconds: float) -> float | None:
        return None if a is None or b is None else round((b - a) / seconds, 3)

    return {
        "storm": {
            "attacker_processes": args.attackers,
            "parallel_per_process": args.parallel,
            "pings_per_connection": args.pings,
            "held_open": args.hold,
            "connections": connections,
            "connections_per_second": round(connections / storm_seconds),
            "pings_sent": connections * args.pings,
            "connection_outcomes": dict(outcomes),
        },
        "server_args": args.serve_arg,
        "baseline": baseline,
        "under_attack": under_attack,
        "server_cpu_cores_busy": {
            "baseline": cpu(cpu_0, cpu_1, args.baseline_seconds),
            "under_attack": cpu(cpu_2, cpu_3, args.seconds),
        },
        "server_files_at_the_end_of_the_storm": files,
        "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "cpus": os.cpu_count(),
        "target_p99_ms": args.target_p99_ms,
    }


def _storm_only(args: argparse.Namespace) -> None:
    """The attacker's process: storm until SIGTERM, then print the connections' outcomes as JSON."""

    async def run() -> dict[str, int]:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        return await storm(args.attack_only, args.parallel, args.pings, args.read_timeout, stop, args.hold)

    print(json.dumps(asyncio.run(run())), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tools.attack_pings``."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.attack_pings", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--attackers", type=int, default=2, help="attacking processes")
    parser.add_argument("--parallel", type=int, default=50, help="connections each attacker has open at once")
    parser.add_argument("--pings", type=int, default=20, help="PING frames sent on each connection")
    parser.add_argument(
        "--hold", action="store_true", help="keep each connection the server answers open until the end"
    )
    parser.add_argument("--read-timeout", type=float, default=5, help="longest wait for the server's answer")
    parser.add_argument("--seconds", type=float, default=20, help="time valid Ingest calls are measured")
    parser.add_argument("--baseline-seconds", type=float, default=5, help="the same without the storm")
    parser.add_argument("--senders", type=int, default=4, help="devices sending on an established connection")
    parser.add_argument(
        "--reconnecting-senders", type=int, default=2, help="devices opening a connection for every batch"
    )
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="an option for the server this tool starts"
    )
    parser.add_argument("--target", help="HOST:PORT of a running aggregator (default: start one)")
    parser.add_argument("--token-file", type=Path, help="a device token for --target (JSON of token issue)")
    parser.add_argument("--target-p99-ms", type=float, default=100.0, help="fail above this p99")
    parser.add_argument("--attack-only", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack_only:
        _storm_only(args)
        return 0
    if (args.target is None) != (args.token_file is None):
        parser.error("give --target and --token-file together")
    if args.target is not None:
        tokens = json.loads(args.token_file.read_text())
        result = asyncio.run(measure(args, args.target, next(iter(tokens.values())), None))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            db = f"sqlite:///{Path(tmp, 'attack.db').resolve()}"
            token = json.loads(issue_tokens(db, PROFILE))[PROFILE]
            log = Path(tmp, "server.log")
            # The log goes to a file, not a pipe: gRPC may log every failed accept, and a full pipe would
            # stall the server.
            with log.open("w") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "sotto.server", "serve", "--listen", "127.0.0.1:0", "--db", db]
                    + ["--rate-per-second", "1000000", "--rate-burst", "1000000", "--log-level", "WARNING"]
                    + args.serve_arg,
                    cwd=REPO,
                    env=child_env(),
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                )
            try:
                line = read_line(proc, 60)
                if not line.startswith("listening on "):
                    raise SystemExit(
                        f"attack_pings: the aggregator did not start: {line!r} {log.read_text()}"
                    )
                target = line.removeprefix("listening on ").strip()
                result = asyncio.run(measure(args, target, token, proc.pid))
            finally:
                stop_server(proc)
            result["server_log"] = _log_summary(log.read_text(errors="replace"))
    print(json.dumps(result, indent=2))
    under = result["under_attack"]
    assert isinstance(under, dict)
    steady = under["established_connection"]
    failed = set(steady["codes"]) != {"OK"} or not steady["p99_ms"] < args.target_p99_ms
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
