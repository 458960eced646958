"""The authenticator a gateway runs: one method, or a chain that picks one by the token's form."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING

from arqonbus_server.gateway.auth.agent import AgentAuthenticator
from arqonbus_server.gateway.auth.base import (
    Authenticator,
    AuthError,
    Credentials,
    DevAuthenticator,
    Principal,
    parse_methods,
    token_method,
)
from arqonbus_server.gateway.auth.jwt import JwtAuthenticator
from arqonbus_server.gateway.auth.keys import ApiKeyAuthenticator

if TYPE_CHECKING:
    from arqonbus_server.gateway.state.security import SecurityState
    from arqonbus_server.shared.settings import Settings


class ChainAuthenticator:
    """Several methods on one gateway: the token's form picks the one that checks it."""

    name = "chain"

    def __init__(self, methods: Mapping[str, Authenticator]) -> None:
        self.methods = dict(methods)

    def authenticate(self, credentials: Credentials) -> Principal | Awaitable[Principal]:
        if not credentials.token:
            raise AuthError(
                "missing credential: send a token in the Authorization header (Bearer), the "
                f"subprotocol 'arqonbus.bearer.<token>' or ?token= (accepted: {self.accepted})"
            )
        method = token_method(credentials.token)
        authenticator = self.methods.get(method)
        if authenticator is None:
            raise AuthError(
                f"this gateway does not accept {method} credentials: use one of {self.accepted}"
            )
        return authenticator.authenticate(credentials)

    @property
    def accepted(self) -> str:
        return ", ".join(self.methods)

    def close(self) -> None:
        for authenticator in self.methods.values():
            close = getattr(authenticator, "close", None)
            if close is not None:
                close()


def make_authenticator(
    mode: str, settings: Settings | None = None, security: SecurityState | None = None
) -> Authenticator:
    """The authenticator for ``mode``; ValueError (with the fix) on bad configuration.

    ``security`` (the gateway's KV-backed state) is needed by ``apikey`` and ``agent``.
    """
    methods = parse_methods(mode)
    if not methods:
        raise ValueError(
            "no authentication mode configured: set ARQONBUS_AUTH to one or more of "
            "jwt, apikey, agent (comma-separated), or dev (--auth dev) for development"
        )
    built: dict[str, Authenticator] = {}
    for method in methods:
        built[method] = _make_one(method, settings, security)
    if len(built) == 1:
        return next(iter(built.values()))
    return ChainAuthenticator(built)


def _make_one(
    method: str, settings: Settings | None, security: SecurityState | None
) -> Authenticator:
    if method == "dev":
        return DevAuthenticator()
    if settings is None:
        raise ValueError(f"{method} authentication needs the gateway settings")
    if method == "jwt":
        return JwtAuthenticator.from_settings(settings)
    if security is None:
        raise ValueError(f"{method} authentication needs the gateway's NATS KV state")
    if method == "apikey":
        keys: Authenticator = ApiKeyAuthenticator(security, settings)
        return keys
    agents: Authenticator = AgentAuthenticator(security, settings)
    return agents
