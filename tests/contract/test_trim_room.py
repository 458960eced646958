"""Broker.trim_room (mesh/ports.py), checked against every implementation: a room's byte cap
removes its oldest events (all channels together) and nothing of other rooms or tenants."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from arqonbus_server.mesh import jetstream
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.mesh.ports import Broker, trim_count
from arqonbus_server.shared.regions import Placement, StreamAt
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme
from tests.contract.conftest import Mesh
from tests.timeouts import SEC

EVENTS = 30
KEPT = 12  # the cap below fits exactly the newest KEPT events of the room


def tenant() -> str:
    return "a" + uuid.uuid4().hex[:12]


def body(i: int) -> bytes:
    """Event ``i``'s body: distinct sizes (10, 13, 16, ...), so a cut one event off shows."""
    return f"{i:02d}".encode() + b"x" * (8 + 3 * i)


async def bodies(broker: Broker, ref: ChannelRef) -> list[bytes]:
    return [e.body async for e in broker.replay(ref, 1, None)]


async def publish_room(broker: Broker, t: str) -> list[tuple[ChannelRef, int, bytes]]:
    """EVENTS events of room ``r`` of ``t``, alternating over its channels a and b."""
    refs = [ChannelRef(t, "r", "a"), ChannelRef(t, "r", "b")]
    published = []
    for i in range(EVENTS):
        ref = refs[i % 2]
        seq = (await broker.publish(ref, body(i), uuid.uuid4().hex)).seq
        published.append((ref, seq, body(i)))
    return published


def cap_keeping(kept: int) -> int:
    """A cap that holds the newest ``kept`` events and is one byte short of one more."""
    newest = [len(body(i)) for i in range(EVENTS - kept, EVENTS)]
    return sum(newest) + len(body(EVENTS - kept - 1)) - 1


def test_trim_count_removes_the_oldest_until_the_rest_fits() -> None:
    assert trim_count([5, 5, 5], 10) == 1
    assert trim_count([5, 5, 5], 9) == 2
    assert trim_count([5, 5, 5], 15) == 0
    assert trim_count([5, 5, 5], 0) == 3
    assert trim_count([], 0) == 0
    with pytest.raises(ValueError, match="0 or more"):
        trim_count([1], -1)


async def test_trim_keeps_exactly_the_newest_events_that_fit(mesh: Mesh) -> None:
    writer, admin = await mesh.broker(), await mesh.broker()
    t, other_tenant = tenant(), tenant()
    published = await publish_room(writer, t)
    neighbour = ChannelRef(t, "other", "a")
    stranger = ChannelRef(other_tenant, "r", "a")
    for i in range(3):
        await writer.publish(neighbour, b"neighbour %d" % i, uuid.uuid4().hex)
        await writer.publish(stranger, b"stranger %d" % i, uuid.uuid4().hex)

    assert await admin.trim_room(t, "r", cap_keeping(KEPT)) == EVENTS - KEPT

    kept = published[EVENTS - KEPT :]
    for channel in ("a", "b"):
        ref = ChannelRef(t, "r", channel)
        expected = [b for r, _, b in kept if r == ref]
        assert await bodies(admin, ref) == expected
        detail = await admin.channel_detail(ref)
        assert (detail.messages, detail.bytes) == (len(expected), sum(map(len, expected)))
        assert detail.first_seq == min(s for r, s, _ in kept if r == ref)
    assert await bodies(admin, neighbour) == [b"neighbour %d" % i for i in range(3)]
    assert await bodies(admin, stranger) == [b"stranger %d" % i for i in range(3)]

    assert await admin.trim_room(t, "r", cap_keeping(KEPT)) == 0  # already fits
    assert await admin.trim_room(t, "r", 10**9) == 0  # a cap larger than the room
    assert await admin.trim_room(t, "nothing-here", 0) == 0  # an unknown room
    assert await admin.trim_room(tenant(), "r", 0) == 0  # a tenant without a stream
    later = await writer.publish(ChannelRef(t, "r", "a"), b"later", uuid.uuid4().hex)
    assert later.seq > max(s for _, s, _ in published)


async def test_trim_to_zero_empties_the_room_and_seqs_go_on(mesh: Mesh) -> None:
    broker = await mesh.broker()
    t = tenant()
    published = await publish_room(broker, t)
    assert await broker.trim_room(t, "r", 0) == EVENTS
    assert await broker.channel_stats(t, "r") == []
    assert await broker.trim_room(t, "r", 0) == 0
    later = await broker.publish(ChannelRef(t, "r", "b"), b"later", uuid.uuid4().hex)
    assert later.seq > published[-1][1]
    assert await bodies(broker, ChannelRef(t, "r", "b")) == [b"later"]


