"""Room rules as pure decisions: bans, mutes, private and invite-only rooms.

The room settings themselves (the KV record, its watch, room key hashing) live in the
gateway (gateway/state/rooms.py); these functions decide over any object that looks like
them (:class:`RoomView`) at the wall-clock time ``now`` (Unix seconds) they are given.

* banned: entering (join, history, calls, handlers) and publishing are refused (``banned``);
* muted: publishing is refused (``muted``, with ``retry_after_ms`` when the mute is timed);
* private / invite-only: entering and publishing need membership: invited, admin of the
  room, or a channel of the room entered on this connection; a private room with a key
  also lets in whoever gives the right ``room_key`` (checked by the gateway: scrypt).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from arqonbus_server.shared.errors import (
    BANNED,
    FORBIDDEN,
    MUTED,
    ROOM_KEY_REQUIRED,
    ArqonError,
)

CALL_ACTION = "call its services"  # the entering action of a service call


class Timed(Protocol):
    """A ban or a mute: ``until`` Unix seconds, or None (until lifted)."""

    @property
    def until(self) -> float | None: ...


class BanView(Timed, Protocol):
    @property
    def reason(self) -> str: ...


class RoomView(Protocol):
    """What the rules read of a room's settings (gateway/state/rooms.py RoomSettings)."""

    @property
    def invite_only(self) -> bool: ...
    @property
    def broken(self) -> bool: ...
    @property
    def key_hash(self) -> str: ...
    @property
    def invited(self) -> set[str]: ...
    @property
    def restricted(self) -> bool: ...
    @property
    def presence(self) -> bool: ...  # join_channel's default for ``presence``
    @property
    def retention_s(self) -> int | None: ...  # the room's own retention (None: the tenant's)
    @property
    def max_message_bytes(self) -> int | None: ...  # largest stored event (None: the gateway's)

    def ban_of(self, principal: str, now: float) -> BanView | None: ...
    def mute_of(self, principal: str, now: float) -> Timed | None: ...


@dataclass(frozen=True, slots=True)
class NeedsKey:
    """Entering is allowed if ``key`` matches the room's key (the gateway checks the hash)."""

    key: str


@dataclass(frozen=True, slots=True)
class Standing:
    """Who asks, in the terms the rules need."""

    principal: str
    is_admin: bool  # has ``admin`` on the room (and the command's channel)
    member: bool  # this connection already entered the room


def until_text(until: float | None) -> str:
    """`` until <UTC time>`` for a timed ban or mute, empty for an open-ended one."""
    if until is None:
        return ""
    return " until " + datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds")


def banned_error(room: str, ban: BanView, now: float) -> ArqonError:
    reason = f": {ban.reason}" if ban.reason else ""
    return ArqonError(BANNED, f"you are banned from room {room!r}{until_text(ban.until)}{reason}")


def room_extra(room: str, until: float | None, now: float) -> dict[str, Any]:
    """The error payload's ``room`` and, for a timed ban or mute, ``retry_after_ms``."""
    extra: dict[str, Any] = {"room": room}
    if until is not None:
        extra["retry_after_ms"] = max(1, int((until - now) * 1000) + 1)
    return extra


def _lets_in(settings: RoomView, who: Standing) -> bool:
    return (
        not settings.restricted or who.is_admin or who.member or who.principal in settings.invited
    )


def enter_decision(
    settings: RoomView | None,
    room: str,
    who: Standing,
    key: str | None,
    action: str,
    now: float,
) -> ArqonError | NeedsKey | None:
    """May ``who`` ``action`` (join, read history, ...) in ``room``? None: yes.

    Otherwise the refusal, or :class:`NeedsKey`: yes if the key matches (a refusal
    ``room_key_required`` "does not match" if not: see :func:`wrong_key`).
    """
    if settings is None:
        return None
    ban = settings.ban_of(who.principal, now)
    if ban is not None:
        return banned_error(room, ban, now)
    if _lets_in(settings, who):
        return None
    if settings.broken:
        detail = f"room {room!r} has unreadable settings: only its admins may {action}"
        return ArqonError(FORBIDDEN, detail)
    if settings.invite_only:
        return ArqonError(
            FORBIDDEN,
            f"room {room!r} is invite-only: ask a room admin to invite you (room_invite) "
            f"before you {action}",
        )
    if not settings.key_hash:
        detail = f"room {room!r} is private and has no key: ask a room admin to invite you"
        return ArqonError(FORBIDDEN, detail)
    if key is None:
        # A service call carries no room key of its own: membership comes from a join.
        how = (
            "join one of its channels with parameter 'room_key' first"
            if action == CALL_ACTION
            else f"{action} with parameter 'room_key'"
        )
        return ArqonError(ROOM_KEY_REQUIRED, f"room {room!r} is private: {how}")
    return NeedsKey(key)


def wrong_key(room: str) -> ArqonError:
    return ArqonError(ROOM_KEY_REQUIRED, f"the room_key for room {room!r} does not match")


def publish_refusal(
    settings: RoomView, room: str, who: Standing, now: float
) -> tuple[ArqonError, dict[str, Any]] | None:
    """Why a publish is refused (error and extra payload fields), or None."""
    ban = settings.ban_of(who.principal, now)
    if ban is not None:
        return banned_error(room, ban, now), room_extra(room, ban.until, now)
    mute = settings.mute_of(who.principal, now)
    if mute is not None:
        error = ArqonError(MUTED, f"you are muted in room {room!r}{until_text(mute.until)}")
        return error, room_extra(room, mute.until, now)
    if not _lets_in(settings, who):
        detail = (
            f"room {room!r} is private or invite-only: join one of its channels "
            "(with its room_key, or after an invite) before you publish"
        )
        return ArqonError(FORBIDDEN, detail), {"room": room}
    return None
