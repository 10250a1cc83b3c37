"""The admin side of the wire: a channel to a running aggregator and the admin token sent on each call.

Used by ``sotto-server profile``, ``delete`` and ``audience``. TLS follows the server's rule: on by default
for a target that is not a loopback address, off for loopback unless a CA or client certificate is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from sotto.server.auth import AUTHORIZATION
from sotto.server.config import is_loopback, read_pem


@dataclass(frozen=True, slots=True)
class AdminConnection:
    """Where the aggregator is, how to reach it and the admin token to present."""

    target: str
    token: str
    #: None: plaintext. Otherwise the CA that signed the server certificate (None: the system's roots)
    #: and, for mutual TLS, the admin's own key and certificate chain.
    tls: tuple[bytes | None, bytes | None, bytes | None] | None = None

    @classmethod
    def from_options(
        cls,
        target: str,
        token_file: str | None,
        tls_ca: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        insecure: bool = False,
    ) -> AdminConnection:
        """Read the token and TLS files; ``ValueError`` names what is missing or unreadable."""
        if token_file is None:
            raise ValueError(
                "an admin token is needed: --admin-token-file FILE (or $SOTTO_ADMIN_TOKEN_FILE); "
                "`sotto-server token issue --admin --db URL` prints one"
            )
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the admin token file {token_file}: {exc}") from None
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"{token_file} must hold one token on one line")
        if (client_cert is None) != (client_key is None):
            raise ValueError("give both --tls-client-cert and --tls-client-key, or neither")
        use_tls = tls_ca is not None or client_cert is not None or not is_loopback(target.rpartition(":")[0])
        if insecure or not use_tls:
            return cls(target, token)
        return cls(
            target,
            token,
            (
                None if tls_ca is None else read_pem(tls_ca, "CA certificate"),
                None if client_key is None else read_pem(client_key, "client private key"),
                None if client_cert is None else read_pem(client_cert, "client certificate chain"),
            ),
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the token."""
        return ((AUTHORIZATION, f"Bearer {self.token}"),)

    def channel(self) -> grpc.Channel:
        """A new blocking channel to the target (close it after use)."""
        if self.tls is None:
            return grpc.insecure_channel(self.target)
        root, key, chain = self.tls
        return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(root, key, chain))
