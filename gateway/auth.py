"""Credentials -> Principal. One interface; dev tokens are the only method so far.

API keys, JWT and Ed25519 agent identity plug in behind :class:`Authenticator`.
The tenant and the principal come only from the credential, never from envelopes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from shared.subjects import is_valid_name

log = logging.getLogger("arqonbus.gateway.auth")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is connected, from the credential alone.

    ``role`` names a capability set (owner, admin, member, read-only); ``grants`` add
    capabilities as ``ROOM:CHANNEL:perms`` strings (patterns such as ``science:*``).
    Dev tokens are owners of their tenant.
    """

    tenant: str
    id: str
    role: str = "owner"
    grants: tuple[str, ...] = ()


class AuthError(Exception):
    """The handshake carries no valid credential (HTTP 401)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a handshake offers, before any check."""

    token: str | None

    @classmethod
    def from_request(cls, path: str, headers: Mapping[str, str]) -> Credentials:
        auth = headers.get("Authorization") or headers.get("authorization")
        if auth and auth[:7].lower() == "bearer ":
            return cls(auth[7:].strip())
        tokens = parse_qs(urlsplit(path).query).get("token")
        return cls(tokens[0] if tokens else None)


class Authenticator(Protocol):
    name: str

    def authenticate(self, credentials: Credentials) -> Principal: ...


class DevAuthenticator:
    """``dev:<tenant>:<principal>`` tokens, trusted as given. For development only."""

    name = "dev"

    def __init__(self) -> None:
        log.warning(
            "DEV AUTH MODE: any client can claim any tenant and identity with a "
            "'dev:<tenant>:<principal>' token. Never expose this gateway to untrusted networks."
        )

    def authenticate(self, credentials: Credentials) -> Principal:
        token = credentials.token
        if not token:
            raise AuthError(
                "missing token: pass ?token=dev:<tenant>:<principal> or a Bearer header"
            )
        parts = token.split(":")
        if len(parts) != 3 or parts[0] != "dev":
            raise AuthError("malformed token: expected dev:<tenant>:<principal>")
        tenant, principal = parts[1], parts[2]
        if not (is_valid_name(tenant) and is_valid_name(principal)):
            raise AuthError("tenant and principal must be 1-64 characters of A-Z a-z 0-9 _ -")
        return Principal(tenant, principal)


def make_authenticator(mode: str) -> Authenticator:
    if mode == "dev":
        return DevAuthenticator()
    raise ValueError(
        "no authentication mode configured: set ARQONBUS_AUTH=dev (or --auth dev) for "
        "development; real identity methods arrive in a later release"
    )
