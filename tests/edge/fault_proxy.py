"""A TCP proxy that loses gRPC replies after the server has processed the request.

It forwards bytes both ways and reads the server's HTTP/2 frames. A gRPC reply ends with a HEADERS frame
carrying END_STREAM (the trailers, with the status); by then the server has done the work. With
probability ``drop_rate`` the proxy withholds that frame and cuts the connection instead, so the client
sees UNAVAILABLE for a request the server applied -- the case a resend with the same batch id exists for.
Plaintext (h2c) only, which is what the tests use.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from types import TracebackType

_HEADERS = 0x1
_END_STREAM = 0x1


class ResponseDroppingProxy:
    """Listen on a free loopback port and forward to ``upstream`` (HOST:PORT), dropping replies."""

    def __init__(self, upstream: str, drop_rate: float, seed: int = 0) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._rate = drop_rate
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        #: Replies completed by the server and forwarded / withheld.
        self.forwarded = 0
        self.dropped = 0
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> ResponseDroppingProxy:
        self._spawn(self._accept)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        self._listener.close()
        for sock in list(self._sockets):
            _close(sock)
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            self._spawn(self._pipe, client, server)
            self._spawn(self._replies, server, client)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _drop_this_one(self) -> bool:
        with self._rng_lock:
            return self._rng.random() < self._rate

    def _replies(self, server: socket.socket, client: socket.socket) -> None:
        buffer = b""
        try:
            while data := server.recv(65536):
                buffer += data
                out = bytearray()
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    frame, buffer = buffer[: 9 + length], buffer[9 + length :]
                    kind, flags = frame[3], frame[4]
                    stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    if stream and kind == _HEADERS and flags & _END_STREAM:
                        if self._drop_this_one():
                            self.dropped += 1
                            client.sendall(out)
                            return  # the finally cuts both connections: the reply never arrives
                        self.forwarded += 1
                    out += frame
                client.sendall(out)
        except OSError:
            pass
        finally:
            _close(server)
            _close(client)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
