"""The Broker's admin reads, room purge and per-event TTL (mesh/ports.py), checked against
every implementation: channel_stats, channel_detail, purge_room and ``publish(ttl_s=...)``."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import nats
import pytest
from nats.js.errors import APIError

from arqonbus_server.mesh import jetstream
from arqonbus_server.mesh.jetstream import JetStreamBroker
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.mesh.ports import Broker, ChannelDetail, ChannelStats
from arqonbus_server.mesh.streams import StreamPolicy, tenant_stream_config
from arqonbus_server.shared.regions import Placement, StreamAt
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme
from tests.contract.conftest import Mesh
from tests.contract.test_broker import Received, live_in_place
from tests.timeouts import SEC, eventually

TTL_S = 2  # short, so that expiry is seen within a test
EXPIRY_WAIT_S = 15.0  # JetStream removes an expired event within about a second of its TTL


def tenant() -> str:
    return "a" + uuid.uuid4().hex[:12]


def key() -> str:
    return uuid.uuid4().hex


async def bodies(broker: Broker, ref: ChannelRef) -> list[bytes]:
    return [e.body async for e in broker.replay(ref, 1, None)]


async def test_channel_stats_list_each_channel_with_its_count_and_last_seq_sorted(
    mesh: Mesh,
) -> None:
    writer, reader = await mesh.broker(), await mesh.broker()
    t, other = tenant(), tenant()
    refs = [ChannelRef(t, "r2", "a"), ChannelRef(t, "r1", "b"), ChannelRef(t, "r1", "a")]
    last: dict[ChannelRef, int] = {}
    for i in range(7):  # interleaved: 3, 2 and 2 events
        ref = refs[i % 3]
        last[ref] = (await writer.publish(ref, b"x" * i, key())).seq
    await writer.publish(ChannelRef(other, "r1", "a"), b"other tenant", key())
    r1a, r1b, r2a = refs[2], refs[1], refs[0]
    assert await reader.channel_stats(t) == [
        ChannelStats("r1", "a", 2, last[r1a]),
        ChannelStats("r1", "b", 2, last[r1b]),
        ChannelStats("r2", "a", 3, last[r2a]),
    ]
    assert await reader.channel_stats(t, "r2") == [ChannelStats("r2", "a", 3, last[r2a])]
    assert await reader.channel_stats(t, "nothing-here") == []
    # Another tenant with a room and channel of the same names never lists t's.
    assert [s.messages for s in await reader.channel_stats(other)] == [1]
    assert await reader.channel_stats(tenant()) == []  # no stream at all


async def test_channel_stats_reflect_a_publish_acknowledged_before_the_call(mesh: Mesh) -> None:
    writer, reader = await mesh.broker(), await mesh.broker()
    ref = ChannelRef(tenant(), "r", "c")
    for i in range(5):
        seq = (await writer.publish(ref, b"e", key())).seq
        assert await reader.channel_stats(ref.tenant) == [ChannelStats("r", "c", i + 1, seq)]


async def test_channel_detail_counts_first_last_and_exact_bytes(mesh: Mesh) -> None:
    broker = await mesh.broker()
    t = tenant()
    ref, neighbour = ChannelRef(t, "r", "c"), ChannelRef(t, "r", "d")
    assert await broker.channel_detail(ref) == ChannelDetail(0, 0, 0, 0, True)
    sizes = [10, 300, 7, 4096]
    seqs = []
    for size in sizes:
        seqs.append((await broker.publish(ref, b"b" * size, key())).seq)
        await broker.publish(neighbour, b"n" * 999, key())
    detail = await broker.channel_detail(ref)
    assert detail == ChannelDetail(len(sizes), seqs[0], seqs[-1], sum(sizes), True)
    assert await broker.channel_detail(ChannelRef(t, "r", "empty")) == ChannelDetail(
        0, 0, 0, 0, True
    )


async def test_channel_detail_estimates_bytes_above_the_bound(mesh: Mesh) -> None:
    broker: Any = await mesh.broker()
    broker.detail_exact_max = 3  # the bound, lowered: 12 events are "many"
    ref = ChannelRef(tenant(), "r", "c")
    seqs = [(await broker.publish(ref, b"s" * 50, key())).seq for _ in range(12)]
    detail = await broker.channel_detail(ref)
    # Every event has the same size, so any sample estimates exactly.
    assert detail == ChannelDetail(12, seqs[0], seqs[-1], 12 * 50, False)


async def test_purge_room_removes_only_that_room_and_seqs_go_on_above(mesh: Mesh) -> None:
    writer, reader = await mesh.broker(), await mesh.broker()
    t, other = tenant(), tenant()
    gone_a, gone_b, kept = (
        ChannelRef(t, "gone", "a"),
        ChannelRef(t, "gone", "b"),
        ChannelRef(t, "kept", "a"),
    )
    seqs = [(await writer.publish(ref, b"e", key())).seq for ref in (gone_a, gone_b, kept, gone_a)]
    await writer.publish(ChannelRef(other, "gone", "a"), b"other tenant", key())
    assert await reader.purge_room(t, "gone") == 3
    assert await bodies(reader, gone_a) == [] and await bodies(reader, gone_b) == []
    assert [e.seq async for e in reader.replay(gone_a, 1, seqs[-1])] == []
    assert await reader.channel_stats(t) == [ChannelStats("kept", "a", 1, seqs[2])]
    assert await bodies(reader, ChannelRef(other, "gone", "a")) == [b"other tenant"]
    later = await writer.publish(gone_a, b"later", key())
    assert later.seq > max(seqs)
    assert await reader.channel_stats(t, "gone") == [ChannelStats("gone", "a", 1, later.seq)]
    assert await reader.purge_room(t, "never-used") == 0
    assert await reader.purge_room(tenant(), "gone") == 0  # no stream at all


async def test_a_ttl_event_expires_while_another_rooms_events_stay(mesh: Mesh) -> None:
    writer, reader = await mesh.broker(), await mesh.broker()
    t = tenant()
    short, long_ = ChannelRef(t, "short", "c"), ChannelRef(t, "long", "c")
    kept = await writer.publish(long_, b"kept", key())
    await writer.publish(short, b"brief", key(), ttl_s=TTL_S)
    assert await bodies(reader, short) == [b"brief"]  # stored until its TTL runs out

    async def expired() -> bool:
        return await bodies(reader, short) == []

    await eventually(expired, EXPIRY_WAIT_S * SEC, "the TTL'd event expired")
    assert await bodies(reader, long_) == [b"kept"]
    assert await reader.channel_stats(t) == [ChannelStats("long", "c", 1, kept.seq)]


async def test_a_ttl_event_is_deduplicated_and_delivered_live(mesh: Mesh) -> None:
    writer, reader = await mesh.broker(), await mesh.broker()
    ref = ChannelRef(tenant(), "r", "c")
    received = Received()
    await reader.subscribe_live(ref, received)
    await live_in_place(writer, ref, received)
    dedupe = key()
    first = await writer.publish(ref, b"ttl", dedupe, ttl_s=3600)
    again = await writer.publish(ref, b"ttl", dedupe, ttl_s=3600)
    assert (again.seq, again.duplicate, first.duplicate) == (first.seq, True, False)
    await received.until(lambda events: any(e.seq == first.seq for e in events))
    assert [e.body for e in received.events if e.seq == first.seq] == [b"ttl"]
    assert (await reader.channel_detail(ref)).messages == 2  # the probe and one "ttl"


async def test_a_ttl_below_one_second_is_a_caller_error(mesh: Mesh) -> None:
    broker = await mesh.broker()
    with pytest.raises(ValueError, match="at least 1 second"):
        await broker.publish(ChannelRef(tenant(), "r", "c"), b"e", key(), ttl_s=0)


# -- JetStream only: streams made before TTLs, and the batched reads' paging ----------------


async def _old_stream(nats_cluster: LocalCluster, tenant_name: str) -> None:
    """The tenant's stream as the previous code made it: per-message TTLs off."""
    config = tenant_stream_config(SubjectScheme(), tenant_name, StreamPolicy(), 3)
    nc = await nats.connect(nats_cluster.urls)
    try:
        await nc.jsm().add_stream(replace(config, allow_msg_ttl=None))
    finally:
        await nc.close()


