"""Built-in command names and their parameters, validated as plain data."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from arqonbus_server.shared.errors import (
    INVALID_PARAMETERS,
    NO_RESPONDERS,
    UNKNOWN_COMMAND,
    ArqonError,
)
from arqonbus_server.shared.subjects import is_valid_name

JOIN_CHANNEL = "join_channel"
LEAVE_CHANNEL = "leave_channel"
HISTORY = "history"
REGISTER_HANDLER = "register_handler"
UNREGISTER_HANDLER = "unregister_handler"
LIMITS = "limits"  # rate limits and usage of this connection (gateway/state/limits.py)
# -- private rooms, bans, mutes (gateway/state/rooms.py): each needs `admin` on the envelope's
# room and channel (send them on any channel of the room) --
ROOM_CONFIGURE = "room_configure"
ROOM_INVITE = "room_invite"
ROOM_UNINVITE = "room_uninvite"
ROOM_BAN = "room_ban"
ROOM_UNBAN = "room_unban"
ROOM_MUTE = "room_mute"
ROOM_UNMUTE = "room_unmute"
ROOM_INFO = "room_info"
ROOM_ADMIN_COMMANDS = (
    ROOM_CONFIGURE,
    ROOM_INVITE,
    ROOM_UNINVITE,
    ROOM_BAN,
    ROOM_UNBAN,
    ROOM_MUTE,
    ROOM_UNMUTE,
    ROOM_INFO,
)
# -- agent identity and token refresh (gateway/auth/agent.py, session.py) --
REGISTER_AGENT = "register_agent"  # needs admin on the command's room/channel
REFRESH_TOKEN = "refresh_token"  # no permission: the new token must be the same principal's
# -- presence (gateway/state/presence.py, shared/presence.py) --
PRESENCE = "presence"  # a page of the channel's members
OCCUPANCY = "occupancy"  # the channel's member counts by state
SET_PRESENCE = "set_presence"  # this connection's state and metadata, in every channel
PRESENCE_COMMANDS = (PRESENCE, OCCUPANCY, SET_PRESENCE)
# -- built-in admin commands (gateway/state/admin.py) --
PING = "ping"
STATUS = "status"
LIST_ROOMS = "list_rooms"
LIST_CHANNELS = "list_channels"
CHANNEL_INFO = "channel_info"
CREATE_ROOM = "create_room"
CONFIGURE_ROOM = "configure_room"  # room_configure is its older name
DELETE_ROOM = "delete_room"
KICK = "kick"
GATEWAY_ADMIN_COMMANDS = (
    PING,
    STATUS,
    LIST_ROOMS,
    LIST_CHANNELS,
    CHANNEL_INFO,
    CREATE_ROOM,
    CONFIGURE_ROOM,
    DELETE_ROOM,
    KICK,
)
# Built-in names that services commonly use too (the seed's scenario calls a "status"
# service): the gateway answers them only in its own room, SYSTEM_ROOM; in any other room
# they are service commands, as before (no responders when no service is registered).
SERVICE_FIRST = frozenset({PING, STATUS})
SYSTEM_ROOM = "_system"
# Where each admin command's permission is checked: on the whole tenant ("*", "*"), on the
# whole room (room, "*"), or (absent here) on the envelope's room and channel.
TENANT_SCOPED = frozenset({STATUS, LIST_ROOMS})
ROOM_SCOPED = frozenset({LIST_CHANNELS, CREATE_ROOM, CONFIGURE_ROOM, DELETE_ROOM, KICK})
# The changes recorded in the audit stream as ``admin_action`` when they succeed.
AUDITED_COMMANDS = frozenset({CREATE_ROOM, CONFIGURE_ROOM, DELETE_ROOM, KICK})
BUILTIN_COMMANDS: tuple[str, ...] = (
    JOIN_CHANNEL,
    LEAVE_CHANNEL,
    HISTORY,
    REGISTER_HANDLER,
    UNREGISTER_HANDLER,
    LIMITS,
    *ROOM_ADMIN_COMMANDS,
    REGISTER_AGENT,
    REFRESH_TOKEN,
    *PRESENCE_COMMANDS,
    *GATEWAY_ADMIN_COMMANDS,
)

HISTORY_DEFAULT_LIMIT = 100
HISTORY_MAX_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class JoinParams:
    since_seq: int | None
    # The epoch of ``since_seq`` (placed tenants: docs/protocol.md#resume-across-a-failover).
    since_epoch: int | None = None
    # Enter presence (None: the room's default) and receive presence frames (None: as
    # ``presence``) (docs/presence.md).
    presence: bool | None = None
    presence_events: bool | None = None
    # Take several of the channel's events in one ``events`` message (docs/protocol.md).
    batch: bool = False


@dataclass(frozen=True, slots=True)
class HistoryParams:
    since_seq: int
    limit: int


def _seq(parameters: dict[str, Any], name: str) -> int | None:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArqonError(INVALID_PARAMETERS, f"parameter {name!r} must be an integer >= 0")
    return value


# Other buses' words for built-in commands, taken as meaning them when no service has the name.
COMMAND_ALIASES: dict[str, str] = {
    "subscribe": JOIN_CHANNEL,
    "sub": JOIN_CHANNEL,
    "join": JOIN_CHANNEL,
    "unsubscribe": LEAVE_CHANNEL,
    "unsub": LEAVE_CHANNEL,
    "leave": LEAVE_CHANNEL,
}
# A name at least this close to a built-in one (difflib's ratio, after case and separators
# are normalized) is taken as its misspelling: "histroy", "join-channel", "room_mutee" are;
# "register" (as close to register_agent as to register_handler) and "status" are not.
BUILTIN_MATCH_CUTOFF = 0.8
_SEPARATORS = re.compile(r"[\s.\-]+")


def is_builtin(name: str) -> bool:
    return name in BUILTIN_COMMANDS


def gateway_answers(name: str, room: str) -> bool:
    """Is the command the gateway's own? Built-in names are, except that ping and status
    (SERVICE_FIRST) are the gateway's only when sent to SYSTEM_ROOM."""
    if name in SERVICE_FIRST:
        return room == SYSTEM_ROOM
    return name in BUILTIN_COMMANDS


