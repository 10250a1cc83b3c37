"""Real aggregator processes for benchmarks and tests: start one, wait for "listening on", stop it; issue
tokens; a throwaway certificate authority for TLS.

One harness so that benchmarks and test kits start and stop servers the same way.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tools.paths import REPO, child_env

_LISTENING = re.compile(r"listening on (\S+:\d+)\n")


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of ``proc``; ``TimeoutError`` when none comes within ``timeout`` seconds.

    The line is read by a helper thread rather than after ``select``: a line that came in the same read
    as the one before it already sits in the pipe object's buffer, where ``select`` cannot see it. After a
    timeout the thread stays blocked until the process ends (the callers stop it)."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines:
        # Its stderr only if it has exited: reading a live process's stderr would wait for its end.
        err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        raise TimeoutError(f"no output within {timeout}s; stderr: {err}")
    return lines[0]


def start_server(
    db_url: str,
    *extra: str,
    listen: str = "127.0.0.1:0",
    cwd: Path | None = None,
    timeout: float = 60,
) -> tuple[subprocess.Popen[str], str]:
    """``python -m sotto.server serve`` on ``listen`` (a free loopback port by default), started when it
    prints "listening on HOST:PORT": the process and that address. ``RuntimeError`` if it does not start."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sotto.server", "serve", "--listen", listen, "--db", db_url, *extra],
        cwd=cwd or REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line(proc, timeout)
    except TimeoutError:
        stop_server(proc)
        raise
    match = _LISTENING.fullmatch(line)
    if not match:
        err = stop_server(proc)
        raise RuntimeError(f"the aggregator did not start: {line!r} {err}")
    return proc, match.group(1)


def stop_server(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    """SIGTERM ``proc`` (SIGKILL if it hangs), close its pipes; returns its stderr."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return err


def run_module(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` run to completion from the checkout, its output captured (not checked)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def issue_tokens(db_url: str, *args: str) -> str:
    """``sotto-server token issue --db URL ARGS``: its JSON output ({profile_id: token})."""
    proc = run_module("sotto.server", "token", "issue", "--db", db_url, *args)
    if proc.returncode != 0:
        raise RuntimeError(f"token issue failed: {proc.stderr}")
    return proc.stdout


class ThrowawayCA:
    """A certificate authority for tests and local trials: issues server and client certificates
    (ECDSA P-256, valid for a day). Needs ``cryptography`` (the ``dev`` extra)."""

    def __init__(self, name: str = "Sotto test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert_pem = self._sign(self._name, self._key.public_key(), ca=True)

    def _sign(self, subject: Any, public_key: Any, ca: bool = False, names: list[Any] | None = None) -> bytes:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, names: list[Any]) -> tuple[bytes, bytes]:
        """A new key and certificate: (key PEM, certificate PEM)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key_pem, self._sign(subject, key.public_key(), names=names)

    def server_pair(self) -> tuple[bytes, bytes]:
        """Key and certificate for ``localhost`` and ``127.0.0.1``."""
        from cryptography import x509

        return self.issue(
            "localhost",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )

    def device_pair(self, profile_id: str | None) -> tuple[bytes, bytes]:
        """Key and certificate of a device bound to ``profile_id`` (None: a certificate naming none)."""
        from cryptography import x509

        names: list[Any] = [x509.DNSName("device.invalid")]
        if profile_id is not None:
            names.append(x509.UniformResourceIdentifier(f"urn:sotto:profile:{profile_id}"))
        return self.issue("sotto device", names)

    def write(self, folder: Path) -> dict[str, Path]:
        """ca.pem, server.pem and server.key in ``folder``; returns their paths by stem."""
        key, cert = self.server_pair()
        paths = {
            "ca": folder / "ca.pem",
            "server": folder / "server.pem",
            "server_key": folder / "server.key",
        }
        paths["ca"].write_bytes(self.cert_pem)
        paths["server"].write_bytes(cert)
        paths["server_key"].write_bytes(key)
        return paths
