"""The hub's window reads (gateway/ws/hub.py on the in-memory broker): a reconnect storm of
one channel's members shares them instead of making two JetStream requests per member."""

from __future__ import annotations

import asyncio

import orjson

from arqonbus_server.gateway.ws.hub import Hub
from arqonbus_server.mesh.memory import MemoryBroker, MemoryMesh
from arqonbus_server.mesh.ports import ChannelWindow
from arqonbus_server.shared.subjects import ChannelRef
from tests.unit.test_hub_epochs import FakeSocket

REF = ChannelRef("acme", "r", "c")
MEMBERS = 50


class WindowCounting(MemoryBroker):
    """Counts window reads."""

    def __init__(self) -> None:
        super().__init__(MemoryMesh())
        self.windows = 0

    async def window(self, ref: ChannelRef) -> ChannelWindow:
        self.windows += 1
        return await super().window(ref)


async def resume(hub: Hub, since_seq: int) -> FakeSocket:
    socket = FakeSocket()
    member, result = await hub.join(socket, REF, since_seq)  # type: ignore[arg-type]
    hub.start(member, result.last_seq)
    return socket


async def test_members_resuming_at_once_share_the_window_reads() -> None:
    broker = WindowCounting()
    await broker.connect()
    for n in range(3):
        await broker.publish(REF, orjson.dumps({"n": n}), f"k{n}")
    hub = Hub(broker, 100, 1 << 20)
    sockets = await asyncio.gather(*(resume(hub, 1) for _ in range(MEMBERS)))
    for socket in sockets:  # each replays 2 and 3, once, in order
        assert [f["seq"] for f in await socket.frames(2)] == [2, 3]
    # One read for the joins and one for the checks after the replays, give or take a
    # read in flight when more members asked; before sharing: one per member at least.
    assert broker.windows <= 6, broker.windows
    await hub.close()
