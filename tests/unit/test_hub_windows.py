"""The hub's window reads (gateway/ws/hub.py on the in-memory broker): a reconnect storm of
one channel's members shares them instead of making two JetStream requests per member."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from arqonbus_server.gateway.ws.hub import Hub
from arqonbus_server.mesh.memory import MemoryBroker, MemoryMesh
from arqonbus_server.mesh.ports import BrokerUnavailable, ChannelWindow
from arqonbus_server.shared.subjects import ChannelRef
from tests.timeouts import SEC
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


def joined_the_gate(hub: Hub, joins: int) -> asyncio.Event:
    """Set once ``joins`` joins have reached the channel's subscription step. The last one
    sets it within the same step that takes it to its wait, so when a waiter of this event
    runs, every join is waiting (or subscribing)."""
    reached = asyncio.Event()
    original = hub._subscribed
    count = 0

    async def counting(ref: ChannelRef, channel: Any) -> None:
        nonlocal count
        count += 1
        if count == joins:
            reached.set()
        await original(ref, channel)

    hub._subscribed = counting  # type: ignore[method-assign]
    return reached


async def test_joins_waiting_for_the_channel_s_subscription_go_on_together() -> None:
    """Joins that arrive while the first one subscribes the channel are woken together
    when it is done: with a lock they were handed the channel one per event-loop turn (a
    storm's hundreds of joins of one channel, hundreds of turns, each as long as the storm
    makes it)."""
    subscribing = asyncio.Event()
    may_finish = asyncio.Event()

    class SlowSubscribe(WindowCounting):
        async def subscribe_live(self, ref, handler):  # type: ignore[no-untyped-def]
            subscribing.set()
            await may_finish.wait()
            return await super().subscribe_live(ref, handler)

    broker = SlowSubscribe()
    await broker.connect()
    hub = Hub(broker, 100, 1 << 20)
    joins = 300
    gate = joined_the_gate(hub, joins)
    tasks = [asyncio.create_task(hub.join(FakeSocket(), REF, 0)) for _ in range(joins)]  # type: ignore[arg-type]
    await asyncio.wait_for(subscribing.wait(), 5 * SEC)
    await asyncio.wait_for(gate.wait(), 5 * SEC)  # every join waits for the subscription
    turns = 0
    done = asyncio.Event()

    def count_turn() -> None:
        nonlocal turns
        turns += 1
        if not done.is_set() and turns < 10_000:
            asyncio.get_running_loop().call_soon(count_turn)

    asyncio.get_running_loop().call_soon(count_turn)
    may_finish.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10 * SEC)
    done.set()
    assert turns < joins / 10, f"{joins} joins took {turns} event-loop turns"
    assert hub.subscription_count() == 1
    await hub.close()


async def test_a_failed_subscribe_is_tried_again_by_a_waiting_join() -> None:
    attempts = 0
    release = asyncio.Event()

    class FailingOnce(WindowCounting):
        async def subscribe_live(self, ref, handler):  # type: ignore[no-untyped-def]
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                await release.wait()
                raise BrokerUnavailable("first subscribe fails")
            return await super().subscribe_live(ref, handler)

    broker = FailingOnce()
    await broker.connect()
    hub = Hub(broker, 100, 1 << 20)
    gate = joined_the_gate(hub, 4)
    first = asyncio.create_task(hub.join(FakeSocket(), REF, 0))  # type: ignore[arg-type]
    others = [asyncio.create_task(hub.join(FakeSocket(), REF, 0)) for _ in range(3)]  # type: ignore[arg-type]
    await asyncio.wait_for(gate.wait(), 5 * SEC)  # the first subscribing, the rest waiting
    release.set()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(first, 5 * SEC)
    await asyncio.wait_for(asyncio.gather(*others), 5 * SEC)  # one of them subscribed
    assert attempts == 2
    await hub.close()
