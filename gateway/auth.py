"""Credentials -> Principal. One interface; dev tokens are the only method so far.

API keys, JWT and Ed25519 agent identity plug in behind :class:`Authenticator`.
The tenant and the principal come only from the credential, never from envelopes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

from shared import authz
from shared.subjects import is_valid_name

if TYPE_CHECKING:
    from shared.settings import Settings

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
    # When the credential stops being valid (Unix seconds, grace included); None: never.
    expires_at: float | None = None


class AuthError(Exception):
    """The handshake carries no valid credential (HTTP 401)."""


# Browsers cannot set headers on a WebSocket: they offer the token as a subprotocol,
# ``new WebSocket(url, ["arqonbus.bearer", "arqonbus.bearer." + token])``. The server
# echoes only BEARER_SUBPROTOCOL (never the token; see Credentials.select_subprotocol).
BEARER_SUBPROTOCOL = "arqonbus.bearer"
_BEARER_PREFIX = BEARER_SUBPROTOCOL + "."


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of a header (websockets' Headers may hold several)."""
    get_all = getattr(headers, "get_all", None)
    if get_all is not None:
        return list(get_all(name))
    value = headers.get(name) or headers.get(name.lower())
    return [value] if value else []


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a handshake offers, before any check.

    The token comes from, in order: ``Authorization: Bearer <token>``, the subprotocol
    ``arqonbus.bearer.<token>`` in ``Sec-WebSocket-Protocol``, the ``?token=`` parameter.
    """

    token: str | None

    @classmethod
    def from_request(cls, path: str, headers: Mapping[str, str]) -> Credentials:
        for auth in _header_values(headers, "Authorization")[:1]:
            if auth[:7].lower() == "bearer ":
                return cls(auth[7:].strip())
        for offered in cls.offered_subprotocols(headers):
            if offered.startswith(_BEARER_PREFIX) and len(offered) > len(_BEARER_PREFIX):
                return cls(offered[len(_BEARER_PREFIX) :])
        tokens = parse_qs(urlsplit(path).query).get("token")
        return cls(tokens[0] if tokens else None)

    @staticmethod
    def offered_subprotocols(headers: Mapping[str, str]) -> list[str]:
        return [
            item.strip()
            for value in _header_values(headers, "Sec-WebSocket-Protocol")
            for item in value.split(",")
            if item.strip()
        ]

    @staticmethod
    def select_subprotocol(offered: Sequence[str]) -> str | None:
        """The subprotocol the server should echo: ``arqonbus.bearer`` when offered, else none.

        A client that sends its token as a subprotocol must also offer ``arqonbus.bearer``:
        browsers fail a handshake whose response selects none of the offered subprotocols,
        and the token itself is never echoed.
        """
        return BEARER_SUBPROTOCOL if BEARER_SUBPROTOCOL in offered else None


class Authenticator(Protocol):
    name: str

    def authenticate(self, credentials: Credentials) -> Principal: ...


class DevAuthenticator:
    """``dev:<tenant>:<principal>[:<role>]`` tokens, trusted as given. For development only.

    Without a role the principal is an ``owner`` of its tenant. The optional role (``owner``,
    ``admin``, ``member``, ``read-only``) lets tests and demos act as a less-privileged
    principal; an unknown role is refused (401).
    """

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
        if len(parts) not in (3, 4) or parts[0] != "dev":
            raise AuthError("malformed token: expected dev:<tenant>:<principal>[:<role>]")
        tenant, principal = parts[1], parts[2]
        if not (is_valid_name(tenant) and is_valid_name(principal)):
            raise AuthError("tenant and principal must be 1-64 characters of A-Z a-z 0-9 _ -")
        if len(parts) == 3:
            return Principal(tenant, principal)
        role = parts[3]
        if not authz.is_known_role(role):
            raise AuthError(f"unknown role in dev token: use one of {authz.ROLE_NAMES}")
        return Principal(tenant, principal, role=role)


def make_authenticator(mode: str, settings: Settings | None = None) -> Authenticator:
    """The authenticator for ``mode``; ValueError (with the fix) on bad configuration."""
    if mode == "dev":
        return DevAuthenticator()
    if mode == "jwt":
        if settings is None:
            raise ValueError("JWT authentication needs the gateway settings (ARQONBUS_JWT_*)")
        from gateway.auth_jwt import JwtAuthenticator  # imports auth: import here, not at top

        return JwtAuthenticator.from_settings(settings)
    raise ValueError(
        "no authentication mode configured: set ARQONBUS_AUTH=jwt (with ARQONBUS_JWT_* keys) "
        "or ARQONBUS_AUTH=dev (or --auth dev) for development"
    )
