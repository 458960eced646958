"""Credentials -> Principal. One interface, several methods.

Methods: ``dev`` tokens (development only), ``jwt`` bearer tokens (gateway/auth/jwt.py),
``apikey`` service-account keys (gateway/auth/keys.py) and ``agent`` Ed25519 agent
identity (gateway/auth/agent.py). The gateway enables a comma-separated list of them
(``ARQONBUS_AUTH=jwt,apikey,agent``); :class:`ChainAuthenticator` picks the method from
the credential's form. The tenant and the principal come only from the credential,
never from envelopes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

from arqonbus_server.shared import authz
from arqonbus_server.shared.errors import INVALID_PARAMETERS, UNAVAILABLE, ServerError
from arqonbus_server.shared.settings import AUTH_METHODS
from arqonbus_server.shared.subjects import is_valid_name

if TYPE_CHECKING:
    pass

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
    # How it signed in (dev, jwt, apikey, agent) and which credential it used: the API
    # key id or the agent id (a revoke closes the sessions that used it); never a secret.
    method: str = "dev"
    credential_id: str = ""


class AuthFailure(ServerError):
    """A credential check did not let the connection in (the subclasses say why)."""


class AuthError(AuthFailure):
    """The handshake carries no valid credential (HTTP 401; in refresh_token,
    invalid_parameters).

    ``tenant`` and ``credential_id`` name whose credential failed, when the credential
    identifies a known tenant (for the audit stream); never a secret.
    """

    catalogue = INVALID_PARAMETERS

    def __init__(self, message: str, tenant: str = "", credential_id: str = "") -> None:
        super().__init__(message)
        self.tenant = tenant
        self.credential_id = credential_id


class AuthUnavailable(AuthFailure):
    """The credential cannot be checked right now (HTTP 503): retry, or another gateway."""

    catalogue = UNAVAILABLE


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
    """``authenticate`` returns the principal, or an awaitable of it when the check needs
    NATS (an agent's single-use nonce); it raises AuthError or AuthUnavailable."""

    name: str

    def authenticate(self, credentials: Credentials) -> Principal | Awaitable[Principal]: ...


async def check_credentials(authenticator: Authenticator, credentials: Credentials) -> Principal:
    """``authenticator.authenticate``, awaited when the method needs NATS."""
    outcome = authenticator.authenticate(credentials)
    if inspect.isawaitable(outcome):
        return await outcome
    return outcome


# Token forms, by method. Anything else is taken for a JWT.
DEV_TOKEN_PREFIX = "dev:"
API_KEY_PREFIX = "arqk_"
AGENT_TOKEN_PREFIX = "ed25519:"
METHODS = AUTH_METHODS


def token_method(token: str) -> str:
    """The method a token is for, from its form alone."""
    if token.startswith(DEV_TOKEN_PREFIX):
        return "dev"
    if token.startswith(API_KEY_PREFIX):
        return "apikey"
    if token.startswith(AGENT_TOKEN_PREFIX):
        return "agent"
    return "jwt"


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
            return Principal(tenant, principal, method="dev")
        role = parts[3]
        if not authz.is_known_role(role):
            raise AuthError(f"unknown role in dev token: use one of {authz.ROLE_NAMES}")
        return Principal(tenant, principal, role=role, method="dev")


def parse_methods(mode: str) -> list[str]:
    """``ARQONBUS_AUTH``: a comma-separated list of methods, in no particular order."""
    methods = [m.strip() for m in mode.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown authentication method(s) {unknown}: use {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))
