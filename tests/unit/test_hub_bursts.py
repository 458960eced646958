"""Live events that arrive in one event-loop turn (gateway/ws/hub.py, "bursts"): a member
that is live and at the burst's start gets them in one write; any other member takes them
one by one, with the same checks as a single live event (a hole is replayed from the store)."""

from __future__ import annotations

import orjson

from arqonbus_server.gateway.ws.hub import Hub, Member
from arqonbus_server.mesh.memory import MemoryBroker, MemoryMesh
from arqonbus_server.mesh.ports import LiveEvent
from arqonbus_server.shared.subjects import ChannelRef
from tests.timeouts import SEC, eventually
from tests.unit.test_hub_epochs import FakeSocket

REF = ChannelRef("acme", "r", "c")


async def stored_hub(events: int) -> tuple[MemoryBroker, Hub]:
    """A hub on a memory broker whose channel holds ``events`` events (seq 1..n, no live
    copy: nobody was subscribed)."""
    broker = MemoryBroker(MemoryMesh())
    await broker.connect()
    for n in range(1, events + 1):
        await broker.publish(REF, body(n), f"k{n}")
    return broker, Hub(broker, 100, 1 << 20)


def body(n: int) -> bytes:
    return orjson.dumps({"id": f"e{n}", "payload": {"n": n}})


def live(seq: int, prev_seq: int) -> LiveEvent:
    return LiveEvent(seq, prev_seq, body(seq), None, "", f"k{seq}")


async def live_member(hub: Hub, cursor: int) -> tuple[FakeSocket, Member]:
    """A member that joined at ``cursor`` and has caught up (it takes live events)."""
    socket = FakeSocket()
    member, _ = await hub.join(socket, REF, cursor)  # type: ignore[arg-type]
    hub.start(member, member.cursor)
    await until_live(member)
    return socket, member


async def until_live(member: Member) -> None:
    async def live() -> bool:
        return not member.syncing

    await eventually(live, 5 * SEC, "the member is live")


async def test_a_burst_goes_to_a_live_member_in_one_write_in_order() -> None:
    _, hub = await stored_hub(3)
    socket, member = await live_member(hub, 0)
    writes = socket.writes
    for seq in (1, 2, 3):  # one turn: written at its end, together
        hub._on_live(REF, live(seq, seq - 1))
    assert socket.writes == writes  # nothing before the turn ends
    frames = await socket.frames(3)
    assert [f["seq"] for f in frames] == [1, 2, 3]
    assert socket.writes == writes + 1
    assert member.cursor == 3
    await hub.close()


async def test_members_at_other_places_take_the_part_of_the_burst_they_miss() -> None:
    _, hub = await stored_hub(4)
    at_two, _ = await live_member(hub, 2)
    at_three, _ = await live_member(hub, 3)
    hub._on_live(REF, live(3, 2))
    hub._on_live(REF, live(4, 3))
    assert [f["seq"] for f in await at_two.frames(2)] == [3, 4]
    assert [f["seq"] for f in await at_three.frames(1)] == [4]  # it had 3 already
    assert (len(at_two.sent), len(at_three.sent)) == (2, 1)
    await hub.close()


async def test_a_hole_in_a_turn_ends_the_burst_and_is_replayed_from_the_store() -> None:
    """5 never comes live: 3 and 4 go out in one write before 6 is looked at; 6 shows the
    hole (its prev_seq is 5), so the member reads 5 from the store, then takes 6."""
    _, hub = await stored_hub(6)
    socket, member = await live_member(hub, 2)
    writes = socket.writes
    hub._on_live(REF, live(3, 2))
    hub._on_live(REF, live(4, 3))
    hub._on_live(REF, live(6, 5))  # the chain breaks: 3 and 4 are written now
    assert [f["seq"] for f in socket.sent] == [3, 4]
    assert socket.writes == writes + 1
    frames = await socket.frames(4)
    assert [f["seq"] for f in frames] == [3, 4, 5, 6]
    await until_live(member)
    assert member.cursor == 6
    hub._on_live(REF, live(6, 5))  # a copy it has: nothing more
    hub._on_live(REF, live(7, 6))
    frames = await socket.frames(5)
    assert [f["seq"] for f in frames] == [3, 4, 5, 6, 7]
    await hub.close()


async def test_a_burst_for_a_channel_without_members_is_dropped() -> None:
    _, hub = await stored_hub(1)
    socket, _ = await live_member(hub, 1)
    hub.leave(socket, REF)  # type: ignore[arg-type]
    hub._on_live(REF, live(2, 1))
    assert hub._bursts == []
    await hub.close()
