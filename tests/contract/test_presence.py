"""The PresenceStore's guarantees (mesh/ports.py), against every implementation.

Each test's stores share a subject prefix of their own (``Mesh.presence``), so the buckets
start empty; a second store is another gateway on the same cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from arqonbus_server.mesh.ports import (
    InvalidKey,
    PresenceChange,
    PresenceEntry,
    PresenceStore,
    PresenceWatch,
    RevisionMismatch,
)
from arqonbus_server.shared.errors import InvalidInput
from arqonbus_server.shared.subjects import ChannelRef
from tests.contract.conftest import Mesh
from tests.timeouts import SEC

WAIT_S = 10.0
log = logging.getLogger("tests.contract.presence")


def channel(tenant: str = "acme", room: str = "lobby", name: str = "general") -> ChannelRef:
    return ChannelRef(tenant, room, name)


def entry(
    principal: str,
    gateway: str = "gw-a",
    session: str = "s1",
    state: str = "online",
    metadata: object = None,
) -> PresenceEntry:
    return PresenceEntry(
        principal=principal,
        session=session,
        gateway=gateway,
        joined_at=1765000000.5,
        state=state,
        metadata=orjson.dumps(metadata if metadata is not None else {}),
        updated_at=1765000001.25,
    )


def key_of(item: PresenceEntry | PresenceChange) -> tuple[str, str, str]:
    return (item.principal, item.gateway, item.session)


class Reader:
    """A watch read one item at a time, each within WAIT_S."""

    def __init__(self, watch: PresenceWatch) -> None:
        self.watch = watch
        self._items: AsyncIterator[PresenceChange | None] = aiter(watch)

    async def next(self) -> PresenceChange | None:
        async with asyncio.timeout(WAIT_S * SEC):
            return await anext(self._items)

    async def change(self) -> PresenceChange:
        item = await self.next()
        assert item is not None, "a second end-of-initial-values marker"
        return item

    async def initial(self) -> list[PresenceChange]:
        """The initial part, up to the marker (which must come)."""
        found: list[PresenceChange] = []
        while (item := await self.next()) is not None:
            found.append(item)
            assert len(found) <= 20_000, "the initial part never ended"
        return found


async def open_reader(store: PresenceStore, ref: ChannelRef) -> Reader:
    return Reader(await store.watch(ref))


async def test_put_stores_replaces_and_remove_deletes(mesh: Mesh) -> None:
    store = await mesh.presence()
    ref = channel()
    first = entry("alice", metadata={"role": "triage"})
    await store.put(ref, first)
    assert await store.entries(ref) == [first]

    replaced = entry("alice", state="idle", metadata={"role": "lead", "n": 2})
    await store.put(ref, replaced)
    assert await store.entries(ref) == [replaced]

    await store.remove(ref, "alice", "gw-a", "s1")
    assert await store.entries(ref) == []
    await store.remove(ref, "alice", "gw-a", "s1")  # absent: not an error
    await store.remove(ref, "nobody", "gw-a", "s9")


async def test_one_entry_per_session_sorted_by_principal_gateway_session(mesh: Mesh) -> None:
    store = await mesh.presence()
    ref = channel()
    puts = [
        entry("bob", "gw-b", "s2"),
        entry("alice", "gw-b", "s1"),
        entry("alice", "gw-a", "s2"),
        entry("alice", "gw-a", "s1"),
        entry("alice-x", "gw-a", "s1"),
    ]
    for item in puts:
        await store.put(ref, item)
    found = await store.entries(ref)
    assert [key_of(e) for e in found] == sorted(key_of(e) for e in puts)


async def test_positions_strictly_increase_in_the_order_applied(mesh: Mesh) -> None:
    store = await mesh.presence()
    here, there = channel(), channel(name="other")
    positions = [
        await store.put(here, entry("a")),
        await store.put(there, entry("b")),
        await store.put(here, entry("a", state="idle")),
        await store.put(here, entry("c")),
    ]
    assert positions == sorted(set(positions))
    assert positions[0] > 0


async def test_watch_yields_the_entries_then_the_marker_then_that_channels_changes(
    mesh: Mesh,
) -> None:
    store = await mesh.presence()
    ref = channel()
    others = [channel(name="other"), channel(room="hall"), channel(tenant="globex")]
    initial = [entry("alice"), entry("bob", "gw-b", "s7", metadata={"k": "v"})]
    for item in initial:
        await store.put(ref, item)
    await store.put(ref, entry("gone"))
    await store.remove(ref, "gone", "gw-a", "s1")  # a removed entry is not in the snapshot
    for other in others:  # the same principal in channels of the same name elsewhere
        await store.put(other, entry("alice"))

    reader = await open_reader(store, ref)
    seen = await reader.initial()
    assert sorted((c.entry for c in seen), key=key_of) == initial  # type: ignore[arg-type]
    assert [key_of(c) for c in seen] == [key_of(c.entry) for c in seen if c.entry]

    carol = await store.put(ref, entry("carol"))
    for other in others:
        await store.put(other, entry("eve"))
        await store.remove(other, "alice", "gw-a", "s1")
    await store.remove(ref, "alice", "gw-a", "s1")
    idle_bob = entry("bob", "gw-b", "s7", state="idle", metadata={"k": "w"})
    last = await store.put(ref, idle_bob)

    changes = [await reader.change() for _ in range(3)]
    assert [(key_of(c), c.entry) for c in changes] == [
        (("carol", "gw-a", "s1"), entry("carol")),
        (("alice", "gw-a", "s1"), None),
        (("bob", "gw-b", "s7"), idle_bob),
    ]
    assert changes[0].position == carol and changes[-1].position == last
    assert changes[0].position < changes[1].position < changes[2].position
    await reader.watch.stop()


async def test_a_watch_of_an_empty_channel_marks_the_end_at_once_and_is_in_place(
    mesh: Mesh,
) -> None:
    store = await mesh.presence()
    ref = channel()
    await store.put(channel(name="busy"), entry("alice"))
    reader = await open_reader(store, ref)
    assert await reader.next() is None
    position = await store.put(ref, entry("bob"))  # right after watch() returned
    change = await reader.change()
    assert (change.position, change.entry) == (position, entry("bob"))


async def test_stop_ends_the_iteration(mesh: Mesh) -> None:
    store = await mesh.presence()
    reader = await open_reader(store, channel())
    assert await reader.next() is None
    waiting = asyncio.ensure_future(reader.next())
    await reader.watch.stop()
    with pytest.raises(StopAsyncIteration):
        await waiting


async def test_two_gateways_see_each_others_entries_and_changes(mesh: Mesh) -> None:
    here, there = await mesh.presence(), await mesh.presence()
    ref = channel()
    await here.put(ref, entry("alice", "gw-a"))
    reader = await open_reader(there, ref)
    assert [c.entry for c in await reader.initial()] == [entry("alice", "gw-a")]

    await there.put(ref, entry("bob", "gw-b"))
    await here.put(ref, entry("carol", "gw-a"))
    assert [(await reader.change()).principal for _ in range(2)] == ["bob", "carol"]
    both = [entry("alice", "gw-a"), entry("bob", "gw-b"), entry("carol", "gw-a")]
    assert await here.entries(ref) == await there.entries(ref) == both


async def test_leases_hold_each_gateways_latest_renewal_position(mesh: Mesh) -> None:
    here, there = await mesh.presence(), await mesh.presence()
    assert await here.leases() == {}
    a1 = await here.renew_lease("gw-a")
    b1 = await there.renew_lease("gw-b")
    assert 0 < a1 < b1
    assert await there.leases() == {"gw-a": a1, "gw-b": b1}
    a2 = await here.renew_lease("gw-a")
    assert a2 > b1
    assert await there.leases() == {"gw-a": a2, "gw-b": b1}
    await here.put(channel(), entry("alice"))  # entries never show up as leases
    assert set(await here.leases()) == {"gw-a", "gw-b"}


async def test_a_conditional_renewal_fails_once_another_removed_or_renewed_the_lease(
    mesh: Mesh,
) -> None:
    mine, other = await mesh.presence(), await mesh.presence()
    first = await mine.renew_lease("gw-a")
    second = await mine.renew_lease("gw-a", after=first)
    assert second > first
    with pytest.raises(RevisionMismatch):  # not at ``first`` any more: nothing written
        await mine.renew_lease("gw-a", after=first)
    assert (await mine.leases())["gw-a"] == second

    taken = await other.renew_lease("gw-a")  # another process under the same node id
    with pytest.raises(RevisionMismatch):
        await mine.renew_lease("gw-a", after=second)
    assert await mine.renew_lease("gw-a", after=taken) > taken

    await other.remove_gateway("gw-a")  # reaped
    with pytest.raises(RevisionMismatch):
        await mine.renew_lease("gw-a", after=taken)
    assert "gw-a" not in await mine.leases()
    again = await mine.renew_lease("gw-a")  # the unconditional renewal takes it back
    assert (await other.leases())["gw-a"] == again


async def test_remove_gateway_removes_its_entries_in_every_tenant_and_its_lease(
    mesh: Mesh,
) -> None:
    store, other = await mesh.presence(), await mesh.presence()
    refs = [channel(), channel(name="c2"), channel(tenant="globex", room="r9")]
    for i, ref in enumerate(refs):
        await store.put(ref, entry(f"p{i}", "gw-dead", "s1"))
        await store.put(ref, entry(f"p{i}", "gw-dead", "s2"))
        await other.put(ref, entry(f"p{i}", "gw-live", "s1"))
    await store.put(refs[0], entry("gw-dead", "gw-live", "gw-dead"))  # names, not the gateway
    await store.renew_lease("gw-dead")
    live_lease = await other.renew_lease("gw-live")
    reader = await open_reader(other, refs[0])
    assert len(await reader.initial()) == 4

    assert await other.remove_gateway("gw-dead") == 6
    for i, ref in enumerate(refs):
        kept = [entry(f"p{i}", "gw-live", "s1")]
        if i == 0:
            kept.insert(0, entry("gw-dead", "gw-live", "gw-dead"))
        assert await store.entries(ref) == kept
    assert await store.leases() == {"gw-live": live_lease}

    removals = [await reader.change() for _ in range(2)]
    assert sorted(key_of(c) for c in removals) == [("p0", "gw-dead", "s1"), ("p0", "gw-dead", "s2")]
    assert all(c.entry is None for c in removals)
    assert removals[0].position < removals[1].position

    assert await store.remove_gateway("gw-dead") == 0  # idempotent
    assert await store.remove_gateway("gw-never-seen") == 0


async def test_concurrent_remove_gateway_from_two_gateways_removes_each_entry_once(
    mesh: Mesh,
) -> None:
    here, there = await mesh.presence(), await mesh.presence()
    ref = channel()
    for i in range(40):
        await here.put(ref, entry(f"p{i}", "gw-dead", f"s{i}"))
    await here.put(ref, entry("keep", "gw-live"))
    await here.renew_lease("gw-dead")
    counts = await asyncio.gather(here.remove_gateway("gw-dead"), there.remove_gateway("gw-dead"))
    assert sum(counts) == 40
    assert await there.entries(ref) == [entry("keep", "gw-live")]
    assert "gw-dead" not in await here.leases()


async def test_remove_room_removes_only_that_rooms_entries(mesh: Mesh) -> None:
    store = await mesh.presence()
    doomed = [channel(room="r1"), channel(room="r1", name="c2")]
    kept = [channel(room="r10"), channel(room="r2"), channel(tenant="globex", room="r1")]
    for ref in doomed + kept:
        await store.put(ref, entry("alice"))
        await store.put(ref, entry("bob", "gw-b"))
    reader = await open_reader(store, doomed[1])
    assert len(await reader.initial()) == 2

    assert await store.remove_room("acme", "r1") == 4
    for ref in doomed:
        assert await store.entries(ref) == []
    for ref in kept:
        assert await store.entries(ref) == [entry("alice"), entry("bob", "gw-b")]
    assert {(await reader.change()).entry for _ in range(2)} == {None}
    assert await store.remove_room("acme", "r1") == 0


BAD_TOKENS = ["", "a.b", "*", ">", "a b", "x" * 65, "é"]


@pytest.mark.parametrize("bad", BAD_TOKENS)
async def test_an_invalid_token_raises_invalid_key_and_stores_nothing(mesh: Mesh, bad: str) -> None:
    store = await mesh.presence()
    good = channel()
    refs = [ChannelRef(bad, "r", "c"), ChannelRef("t", bad, "c"), ChannelRef("t", "r", bad)]
    for ref in refs:
        with pytest.raises(InvalidKey):
            await store.put(ref, entry("alice"))
        with pytest.raises(InvalidKey):
            await store.entries(ref)
        with pytest.raises(InvalidKey):
            await store.watch(ref)
        with pytest.raises(InvalidKey):
            await store.remove(ref, "alice", "gw-a", "s1")
    for principal, gateway, session in [(bad, "g", "s"), ("p", bad, "s"), ("p", "g", bad)]:
        with pytest.raises(InvalidKey):
            await store.put(good, entry(principal, gateway, session))
        with pytest.raises(InvalidKey):
            await store.remove(good, principal, gateway, session)
    for call in (store.renew_lease, store.remove_gateway):
        with pytest.raises(InvalidKey):
            await call(bad)
    with pytest.raises(InvalidKey):
        await store.remove_room(bad, "r")
    with pytest.raises(InvalidKey):
        await store.remove_room("t", bad)
    assert await store.entries(good) == []
    assert await store.leases() == {}


async def test_metadata_must_be_a_json_object(mesh: Mesh) -> None:
    store = await mesh.presence()
    for metadata in (b"[1]", b"not json", b'"s"'):
        bad = PresenceEntry("alice", "s1", "gw-a", 1.0, "online", metadata, 1.0)
        with pytest.raises(InvalidInput):
            await store.put(channel(), bad)
    assert await store.entries(channel()) == []


async def test_ten_thousand_entries_of_one_channel_all_come_back(mesh: Mesh) -> None:
    store = await mesh.presence()
    ref = channel()
    count = 10_000
    await store.put(channel(name="neighbour"), entry("someone"))
    for start in range(0, count, 500):
        batch = range(start, start + 500)
        await asyncio.gather(*(store.put(ref, entry(f"p{i:05d}", session=f"s{i}")) for i in batch))

    started = time.perf_counter()
    found = await store.entries(ref)
    entries_s = time.perf_counter() - started
    assert [e.principal for e in found] == [f"p{i:05d}" for i in range(count)]

    started = time.perf_counter()
    reader = await open_reader(store, ref)
    initial = await reader.initial()
    watch_s = time.perf_counter() - started
    assert sorted(c.principal for c in initial) == [f"p{i:05d}" for i in range(count)]

    started = time.perf_counter()
    assert await store.remove_gateway("gw-a") == count + 1  # and the neighbour's entry
    remove_s = time.perf_counter() - started
    assert await store.entries(ref) == []
    removals = [await reader.change() for _ in range(count)]
    assert {c.entry for c in removals} == {None}
    await reader.watch.stop()
    log.info(
        "%s: 10k entries() %.2f s, watch snapshot %.2f s, remove_gateway %.2f s",
        mesh.kind,
        entries_s,
        watch_s,
        remove_s,
    )