async def _allows_ttl(nats_cluster: LocalCluster, tenant_name: str) -> bool:
    nc = await nats.connect(nats_cluster.urls)
    try:
        info = await nc.jsm().stream_info(SubjectScheme().stream_name(tenant_name))
        return bool(info.config.allow_msg_ttl)
    finally:
        await nc.close()


async def test_a_stream_made_before_ttls_is_upgraded_on_first_use(
    jetstream_mesh: Mesh, nats_cluster: LocalCluster
) -> None:
    t = tenant()
    await _old_stream(nats_cluster, t)
    assert not await _allows_ttl(nats_cluster, t)
    broker = await jetstream_mesh.broker()
    ref = ChannelRef(t, "r", "c")
    await broker.publish(ref, b"e", key(), ttl_s=TTL_S)
    assert await _allows_ttl(nats_cluster, t)

    async def expired() -> bool:
        return await bodies(broker, ref) == []

    await eventually(expired, EXPIRY_WAIT_S * SEC, "the TTL'd event expired")
    # Why every new stream has TTLs on: the server refuses to turn them off again.
    nc = await nats.connect(nats_cluster.urls)
    try:
        info = await nc.jsm().stream_info(SubjectScheme().stream_name(t))
        with pytest.raises(APIError, match="can not be disabled"):
            await nc.jsm().update_stream(replace(info.config, allow_msg_ttl=False))
    finally:
        await nc.close()


