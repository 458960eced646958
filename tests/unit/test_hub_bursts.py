"""Live events that arrive in one event-loop turn (gateway/ws/hub.py, "bursts"): a member
that is live and at the burst's start gets them in one write; any other member takes them
one by one, with the same checks as a single live event (a hole is replayed from the store)."""

from __future__ import annotations

from typing import Any

import orjson

from arqonbus_server.gateway.http.metrics import NoMetrics
from arqonbus_server.gateway.ws.hub import Hub, Member
from arqonbus_server.mesh.memory import MemoryBroker, MemoryMesh
from arqonbus_server.mesh.ports import LiveEvent
from arqonbus_server.shared.errors import CloseCode
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


async def live_member(
    hub: Hub, cursor: int, batch: bool = False, replay: bool = False
) -> tuple[FakeSocket, Member]:
    """A member that joined at ``cursor`` (with ``batch``) and has caught up: live from
    there, or with ``replay`` once it has read what the channel holds after it."""
    socket = FakeSocket()
    member, joined = await hub.join(socket, REF, cursor, batch=batch)  # type: ignore[arg-type]
    hub.start(member, joined.last_seq if replay else member.cursor)
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


async def test_a_burst_that_would_overrun_the_bound_goes_event_by_event() -> None:
    """Near its send bound, a member takes a burst one event at a time, so the bound is
    overshot by one event before the slow-consumer close, never by a whole burst."""
    _, hub = await stored_hub(4)
    socket, _ = await live_member(hub, 0)
    event_frame = len(body(1)) + 10  # an event message (its stored form) and frame header
    socket.limit = socket.taken_bytes + event_frame  # room for one event, not for all four
    writes = socket.writes
    for seq in (1, 2, 3, 4):
        hub._on_live(REF, live(seq, seq - 1))
    frames = await socket.frames(2)
    assert [f["seq"] for f in frames] == [1, 2]  # the second overran the bound ...
    assert socket.closed == CloseCode.SLOW_CONSUMER  # ... and the third was refused
    assert socket.writes == writes + 2
    assert socket.taken_bytes - socket.limit <= event_frame  # one event over, at most
    await hub.close()


class Deliveries(NoMetrics):
    """The deliveries the hub counts, per event body."""

    def __init__(self) -> None:
        self.counted: dict[bytes, int] = {}

    def delivered(self, members: int, body: bytes) -> None:
        self.counted[body] = self.counted.get(body, 0) + members


async def test_only_the_events_a_socket_took_are_counted_as_delivered() -> None:
    """A write the socket refuses (it is closing for 4001) delivers nothing, so the hub
    counts it nowhere: whole bursts, bursts cut event by event, single events and the
    fan-out of a traced gateway or a placed tenant."""
    broker = MemoryBroker(MemoryMesh())
    await broker.connect()
    for n in range(1, 7):
        await broker.publish(REF, body(n), f"k{n}")
    metrics = Deliveries()
    hub = Hub(broker, 100, 1 << 20, metrics=metrics)
    full, _ = await live_member(hub, 0)
    near, _ = await live_member(hub, 0)
    closed, _ = await live_member(hub, 0)
    event_frame = len(body(1)) + 10
    near.limit = near.taken_bytes + event_frame  # takes events 1 and 2 (one over), then refuses
    closed.limit = closed.taken_bytes - 1  # already over: refuses everything
    for seq in (1, 2, 3, 4):
        hub._on_live(REF, live(seq, seq - 1))
    await full.frames(4)
    await near.frames(2)
    assert near.closed == closed.closed == CloseCode.SLOW_CONSUMER and not closed.sent
    assert [metrics.counted[body(seq)] for seq in (1, 2, 3, 4)] == [2, 2, 1, 1]
    hub._on_live(REF, live(5, 4))  # one event alone: the full member only
    await full.frames(5)
    assert metrics.counted[body(5)] == 1
    # The path of a traced gateway or a placed tenant's event: the same count.
    assert hub._fan_out(hub._channels[REF], live(6, 5)) == 1
    assert metrics.counted[body(6)] == 1 and len(full.sent) == 6
    await hub.close()


async def test_a_burst_for_a_channel_without_members_is_dropped() -> None:
    _, hub = await stored_hub(1)
    socket, _ = await live_member(hub, 1)
    hub.leave(socket, REF)  # type: ignore[arg-type]
    hub._on_live(REF, live(2, 1))
    assert hub._bursts == []
    await hub.close()


# -- batched delivery: members that joined with ``batch`` (docs/protocol.md) -------------------


async def batch_member(hub: Hub, cursor: int, replay: bool = False) -> tuple[FakeSocket, Member]:
    """A member that joined with ``batch`` (see :func:`live_member`)."""
    return await live_member(hub, cursor, batch=True, replay=replay)


