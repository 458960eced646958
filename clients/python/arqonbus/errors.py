"""Exceptions raised by the ArqonBus SDK.

Every exception the SDK raises for the bus is an :class:`ArqonBusError` (misuse of the API
raises ``ValueError`` or ``TypeError``, as usual in Python). The tree::

    ArqonBusError
    ├── errors the gateway sends (``error`` frames, ``command_response`` errors);
    │   the wire ``code`` in brackets
    │   ├── InvalidJson          [invalid_json]
    │   ├── InvalidEnvelope      [invalid_envelope]   also raised before sending a bad id
    │   ├── InvalidName          [invalid_name]
    │   ├── UnknownCommand       [unknown_command]
    │   ├── InvalidParameters    [invalid_parameters]
    │   ├── MessageTooLarge      [message_too_large]  also raised before sending
    │   ├── NotJoined            [not_joined]
    │   ├── NotRegistered        [not_registered]
    │   ├── LimitExceeded        [limit_exceeded]
    │   ├── Unavailable          [unavailable]        retryable
    │   ├── Internal             [internal]           retryable
    │   ├── NoResponders         [no_responders]      retryable
    │   ├── Timeout              [timeout]            retryable; also the SDK's own timeouts
    │   ├── UnknownRequest       [unknown_request]
    │   ├── Forbidden            [forbidden]
    │   ├── PolicyViolation      [policy_violation]
    │   ├── InvalidPayload       [invalid_payload]
    │   ├── RateLimited          [rate_limited]       retryable, retry_after_ms
    │   ├── QuotaExceeded        [quota_exceeded]
    │   ├── RoomKeyRequired      [room_key_required]
    │   ├── Banned               [banned]             room, channels, retry_after_ms
    │   ├── Muted                [muted]              room, retry_after_ms
    │   ├── RoomExists           [room_exists]        create_room of a configured room
    │   ├── RoomNotFound         [room_not_found]     delete_room of an unknown room
    │   ├── Kicked               [kicked]             pushed: room, channels, reason
    │   ├── RoomDeleted          [room_deleted]       pushed: room, channels
    │   └── CommandFailed        [a handler's own code]
    └── errors of the connection (raised by the SDK itself)
        ├── ConnectionLost       [connection_lost]    retryable
        ├── ConnectionFailed     [connection_failed]  retryable, refusals
        ├── AuthenticationError  [unauthorized]
        ├── ConnectionRejected   [connection_rejected] close_code
        └── ClientClosed         [client_closed]

Every :class:`ArqonBusError` carries its fields as attributes:

``code``
    The stable error code. For server errors it is the wire code (``invalid_name``,
    ``unavailable``, ...). Errors the SDK raises by itself have their own codes
    (``connection_lost``, ``connection_failed``, ``unauthorized``, ...).
``message``
    Text for people. Do not parse it.
``request_id``
    The ``id`` of the request it answers, when there is one.
``retryable``
    Whether sending the same request again can succeed.
``retry_after_ms``
    How long the gateway asked to wait before sending again (``rate_limited``, a timed
    ``banned`` or ``muted``); 0 when it did not say.
``room``, ``channels``
    The room (and, for a ban that removed the connection, its channels) the gateway named;
    ``None`` and ``()`` when it named none.

Server errors map one-to-one onto subclasses (see :data:`ERROR_CLASSES`). A code the SDK
does not know, for example one a service handler made up, becomes :class:`CommandFailed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ERROR_CLASSES",
    "ArqonBusError",
    "AuthenticationError",
    "Banned",
    "ClientClosed",
    "CommandFailed",
    "ConnectionFailed",
    "ConnectionLost",
    "ConnectionRejected",
    "Forbidden",
    "HandshakeRefusal",
    "Internal",
    "InvalidEnvelope",
    "InvalidJson",
    "InvalidName",
    "InvalidParameters",
    "InvalidPayload",
    "Kicked",
    "LimitExceeded",
    "MessageTooLarge",
    "Muted",
    "NoResponders",
    "NotJoined",
    "NotRegistered",
    "PolicyViolation",
    "QuotaExceeded",
    "RateLimited",
    "RoomDeleted",
    "RoomExists",
    "RoomKeyRequired",
    "RoomNotFound",
    "Timeout",
    "Unavailable",
    "UnknownCommand",
    "UnknownRequest",
    "error_from_wire",
]


class ArqonBusError(Exception):
    """Base class of every SDK exception."""

    default_code: ClassVar[str] = "error"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
        retry_after_ms: int = 0,
        room: str | None = None,
        channels: tuple[str, ...] = (),
        event_index: int | None = None,
        event_id: str | None = None,
    ) -> None:
        self.code: str = code or self.default_code
        self.message: str = message
        self.request_id: str | None = request_id
        self.retryable: bool = self.default_retryable if retryable is None else retryable
        self.retry_after_ms: int = retry_after_ms
        self.room: str | None = room
        self.channels: tuple[str, ...] = channels
        # A refused batch (publish_many): the place and id of the event that refused it.
        self.event_index: int | None = event_index
        self.event_id: str | None = event_id
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"request_id={self.request_id!r}, retryable={self.retryable!r})"
        )


# -- errors the gateway sends -------------------------------------------------------------


class InvalidJson(ArqonBusError):
    """The gateway could not parse a frame as UTF-8 JSON."""

    default_code = "invalid_json"


class InvalidEnvelope(ArqonBusError):
    """A field of the envelope is malformed (for example an ``id`` the SDK was given)."""

    default_code = "invalid_envelope"


class InvalidName(ArqonBusError):
    """A room or channel name breaks the rules: 1-64 characters of ``A-Za-z0-9_-``."""

    default_code = "invalid_name"


class UnknownCommand(ArqonBusError):
    """The command name is neither built-in nor a valid service command name."""

    default_code = "unknown_command"


class InvalidParameters(ArqonBusError):
    """A command parameter is invalid (``since_seq``, ``limit``, ``timeout_ms``, ...)."""

    default_code = "invalid_parameters"


class MessageTooLarge(ArqonBusError):
    """The envelope exceeds ``welcome.limits.max_envelope_bytes``."""

    default_code = "message_too_large"


class NotJoined(ArqonBusError):
    """``leave_channel`` for a channel this connection is not a member of."""

    default_code = "not_joined"


class NotRegistered(ArqonBusError):
    """``unregister_handler`` for a command this connection has not registered."""

    default_code = "not_registered"


class LimitExceeded(ArqonBusError):
    """A per-connection limit from ``welcome.limits`` was reached."""

    default_code = "limit_exceeded"


class Unavailable(ArqonBusError):
    """The store or the handler's connection was not available. Retry (same ``id`` for events)."""

    default_code = "unavailable"
    default_retryable = True