async def test_a_placed_primary_made_before_ttls_accepts_a_ttl_event(
    jetstream_mesh: Mesh, nats_cluster: LocalCluster
) -> None:
    t = tenant()
    await _old_stream(nats_cluster, t)
    stream = SubjectScheme().stream_name(t)
    placement = Placement(t, "here", StreamAt("here", stream))
    broker = await jetstream_mesh.broker()
    broker.placement_for = lambda name: placement if name == t else None
    ref = ChannelRef(t, "r", "c")
    stored = await broker.publish(ref, b"e", key(), ttl_s=3600)  # refused once, upgraded, sent
    assert await _allows_ttl(nats_cluster, t)
    assert await broker.channel_stats(t) == [ChannelStats("r", "c", 1, stored.seq)]


async def test_channel_stats_page_through_many_channels_and_small_batches(
    jetstream_mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lowered bounds: 3 subjects per multi_last request, one event per direct-get batch.
    monkeypatch.setattr(jetstream, "_MULTI_LAST_CHUNK", 3)
    monkeypatch.setattr(jetstream, "_REPLAY_BATCH_BYTES", 1)
    broker = await jetstream_mesh.broker()
    assert isinstance(broker, JetStreamBroker)
    t = tenant()
    expected = []
    for i in range(8):
        ref = ChannelRef(t, f"r{i % 2}", f"c{i}")
        await broker.publish(ref, b"first", key())
        expected.append(ChannelStats(ref.room, ref.channel, 2, 0))
        expected[-1] = replace(expected[-1], last_seq=(await broker.publish(ref, b"2", key())).seq)
    assert await broker.channel_stats(t) == sorted(expected, key=lambda s: (s.room, s.channel))


async def test_purge_room_of_a_placed_tenant_purges_its_mirrors_too(
    jetstream_mesh: Mesh, nats_cluster: LocalCluster
) -> None:
    broker = await jetstream_mesh.broker()
    t = tenant()
    gone, kept = ChannelRef(t, "gone", "c"), ChannelRef(t, "kept", "c")
    seqs = [(await broker.publish(ref, b"e", key())).seq for ref in (gone, kept, gone)]
    mirror = await jetstream_mesh.add_mirror(t)
    await broker.wait_mirrored(t, [mirror], seqs[-1], 10 * SEC)
    primary = StreamAt("here", SubjectScheme().stream_name(t))
    placement = Placement(t, "here", primary, (StreamAt("there", mirror),), acks="home")
    broker.placement_for = lambda name: placement if name == t else None
    assert await broker.purge_room(t, "gone") == 2
    nc = await nats.connect(nats_cluster.urls)
    try:
        # A mirror does not copy a purge: without its own, it would still hold 3 events.
        assert (await nc.jsm().stream_info(mirror)).state.messages == 1
    finally:
        await nc.close()
    assert await broker.channel_stats(t) == [ChannelStats("kept", "c", 1, seqs[1])]
