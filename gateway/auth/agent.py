"""Ed25519 agent identity: sign-in with a single-use nonce, registration, revocation.

An agent signs ``(agent id, nonce, timestamp)`` with its private key (shared/agent_identity.py).
The gateway checks, in order: the token's form, the agent's record (the watched copy of
the agents KV bucket: unknown or revoked is refused), the timestamp (within
``agent_clock_skew_s``), the signature against the registered public key, and last the
nonce: it must have been issued by a gateway (``kv.create(nonce, "issued")`` in the
nonces bucket, whose entries expire after NONCE_TTL_S) and is consumed with a
compare-and-set (``kv.update(nonce, "used", revision)``), so of any number of
gateways that see the same token exactly one accepts it (mesh/ports.py: KVBucket).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from arqonbus_server.gateway.auth.base import AuthError, AuthUnavailable, Credentials, Principal
from arqonbus_server.mesh.ports import (
    BrokerUnavailable,
    KeyContended,
    KeyExists,
    KVBucket,
    RevisionMismatch,
)
from arqonbus_server.shared import authz, subjects
from arqonbus_server.shared.agent_identity import (
    AgentIdentityError,
    AgentRecord,
    b64url,
    is_agent_id,
    new_agent_id,
    new_nonce,
    parse_public_key,
    parse_token,
    verify,
)
from arqonbus_server.shared.errors import InvalidInput

if TYPE_CHECKING:
    from arqonbus_server.gateway.state.security import SecurityState
    from arqonbus_server.shared.settings import Settings

log = logging.getLogger("arqonbus.gateway.auth_agent")

NONCE_ISSUED = b"issued"
NONCE_USED = b"used"
NONCE_REFUSED = "nonce unknown, expired or already used: get a new one"
# Bound on each NATS round trip of a sign-in (nonce get and update).
_NATS_TIMEOUT_S = 5.0
# The state store's answers about a key (as opposed to the store failing to answer).
KeyExistsError = KeyExists
KeyContendedError = KeyContended


async def issue_nonce(security: SecurityState) -> str:
    """A fresh single-use nonce, stored as issued (AuthUnavailable when NATS cannot store it)."""
    nonce = new_nonce()
    try:
        async with asyncio.timeout(_NATS_TIMEOUT_S):
            kv = await security.nonces()
            await kv.create(nonce, NONCE_ISSUED)
    except Exception as exc:
        raise AuthUnavailable(
            "cannot issue a nonce now (message store unreachable): retry, or use another gateway"
        ) from exc
    return nonce


async def consume_nonce(security: SecurityState, nonce: str) -> None:
    """Mark ``nonce`` used, once across all gateways; AuthError if it cannot be."""
    try:
        async with asyncio.timeout(_NATS_TIMEOUT_S):
            kv = await security.nonces()
            entry = await kv.get(nonce)
            if entry is None or entry.value != NONCE_ISSUED:
                raise AuthError(NONCE_REFUSED)
            # Compare-and-set on the revision read: of concurrent consumers only one wins.
            await kv.update(nonce, NONCE_USED, entry.revision)
    except AuthError:
        raise
    except RevisionMismatch:
        raise AuthError(NONCE_REFUSED) from None
    except Exception as exc:
        raise AuthUnavailable(
            "cannot check the nonce now (message store unreachable): get a new nonce and retry"
        ) from exc


class AgentAuthenticator:
    """``ed25519:`` tokens of registered agents (see the module docstring)."""

    name = "agent"

    def __init__(self, security: SecurityState, settings: Settings) -> None:
        self.security = security
        self.clock_skew_s = float(getattr(settings, "agent_clock_skew_s", 30.0))

    def authenticate(self, credentials: Credentials) -> Any:
        token = credentials.token
        if not token:
            raise AuthError("missing token: send an agent token ed25519:<agent_id>:...")
        try:
            parsed = parse_token(token)
        except AgentIdentityError as exc:
            raise AuthError(str(exc)) from None
        return self._authenticate(parsed)

    async def _authenticate(self, token: Any) -> Principal:
        agents = self.security.agents
        if not await self.security.wait_ready(agents):
            raise AuthUnavailable("agent identities are not loaded yet: retry shortly")
        raw = agents.get(token.agent_id)
        if raw is None and await agents.caught_up():  # registered a moment ago elsewhere?
            raw = agents.get(token.agent_id)
        if raw is None:
            raise AuthError("unknown agent: register it first (arqonbus agents register)")
        try:
            record = AgentRecord.from_json(raw)
        except AgentIdentityError:
            log.error("agent record %s is malformed", token.agent_id)
            raise AuthError("unknown agent: register it first (arqonbus agents register)") from None
        if record.agent_id != token.agent_id:  # stored under another agent's id: refuse
            log.error("agent record %s names another agent id", token.agent_id)
            raise AuthError("unknown agent: register it first (arqonbus agents register)")
        if record.revoked:
            raise AuthError(
                "this agent was revoked: register a new key",
                tenant=record.tenant,
                credential_id=record.agent_id,
            )
        skew = abs(time.time() - token.timestamp)
        if skew > self.clock_skew_s:
            raise AuthError(
                f"timestamp is {skew:.0f} s off the gateway's clock (at most "
                f"{self.clock_skew_s:g} s): sync the clock, get a new nonce and sign again",
                tenant=record.tenant,
                credential_id=record.agent_id,
            )
        if not verify(record.public_key_bytes, token):
            raise AuthError(
                "bad signature: sign the message with the agent's registered private key",
                tenant=record.tenant,
                credential_id=record.agent_id,
            )
        try:
            await consume_nonce(self.security, token.nonce)
        except AuthError as exc:
            raise AuthError(str(exc), record.tenant, record.agent_id) from None
        return Principal(
            record.tenant,
            record.agent_id,
            role=record.role,
            grants=record.grants,
            method="agent",
            credential_id=record.agent_id,
        )


# -- registration -----------------------------------------------------------------------


class RegistrationError(InvalidInput):
    """A registration request is invalid; the message says what to fix."""


def records(items: Iterable[tuple[str, bytes]]) -> list[AgentRecord]:
    """The agent records among KV items (malformed ones are skipped)."""
    out = []
    for key, raw in items:
        if not is_agent_id(key):
            continue
        try:
            out.append(AgentRecord.from_json(raw))
        except AgentIdentityError:
            log.warning("skipping malformed agent record %s", key)
    return out


def new_record(
    tenant: str,
    name: str,
    public_key: str | bytes,
    role: str = "member",
    grants: Iterable[str] = (),
    existing: Iterable[AgentRecord] = (),
) -> AgentRecord:
    """A new agent record, validated; RegistrationError names the bad field.

    A public key may be registered once per tenant (revoked agents included: register a
    new key after a revocation).
    """
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or not name.isprintable():
        raise RegistrationError("name must be 1-128 printable characters")
    try:
        key = b64url(parse_public_key(public_key))
    except (AgentIdentityError, ValueError) as exc:
        raise RegistrationError(f"public_key: {exc}") from None
    if not authz.is_known_role(role):
        raise RegistrationError(f"unknown role {role[:64]!r}: use one of {authz.ROLE_NAMES}")
    grant_list = tuple(grants)
    try:
        authz.parse_grants(grant_list)
    except authz.GrantError as exc:
        raise RegistrationError(str(exc)) from None
    for other in existing:
        if other.tenant == tenant and other.public_key == key:
            raise RegistrationError(
                f"this public key is already registered in tenant {tenant} (agent "
                f"{other.agent_id}): generate a new key pair for a new agent"
            )
    return AgentRecord(
        agent_id=new_agent_id(),
        tenant=tenant,
        name=name,
        public_key=key,
        role=role,
        grants=grant_list,
        created_at=time.time(),
    )


def public_key_index(tenant: str, public_key: str) -> str:
    """The KV key that reserves a public key within a tenant (one agent per key)."""
    digest = hashlib.sha256(public_key.encode()).hexdigest()
    return f"pubkey.{tenant}.{digest}"


async def store_new(kv: KVBucket, record: AgentRecord) -> None:
    """Store a new agent. The key's index entry is created first, atomically: of any number
    of registrations of one key at once (on any gateways or CLIs) exactly one succeeds, and
    every other one gets RegistrationError (KVBucket.create names the winner)."""
    try:
        await kv.create(
            public_key_index(record.tenant, record.public_key), record.agent_id.encode()
        )
    except KeyExists as exc:
        owner = exc.value.decode(errors="replace")
        agent = f" (agent {owner})" if is_agent_id(owner) else ""
        raise RegistrationError(
            f"this public key is already registered in tenant {record.tenant}{agent}: generate "
            "a new key pair for a new agent"
        ) from None
    await kv.create(record.agent_id, record.to_json())


async def revoke(kv: KVBucket, tenant: str, agent_id: str) -> AgentRecord:
    """Mark an agent revoked (kept for the record); RegistrationError if not in ``tenant``."""
    entry = await kv.get(agent_id)
    if entry is None:
        raise RegistrationError(f"no agent {agent_id} in tenant {tenant}")
    record = AgentRecord.from_json(entry.value)
    if record.tenant != tenant:
        raise RegistrationError(f"no agent {agent_id} in tenant {tenant}")
    if record.revoked:
        return record
    revoked = AgentRecord(
        record.agent_id,
        record.tenant,
        record.name,
        record.public_key,
        record.role,
        record.grants,
        record.created_at,
        time.time(),
    )
    await kv.update(agent_id, revoked.to_json(), entry.revision)
    return revoked


def registration_parameters(parameters: dict[str, Any]) -> tuple[str, str, str]:
    """``register_agent``'s (public_key, name, role), shape-checked; RegistrationError if not."""
    public_key = parameters.get("public_key")
    name = parameters.get("name")
    role = parameters.get("role", "member")
    if not isinstance(public_key, str):
        raise RegistrationError("parameter 'public_key' must be base64url text (32 raw bytes)")
    if not isinstance(name, str):
        raise RegistrationError("parameter 'name' must be a string")
    if not isinstance(role, str):
        raise RegistrationError("parameter 'role' must be a role name")
    return public_key, name, role


