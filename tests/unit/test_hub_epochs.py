"""The hub and a placed tenant's epochs (gateway/ws/hub.py on the in-memory broker): delivered
events carry the epoch; a failover moves members past the fork back to it, with a gap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson

from arqonbus_server.gateway.ws.hub import Hub
from arqonbus_server.mesh.memory import MemoryBroker, MemoryMesh, _Stream
from arqonbus_server.mesh.ports import BrokerUnavailable, StoredEvent
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
        self.writes = 0  # write_frame calls
        self.changed = asyncio.Event()
        self.closed: CloseCode | None = None
        # The transport's bound (gateway/ws/transport.py Socket): None, unbounded; else a
        # write is refused, and the socket closed 4001, once the bytes taken exceed it.
        self.limit: int | None = None
        self.taken_bytes = 0

    def fits(self, size: int) -> bool:
        return self.limit is None or self.taken_bytes + size <= self.limit

    def _take(self, payload: bytes) -> bool:
        self.sent.append(orjson.loads(payload))
        self.changed.set()
        return True

    def write_frame(self, frame: bytes, frames: int = 1) -> bool:
        if self.limit is not None:
            if self.taken_bytes > self.limit:
                self.closed = CloseCode.SLOW_CONSUMER
                return False
            self.taken_bytes += len(frame)
        self.writes += 1
        taken = 0
        while frame:  # unmasked text frames, each with a 2- or 4-byte header
            size, start = (frame[1], 2) if frame[1] < 126 else (int.from_bytes(frame[2:4]), 4)
            self._take(frame[start : start + size])
            frame, taken = frame[start + size :], taken + 1
        assert taken == frames, (taken, frames)
        return True

    def before_flush(self, write: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_soon(write)

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


async def placed_hub(
    placements: dict[str, Placement],
    events: int,
    broker: MemoryBroker | None = None,
    truth: dict[str, Placement] | None = None,
    **hub_options: Any,
) -> tuple[MemoryBroker, Hub]:
    """A hub on a memory broker whose tenant acme is placed, with ``events`` stored.

    ``placements`` is what the gateway knows; ``truth`` (default the same) is where the
    broker stores, and so which stream its live events name."""
    broker = broker or MemoryBroker(MemoryMesh())
    broker.placement_for = (placements if truth is None else truth).get
    await broker.connect()
    broker.mesh.streams["acme"] = _Stream()  # provisioned by the ops tools
    hub = Hub(broker, 100, 1 << 20, **hub_options)
    hub.placement_for = placements.get
    for n in range(events):
        await broker.publish(REF, orjson.dumps({"n": n}), f"k{n}")
    return broker, hub


async def joined(hub: Hub, ref: ChannelRef = REF, events: int | None = None) -> FakeSocket:
    """A member of ``ref`` from its start that was sent its ``events`` (default: as many as
    the channel's last seq, for a tenant with one channel)."""
    socket = FakeSocket()
    member, result = await hub.join(socket, ref, 0, since_epoch=1)  # type: ignore[arg-type]
    hub.start(member, result.last_seq)
    await socket.frames(result.last_seq if events is None else events)
    return socket


async def live_offered(broker: MemoryBroker, ref: ChannelRef, body: bytes, key: str) -> None:
    """Publish, and return once every live subscriber of ``ref`` was offered the event:
    a marker subscribed after the hub is called after it (the memory mesh keeps order)."""
    seen = asyncio.Event()
    marker = await broker.subscribe_live(ref, lambda _ref, _event: seen.set())
    try:
        await broker.publish(ref, body, key)
        async with asyncio.timeout(5 * SEC):
            await seen.wait()
    finally:
        await marker.close()


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
    assert (member.epoch, hub.current_epoch("acme")) == (2, 2)
    # The member replays the new epoch from the fork, then takes the next live event.
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


async def test_an_idle_channel_catches_up_at_the_placement_change() -> None:
    placements = {"acme": FIRST}
    _, hub = await placed_hub(placements, events=3)
    socket = await joined(hub)
    placements["acme"] = promoted(FIRST, "west", 1)  # epoch 2 from seq 2: 2..3 not carried
    hub.placement_changed("acme")
    sent = await socket.frames(6)  # the gap, then 2..3 of epoch 2, with nothing published
    assert [(f.get("type", "event"), f.get("seq"), f.get("epoch")) for f in sent[3:]] == [
        ("gap", None, None),
        ("event", 2, 2),
        ("event", 3, 2),
    ]
    assert socket.closed is None
    await hub.close()


async def test_live_events_of_an_epoch_the_gateway_has_not_seen_wait_for_its_record() -> None:
    gateway_knows = {"acme": FIRST}
    failed_over = promoted(FIRST, "west", 3)  # the mirror had every event: no loss
    broker, hub = await placed_hub(gateway_knows, events=3)
    socket = await joined(hub)
    broker.placement_for = {"acme": failed_over}.get  # the store moved; the record is on its way
    await live_offered(broker, REF, orjson.dumps({"n": 3}), "k3")
    assert len(socket.sent) == 3  # not sent as an event of epoch 1
    gateway_knows["acme"] = failed_over
    hub.placement_changed("acme")
    sent = await socket.frames(4)
    assert [(f["seq"], f["epoch"]) for f in sent] == [(1, 1), (2, 1), (3, 1), (4, 2)]
    await hub.close()


async def test_a_former_primary_living_on_is_not_delivered_in_the_new_epoch() -> None:
    failed_over = promoted(FIRST, "west", 3)
    broker, hub = await placed_hub({"acme": failed_over}, events=3, truth={"acme": FIRST})
    socket = await joined(hub)
    await live_offered(broker, REF, orjson.dumps({"n": 3}), "k3")  # stored by arq_acme
    assert [(f["seq"], f["epoch"]) for f in socket.sent] == [(1, 2), (2, 2), (3, 2)]
    await hub.close()


async def test_a_join_from_an_epoch_the_gateway_has_not_seen_is_refused_retryably() -> None:
    _, hub = await placed_hub({"acme": FIRST}, events=1)
    try:
        await hub.join(FakeSocket(), REF, 5, since_epoch=2)  # type: ignore[arg-type]
    except BrokerUnavailable as exc:
        assert "epoch 2" in str(exc)
    else:
        raise AssertionError("a join ahead of the gateway's epoch was served")
    assert hub.member_count() == 0
    await hub.close()


class CountingBroker(MemoryBroker):
    """Counts the replays in progress at once. Once armed, each replay holds until ``hold``
    of them run together, so the peak shows the bound: unbounded catch-ups would exceed it,
    and catch-ups run one at a time would never reach it (the hold then times out)."""

    def __init__(self, hold: int) -> None:
        super().__init__(MemoryMesh())
        self.hold = hold
        self.armed = False
        self.full = asyncio.Event()
        self.active = 0
        self.most = 0

    def arm(self) -> None:
        self.armed, self.most = True, 0

    async def replay(
        self, ref: ChannelRef, start_seq: int, end_seq: int | None, limit: int | None = None
    ) -> AsyncGenerator[StoredEvent, None]:
        self.active += 1
        self.most = max(self.most, self.active)
        if self.active >= self.hold:
            self.full.set()
        try:
            if self.armed:
                await asyncio.wait_for(self.full.wait(), 5 * SEC)
            async for stored in super().replay(ref, start_seq, end_seq, limit):
                yield stored
        finally:
            self.active -= 1


async def test_a_failover_catches_up_many_members_a_bounded_number_at_a_time() -> None:
    placements = {"acme": FIRST}
    broker = CountingBroker(hold=3)
    refs = [ChannelRef("acme", "r", f"c{n}") for n in range(4)]
    _, hub = await placed_hub(placements, 0, broker, epoch_catchup_concurrency=3)
    for ref in refs:
        await broker.publish(ref, orjson.dumps({"n": 0}), f"k{ref.channel}")
    sockets = [await joined(hub, ref, events=1) for ref in refs for _ in range(5)]
    placements["acme"] = promoted(FIRST, "west", 0)  # epoch 2 from seq 1: every member moves
    broker.arm()
    hub.placement_changed("acme")
    for socket in sockets:  # a gap, then seq 1 of epoch 2 again from the store
        sent = await socket.frames(3)
        assert [(f.get("type", "event"), f.get("epoch")) for f in sent[1:]] == [
            ("gap", None),
            ("event", 2),
        ]
    assert broker.most == 3  # the bound, reached
    await hub.close()
