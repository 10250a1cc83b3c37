"""Who is calling, and what each caller may do.

A caller presents one credential:

- a bearer token in the call metadata, ``authorization: Bearer sotto_...``. Tokens are 256 random bits,
  issued by ``sotto-server token issue`` and stored only as SHA-256 (a fast hash is enough: nothing this
  random can be guessed from its hash, and a leaked table reveals no token). A device token is bound to
  one profile; an admin token to none.
- or, with mutual TLS, a client certificate whose URI SAN ``urn:sotto:profile:PROFILE_ID`` names the
  profile the device is bound to. A token, when sent as well, takes precedence.

A device may write to, read and erase only the profile it is bound to; an admin may read and erase any
profile and ask for audience sizes, but never writes signals.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

from sotto.server.store import Credential, Role, Store
from sotto.wire import PROFILE_ID_PATTERN

TOKEN_PREFIX = "sotto_"
PROFILE_URI_PREFIX = "urn:sotto:profile:"
AUTHORIZATION = "authorization"

#: The roles allowed to call each method of sotto.v1.SignalAggregator; a device is further limited to
#: its own profile by the servicer.
ACCESS: dict[str, frozenset[Role]] = {
    "Ingest": frozenset({Role.DEVICE}),
    "GetProfile": frozenset({Role.DEVICE, Role.ADMIN}),
    "DeleteProfile": frozenset({Role.DEVICE, Role.ADMIN}),
    "AudienceSize": frozenset({Role.ADMIN}),
}


class AuthError(Exception):
    """A call is refused before it reaches the servicer.

    ``reason`` is a short fixed label for logs and metrics; ``str(error)`` is the message for the caller.
    """

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: a role and, for a device, its profile. ``role`` None means authentication
    is turned off (loopback embeddings only) and the caller may do everything."""

    role: Role | None
    profile_id: str | None = None

    def may_access(self, profile_id: str) -> bool:
        """Whether this caller may touch ``profile_id``: a device only its own."""
        return self.role is not Role.DEVICE or self.profile_id == profile_id

    @property
    def rate_key(self) -> str | None:
        """The key of the caller's rate-limit bucket: devices are limited per profile, others not at all."""
        return self.profile_id if self.role is Role.DEVICE else None


#: The caller when authentication is off.
UNCHECKED = Principal(role=None)


def new_token() -> str:
    """A fresh bearer token: ``sotto_`` and 43 URL-safe characters (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """What the store keeps of a token."""
    return hashlib.sha256(token.encode()).digest()


def device_credential(token: str, profile_id: str) -> Credential:
    """The stored form of a device token bound to ``profile_id``."""
    if not PROFILE_ID_PATTERN.fullmatch(profile_id):
        raise ValueError(f"profile id {profile_id!r} must be 8 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return Credential(hash_token(token), Role.DEVICE, profile_id)


def admin_credential(token: str) -> Credential:
    """The stored form of an admin token."""
    return Credential(hash_token(token), Role.ADMIN)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The token of the ``authorization: Bearer TOKEN`` metadata entry; None when there is none."""
    values = [value for key, value in metadata if key == AUTHORIZATION]
    if not values:
        return None
    if len(values) > 1:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED, "malformed", "send one authorization metadata entry, not several"
        )
    value = values[0]
    scheme, _, token = (value.decode(errors="replace") if isinstance(value, bytes) else value).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "malformed",
            "authorization metadata must be 'Bearer <token>'",
        )
    return token.strip()


def certificate_profile(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The profile named by the verified client certificate's ``urn:sotto:profile:`` URI; None without
    a client certificate or without such a URI."""
    uris = {uri.decode(errors="replace") for uri in auth_context.get("peer_uri", ())}
    profiles = {uri.removeprefix(PROFILE_URI_PREFIX) for uri in uris if uri.startswith(PROFILE_URI_PREFIX)}
    if not profiles:
        return None
    if len(profiles) > 1:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "certificate",
            "the client certificate names several profiles; "
            f"it must have exactly one {PROFILE_URI_PREFIX} URI",
        )
    (profile,) = profiles
    if not PROFILE_ID_PATTERN.fullmatch(profile):
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "certificate",
            f"the client certificate's {PROFILE_URI_PREFIX} URI does not end in a valid profile id "
            "(8 to 64 characters of A-Z, a-z, 0-9, '_' or '-')",
        )
    return profile


class Authenticator:
    """Resolves a call's credential to a ``Principal``, looking tokens up in the store on every call (so
    a revoked or deleted token stops working at once, in every process)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def authenticate(
        self, metadata: Sequence[tuple[str, str | bytes]], auth_context: Mapping[str, Sequence[bytes]]
    ) -> Principal:
        """The caller, or ``AuthError`` (UNAUTHENTICATED); store errors propagate."""
        token = bearer_token(metadata)
        if token is not None:
            credential = await self._store.find_credential(hash_token(token))
            if credential is None:
                raise AuthError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown_token",
                    "unknown or revoked token; ask the operator for a new one",
                )
            return Principal(credential.role, credential.profile_id)
        profile = certificate_profile(auth_context)
        if profile is not None:
            return Principal(Role.DEVICE, profile)
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "no_credential",
            "no credential: send 'authorization: Bearer <token>' metadata, or a client certificate with a "
            f"{PROFILE_URI_PREFIX}PROFILE_ID URI",
        )