class Internal(ArqonBusError):
    """An unexpected failure in the gateway or in a service handler."""

    default_code = "internal"
    default_retryable = True


class NoResponders(ArqonBusError):
    """No connection has registered a handler for this service command."""

    default_code = "no_responders"
    default_retryable = True


class Timeout(ArqonBusError):
    """No answer in time.

    The outcome is unknown: the event may have been stored, the command may have run. For a
    publish, publish again with the **same** ``id``: if it was stored, the ack says
    ``duplicate=True`` and carries the original ``seq``. Retry a command only if it is safe to
    repeat.
    """

    default_code = "timeout"
    default_retryable = True


class UnknownRequest(ArqonBusError):
    """A handler answered a delivery that no longer awaits an answer."""

    default_code = "unknown_request"


class Forbidden(ArqonBusError):
    """The token's role and grants lack the permission for this action on this channel.

    The message names the missing permission and the room and channel. Retrying with the same
    token cannot succeed: ask for a role or grant that has the permission.
    """

    default_code = "forbidden"


# -- content policies (issue 6) --


class PolicyViolation(ArqonBusError):
    """The tenant's content policy refused the payload; the message names the rule.

    Nothing was stored. Sending the same payload again gets the same answer.
    """

    default_code = "policy_violation"


class InvalidPayload(ArqonBusError):
    """The payload fails the JSON Schema the content policy sets for this channel or type.

    The message names the field and the failed keyword (never the value). Fix the payload.
    """

    default_code = "invalid_payload"


