"""``sotto-server serve --workers N``: N aggregator processes on one port, supervised by one parent.

One Python process serves on one core (one event loop, one GIL). Like gRPC's multiprocessing example,
the parent reserves the port with ``SO_REUSEPORT`` and starts N worker processes that each bind it with
gRPC's ``grpc.so_reuseport`` option; the kernel spreads incoming connections over them. Each worker is a
complete ``serve`` with its own event loop and its own store connection (or pool). Workers are started
with ``spawn`` (a fresh interpreter), never ``fork``: gRPC's C core does not survive a fork once used.

- **Metrics**: the workers run in prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set
  to a private directory that the parent creates and removes); the parent serves ``/metrics`` merged over
  all of them (``MultiProcessCollector``) and calls ``mark_process_dead`` for every worker that ends.
- **Shutdown**: SIGTERM or SIGINT to the parent is passed on as SIGTERM to every worker, which turns its
  health to NOT_SERVING and drains its calls within ``--grace-seconds``, as a single process does. The
  parent exits 0 when every worker did.
- **A worker that dies** (crash, OOM kill, SIGKILL) is logged with its exit status; the parent then stops
  the others gracefully and exits 1. It does not restart workers itself: the process manager in front
  (systemd ``Restart=on-failure``, a Kubernetes container restart) restarts the whole service with its
  own backoff and counts the restart where operators look, instead of a crash loop hidden inside a
  service that looks healthy. Devices resend whatever was not acknowledged.
- **Retention purge**: only worker 0 runs it (the purge is idempotent, but N concurrent purges would
  only compete for the same rows and locks).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from sotto.server.metrics import MetricsServer, serve_merged

log = logging.getLogger(__name__)

#: Seconds a worker gets after the grace period to close its store and exit before it is killed.
STOP_MARGIN_S = 30.0
#: Seconds a worker gets to import, open its store and bind before the start counts as failed.
START_TIMEOUT_S = 120.0

#: What a worker process runs: (index, its arguments, the end of the pipe it reports on). It sends
#: ``("ready", port)`` once serving, or ``("error", exit_code, message)`` when it cannot start.
WorkerTarget = Callable[[int, argparse.Namespace, Connection], None]


def reserve_port(address: str) -> socket.socket:
    """Bind ``HOST:PORT`` (port 0 picks one) with SO_REUSEPORT, without listening, and return the socket.

    Kept open while the workers run, it holds the port for them: they bind it too (gRPC's
    ``grpc.so_reuseport``) and only their listening sockets receive connections. The address is first
    bound without SO_REUSEPORT, so that a port another server already listens on (even one that set
    SO_REUSEPORT itself) is refused instead of shared. Raises ``RuntimeError`` when it cannot be bound.
    """
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
            sockaddr = (sockaddr[0], probe.getsockname()[1], *sockaddr[2:])
        reserved = socket.socket(family, kind, proto)
        try:
            reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            reserved.bind(sockaddr)
        except OSError:
            reserved.close()
            raise
    except OSError as exc:  # includes socket.gaierror for a host name that does not resolve
        raise RuntimeError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    return reserved


class _Stop:
    """SIGTERM/SIGINT of the parent, as a flag plus a file descriptor that ``wait`` can watch."""

    def __init__(self) -> None:
        self.requested = False
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    @property
    def fileno(self) -> int:
        """The descriptor that becomes readable when a signal arrives."""
        return self._read.fileno()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGTERM and SIGINT here while the block runs."""
        previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(self._write.fileno())
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._read.close()
            self._write.close()

    def drain(self) -> None:
        """Empty the wake-up descriptor."""
        with contextlib.suppress(BlockingIOError):
            while self._read.recv(512):
                pass


class _Worker:
    def __init__(self, index: int, process: BaseProcess, conn: Connection) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.ready = False

    @property
    def pid(self) -> int:
        return self.process.pid or 0


