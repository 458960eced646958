"""The gateway's watched copy of the placement bucket, and acks that wait for a mirror, on the
in-memory twins (gateway/state/placement.py, mesh/mirrors.py, mesh/memory.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from arqonbus_server.gateway.state.placement import PlacementTable, placement_kind
from arqonbus_server.mesh.memory import MemoryBroker, MemoryMesh, MemoryStateStore, _Stream
from arqonbus_server.mesh.mirrors import MirrorConfirmer
from arqonbus_server.mesh.ports import BrokerUnavailable
from arqonbus_server.mesh.watched import WatchedBucket
from arqonbus_server.shared.regions import Epoch, Placement, StreamAt
from arqonbus_server.shared.subjects import ChannelRef
from tests.timeouts import SEC, eventually


async def until(condition: Callable[[], bool], what: str) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, 5 * SEC, what)


PRIMARY = StreamAt("east", "arq_acme")
MIRROR = StreamAt("west", "arq-mirror-west_acme")
PLACED = Placement("acme", "east", PRIMARY, (MIRROR,), (Epoch(1, 1, PRIMARY),))
REF = ChannelRef("acme", "r", "c")


async def test_the_copy_follows_the_bucket_and_ignores_a_record_that_does_not_parse() -> None:
    mesh = MemoryMesh()
    kv = await MemoryStateStore(mesh).bucket(placement_kind("here"))
    await kv.put("acme", PLACED.to_json())
    watched = WatchedBucket(
        "placement", lambda: MemoryStateStore(mesh).bucket(placement_kind("here"))
    )
    changed: list[str] = []
    watched.on_change(lambda key, _: changed.append(key))
    table = PlacementTable(watched.get)
    watched.start()
    try:
        await asyncio.wait_for(watched.ready.wait(), 5 * SEC)
        assert table.get("acme") == PLACED
        assert (table.epoch("acme"), table.get("other"), table.epoch("other")) == (1, None, None)
        moved = Placement("acme", "east", MIRROR, (), (*PLACED.epochs, Epoch(2, 8, MIRROR)))
        await kv.put("acme", moved.to_json())
        await until(lambda: table.epoch("acme") == 2, "epoch 2")
        assert changed == ["acme", "acme"]  # the first load, then the change
        await kv.put("acme", b"{not json")
        await until(lambda: table.get("acme") is None, "no placement")
        await kv.put("acme", PLACED.to_json())
        await until(lambda: table.get("acme") == PLACED, "the placement again")
        await kv.delete("acme")
        await until(lambda: table.get("acme") is None, "no placement")
    finally:
        await watched.close()


async def placed_broker(placement: Placement, timeout_s: float = 5.0) -> MemoryBroker:
    broker = MemoryBroker(MemoryMesh())
    broker.placement_for = {placement.tenant: placement}.get
    broker.publish_timeout_s = timeout_s
    await broker.connect()
    return broker


async def test_a_placed_tenant_is_never_created_and_its_publish_fails_retryably() -> None:
    broker = await placed_broker(PLACED)
    with pytest.raises(BrokerUnavailable):
        await broker.publish(REF, b"{}", "k1")
    assert "acme" not in broker.mesh.streams
    assert await broker.ensure_stream("acme") == -1
    assert "acme" not in broker.mesh.streams


async def test_a_mirrored_ack_waits_for_the_mirror_and_a_lagging_one_times_out() -> None:
    broker = await placed_broker(PLACED, timeout_s=0.2 * SEC)
    mesh = broker.mesh
    mesh.streams["acme"] = _Stream()  # provisioned
    mesh.add_mirror(MIRROR.stream, "acme")
    assert (await broker.publish(REF, b"{}", "k1")).seq == 1  # the mirror follows at once
    mesh.hold_mirror(MIRROR.stream, 1)
    with pytest.raises(BrokerUnavailable, match="no mirror"):
        await broker.publish(REF, b"{}", "k2")  # stored as 2, the mirror holds 1
    broker.publish_timeout_s = 5 * SEC
    retry = asyncio.create_task(broker.publish(REF, b"{}", "k2"))  # same key: stored once
    await until(lambda: broker._confirmers.pending("acme") == 1, "the retry waits")
    assert not retry.done()
    mesh.hold_mirror(MIRROR.stream, None)
    result = await asyncio.wait_for(retry, 5 * SEC)
    assert (result.seq, result.duplicate) == (2, True)
    await broker.close()


async def test_home_acks_do_not_wait_for_mirrors() -> None:
    home = Placement("acme", "east", PRIMARY, (MIRROR,), PLACED.epochs, acks="home")
    broker = await placed_broker(home, timeout_s=0.1 * SEC)
    broker.mesh.streams["acme"] = _Stream()
    broker.mesh.add_mirror(MIRROR.stream, "acme")
    broker.mesh.hold_mirror(MIRROR.stream, 0)
    assert (await broker.publish(REF, b"{}", "k1")).seq == 1


async def test_one_confirmer_resolves_every_pending_seq_up_to_the_highest_mirror() -> None:
    held = {"m1": 0, "m2": 0}
    asked: list[str] = []

    async def last_seq(stream: str) -> int:
        asked.append(stream)
        if stream == "gone":
            raise BrokerUnavailable("no such stream")
        return held[stream]

    confirmer = MirrorConfirmer(last_seq, interval_s=0.001, max_pending=3)
    waits = [
        asyncio.create_task(confirmer.wait(["m1", "m2", "gone"], seq, 5 * SEC)) for seq in (1, 2, 3)
    ]
    await until(lambda: confirmer.pending == 3, "confirmer.pending == 3")
    with pytest.raises(BrokerUnavailable, match="already wait"):  # bounded
        await confirmer.wait(["m1"], 4, 5 * SEC)
    held["m2"] = 2  # one mirror is enough
    await asyncio.wait_for(asyncio.gather(*waits[:2]), 5 * SEC)
    assert not waits[2].done()
    held["m1"] = 3
    await asyncio.wait_for(waits[2], 5 * SEC)
    assert confirmer.pending == 0
    rounds = len(asked)
    await confirmer.wait(["m1", "m2", "gone"], 3, 5 * SEC)  # confirmed already: no round
    assert len(asked) == rounds
    await confirmer.close()


async def test_an_answer_about_other_mirrors_confirms_nothing() -> None:
    """The mirrors to wait for changed while a round of stream infos was on its way: its
    answer (about the old ones) must not confirm a wait for the new ones."""
    answer = asyncio.Event()

    async def last_seq(stream: str) -> int:
        if stream == "old":
            await answer.wait()  # slow: still on its way when the mirrors change
            return 10
        return 0

    confirmer = MirrorConfirmer(last_seq, interval_s=0.001)
    with pytest.raises(BrokerUnavailable):
        await confirmer.wait(["old"], 10, 0.05 * SEC)
    waiting = asyncio.create_task(confirmer.wait(["new"], 10, 0.5 * SEC))
    await until(lambda: confirmer.pending == 1, "the wait for the new mirror is pending")
    answer.set()  # the old mirror's answer arrives: it holds seq 10
    with pytest.raises(BrokerUnavailable, match="new"):
        await waiting  # "new" never held it: not confirmed on "old"'s word
    await confirmer.close()


async def test_an_ack_carries_the_epoch_of_the_placement_the_publish_used() -> None:
    home = Placement("acme", "east", PRIMARY, (), (*PLACED.epochs, Epoch(2, 1, PRIMARY)))
    broker = await placed_broker(home)
    broker.mesh.streams["acme"] = _Stream()  # provisioned by the ops tools
    first = await broker.publish(REF, b"{}", "k1")
    again = await broker.publish(REF, b"{}", "k1")
    assert (first.seq, first.duplicate, first.epoch) == (1, False, 2)
    assert (again.seq, again.duplicate, again.epoch) == (1, True, 2)
    alone = MemoryBroker(MemoryMesh())
    await alone.connect()
    assert (await alone.publish(REF, b"{}", "k1")).epoch is None  # not placed: no epoch


def test_the_ops_tools_get_the_brokers_connection_publicly_and_not_before_it_connects() -> None:
    from arqonbus_server.mesh.jetstream import JetStreamBroker
    from arqonbus_server.mesh.regions import RegionOps
    from arqonbus_server.mesh.streams import StreamPolicy
    from arqonbus_server.shared.subjects import SubjectScheme

    broker = JetStreamBroker(["nats://127.0.0.1:1"], SubjectScheme(), StreamPolicy())
    with pytest.raises(BrokerUnavailable, match="not connected"):
        broker.nats_connection()
    with pytest.raises(BrokerUnavailable, match="not connected"):
        RegionOps.of(broker)