def builtin_suggestion(name: str) -> str | None:
    """The built-in command ``name`` was probably meant to be, or None.

    Asked only about names that are not built-in and that no service handles (a service
    may be called "subscribe": while one is registered, its calls reach it).
    """
    normal = _SEPARATORS.sub("_", name.strip().lower()).strip("_")
    if normal in BUILTIN_COMMANDS:
        return normal
    if normal in COMMAND_ALIASES:
        return COMMAND_ALIASES[normal]
    # ping and status are common service names too: "stats" is a service's, not a typo
    candidates = [name for name in BUILTIN_COMMANDS if name not in SERVICE_FIRST]
    close = difflib.get_close_matches(normal, candidates, n=1, cutoff=BUILTIN_MATCH_CUTOFF)
    return close[0] if close else None


def misspelt_builtin(name: str) -> ArqonError | None:
    """``unknown_command`` (not retryable) for a name that no service handles and that looks
    like a built-in command; None when it does not (the caller answers ``no_responders``)."""
    suggestion = builtin_suggestion(name)
    if suggestion is None:
        return None
    if suggestion == name and name in SERVICE_FIRST:
        return ArqonError(
            NO_RESPONDERS,
            f"no service handles {name!r} on this room and channel; the gateway's own {name} "
            f"is sent to room {SYSTEM_ROOM!r}",
        )
    return ArqonError(UNKNOWN_COMMAND, f"unknown command {name[:64]!r}; did you mean {suggestion}?")


def require_service_name(name: str) -> str:
    """A command that is not built-in goes to a service; its name becomes a subject token."""
    if not is_valid_name(name):
        detail = f"command {name[:64]!r} is not built-in and not a valid service name"
        if suggestion := builtin_suggestion(name[:128]):
            detail += f"; did you mean {suggestion}?"
        raise ArqonError(UNKNOWN_COMMAND, detail)
    return name


def handler_params(parameters: dict[str, Any]) -> str:
    """The ``command`` parameter of register_handler / unregister_handler."""
    name = parameters.get("command")
    if not is_valid_name(name):
        raise ArqonError(
            INVALID_PARAMETERS,
            "parameter 'command' must be a command name of 1-64 characters of A-Z, a-z, 0-9, "
            "'_' or '-'",
        )
    assert isinstance(name, str)
    if name in BUILTIN_COMMANDS and name not in SERVICE_FIRST:
        raise ArqonError(
            INVALID_PARAMETERS, f"parameter 'command': {name!r} is built-in and cannot be handled"
        )
    return name