def seqs_of(messages: list[dict[str, Any]]) -> list[int]:
    """The seqs delivered by ``event`` and ``events`` messages, in order."""
    out: list[int] = []
    for message in messages:
        if message.get("type") == "events":
            assert (message["room"], message["channel"]) == (REF.room, REF.channel)
            out.extend(event["seq"] for event in message["payload"]["events"])
        else:
            out.append(message["seq"])
    return out


async def test_a_batch_member_takes_a_burst_in_one_events_message_and_others_as_before() -> None:
    _, hub = await stored_hub(3)
    batched, member = await batch_member(hub, 0)
    plain, _ = await live_member(hub, 0)
    for seq in (1, 2, 3):
        hub._on_live(REF, live(seq, seq - 1))
    (message,) = await batched.frames(1)
    assert message["type"] == "events"
    assert [e["payload"]["n"] for e in message["payload"]["events"]] == [1, 2, 3]
    assert seqs_of(await plain.frames(3)) == [1, 2, 3]
    assert [m.get("type") for m in plain.sent] == [None, None, None]  # event messages
    assert member.cursor == 3
    hub._on_live(REF, live(4, 3))  # alone in its turn: an event message
    (_, single) = await batched.frames(2)
    assert single["seq"] == 4 and "type" not in single  # the test bodies have no type
    await hub.close()


async def test_a_batch_member_behind_the_burst_takes_the_events_it_misses_one_by_one() -> None:
    _, hub = await stored_hub(4)
    behind, _ = await batch_member(hub, 3)
    at_two, _ = await batch_member(hub, 2)
    hub._on_live(REF, live(3, 2))
    hub._on_live(REF, live(4, 3))
    assert [m["type"] for m in await at_two.frames(1)] == ["events"]
    assert seqs_of(at_two.sent) == [3, 4]
    assert seqs_of(await behind.frames(1)) == [4]  # it had 3: no events message for it
    await hub.close()


async def test_a_long_burst_is_cut_into_events_messages_within_the_bytes_bound() -> None:
    """Delivered forms of about 20 KB: three fit in one message, a fourth would not."""
    big = 20_000
    broker = MemoryBroker(MemoryMesh())
    await broker.connect()
    bodies = [orjson.dumps({"id": f"e{n}", "pad": "x" * big}) for n in range(1, 8)]
    for n, stored in enumerate(bodies, 1):
        await broker.publish(REF, stored, f"k{n}")
    hub = Hub(broker, 100, 1 << 22)
    socket, member = await batch_member(hub, 0, replay=True)  # the store's 7 events
    replayed = list(socket.sent)
    assert seqs_of(replayed) == [1, 2, 3, 4, 5, 6, 7]
    assert [len(m["payload"]["events"]) if m.get("type") else 1 for m in replayed] == [3, 3, 1]
    for n in range(8, 15):
        hub._on_live(REF, LiveEvent(n, n - 1, bodies[0], None, "", f"k{n}"))
    live_messages = (await socket.frames(len(replayed) + 3))[len(replayed) :]
    assert seqs_of(live_messages) == list(range(8, 15))
    assert [len(m["payload"]["events"]) if m.get("type") else 1 for m in live_messages] == [3, 3, 1]
    assert member.cursor == 14
    await hub.close()


async def test_a_batch_members_replay_comes_in_events_messages_then_it_goes_live() -> None:
    _, hub = await stored_hub(5)
    socket, member = await batch_member(hub, 1, replay=True)
    assert [m["type"] for m in socket.sent] == ["events"]
    assert seqs_of(socket.sent) == [2, 3, 4, 5]
    assert member.cursor == 5
    hub._on_live(REF, live(6, 5))
    assert seqs_of(await socket.frames(2)) == [2, 3, 4, 5, 6]
    await hub.close()


async def test_live_events_held_while_a_batch_member_replays_go_out_in_runs() -> None:
    """Live events that arrive while a batch member still replays are held; once it has
    caught up, the held events that follow each other go out in one ``events`` message,
    a copy of one it has is dropped, and a hole is read from the store first."""
    _, hub = await stored_hub(8)
    socket = FakeSocket()
    member, _ = await hub.join(socket, REF, 0, batch=True)  # type: ignore[arg-type]
    for seq, prev_seq in ((4, 3), (5, 4), (6, 5), (5, 4), (8, 7)):  # 7 never came live
        hub._buffer(member, live(seq, prev_seq))
    hub.start(member, 3)
    await until_live(member)
    assert seqs_of(socket.sent) == list(range(1, 9))
    assert [
        len(m["payload"]["events"]) if m.get("type") == "events" else 1 for m in socket.sent
    ] == [
        3,  # the replay
        3,  # 4-6, held
        1,  # 7, read from the store
        1,  # 8, held
    ]
    assert member.cursor == 8 and not member.pending and member.pending_bytes == 0
    await hub.close()