async def test_a_negative_cap_is_refused(mesh: Mesh) -> None:
    broker = await mesh.broker()
    with pytest.raises(ValueError, match="0 or more"):
        await broker.trim_room(tenant(), "r", -1)


async def test_concurrent_trims_remove_each_event_once(mesh: Mesh) -> None:
    """Two gateways trim one room at once to the same cap. Both cuts come from the same
    stored room, so both purge below the same seq; each event is removed by exactly one
    purge (JetStream applies purges one after the other and counts what each removed), so
    the two counts add up to exactly the events removed, and the room is as after one."""
    writer, one, two = await mesh.broker(), await mesh.broker(), await mesh.broker()
    t = tenant()
    published = await publish_room(writer, t)
    counts = await asyncio.gather(
        one.trim_room(t, "r", cap_keeping(KEPT)), two.trim_room(t, "r", cap_keeping(KEPT))
    )
    assert sum(counts) == EVENTS - KEPT
    kept = published[EVENTS - KEPT :]
    for channel in ("a", "b"):
        ref = ChannelRef(t, "r", channel)
        assert await bodies(writer, ref) == [b for r, _, b in kept if r == ref]


async def test_a_room_above_the_read_bound_is_read_from_its_newest_events(
    jetstream_mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lowered bounds: 10 events read per trim, one event per direct-get batch.
    monkeypatch.setattr(jetstream, "TRIM_READ_MAX", 10)
    monkeypatch.setattr(jetstream, "_REPLAY_BATCH_BYTES", 1)
    broker = await jetstream_mesh.broker()
    t = tenant()
    published = await publish_room(broker, t)
    # The cap holds the newest KEPT (12) events, more than the 10 read: nothing is proven
    # past the cap, so nothing goes (never too many).
    assert await broker.trim_room(t, "r", cap_keeping(KEPT)) == 0
    # A cap of the newest 3: the newest 10 exceed it, so the cut is exact in one call.
    assert await broker.trim_room(t, "r", cap_keeping(3)) == EVENTS - 3
    assert await broker.trim_room(t, "r", cap_keeping(3)) == 0
    kept = published[EVENTS - 3 :]
    for channel in ("a", "b"):
        ref = ChannelRef(t, "r", channel)
        assert await bodies(broker, ref) == [b for r, _, b in kept if r == ref]


async def test_a_read_cut_short_by_time_trims_in_steps(
    jetstream_mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No time to read past the first batch, of one event (max_bytes 1).
    monkeypatch.setattr(jetstream, "_TRIM_READ_S", 0.0)
    monkeypatch.setattr(jetstream, "_REPLAY_BATCH_BYTES", 1)
    broker = await jetstream_mesh.broker()
    t = tenant()
    published = await publish_room(broker, t)
    # Each call proves only its one event past a cap of 3 bytes, and removes it: steps.
    assert [await broker.trim_room(t, "r", 3) for _ in range(3)] == [1, 1, 1]
    remaining = await bodies(broker, ChannelRef(t, "r", "a")) + await bodies(
        broker, ChannelRef(t, "r", "b")
    )
    assert sorted(remaining) == sorted(b for _, _, b in published[3:])


async def test_trim_of_a_placed_tenant_trims_its_mirrors_too(
    jetstream_mesh: Mesh, nats_cluster: LocalCluster
) -> None:
    broker = await jetstream_mesh.broker()
    t = tenant()
    published = await publish_room(broker, t)
    await broker.publish(ChannelRef(t, "other", "c"), b"stays", uuid.uuid4().hex)
    mirror = await jetstream_mesh.add_mirror(t)
    await broker.wait_mirrored(t, [mirror], published[-1][1] + 1, 10 * SEC)
    primary = StreamAt("here", SubjectScheme().stream_name(t))
    placement = Placement(t, "here", primary, (StreamAt("there", mirror),), acks="home")
    broker.placement_for = lambda name: placement if name == t else None
    assert await broker.trim_room(t, "r", cap_keeping(KEPT)) == EVENTS - KEPT
    nc = await nats.connect(nats_cluster.urls)
    try:
        # A mirror does not copy a purge: without its own, it would still hold all 31.
        assert (await nc.jsm().stream_info(mirror)).state.messages == KEPT + 1
    finally:
        await nc.close()