def service_timeout_ms(value: object, default_ms: int, max_ms: int) -> int:
    """``payload.timeout_ms`` of a service command: absent means the gateway's default."""
    if value is None:
        return default_ms
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_ms:
        raise ArqonError(
            INVALID_PARAMETERS, f"field 'timeout_ms' must be an integer between 1 and {max_ms}"
        )
    return value


def join_params(parameters: dict[str, Any]) -> JoinParams:
    since_seq = _seq(parameters, "since_seq")
    since_epoch = _seq(parameters, "since_epoch")
    if since_epoch is not None and (since_epoch < 1 or since_seq is None):
        raise ArqonError(
            INVALID_PARAMETERS,
            "parameter 'since_epoch' must be an integer >= 1 and comes with 'since_seq' "
            "(the epoch and seq of the last event received)",
        )
    flags = [_flag(parameters, name) for name in ("presence", "presence_events", "batch")]
    return JoinParams(since_seq, since_epoch, flags[0], flags[1], flags[2] is True)


def _flag(parameters: dict[str, Any], name: str) -> bool | None:
    value = parameters.get(name)
    if value is not None and not isinstance(value, bool):
        raise ArqonError(INVALID_PARAMETERS, f"parameter {name!r} must be true or false")
    return value


LIST_DEFAULT_LIMIT = 100
LIST_MAX_LIMIT = 1000
KICK_REASON_MAX_CHARS = 200


@dataclass(frozen=True, slots=True)
class ListParams:
    after: str | None  # the last name of the previous page (its ``next_cursor``)
    limit: int


def list_params(parameters: dict[str, Any]) -> ListParams:
    """``cursor`` and ``limit`` of list_rooms / list_channels."""
    cursor = parameters.get("cursor")
    if cursor is not None and not is_valid_name(cursor):
        raise ArqonError(
            INVALID_PARAMETERS,
            "parameter 'cursor' must be the next_cursor of a previous page (a room or channel "
            "name), or absent for the first page",
        )
    limit = _seq(parameters, "limit")
    if limit is None:
        limit = LIST_DEFAULT_LIMIT
    if not 1 <= limit <= LIST_MAX_LIMIT:
        raise ArqonError(
            INVALID_PARAMETERS, f"parameter 'limit' must be between 1 and {LIST_MAX_LIMIT}"
        )
    return ListParams(cursor, limit)


def delete_room_params(parameters: dict[str, Any], room: str) -> None:
    """delete_room needs ``confirm`` equal to the room's name: deleting is not undone."""
    if parameters.get("confirm") != room:
        raise ArqonError(
            INVALID_PARAMETERS,
            f"delete_room removes every event and the presence of room {room!r} for good: "
            f"send parameter 'confirm' set to the room's name ({room!r}) to go ahead",
        )


@dataclass(frozen=True, slots=True)
class KickParams:
    principal: str
    reason: str


def kick_params(parameters: dict[str, Any]) -> KickParams:
    principal = parameters.get("principal")
    if not is_valid_name(principal):
        raise ArqonError(
            INVALID_PARAMETERS,
            "parameter 'principal' must be a principal id of 1-64 characters of A-Z, a-z, "
            "0-9, '_' or '-'",
        )
    reason = parameters.get("reason", "")
    if reason is None:
        reason = ""
    if not isinstance(reason, str) or len(reason) > KICK_REASON_MAX_CHARS:
        raise ArqonError(
            INVALID_PARAMETERS,
            f"parameter 'reason' must be a string of at most {KICK_REASON_MAX_CHARS} characters",
        )
    assert isinstance(principal, str)
    return KickParams(principal, reason)


def history_params(parameters: dict[str, Any], max_limit: int = HISTORY_MAX_LIMIT) -> HistoryParams:
    since = _seq(parameters, "since_seq") or 0
    limit = _seq(parameters, "limit")
    if limit is None:
        limit = min(HISTORY_DEFAULT_LIMIT, max_limit)
    if not 1 <= limit <= max_limit:
        raise ArqonError(INVALID_PARAMETERS, f"parameter 'limit' must be between 1 and {max_limit}")
    return HistoryParams(since, limit)


def refresh_token_params(parameters: dict[str, Any]) -> str:
    """The ``token`` parameter of refresh_token: a new credential for the same principal."""
    token = parameters.get("token")
    if not isinstance(token, str) or not 1 <= len(token) <= 8192:
        raise ArqonError(
            INVALID_PARAMETERS, "parameter 'token' must be the new credential (a non-empty string)"
        )
    return token