def run_workers(args: argparse.Namespace, count: int, target: WorkerTarget, grace_s: float) -> int:
    """Run ``count`` workers of ``serve`` on ``args.listen`` until SIGTERM/SIGINT or until one dies.

    Prints ``listening on HOST:PORT`` once every worker serves (and ``metrics on …`` with
    ``args.metrics_listen``, served here, merged over the workers). Returns the exit code: 0 after a
    clean stop, the failing worker's code when one could not start, 1 when one died.
    """
    if count < 2:
        raise ValueError(f"run_workers needs at least 2 workers, got {count}")
    host = args.listen.rpartition(":")[0]
    reserved = reserve_port(args.listen)
    port = int(reserved.getsockname()[1])
    directory = tempfile.mkdtemp(prefix="sotto-metrics-")
    # Read by prometheus-client when a worker imports it: spawned workers inherit this environment.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    stop = _Stop()
    exporter: MetricsServer | None = None
    workers: list[_Worker] = []
    try:
        if args.metrics_listen is not None:  # bound before any worker starts: a busy port stops nothing
            metrics_host, _, metrics_port = args.metrics_listen.rpartition(":")
            exporter = serve_merged(directory, metrics_host, int(metrics_port))
        with stop.installed():
            context = multiprocessing.get_context("spawn")
            worker_args = argparse.Namespace(
                **{**vars(args), "listen": f"{host}:{port}", "metrics_listen": None}
            )
            for index in range(count):
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=target, args=(index, worker_args, send), name=f"sotto-worker-{index}"
                )
                process.start()
                send.close()  # the worker holds the only writing end: EOF when it dies
                workers.append(_Worker(index, process, receive))
            code = _await_ready(workers, stop)
            if code is not None:
                return _shutdown(workers, grace_s, directory, failed=code)
            log.info(
                "event=workers_started count=%d port=%d pids=%s",
                count,
                port,
                ",".join(str(w.pid) for w in workers),
            )
            print(f"listening on {host}:{port}", flush=True)
            if exporter is not None:
                print(f"metrics on http://{metrics_host}:{exporter.port}/metrics", flush=True)
            died = _await_stop_or_death(workers, stop)
            return _shutdown(workers, grace_s, directory, failed=1 if died else None)
    finally:
        for worker in workers:
            if worker.process.is_alive():  # only after an unexpected error here: never leave orphans
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        if exporter is not None:
            exporter.close()
        reserved.close()
        shutil.rmtree(directory, ignore_errors=True)


def _await_ready(workers: list[_Worker], stop: _Stop) -> int | None:
    """Wait until every worker reports ready; the exit code to stop with otherwise (0: stop requested)."""
    waiting = {w.conn: w for w in workers}
    while waiting:
        ready = wait([*waiting, stop.fileno], timeout=START_TIMEOUT_S)
        if not ready:
            log.error("event=worker_start_timeout seconds=%g", START_TIMEOUT_S)
            return 1
        if stop.fileno in ready:
            stop.drain()
            if stop.requested:
                return 0
        for conn in ready:
            if not isinstance(conn, Connection):
                continue
            worker = waiting.pop(conn)
            try:
                message = conn.recv()
            except EOFError:  # died before saying anything (killed, or crashed while importing)
                worker.process.join()
                log.error(
                    "event=worker_died worker=%d pid=%d exitcode=%s phase=start",
                    worker.index,
                    worker.pid,
                    worker.process.exitcode,
                )
                return 1
            if message[0] == "ready":
                worker.ready = True
                continue
            _, code, text = message
            # The worker's own message is what the operator needs (bad TLS file, unsafe address, ...).
            print(f"sotto-server: error: {text}", file=sys.stderr, flush=True)
            return int(code)
    return None


def _await_stop_or_death(workers: list[_Worker], stop: _Stop) -> bool:
    """Block until a stop is requested (False) or a worker ends on its own (True)."""
    sentinels = {w.process.sentinel: w for w in workers}
    while True:
        ready = wait([*sentinels, stop.fileno])
        if stop.fileno in ready:
            stop.drain()
            if stop.requested:
                return False
        for sentinel in ready:
            worker = sentinels.get(sentinel)  # type: ignore[arg-type]
            if worker is not None:
                worker.process.join()
                log.error(
                    "event=worker_died worker=%d pid=%d exitcode=%s action=stopping_all",
                    worker.index,
                    worker.pid,
                    worker.process.exitcode,
                )
                return True


def _shutdown(workers: list[_Worker], grace_s: float, directory: str, failed: int | None) -> int:
    """SIGTERM every live worker, wait for them to drain, kill the ones that hang; the exit code."""
    log.info("event=shutdown workers=%d grace=%s", sum(w.process.is_alive() for w in workers), grace_s)
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()
    code = failed or 0
    for worker in workers:
        worker.process.join(grace_s + STOP_MARGIN_S)
        if worker.process.is_alive():
            log.error("event=worker_hung worker=%d pid=%d action=kill", worker.index, worker.pid)
            worker.process.kill()
            worker.process.join()
            code = code or 1
        exitcode = worker.process.exitcode
        # A worker stopped while still starting (before its signal handlers) ends by SIGTERM: no calls lost.
        clean = exitcode == 0 or (exitcode == -signal.SIGTERM and not worker.ready)
        if not clean:
            log.error("event=worker_exit worker=%d pid=%d exitcode=%s", worker.index, worker.pid, exitcode)
            code = code or 1
        mark_process_dead(worker.pid, directory)
    return code
