"""The hub and a placed tenant's epochs (gateway/ws/hub.py on the in-memory broker): delivered
events carry the epoch; a failover moves members past the fork back to it, with a gap."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from arqonbus_server.gateway.ws.hub import Hub
from arqonbus_server.mesh.memory import MemoryBroker, MemoryMesh, _Stream
from arqonbus_server.shared.errors import CloseCode
from arqonbus_server.shared.regions import Epoch, Placement, StreamAt, promoted
from arqonbus_server.shared.subjects import ChannelRef
from tests.timeouts import SEC

REF = ChannelRef("acme", "r", "c")
EAST, WEST = StreamAt("east", "arq_acme"), StreamAt("west", "arq-mirror-west_acme")
FIRST = Placement("acme", "east", EAST, (WEST,), (Epoch(1, 1, EAST),), acks="home")


class FakeSocket:
    """What the hub uses of a socket: the frames it was sent, parsed."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.closed: CloseCode | None = None

    def _take(self, payload: bytes) -> bool:
        self.sent.append(orjson.loads(payload))
        self.changed.set()
        return True

    def write_frame(self, frame: bytes) -> bool:
        return self._take(frame[2:] if frame[1] < 126 else frame[4:])  # an unmasked header

    def send(self, message: bytes) -> bool:
        return self._take(message)

    async def send_paced(self, message: bytes) -> bool:
        return self._take(message)

    def close_soon(self, code: CloseCode, reason: str) -> None:
        self.closed = code

    async def frames(self, count: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(5 * SEC):
            while len(self.sent) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.sent


async def placed_hub(placements: dict[str, Placement], events: int) -> tuple[MemoryBroker, Hub]:
    """A hub on a memory broker whose tenant acme is placed, with ``events`` stored."""
    broker = MemoryBroker(MemoryMesh())
    broker.placement_for = placements.get
    await broker.connect()
    broker.mesh.streams["acme"] = _Stream()  # provisioned by the ops tools
    hub = Hub(broker, 100, 1 << 20)
    hub.placement_for = placements.get
    for n in range(events):
        await broker.publish(REF, orjson.dumps({"n": n}), f"k{n}")
    return broker, hub


async def test_members_get_the_epoch_and_move_back_to_the_fork_after_a_failover() -> None:
    placements = {"acme": FIRST}
    broker, hub = await placed_hub(placements, events=3)
    socket = FakeSocket()
    member, result = await hub.join(socket, REF, 0, since_epoch=1)  # type: ignore[arg-type]
    assert result.as_result() == {"last_seq": 3, "epoch": 1}
    hub.start(member, result.last_seq)
    sent = await socket.frames(3)
    assert [(f["seq"], f["epoch"]) for f in sent] == [(1, 1), (2, 1), (3, 1)]

    # West's mirror held only seq 1: epoch 2 starts at 2, and seqs 2..3 of epoch 1 are lost.
    placements["acme"] = promoted(FIRST, "west", 1)
    hub.placement_changed("acme")
    gap = (await socket.frames(4))[3]
    assert gap["type"] == "gap"
    assert gap["payload"] == {
        "after_seq": 1,
        "first_available_seq": 2,
        "reason": "epoch",
        "epoch": 2,
        "lost": {"epoch": 1, "from_seq": 2, "to_seq": 3},
    }
    assert (member.cursor, member.epoch, hub.epoch_of("acme")) == (1, 2, 2)
    # The next live event continues after 3: the member replays the new epoch from the fork.
    await broker.publish(REF, orjson.dumps({"n": 3}), "k3")
    sent = await socket.frames(7)
    assert [(f["seq"], f["epoch"]) for f in sent[4:]] == [(2, 2), (3, 2), (4, 2)]
    assert socket.closed is None
    await hub.close()


async def test_a_join_past_the_fork_resumes_at_the_fork_and_says_what_was_lost() -> None:
    placements = {"acme": promoted(FIRST, "west", 1)}
    _, hub = await placed_hub(placements, events=2)
    socket = FakeSocket()
    member, result = await hub.join(socket, REF, 3, since_epoch=1)  # type: ignore[arg-type]
    assert result.as_result() == {
        "last_seq": 2,
        "epoch": 2,
        "gap": True,
        "after_seq": 1,
        "first_available_seq": 2,
        "reason": "epoch",
        "lost": {"epoch": 1, "from_seq": 2, "to_seq": 3},
    }
    hub.start(member, result.last_seq)
    assert [(f["seq"], f["epoch"]) for f in await socket.frames(1)] == [(2, 2)]
    await hub.close()