async def register_from_session(
    security: SecurityState, tenant: str, caller_role: str, parameters: dict[str, Any]
) -> AgentRecord:
    """The ``register_agent`` command: into the caller's tenant; never above the caller's role."""
    public_key, name, role = registration_parameters(parameters)
    if not authz.may_give_role(caller_role, role):
        raise RegistrationError(
            f"a {caller_role} may register agents of its own role or lower, not {role!r}"
        )
    if not await security.wait_ready(security.agents):
        raise BrokerUnavailable("agent identities are not loaded yet")
    record = new_record(tenant, name, public_key, role, (), records(security.agents.items()))
    kv = await security.state.bucket(subjects.KV_AGENTS)
    try:
        async with asyncio.timeout(_NATS_TIMEOUT_S):
            await store_new(kv, record)
    except RegistrationError:
        raise
    except Exception as exc:
        raise BrokerUnavailable(f"could not store agent {record.agent_id}: {exc}") from exc
    return record


def revoked_agent_id(key: str, value: bytes | None) -> str | None:
    """The agent id an AGENTS change revokes (record revoked or deleted), else None."""
    if not is_agent_id(key):
        return None
    if value is None:
        return key
    try:
        record = AgentRecord.from_json(value)
    except AgentIdentityError:
        return key  # fail closed: a record that does not parse ends the agent's sessions
    # A record under another agent's key is not this agent's: treat it as gone.
    return key if record.revoked or record.agent_id != key else None
