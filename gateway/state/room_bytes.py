"""Rooms with a byte cap (``max_bytes``): the oldest events go once the room is over it.

A room configured with ``max_bytes`` keeps its newest events up to that many bytes, all its
channels together, like a stream's ``max_bytes`` with ``discard: old``. JetStream has no
limit per subject, so the gateway keeps the cap: after this gateway stores events in a capped
room (or the cap is set or lowered), the room is marked, and every ``interval_s`` the marked
rooms are trimmed through :meth:`mesh.ports.Broker.trim_room`, which removes the room's oldest
events until the rest fit. Several gateways may trim one room at once: each removes at most
what the cap asks.

So a room may hold more than its cap for up to about ``interval_s`` (plus one trim's time)
after a burst; publishes are never refused for it (the tenant's own quota still applies).
Clients resuming from a seq older than what is left get a ``gap`` as after any retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from arqonbus_server.gateway.state.rooms import RoomDirectory, RoomSettings
from arqonbus_server.mesh.ports import Broker
from arqonbus_server.shared.subjects import ChannelRef

log = logging.getLogger("arqonbus.gateway.room_bytes")

TRIM_INTERVAL_S = 5.0  # marked rooms are trimmed this often
TRIM_TIMEOUT_S = 10.0  # one room's trim
ROOMS_PER_ROUND = 100  # at most this many rooms trimmed per round (the rest wait their turn)


class RoomTrimmer:
    """Marks capped rooms that grew on this gateway and trims them every ``interval_s``."""

    def __init__(
        self, broker: Broker, rooms: RoomDirectory, interval_s: float = TRIM_INTERVAL_S
    ) -> None:
        self._broker = broker
        self._rooms = rooms
        self._interval = interval_s
        self._marked: dict[tuple[str, str], None] = {}  # insertion-ordered set
        self._task: asyncio.Task[None] | None = None
        self.trimmed = 0  # events removed by this gateway (for tests and logs)
        rooms.on_update(self._on_room_update)

    def published(self, ref: ChannelRef) -> None:
        """An event of ``ref`` was stored: mark its room if it has a cap (one dict lookup)."""
        settings = self._rooms.get(ref.tenant, ref.room)
        if settings is not None and settings.max_bytes is not None:
            self._marked[(ref.tenant, ref.room)] = None

    def _on_room_update(self, tenant: str, room: str, settings: RoomSettings | None) -> None:
        if settings is not None and settings.max_bytes is not None:  # set or lowered
            self._marked[(tenant, room)] = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="room trimmer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.trim_marked()
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def trim_marked(self) -> int:
        """Trim the marked rooms (at most ROOMS_PER_ROUND); returns the events removed."""
        removed = 0
        for tenant, room in list(self._marked)[:ROOMS_PER_ROUND]:
            self._marked.pop((tenant, room), None)
            settings = self._rooms.get(tenant, room)
            if settings is None or settings.max_bytes is None:
                continue
            try:
                async with asyncio.timeout(TRIM_TIMEOUT_S):
                    count = await self._broker.trim_room(tenant, room, settings.max_bytes)
            except Exception as exc:  # the store did not answer: the next round tries again
                log.warning("room %s/%s not trimmed to its max_bytes: %s", tenant, room, exc)
                self._marked[(tenant, room)] = None
                continue
            if count:
                log.info("room %s/%s: %d oldest events removed (max_bytes)", tenant, room, count)
            removed += count
        self.trimmed += removed
        return removed