# -- rate limits and quotas (issue 6) --


class RateLimited(ArqonBusError):
    """The connection or its principal exceeded a rate limit; the frame was not acted on.

    ``retry_after_ms`` says how long to wait before sending it again (the same ``id``).
    """

    default_code = "rate_limited"
    default_retryable = True


class QuotaExceeded(ArqonBusError):
    """The tenant's stored-bytes quota is full: the event was not stored."""

    default_code = "quota_exceeded"


# -- private rooms, bans, mutes (issue 6) --


class RoomKeyRequired(ArqonBusError):
    """The room is private: join with ``room_key`` set to its key, or get invited."""

    default_code = "room_key_required"


class Banned(ArqonBusError):
    """A room admin banned this principal from the room (join, read and publish refused).

    The gateway may also push this error without a request (``request_id`` None) when a ban
    removes the connection from the room's channels (``room``, ``channels``). A timed ban
    says when it ends in ``retry_after_ms``.
    """

    default_code = "banned"


class Muted(ArqonBusError):
    """A room admin muted this principal in the room: reading works, publishing does not.

    ``room`` names the room; ``retry_after_ms`` says when a timed mute ends.
    """

    default_code = "muted"


# -- room administration (issue 16) --


class RoomExists(ArqonBusError):
    """``create_room`` of a room that is configured already: use ``configure_room``."""

    default_code = "room_exists"


class RoomNotFound(ArqonBusError):
    """``delete_room`` of a room with no stored events and no settings: nothing to delete."""

    default_code = "room_not_found"


class Kicked(ArqonBusError):
    """A room admin kicked this principal from the room; pushed without a request.

    The connection left ``channels`` of ``room``; their subscriptions end with this error.
    Joining again is allowed (a kick is not a ban). ``reason`` is the admin's reason, or "".
    """

    default_code = "kicked"

    def __init__(self, message: str = "", *, reason: str = "", **fields: Any) -> None:
        super().__init__(message, **fields)
        self.reason: str = reason


class RoomDeleted(ArqonBusError):
    """A room admin deleted the room (its events and presence); pushed without a request.

    The connection left ``channels`` of ``room``; their subscriptions end with this error.
    """

    default_code = "room_deleted"


class CommandFailed(ArqonBusError):
    """A service handler answered with an error of its own ``code``.

    Raise it from a handler to answer with that error::

        raise CommandFailed("pool_exhausted", "all connections are busy", retryable=True)

    ``code`` must be a valid name (1-64 characters of ``A-Za-z0-9_-``); ``message`` is cut to
    1024 characters.
    """

    default_code = "command_failed"

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        retryable: bool = False,
        request_id: str | None = None,
        retry_after_ms: int = 0,
        room: str | None = None,
        channels: tuple[str, ...] = (),
    ) -> None:
        super().__init__(
            message,
            code=code,
            request_id=request_id,
            retryable=retryable,
            retry_after_ms=retry_after_ms,
            room=room,
            channels=channels,
        )


# -- errors of the connection -------------------------------------------------------------


class ConnectionLost(ArqonBusError):
    """The connection dropped while the call was pending.

    Raised for commands, which are not idempotent, so the SDK does not resend them. Publishes
    and the SDK's own idempotent calls (joins, history pages) are retried internally instead.
    """

    default_code = "connection_lost"
    default_retryable = True


