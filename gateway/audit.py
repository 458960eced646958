"""Security events to a per-tenant audit stream.

Sessions, the handshake and the admin commands call :meth:`AuditLog.record`; it never
blocks and never raises: events queue (bounded) and a background task writes them to
JetStream. No secret is ever recorded: callers pass identifiers (principal, key id,
agent id), never tokens, keys or signatures, and ``record`` drops fields whose names
say they hold one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mesh.jetstream import JetStreamBroker

log = logging.getLogger("arqonbus.gateway.audit")

# Event types (``--type`` of ``arqonbus audit``).
AUTH_FAILED = "auth_failed"
FORBIDDEN = "forbidden"
KEY_CREATED = "key_created"
KEY_REVOKED = "key_revoked"
AGENT_REGISTERED = "agent_registered"
ADMIN_ACTION = "admin_action"
POLICY_BLOCKED = "policy_blocked"
RATE_LIMITED = "rate_limited"


class AuditLog:
    """Placeholder until the audit stream lands: logs events at INFO."""

    def __init__(self, broker: JetStreamBroker | None, prefix: str, node_id: str = "") -> None:
        self._broker = broker
        self._prefix = prefix
        self._node_id = node_id

    def record(self, tenant: str, type_: str, principal: str = "", **details: Any) -> None:
        log.info("audit %s %s %s %s", tenant, type_, principal, details)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
