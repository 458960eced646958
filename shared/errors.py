"""The error catalogue and the server's one exception tree.

Each catalogue entry has a stable ``code`` (part of the wire protocol), a message that
tells a person what to do, and whether retrying the same request can succeed.

Every exception the server raises on purpose derives from :class:`ServerError`, and each
class names the one catalogue entry (``catalogue``) a client sees when it surfaces in a
reply (:func:`as_arqon_error`). The tree::

    ServerError                        root; .catalogue: the code a client would see
    ├── ArqonError                     an error reply to one request (any code below);
    │                                  carries its fields (retry_after_ms, room, ...)
    ├── ConfigError                    a setting is invalid: exit 2 (shared/settings.py)
    │   └── MeshFileError              the operator's mesh file; names every bad key (shared/regions.py)
    ├── InvalidInput (+ValueError)     bad data given to a pure check: invalid_parameters
    │   ├── KeyFormatError, RecordError          shared/apikeys.py
    │   ├── AgentIdentityError                   shared/agent_identity.py
    │   ├── GrantError                           shared/authz.py
    │   ├── PolicyError                          shared/inspect.py
    │   ├── MalformedServiceMessage              shared/service.py
    │   ├── BadHeartbeat                         shared/cluster.py
    │   ├── InvalidKey                           mesh/ports.py
    │   ├── PlacementRecordError                 shared/regions.py: a placement record
    │   ├── RoomRecordError, TenantLimitsError   gateway/state/
    │   └── RegistrationError                    gateway/auth/agent.py
    ├── AuthFailure                    a credential check (gateway/auth/base.py)
    │   ├── AuthError                  refused: HTTP 401, close 4501
    │   └── AuthUnavailable            cannot be checked now: HTTP 503 (unavailable)
    ├── MeshError                      a port of the mesh (mesh/ports.py)
    │   ├── BrokerUnavailable          unavailable (retry)
    │   ├── StoreQuotaExceeded         quota_exceeded
    │   ├── NoResponders               no_responders
    │   ├── RequestTimeout             timeout
    │   ├── KeyExists                  invalid_parameters (carries key, value, revision)
    │   ├── KeyContended, RevisionMismatch   unavailable (retry)
    │   ├── RegionsRefused (+RuntimeError)   mesh/regions.py: provision/failover refused, says why
    │   └── BatchError                 mesh/batch.py: an atomic batch not (known to be) stored: unavailable
    │       ├── BatchPublisherClosed, NoStream
    │       └── BatchRejected          JetStream refused it (code, description): BatchDuplicate,
    │                                  BatchTooLarge, BatchTooManyInflight, BatchIncomplete,
    │                                  AtomicPublishDisabled
    ├── PortInUse (+RuntimeError)      a listener's port is taken (carries host, port, what)
    └── LocalClusterError              the embedded cluster and dev supervisor (mesh/local.py)
        ├── NatsServerNotFound, DataDirInUse, NodeExited, GatewayFailed (+RuntimeError)
        ├── ContainerEngineUnavailable (+RuntimeError)   no engine for NATS in containers
        ├── UnknownNatsBackend (+ValueError)              ARQONBUS_NATS_BACKEND: local or container
        └── ClusterNotReady (+TimeoutError)

Close codes are separate: they end a connection and tell the client whether to
reconnect (4000-4499, 1012) or to stop (4500-4999).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: str
    message: str
    retryable: bool


INVALID_JSON = ErrorCode(
    "invalid_json", "The frame is not valid UTF-8 JSON. Send one JSON object per frame.", False
)
INVALID_ENVELOPE = ErrorCode(
    "invalid_envelope",
    "The envelope is malformed. Check the named field against docs/protocol.md.",
    False,
)
INVALID_NAME = ErrorCode(
    "invalid_name",
    "Room and channel names must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'.",
    False,
)
UNKNOWN_COMMAND = ErrorCode(
    "unknown_command",
    "Use a built-in command (docs/protocol.md lists them), or a service command name of 1-64 "
    "characters of A-Z, a-z, 0-9, '_' or '-' that a service has registered with "
    "register_handler.",
    False,
)
INVALID_PARAMETERS = ErrorCode(
    "invalid_parameters", "A command parameter is invalid. Fix the named parameter.", False
)
MESSAGE_TOO_LARGE = ErrorCode(
    "message_too_large",
    "The envelope exceeds the size limit announced in welcome.limits.max_envelope_bytes. "
    "Send a smaller payload.",
    False,
)
NOT_JOINED = ErrorCode(
    "not_joined", "You are not a member of this channel. Send join_channel first.", False
)
LIMIT_EXCEEDED = ErrorCode(
    "limit_exceeded",
    "A per-connection limit from welcome.limits is reached. Leave a channel or open "
    "another connection.",
    False,
)
UNAVAILABLE = ErrorCode(
    "unavailable",
    "The message store is unreachable right now. Retry with the same id; "
    "it will not be stored twice.",
    True,
)
NO_RESPONDERS = ErrorCode(
    "no_responders",
    "No service has registered a handler for this command on this room and channel. "
    "Start the service (it sends register_handler), then retry.",
    True,
)
TIMEOUT = ErrorCode(
    "timeout",
    "The handler did not answer within timeout_ms. It may still have run the command: "
    "retry only if the command is safe to repeat, or raise timeout_ms.",
    True,
)
NOT_REGISTERED = ErrorCode(
    "not_registered",
    "This connection has no handler registered for that command. Nothing to unregister.",
    False,
)
UNKNOWN_REQUEST = ErrorCode(
    "unknown_request",
    "No command awaits an answer with this request_id on this connection: it was answered "
    "already, or the caller's timeout passed. Answer each delivery once, within timeout_ms.",
    False,
)
# -- authorization (issue 6) --
FORBIDDEN = ErrorCode(
    "forbidden",
    "Your credential's role and grants do not allow this action on this room and channel. "
    "Ask the tenant's administrator for the named permission (a role or a grant such as "
    "ROOM:CHANNEL:PERMISSION), or use a credential that has it.",
    False,
)
# -- content policies (issue 6, shared/inspect.py) --
POLICY_VIOLATION = ErrorCode(
    "policy_violation",
    "The tenant's content policy refuses this payload (the message names the rule). "
    "Remove the refused content, then publish again.",
    False,
)
INVALID_PAYLOAD = ErrorCode(
    "invalid_payload",
    "The payload does not match the JSON Schema the tenant's content policy sets for this "
    "channel or payload type (the message names the field). Fix the field, then publish again.",
    False,
)
# -- rate limits and quotas (issue 6, gateway/state/limits.py) --
MESSAGE_RATE_LIMITED = ErrorCode(
    "rate_limited",
    "This connection or principal sends faster than its rate limit (the limits command shows "
    "them). The frame was not acted on: wait retry_after_ms, then send it again.",
    True,
)
QUOTA_EXCEEDED = ErrorCode(
    "quota_exceeded",
    "The tenant's stored-bytes quota is full: the event was not stored. Retry once older "
    "events expire (stream_max_age_s), or ask the operator to raise ARQONBUS_TENANT_MAX_BYTES.",
    False,
)
# -- private rooms, bans, mutes (issue 6, gateway/state/rooms.py) --
ROOM_KEY_REQUIRED = ErrorCode(
    "room_key_required",
    "This room is private. Join with parameter room_key set to the room's key (ask a room "
    "admin for it), or ask a room admin to invite you with room_invite.",
    False,
)
BANNED = ErrorCode(
    "banned",
    "A room admin banned you from this room: you cannot join, read or publish there. If "
    "retry_after_ms is given the ban ends then; otherwise ask a room admin to run room_unban.",
    False,
)
MUTED = ErrorCode(
    "muted",
    "A room admin muted you in this room: you may still join and read, but not publish. If "
    "retry_after_ms is given the mute ends then; otherwise ask a room admin to run room_unmute.",
    False,
)
# -- room administration (issue 16, gateway/state/admin.py) --
ROOM_EXISTS = ErrorCode(
    "room_exists",
    "The room is configured already. Change it with configure_room, or delete it with "
    "delete_room first.",
    False,
)
ROOM_NOT_FOUND = ErrorCode(
    "room_not_found",
    "The room has no stored events and no settings: there is nothing to act on. Check the "
    "room's name (list_rooms lists the tenant's rooms).",
    False,
)
KICKED = ErrorCode(
    "kicked",
    "A room admin removed you from this room's channels. You may join again; if you are "
    "kept out, ask a room admin why (a ban follows room_ban).",
    False,
)
ROOM_DELETED = ErrorCode(
    "room_deleted",
    "A room admin deleted this room: its events and presence are gone and you were removed "
    "from its channels. Join again to use the room afresh.",
    False,
)
INTERNAL = ErrorCode(
    "internal", "Internal gateway error. Retry with the same id; report it if it persists.", True
)

CATALOGUE: dict[str, ErrorCode] = {
    e.code: e
    for e in (
        INVALID_JSON,
        INVALID_ENVELOPE,
        INVALID_NAME,
        UNKNOWN_COMMAND,
        INVALID_PARAMETERS,
        MESSAGE_TOO_LARGE,
        NOT_JOINED,
        LIMIT_EXCEEDED,
        UNAVAILABLE,
        NO_RESPONDERS,
        TIMEOUT,
        NOT_REGISTERED,
        UNKNOWN_REQUEST,
        FORBIDDEN,
        POLICY_VIOLATION,
        INVALID_PAYLOAD,
        MESSAGE_RATE_LIMITED,
        QUOTA_EXCEEDED,
        ROOM_KEY_REQUIRED,
        BANNED,
        MUTED,
        ROOM_EXISTS,
        ROOM_NOT_FOUND,
        KICKED,
        ROOM_DELETED,
        INTERNAL,
    )
}


@dataclass(frozen=True, slots=True)
class HandshakeRefusal:
    """An HTTP answer instead of a WebSocket upgrade: ``{"error": code, "message": ...}``.

    Not in :data:`CATALOGUE`: these never appear in an ``error`` frame; the client sees
    them as the HTTP status and JSON body of a refused upgrade.
    """

    status: int
    code: str
    message: str


RATE_LIMITED = HandshakeRefusal(
    429,
    "rate_limited",
    "Too many new connections from your address. Wait retry_after_ms (the Retry-After "
    "header, in seconds), then reconnect.",
)


# -- connections per tenant (issue 6, gateway/state/limits.py) --
TENANT_CONNECTIONS = HandshakeRefusal(
    429,
    "limit_exceeded",
    "Your tenant has reached its connection limit (ARQONBUS_MAX_CONNECTIONS_PER_TENANT). "
    "Close a connection of this tenant, or wait retry_after_ms and try again.",
)


# -- Origin allowlist (issue 6) --
FORBIDDEN_ORIGIN = HandshakeRefusal(
    403,
    "forbidden_origin",
    "This gateway does not accept WebSocket connections from this page's origin. Open the app "
    "from an allowed origin, or ask the operator to add it to ARQONBUS_ALLOWED_ORIGINS.",
)


class ServerError(Exception):
    """Root of every exception the server raises on purpose (the tree is drawn above).

    ``catalogue`` is the one error a client sees when this surfaces in a reply.
    """

    catalogue: ClassVar[ErrorCode] = INTERNAL


class ArqonError(ServerError):
    """An error reply to one request. The connection stays open.

    ``fields`` are sent in the error frame's payload beside ``code`` and ``message``:
    ``retry_after_ms``, ``room``, ``channels``, ``max_envelope_bytes``, ...
    """

    def __init__(
        self,
        error: ErrorCode,
        detail: str | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> None:
        self.error = error
        self.detail = detail
        self.request_id = request_id
        self.fields: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
        super().__init__(self.message)

    @property
    def catalogue(self) -> ErrorCode:  # type: ignore[override]
        return self.error

    @property
    def code(self) -> str:
        return self.error.code

    @property
    def retry_after_ms(self) -> int | None:
        value = self.fields.get("retry_after_ms")
        return value if isinstance(value, int) else None

    @property
    def message(self) -> str:
        if self.detail:
            # A detail may end in its own punctuation ("...; did you mean history?").
            stop = "" if self.detail.endswith((".", "?", "!")) else "."
            return f"{self.detail}{stop} {self.error.message}"
        return self.error.message

    def with_request_id(self, request_id: str | None) -> ArqonError:
        return ArqonError(self.error, self.detail, request_id, **self.fields)

    def with_fields(self, fields: Mapping[str, Any]) -> ArqonError:
        return ArqonError(self.error, self.detail, self.request_id, **{**self.fields, **fields})


class InvalidInput(ServerError, ValueError):
    """Bad data given to a pure check; the message names what to fix."""

    catalogue = INVALID_PARAMETERS


class PortInUse(ServerError, RuntimeError):
    """A port a listener needs (a gateway's, a local NATS node's) is taken by another process."""

    def __init__(self, host: str, port: int, what: str, hint: str) -> None:
        self.host = host
        self.port = port
        self.what = what
        super().__init__(f"{host}:{port} ({what}) is already in use. {hint}")


class LocalClusterError(ServerError):
    """The embedded NATS cluster or the dev supervisor could not do what was asked."""


def as_arqon_error(exc: ServerError, request_id: str | None = None) -> ArqonError:
    """The reply a client gets for ``exc``: its catalogue entry, with its message as detail."""
    if isinstance(exc, ArqonError):
        return exc.with_request_id(request_id or exc.request_id)
    return ArqonError(exc.catalogue, str(exc) or None, request_id)


class CloseCode(IntEnum):
    """WebSocket close codes the gateway sends, and what a client should do."""

    NORMAL = 1000
    MESSAGE_TOO_BIG = 1009
    KEEPALIVE_TIMEOUT = 1011  # no frame came back after a ping: taken for dead; resume
    SERVICE_RESTART = 1012  # node draining: reconnect to another gateway and resume
    TRY_AGAIN_LATER = 1013  # too many unauthenticated connections from this address
    SLOW_CONSUMER = 4001  # send buffer overflowed: reconnect and resume from last seq
    BACKEND_UNAVAILABLE = 4002  # node lost the message store: reconnect elsewhere, resume
    IDLE_TIMEOUT = 4003  # no message for idle_timeout_s: reconnect (and resume) when needed
    TOKEN_EXPIRED = 4004  # the credential expired: get a fresh one, reconnect and resume
    TOO_MANY_CONNECTIONS = 4005  # the tenant is at max_connections_per_tenant: retry later
    # The credential (an API key, an agent) was revoked: do not reconnect with it (fatal).
    CREDENTIAL_REVOKED = 4500
    # First-message auth (ARQONBUS_AUTH_MESSAGE_TIMEOUT_S): fatal, the same credential or
    # client bug would fail again.
    AUTH_FAILED = 4501  # the auth frame's credential was refused: fix it, do not retry as is
    AUTH_TIMEOUT = 4502  # no auth frame within timeout_ms of auth_required: a client bug

    @property
    def should_reconnect(self) -> bool:
        return self in (
            CloseCode.KEEPALIVE_TIMEOUT,
            CloseCode.SERVICE_RESTART,
            CloseCode.TRY_AGAIN_LATER,
        ) or (4000 <= self <= 4499)
