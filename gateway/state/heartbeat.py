"""This gateway's heartbeat: who it is and how busy, announced every interval.

Every ``heartbeat_interval_s`` the gateway announces a :class:`shared.cluster.Heartbeat`
through the ``ClusterView`` port (mesh/ports.py); ``arqonbus status`` lists them. The
counts come from what the gateway already keeps: its sessions and the listener's
``FrameCounts`` (messages in and out, gateway/ws/transport.py), so the hot path pays nothing extra here. On drain
the heartbeat is withdrawn, so a stopped gateway leaves the list at once; a killed one leaves
it when its last heartbeat expires (3 intervals).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from arqonbus_server.mesh.ports import ClusterView
from arqonbus_server.shared.cluster import (
    Heartbeat,
    NatsServerRef,
    RateMeter,
    encode_heartbeat,
)

log = logging.getLogger("arqonbus.gateway.heartbeat")
DISTRIBUTION = "arqonbus-server"


def server_version() -> str:
    """The installed arqonbus-server version ("unknown" when run from an uninstalled tree)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    node: str
    region: str
    version: str


class HeartbeatPublisher:
    """Announces this gateway's heartbeat every ``interval_s`` until closed."""

    def __init__(
        self,
        view: ClusterView,
        identity: NodeIdentity,
        interval_s: float,
        connections: Callable[[], int],
        frames: Callable[[], tuple[int, int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._view = view
        self._identity = identity
        self._interval = interval_s
        self._connections = connections
        self._frames = frames
        self._clock = clock
        self._started = clock()
        self._in = RateMeter()
        self._out = RateMeter()
        self._task: asyncio.Task[None] | None = None

    def heartbeat(self) -> Heartbeat:
        """The heartbeat now (rates since the previous call)."""
        now = self._clock()
        received, sent = self._frames()
        name, url = self._view.connected_server()
        return Heartbeat(
            node=self._identity.node,
            region=self._identity.region,
            version=self._identity.version,
            uptime_s=round(now - self._started, 1),
            connections=self._connections(),
            msgs_in_per_s=round(self._in.rate(received, now), 1),
            msgs_out_per_s=round(self._out.rate(sent, now), 1),
            nats=NatsServerRef(name, url),
            interval_s=self._interval,
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            heartbeat = self.heartbeat()
            try:
                async with asyncio.timeout(self._interval):
                    await self._view.announce(
                        heartbeat.node, encode_heartbeat(heartbeat), heartbeat.ttl_s
                    )
            except Exception as exc:  # NATS down: the next beat tries again
                log.debug("heartbeat not announced: %s", exc)
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - started)))

    async def close(self, timeout: float = 1.0) -> None:
        """Stop, and leave the cluster view now (best effort: it expires anyway)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self._view.withdraw(self._identity.node)