@dataclass(frozen=True, slots=True)
class HandshakeRefusal:
    """A gateway's HTTP answer instead of the WebSocket upgrade, e.g. ``503`` while it starts.

    ``code`` and ``message`` come from the gateway's JSON body (``unavailable``, ``starting:
    the security state is not loaded yet; ...``); each is ``""`` when the body had none.
    """

    status: int
    code: str
    message: str


class ConnectionFailed(ArqonBusError):
    """:meth:`Client.connect` could not reach any gateway within ``connect_timeout``.

    The message gives each URL's last reason. ``refusals`` maps each URL whose last attempt
    the gateway refused at the HTTP level (503 while starting, draining or cut off from NATS;
    429) to that :class:`HandshakeRefusal`.
    """

    default_code = "connection_failed"
    default_retryable = True

    def __init__(
        self,
        message: str = "",
        *,
        refusals: Mapping[str, HandshakeRefusal] | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, code=code, request_id=request_id, retryable=retryable)
        self.refusals: dict[str, HandshakeRefusal] = dict(refusals or {})


class AuthenticationError(ArqonBusError):
    """The gateway refused the token (HTTP 401). Do not retry with the same token."""

    default_code = "unauthorized"


class ConnectionRejected(ArqonBusError):
    """The gateway closed the connection with a code in 4500-4999: do not reconnect."""

    default_code = "connection_rejected"

    def __init__(self, message: str = "", *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class ClientClosed(ArqonBusError):
    """The client was closed (or never connected) when the call was made or while it waited."""

    default_code = "client_closed"


ERROR_CLASSES: dict[str, type[ArqonBusError]] = {
    cls.default_code: cls
    for cls in (
        InvalidJson,
        InvalidEnvelope,
        InvalidName,
        UnknownCommand,
        InvalidParameters,
        MessageTooLarge,
        NotJoined,
        NotRegistered,
        LimitExceeded,
        Unavailable,
        Internal,
        NoResponders,
        Timeout,
        UnknownRequest,
        Forbidden,
        PolicyViolation,
        InvalidPayload,
        RoomKeyRequired,
        Banned,
        Muted,
        RateLimited,
        QuotaExceeded,
        RoomExists,
        RoomNotFound,
        Kicked,
        RoomDeleted,
    )
}
"""The server error codes of protocol v1 and their exception classes."""


def error_from_wire(error: Any, request_id: str | None = None) -> ArqonBusError:
    """The exception for an ``error`` payload or a ``command_response`` ``error`` object."""
    if not isinstance(error, dict):
        return Internal(f"malformed error from the gateway: {error!r}", request_id=request_id)
    code = error.get("code")
    message = error.get("message")
    retryable = error.get("retryable")
    code = code if isinstance(code, str) and code else "internal"
    message = message if isinstance(message, str) else ""
    retry = retryable if isinstance(retryable, bool) else None
    wait, room, channels = error.get("retry_after_ms"), error.get("room"), error.get("channels")
    index, event_id = error.get("index"), error.get("event_id")
    fields: dict[str, Any] = {
        "request_id": request_id,
        "retry_after_ms": wait if isinstance(wait, int) and not isinstance(wait, bool) else 0,
        "room": room if isinstance(room, str) else None,
        "channels": tuple(c for c in channels if isinstance(c, str))
        if isinstance(channels, list)
        else (),
    }
    cls = ERROR_CLASSES.get(code)
    if cls is None:  # a handler's own error: never about a batch
        return CommandFailed(code, message, retryable=bool(retry), **fields)
    if isinstance(index, int) and not isinstance(index, bool):  # one event refused a batch
        fields["event_index"] = index
        fields["event_id"] = event_id if isinstance(event_id, str) else None
    if cls is Kicked:
        reason = error.get("reason")
        return Kicked(message, retryable=retry, reason=_text(reason), **fields)
    return cls(message, retryable=retry, **fields)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
