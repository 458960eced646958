"""The typed helpers of the built-in admin commands (docs/protocol.md, "Room and tenant
administration"): each one is :meth:`Client.admin` with the command's parameters checked.

A mixin of :class:`arqonbus.Client`, kept apart so that the client module stays about
connections and delivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

__all__ = ["ROOM_SETTINGS", "SYSTEM_ROOM", "AdminCommands"]

SYSTEM_ROOM = "_system"
"""The room of the gateway's own ``ping`` and ``status`` (in other rooms those names are
service commands), and of the other tenant-wide commands."""

ROOM_SETTINGS = frozenset(
    {"private", "key", "invite_only", "retention_s", "max_message_bytes", "max_bytes", "presence"}
)
"""The settings of ``create_room`` and ``configure_room`` (docs/protocol.md#create_room)."""


class AdminCommands:
    """``ping``, ``status``, ``list_rooms``, ``list_channels``, ``channel_info``,
    ``create_room``, ``configure_room``, ``delete_room`` and ``kick`` as methods."""

    if TYPE_CHECKING:  # provided by arqonbus.Client, which mixes these helpers in

        async def admin(
            self,
            room: str,
            command: str,
            params: dict[str, Any] | None = None,
            *,
            channel: str = "admin",
            timeout: float | None = None,
        ) -> dict[str, Any]: ...

    async def ping(self, *, timeout: float | None = None) -> dict[str, Any]:
        """``{"pong": true, "time": unix_s, "gateway": node}``; needs no permission."""
        return await self.admin(SYSTEM_ROOM, "ping", timeout=timeout)

    async def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """This gateway's node, region, version, uptime and connection counts, and the number
        of live gateways. Needs ``admin`` on the tenant (``*``)."""
        return await self.admin(SYSTEM_ROOM, "status", timeout=timeout)

    async def list_rooms(
        self, *, cursor: str | None = None, limit: int | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """One page of the tenant's rooms, sorted: ``{"rooms": [...], "next_cursor"}``.

        Pass ``next_cursor`` back as ``cursor`` for the next page (None: the last page).
        ``limit`` is 1-1000 (default 100). Needs ``admin`` on the tenant (``*``).
        """
        params = _page_params(cursor, limit)
        return await self.admin(SYSTEM_ROOM, "list_rooms", params, timeout=timeout)

    async def list_channels(
        self,
        room: str,
        *,
        cursor: str | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One page of ``room``'s channels with stored events (see :meth:`list_rooms`)."""
        params = _page_params(cursor, limit)
        return await self.admin(room, "list_channels", params, timeout=timeout)

    async def channel_info(
        self, room: str, channel: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Seqs, size, retention, presence setting and occupancy of one channel (zeros for a
        channel without events). Needs ``admin`` on the room."""
        return await self.admin(room, "channel_info", channel=channel, timeout=timeout)

    async def create_room(
        self, room: str, *, timeout: float | None = None, **settings: Any
    ) -> dict[str, Any]:
        """Configure a new room; raises :class:`RoomExists` if it is configured already.

        ``settings`` are any of :data:`ROOM_SETTINGS`: ``private`` and ``key``,
        ``invite_only``, ``retention_s`` (seconds, from the gateway's minimum to the tenant's
        retention; applies to events published after it is set), ``max_message_bytes``,
        ``max_bytes`` (the room keeps its newest events up to that many bytes), ``presence`` (the default of ``join_channel``'s ``presence``). Returns the room's info.
        """
        _check_room_settings(settings, at_least_one=False)
        return await self.admin(room, "create_room", settings, timeout=timeout)

    async def configure_room(
        self, room: str, *, timeout: float | None = None, **settings: Any
    ) -> dict[str, Any]:
        """Change some of a room's settings (see :meth:`create_room`; ``None`` removes
        ``retention_s``, ``max_message_bytes`` or ``max_bytes``). Creates an unconfigured room."""
        _check_room_settings(settings, at_least_one=True)
        return await self.admin(room, "configure_room", settings, timeout=timeout)

    async def delete_room(
        self, room: str, *, confirm: str, timeout: float | None = None
    ) -> dict[str, Any]:
        """Delete a room's stored events, settings and presence; ``confirm`` must be the
        room's name. Members are removed (their subscriptions end with :class:`RoomDeleted`).
        Returns ``{"room", "events_removed", "presence_removed"}``; raises
        :class:`RoomNotFound` for a room with neither events nor settings."""
        if confirm != room:
            raise ValueError(f"delete_room removes every event of {room!r}: pass confirm={room!r}")
        return await self.admin(room, "delete_room", {"confirm": confirm}, timeout=timeout)

    async def kick(
        self,
        room: str,
        principal: str,
        *,
        reason: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Remove ``principal``'s sessions from ``room``'s channels on every gateway; their
        subscriptions end with :class:`Kicked`. They may join again (``room_ban`` keeps them
        out). ``reason``: at most 200 characters, shown to them."""
        params: dict[str, Any] = {"principal": principal}
        if reason is not None:
            params["reason"] = reason
        return await self.admin(room, "kick", params, timeout=timeout)


def _page_params(cursor: str | None, limit: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if cursor is not None:
        params["cursor"] = cursor
    if limit is not None:
        params["limit"] = limit
    return params


def _check_room_settings(settings: Mapping[str, Any], *, at_least_one: bool) -> None:
    unknown = sorted(set(settings) - ROOM_SETTINGS)
    if unknown:
        raise ValueError(f"unknown room setting(s) {unknown}: use {sorted(ROOM_SETTINGS)}")
    if at_least_one and not settings:
        raise ValueError(f"pass at least one of {sorted(ROOM_SETTINGS)}")
