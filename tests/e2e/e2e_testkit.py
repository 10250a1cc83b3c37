"""Helpers of the end-to-end tests: a real aggregator process and a byte-capturing TCP proxy."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tools.harness import issue_tokens, start_server, stop_server
from tools.paths import SHARED_DATA

ROOT = Path(__file__).resolve().parents[2]
#: The shared data sets, found like every other tool and test does ($SOTTO_SHARED_DATA honoured).
SHARED = SHARED_DATA


@dataclass(frozen=True)
class Aggregator:
    """A running aggregator process: its address and the credential files issued for it."""

    target: str
    #: JSON {profile_id: token} of the devices named at start (what emulate_device.py --token-file reads).
    token_file: Path
    #: One admin token (what `sotto-server profile --admin-token-file` reads).
    admin_token_file: Path


@contextlib.contextmanager
def aggregator(db: Path, devices: list[str], *extra: str) -> Iterator[Aggregator]:
    """Issue tokens for ``devices`` and an admin, run `python -m sotto.server serve` on a free loopback
    port and yield it; SIGTERM it after."""
    url = f"sqlite:///{db}"
    token_file = db.with_name("tokens.json")
    token_file.write_text(issue_tokens(url, *devices))
    admin_token_file = db.with_name("admin.token")
    admin_token_file.write_text(issue_tokens(url, "--admin"))
    proc, target = start_server(url, *extra)
    try:
        yield Aggregator(target, token_file, admin_token_file)
    finally:
        stop_server(proc)


class CaptureProxy:
    """Forwards loopback TCP to ``target`` and records every byte the client sent.

    What it records is exactly what crossed the wire from device to aggregator (plaintext gRPC).
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._captured = bytearray()
        #: The same bytes, per client connection (in the order connections were accepted).
        self._connections: list[bytearray] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def captured(self) -> bytes:
        with self._lock:
            return bytes(self._captured)

    @property
    def connections(self) -> list[bytes]:
        with self._lock:
            return [bytes(c) for c in self._connections]

    def __enter__(self) -> CaptureProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        self._listener.setblocking(False)
        sel.register(self._listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, tuple[socket.socket, bool]] = {}
        buffers: dict[socket.socket, bytearray] = {}
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    client, _addr = self._listener.accept()
                    upstream = socket.create_connection(self._target)
                    peers[client] = (upstream, True)
                    peers[upstream] = (client, False)
                    with self._lock:
                        buffers[client] = bytearray()
                        self._connections.append(buffers[client])
                    sel.register(client, selectors.EVENT_READ)
                    sel.register(upstream, selectors.EVENT_READ)
                    continue
                if sock not in peers:  # closed earlier in this round, together with its peer
                    continue
                other, from_client = peers[sock]
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    for s in (sock, other):
                        with contextlib.suppress(KeyError, ValueError):
                            sel.unregister(s)
                        peers.pop(s, None)
                        s.close()
                    continue
                if from_client:
                    with self._lock:
                        self._captured += data
                        buffers[sock] += data
                other.sendall(data)
        for s in list(peers):
            s.close()
        sel.close()


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _PADDED = 0, 0x8


def grpc_requests(connection: bytes) -> list[bytes]:
    """The serialized request messages a client sent on one plaintext HTTP/2 connection.

    Reads the frames (DATA payloads per stream, padding removed), then the gRPC length-prefixed messages of
    each stream. Strict: any byte that does not fit the framing fails, so nothing can hide from the caller.
    """
    assert connection.startswith(HTTP2_PREFACE), "not an HTTP/2 client connection"
    streams: dict[int, bytearray] = {}
    pos = len(HTTP2_PREFACE)
    while pos < len(connection):
        assert pos + 9 <= len(connection), "truncated HTTP/2 frame header"
        length = int.from_bytes(connection[pos : pos + 3], "big")
        kind, flags = connection[pos + 3], connection[pos + 4]
        stream = int.from_bytes(connection[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        payload = connection[pos + 9 : pos + 9 + length]
        assert len(payload) == length, "truncated HTTP/2 frame"
        pos += 9 + length
        if kind == _DATA:
            if flags & _PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            streams.setdefault(stream, bytearray()).extend(payload)
    messages = []
    for data in streams.values():
        at = 0
        while at < len(data):
            compressed, size = data[at], int.from_bytes(data[at + 1 : at + 5], "big")
            assert compressed == 0, "compressed gRPC message: cannot be inspected"
            messages.append(bytes(data[at + 5 : at + 5 + size]))
            assert len(messages[-1]) == size, "truncated gRPC message"
            at += 5 + size
    return messages


def write_wav(path: Path, samples: list[int] | bytes, rate: int = 16000) -> Path:
    """Write mono int16 PCM to a WAV file with the standard library."""
    import wave

    data = (
        samples
        if isinstance(samples, bytes)
        else b"".join(int(s).to_bytes(2, "little", signed=True) for s in samples)
    )
    with wave.open(os.fspath(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(data)
    return path
