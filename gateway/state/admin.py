"""The built-in admin and presence commands a gateway answers (docs/protocol.md).

The connection core (shared/core/commands.py) checks the permission and the parameters,
then emits :class:`~shared.core.effects.RunCommand`; the session hands it to
:meth:`GatewayCommands.run`, which reads the ports (the broker's store, the presence
service, the room directory) and returns the result. Nothing here decides who may do what.

* ``ping``, ``status``: this gateway (and how many gateways the cluster view lists).
* ``list_rooms``, ``list_channels``: from the store (channels with stored events, with their
  counts and last seq) plus the rooms configured in ROOMS; pages by name after ``cursor``.
* ``channel_info``: the store's view of one channel, the room's retention and presence
  default, and the channel's occupancy.
* ``delete_room``: every session in the room leaves it (on every gateway, through the room
  record: gateway/state/rooms.py ``forget_room``), then its events and presence are removed.
* ``presence``, ``occupancy``, ``set_presence``: the presence service
  (gateway/state/presence.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from arqonbus_server.gateway.state.presence import PresenceService
from arqonbus_server.gateway.state.room_bytes import RoomTrimmer
from arqonbus_server.gateway.state.rooms import RoomDirectory, forget_room
from arqonbus_server.mesh.ports import Broker, BrokerUnavailable, ChannelStats
from arqonbus_server.shared import commands
from arqonbus_server.shared.commands import ListParams
from arqonbus_server.shared.core.effects import RunCommand
from arqonbus_server.shared.errors import ROOM_NOT_FOUND, UNAVAILABLE, ArqonError
from arqonbus_server.shared.subjects import ChannelRef

PresenceSink = Callable[[bytes], None]
log = logging.getLogger("arqonbus.gateway.admin")


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """What ``status`` and ``ping`` tell about this gateway."""

    node: str
    region: str
    version: str
    started: float  # time.monotonic() at start
    retention_s: float  # the tenant streams' retention (stream_max_age_s)


class GatewayCommands:
    """Answers the :class:`RunCommand` effects of every session of this gateway."""

    def __init__(
        self,
        broker: Broker,
        info: GatewayInfo,
        presence: PresenceService | None,
        rooms: RoomDirectory | None,
        connections: Callable[[str], tuple[int, int]],
        gateways: Callable[[], Awaitable[int]],
        trimmer: RoomTrimmer | None = None,
    ) -> None:
        self._broker = broker
        self._info = info
        self._presence = presence
        self._rooms = rooms
        # (this gateway's connections, the tenant's connections on this gateway)
        self._connections = connections
        self._gateways = gateways  # live gateways in the cluster view
        self._leaving: set[asyncio.Task[None]] = set()
        self._trimmer = trimmer  # rooms with max_bytes (gateway/state/room_bytes.py)

    # -- presence hooks of a session ------------------------------------------------------

    async def enter(
        self,
        ref: ChannelRef,
        session: str,
        principal: str,
        *,
        present: bool,
        sink: PresenceSink | None,
    ) -> bool:
        """After a join: enter presence and/or receive its frames. False without presence."""
        if self._presence is None:
            return False
        if present:
            await self._presence.enter(ref, session, principal, sink)
        elif sink is not None:
            self._presence.watch(ref, session, sink)
        if sink is not None:  # the join's reply promises every change after it
            try:
                await self._presence.following(ref)
            except BrokerUnavailable as exc:  # the view catches up (an overflow frame) later
                log.warning("presence view of %s not ready for a join: %s", ref, exc)
        return True

    def left(self, ref: ChannelRef, session: str) -> None:
        """The session left the channel (leave_channel, a ban, a kick): in the background."""
        if self._presence is not None:
            task = asyncio.create_task(_leave_quietly(self._presence, ref, session))
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)

    def ended(self, session: str) -> None:
        """The connection closed: its presence everywhere goes."""
        if self._presence is not None:
            self._presence.forget(session)

    def published(self, ref: ChannelRef) -> None:
        """An event of ``ref`` was stored by this gateway (a capped room may need a trim)."""
        if self._trimmer is not None:
            self._trimmer.published(ref)

    def activity(self, session: str) -> None:
        if self._presence is not None:
            self._presence.activity(session)

    # -- commands ----------------------------------------------------------------------

    async def run(self, effect: RunCommand) -> dict[str, Any]:
        handler = self._handlers().get(effect.name)
        if handler is None:  # pragma: no cover - the core emits only the names above
            raise ValueError(effect.name)
        return await handler(effect)

    def _handlers(self) -> dict[str, Callable[[RunCommand], Awaitable[dict[str, Any]]]]:
        return {
            commands.PING: self._ping,
            commands.STATUS: self._status,
            commands.LIST_ROOMS: self._list_rooms,
            commands.LIST_CHANNELS: self._list_channels,
            commands.CHANNEL_INFO: self._channel_info,
            commands.DELETE_ROOM: self._delete_room,
            commands.PRESENCE: self._presence_page,
            commands.OCCUPANCY: self._occupancy,
            commands.SET_PRESENCE: self._set_presence,
        }

    async def _ping(self, effect: RunCommand) -> dict[str, Any]:
        return {"pong": True, "time": time.time(), "gateway": self._info.node}

    async def _status(self, effect: RunCommand) -> dict[str, Any]:
        on_gateway, of_tenant = self._connections(effect.ref.tenant)
        return {
            "gateway": self._info.node,
            "region": self._info.region,
            "version": self._info.version,
            "uptime_s": round(time.monotonic() - self._info.started, 1),
            "connections": {"gateway": on_gateway, "tenant": of_tenant},
            "gateways": await self._gateways(),
        }

    async def _list_rooms(self, effect: RunCommand) -> dict[str, Any]:
        params: ListParams = effect.parameters
        tenant = effect.ref.tenant
        rooms: dict[str, dict[str, Any]] = {}
        for stats in await self._broker.channel_stats(tenant):
            room = rooms.setdefault(stats.room, _room_row(stats.room))
            room["channels"] += 1
            room["messages"] += stats.messages
            room["last_seq"] = max(room["last_seq"], stats.last_seq)
        if self._rooms is not None:
            for name in self._rooms.configured_rooms(tenant):
                rooms.setdefault(name, _room_row(name))["configured"] = True
        page, cursor = _page(sorted(rooms), params)
        return {"rooms": [rooms[name] for name in page], "next_cursor": cursor}

    async def _list_channels(self, effect: RunCommand) -> dict[str, Any]:
        params: ListParams = effect.parameters
        room = effect.ref.room
        stats = {s.channel: s for s in await self._broker.channel_stats(effect.ref.tenant, room)}
        page, cursor = _page(sorted(stats), params)
        rows = [_channel_row(stats[name]) for name in page]
        return {"room": room, "channels": rows, "next_cursor": cursor}

    async def _channel_info(self, effect: RunCommand) -> dict[str, Any]:
        ref = effect.ref
        detail = await self._broker.channel_detail(ref)
        settings = None if self._rooms is None else self._rooms.get(ref.tenant, ref.room)
        retention = self._info.retention_s
        if settings is not None and settings.retention_s is not None:
            retention = min(retention, settings.retention_s)
        occupancy = None if self._presence is None else await self._presence.occupancy(ref)
        return {
            "room": ref.room,
            "channel": ref.channel,
            "messages": detail.messages,
            "first_seq": detail.first_seq,
            "last_seq": detail.last_seq,
            "bytes": detail.bytes,
            "bytes_exact": detail.bytes_exact,
            "retention_s": retention,
            "max_bytes": None if settings is None else settings.max_bytes,
            "presence": bool(settings is not None and settings.presence),
            "occupancy": occupancy,
        }

    async def _delete_room(self, effect: RunCommand) -> dict[str, Any]:
        tenant, room = effect.ref.tenant, effect.ref.room
        if self._rooms is None:
            raise ArqonError(UNAVAILABLE, "delete_room needs the gateway's NATS security state")
        settings = self._rooms.get(tenant, room)
        configured = settings is not None and settings.configured
        if not configured and not await self._broker.channel_stats(tenant, room):
            raise ArqonError(
                ROOM_NOT_FOUND,
                f"room {room!r} has no stored events and no settings: nothing to delete",
                room=room,
            )
        # Members leave first (every gateway applies the room record's kick of everyone),
        # so nothing they publish afterwards lands in the room being emptied.
        await forget_room(self._rooms, tenant, room, effect.principal)
        events = await self._broker.purge_room(tenant, room)
        removed = 0 if self._presence is None else await self._presence.remove_room(tenant, room)
        return {"room": room, "events_removed": events, "presence_removed": removed}

    def _need_presence(self) -> PresenceService:
        if self._presence is None:
            raise ArqonError(UNAVAILABLE, "presence needs the gateway's NATS state")
        return self._presence

    async def _presence_page(self, effect: RunCommand) -> dict[str, Any]:
        return await self._need_presence().page(effect.ref, effect.parameters)

    async def _occupancy(self, effect: RunCommand) -> dict[str, Any]:
        return await self._need_presence().occupancy(effect.ref)

    async def _set_presence(self, effect: RunCommand) -> dict[str, Any]:
        change = effect.parameters
        return await self._need_presence().set_presence(
            effect.session, effect.principal, change.state, change.metadata
        )


async def _leave_quietly(presence: PresenceService, ref: ChannelRef, session: str) -> None:
    """A leave the store did not take: the entry goes with the session, or at lease expiry."""
    try:
        await presence.leave(ref, session)
    except BrokerUnavailable as exc:
        log.warning("presence of %s in %s not removed now: %s", session, ref, exc)


def _room_row(room: str) -> dict[str, Any]:
    return {"room": room, "channels": 0, "messages": 0, "last_seq": 0, "configured": False}


def _channel_row(stats: ChannelStats) -> dict[str, Any]:
    return {"channel": stats.channel, "messages": stats.messages, "last_seq": stats.last_seq}


def _page(names: list[str], params: ListParams) -> tuple[list[str], str | None]:
    """The names after ``params.after``, at most ``params.limit``; the next cursor or None."""
    if params.after is not None:
        names = [name for name in names if name > params.after]
    page = names[: params.limit]
    more = len(names) > params.limit
    return page, (page[-1] if more and page else None)
