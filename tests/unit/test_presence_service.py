"""PresenceService on the in-memory store: two services on one MemoryMesh are two gateways."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from arqonbus_server.gateway.state.presence import (
    REPUT_CONCURRENCY,
    PresenceService,
    PresenceSettings,
)
from arqonbus_server.mesh.memory import MemoryMesh, MemoryPresenceStore
from arqonbus_server.mesh.ports import BrokerUnavailable
from arqonbus_server.shared.presence import PresenceQuery, decode_cursor
from arqonbus_server.shared.subjects import ChannelRef
from tests.timeouts import SEC, eventually

REF = ChannelRef("acme", "lobby", "general")
FAST = PresenceSettings(
    batch_ms=20, idle_s=0, lease_interval_s=0.05, lease_timeout_s=0.4, mirror_linger_s=60
)


class Frames:
    """A sink that keeps the frames it receives, to wait on."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.arrived = asyncio.Event()

    def __call__(self, data: bytes) -> None:
        self.raw.append(data)
        self.arrived.set()

    @property
    def frames(self) -> list[dict[str, Any]]:
        frames = [orjson.loads(r) for r in self.raw]
        assert all(f["type"] == "presence" and "room" in f for f in frames), frames
        return [f["payload"] for f in frames]

    def changes(self) -> list[dict[str, Any]]:
        return [c for f in self.frames for c in f["changes"]]

    async def until(self, check: Callable[[Frames], bool], what: str) -> None:
        """Wait (event-driven) until ``check`` holds after some frame."""
        try:
            async with asyncio.timeout(3 * SEC):
                while not check(self):
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not within {3 * SEC:g} s; got {self.frames}") from None


def has(action: str, principal: str, **fields: Any) -> Callable[[Frames], bool]:
    def check(frames: Frames) -> bool:
        return any(
            c["action"] == action
            and c["principal"] == principal
            and all(c.get(k) == v for k, v in fields.items())
            for c in frames.changes()
        )

    return check


class Gateways:
    def __init__(self) -> None:
        self.mesh = MemoryMesh()
        self.services: list[PresenceService] = []

    async def start(self, name: str, settings: PresenceSettings = FAST) -> PresenceService:
        service = PresenceService(MemoryPresenceStore(self.mesh), name, settings)
        await service.start()
        self.services.append(service)
        return service

    def store(self) -> MemoryPresenceStore:
        return MemoryPresenceStore(self.mesh)


@pytest.fixture
async def gateways() -> AsyncIterator[Gateways]:
    made = Gateways()
    yield made
    for service in made.services:
        await service.stop()


async def watcher(service: PresenceService, ref: ChannelRef = REF) -> Frames:
    """A sink on ``service`` for ``ref`` that enters too, once its mirror is in place."""
    frames = Frames()
    await service.enter(ref, "watch1", "watcher", frames)
    await service.occupancy(ref)  # the mirror has its snapshot: later changes are frames
    return frames


async def test_join_update_and_leave_are_seen_by_the_other_gateway(gateways: Gateways) -> None:
    a, b = await gateways.start("gwa"), await gateways.start("gwb")
    frames = await watcher(b)
    await a.enter(REF, "s1", "alice", None)
    await frames.until(has("join", "alice", state="online", connections=1), "alice's join")
    result = await a.set_presence("s1", "alice", "idle", b'{"role":"triage"}')
    assert result == {"state": "idle", "metadata": {"role": "triage"}, "channels": 1}
    await frames.until(
        has("update", "alice", state="idle", metadata={"role": "triage"}), "alice's update"
    )
    await a.leave(REF, "s1")
    await frames.until(has("leave", "alice"), "alice's leave")
    positions = [c["position"] for c in frames.changes() if c["principal"] == "alice"]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


async def test_two_sessions_on_two_gateways_are_one_member(gateways: Gateways) -> None:
    a, b = await gateways.start("gwa"), await gateways.start("gwb")
    await a.enter(REF, "s1", "alice", None)
    await b.set_presence("s2", "alice", "idle", None)
    await b.enter(REF, "s2", "alice", None)
    page = await eventually(
        lambda: _page_with(a, lambda p: p["occupancy"]["connections"] == 2), 3 * SEC, "2 sessions"
    )
    assert page["occupancy"] == {"members": 1, "connections": 2, "online": 1, "idle": 0}
    [alice] = page["members"]
    assert alice["state"] == "online"
    assert {(c["gateway"], c["state"]) for c in alice["connections"]} == {
        ("gwa", "online"),
        ("gwb", "idle"),
    }
    assert page["next_cursor"] is None and page["position"] >= 2


async def _page_with(
    service: PresenceService, check: Callable[[dict[str, Any]], bool], query: Any = None
) -> dict[str, Any] | None:
    page = await service.page(REF, query or PresenceQuery())
    return page if check(page) else None


async def test_a_first_query_reads_the_snapshot_and_pages(gateways: Gateways) -> None:
    a, b = await gateways.start("gwa"), await gateways.start("gwb")
    for i in range(25):
        await a.enter(REF, f"s{i}", f"p{i:02d}", None)
    occupancy = await b.occupancy(REF)  # no mirror yet: waits for the snapshot
    assert occupancy["members"] == 25 and occupancy["position"] >= 25
    names: list[str] = []
    query = PresenceQuery(limit=10)
    for _ in range(5):
        page = await b.page(REF, query)
        names += [m["principal"] for m in page["members"]]
        if page["next_cursor"] is None:
            break
        query = PresenceQuery(limit=10, after=decode_cursor(page["next_cursor"]))
    assert names == [f"p{i:02d}" for i in range(25)]


async def test_frames_are_coalesced_and_shared_by_every_sink(gateways: Gateways) -> None:
    a = await gateways.start("gwa")
    b = await gateways.start("gwb", PresenceSettings(batch_ms=200, idle_s=0))
    frames = await watcher(b)
    other = Frames()
    await b.enter(REF, "watch2", "watcher", other)  # the same principal: an update
    await frames.until(has("update", "watcher", connections=2), "the second watcher session")
    await other.until(lambda f: bool(f.raw), "the second sink's frame")
    start = len(frames.raw)
    await asyncio.gather(*(a.enter(REF, f"s{i}", f"p{i}", None) for i in range(5)))
    await frames.until(lambda f: len(f.changes()) >= 1 + 5, "the joins")
    assert len(frames.raw) == start + 1  # five joins, one frame
    assert {c["principal"] for c in frames.frames[-1]["changes"]} == {f"p{i}" for i in range(5)}
    await other.until(lambda f: f.raw[-1] is frames.raw[-1], "the same bytes to both sinks")


async def test_a_join_storm_overflows(gateways: Gateways) -> None:
    a = await gateways.start("gwa")
    b = await gateways.start("gwb", PresenceSettings(batch_ms=100, max_changes=3, idle_s=0))
    frames = await watcher(b)
    await asyncio.gather(*(a.enter(REF, f"s{i}", f"p{i}", None) for i in range(10)))
    await frames.until(lambda f: any(x.get("overflow") for x in f.frames), "an overflow frame")
    [overflow] = [x for x in frames.frames if x.get("overflow")]
    assert overflow["changes"] == []
    assert overflow["occupancy"]["members"] == 11  # ten and the watcher


async def test_a_killed_gateway_is_removed_by_the_others(gateways: Gateways) -> None:
    a, b = await gateways.start("gwa"), await gateways.start("gwb")
    frames = await watcher(b)
    await a.enter(REF, "s1", "alice", None)
    await frames.until(has("join", "alice"), "alice's join")
    await a.stop()  # a kill: no close, no removal, no more renewals
    await frames.until(has("leave", "alice"), "alice's leave after gwa's lease expired")
    store = gateways.store()
    await eventually(
        lambda: _none_of(store, "gwa"), 3 * SEC, "gwa's entries and lease removed from the store"
    )
    assert (await b.occupancy(REF))["members"] == 1  # the watcher only


async def _none_of(store: MemoryPresenceStore, gateway: str) -> bool:
    entries = await store.entries(REF)
    return all(e.gateway != gateway for e in entries) and gateway not in await store.leases()


async def test_a_reaped_gateway_puts_its_entries_again(gateways: Gateways) -> None:
    a = await gateways.start("gwa")
    await a.enter(REF, "s1", "alice", None)
    store = gateways.store()
    assert await store.remove_gateway("gwa") == 1  # as another gateway would, wrongly
    await eventually(
        lambda: _principals(store, {"alice"}), 3 * SEC, "alice's entry put again by gwa"
    )


class LaggingLeases(MemoryPresenceStore):
    """The twin whose lease reads come from a replica one read behind (a NATS KV read may be
    served by a follower), its renewals decided on the leader as always."""

    def __init__(self, mesh: MemoryMesh) -> None:
        super().__init__(mesh)
        self.behind: dict[str, int] = {}
        self.reads = 0

    async def leases(self) -> dict[str, int]:
        self.reads += 1
        now = await super().leases()
        seen, self.behind = self.behind, now
        return seen


async def test_a_lagging_lease_read_is_no_reason_to_repair(
    gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    store = LaggingLeases(gateways.mesh)
    caplog.set_level("INFO", logger="arqonbus.gateway.presence")
    service = PresenceService(store, "gwa", FAST)
    await service.start()
    gateways.services.append(service)
    await service.enter(REF, "s1", "alice", None)
    await eventually(lambda: _reads(store, 10), 3 * SEC, "ten lease rounds")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


async def _reads(store: LaggingLeases, count: int) -> bool:
    return store.reads >= count


async def test_a_lease_renewed_by_another_is_repaired(
    gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    a = await gateways.start("gwa")
    await a.enter(REF, "s1", "alice", None)
    store = gateways.store()
    caplog.set_level("INFO", logger="arqonbus.gateway.presence")
    await store.renew_lease("gwa")  # another process under the same node id
    await store.remove(REF, "alice", "gwa", "s1")  # and its clean start, without a watch here

    async def warned() -> bool:
        return any("renewed by another" in r.getMessage() for r in caplog.records)

    await eventually(warned, 3 * SEC, "the repair's warning")
    await eventually(lambda: _principals(store, {"alice"}), 3 * SEC, "alice's entry put again")


async def _principals(store: MemoryPresenceStore, expected: set[str]) -> bool:
    return {e.principal for e in await store.entries(REF)} == expected


async def test_a_silent_session_turns_idle_then_online_again(gateways: Gateways) -> None:
    a = await gateways.start(
        "gwa", PresenceSettings(batch_ms=20, idle_s=0.3 * SEC, lease_interval_s=0.05)
    )
    b = await gateways.start("gwb")
    frames = await watcher(b)
    await a.enter(REF, "s1", "alice", None)
    await frames.until(has("update", "alice", state="idle"), "alice idle after silence")
    a.activity("s1")
    await frames.until(
        lambda f: f.changes()[-1]["principal"] == "alice" and f.changes()[-1]["state"] == "online",
        "alice online after a frame",
    )


async def test_close_forget_and_remove_room_remove_entries(gateways: Gateways) -> None:
    a, b = await gateways.start("gwa"), await gateways.start("gwb")
    store = gateways.store()
    other_room = ChannelRef("acme", "other", "general")
    await a.enter(REF, "s1", "alice", None)
    await a.enter(REF, "s2", "bob", None)
    await a.enter(other_room, "s2", "bob", None)
    await b.enter(REF, "s3", "carol", None)
    a.forget("s1")
    await eventually(lambda: _principals(store, {"bob", "carol"}), 3 * SEC, "alice forgotten")
    assert await a.remove_room("acme", "lobby") == 2  # bob's and carol's (another gateway's)
    assert await store.entries(REF) == []
    assert [e.principal for e in await store.entries(other_room)] == ["bob"]
    await a.set_presence("s2", "bob", "idle", None)  # the removed room is not put again
    assert await store.entries(REF) == []
    await a.close()
    assert await store.entries(other_room) == []
    assert "gwa" not in await store.leases()


class FlakyRemovals(MemoryPresenceStore):
    """The twin, but ``remove`` fails while ``down`` (a NATS node lost mid-disconnect)."""

    def __init__(self, mesh: MemoryMesh) -> None:
        super().__init__(mesh)
        self.down = True

    async def remove(self, ref: ChannelRef, principal: str, gateway: str, session: str) -> None:
        if self.down:
            raise BrokerUnavailable("no response from stream")
        await super().remove(ref, principal, gateway, session)


async def test_removals_the_store_refused_are_retried_until_they_land(
    gateways: Gateways,
) -> None:
    store = FlakyRemovals(gateways.mesh)
    service = PresenceService(store, "gwa", FAST)
    await service.start()
    gateways.services.append(service)
    reader = gateways.store()
    for session in ("s1", "s2"):
        await service.enter(REF, session, "alice", None)
    await service.leave(REF, "s1")  # refused: kept for the next round
    service.forget("s2")  # the connection ended: refused in the background too
    assert len(await reader.entries(REF)) == 2  # a live gateway's stale entries, for now
    store.down = False

    async def gone() -> bool:
        return not await reader.entries(REF)

    await eventually(gone, 5 * SEC, "the refused removals retried by the lease rounds")
    await service.enter(REF, "s3", "alice", None)  # and nothing removes a later entry
    assert [e.session for e in await reader.entries(REF)] == ["s3"]


class CountedRemovals(MemoryPresenceStore):
    """The twin, counting removal attempts and the most in flight at once."""

    def __init__(self, mesh: MemoryMesh) -> None:
        super().__init__(mesh)
        self.attempts = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.released = asyncio.Event()

    async def remove(self, ref: ChannelRef, principal: str, gateway: str, session: str) -> None:
        self.attempts += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.released.wait()  # every removal stays in flight until released
            await super().remove(ref, principal, gateway, session)
        finally:
            self.in_flight -= 1


async def test_a_mass_disconnect_removes_each_entry_once_with_bounded_concurrency(
    gateways: Gateways,
) -> None:
    # Each ended connection used to retry every queued removal: n closes gave n^2 store
    # calls, a flood that overflowed the NATS client's buffer at a few thousand sessions.
    store = CountedRemovals(gateways.mesh)
    service = PresenceService(store, "gwa", dataclasses.replace(FAST, lease_interval_s=60))
    await service.start()
    gateways.services.append(service)
    n = 3 * REPUT_CONCURRENCY
    for i in range(n):
        await service.enter(REF, f"s{i}", f"p{i}", None)
    for i in range(n):
        service.forget(f"s{i}")

    async def saturated() -> bool:
        return store.in_flight == REPUT_CONCURRENCY

    await eventually(saturated, 3 * SEC, "removals in flight up to the bound")
    store.released.set()

    async def gone() -> bool:
        return not await gateways.store().entries(REF)

    await eventually(gone, 5 * SEC, "every entry removed")
    assert store.attempts == n and store.most_in_flight == REPUT_CONCURRENCY


class FlakyPuts(MemoryPresenceStore):
    """The twin, but ``put`` fails while ``down`` (a join during a leader election)."""

    def __init__(self, mesh: MemoryMesh) -> None:
        super().__init__(mesh)
        self.down = True

    async def put(self, ref: ChannelRef, entry: Any) -> int:
        if self.down:
            raise BrokerUnavailable("no response from stream")
        return await super().put(ref, entry)


async def test_an_entry_the_store_refused_at_enter_is_put_until_it_lands(
    gateways: Gateways,
) -> None:
    store = FlakyPuts(gateways.mesh)
    settings = dataclasses.replace(FAST, call_timeout_s=0.2)
    service = PresenceService(store, "gwa", settings)
    await service.start()
    gateways.services.append(service)
    reader = gateways.store()
    await service.enter(REF, "s1", "alice", None)  # refused: no error, kept for the rounds
    await service.enter(REF, "s2", "bob", None)
    await service.leave(REF, "s2")  # left before it was ever stored: never put later
    # The store stays down longer than any time-limited repair window would last: the
    # entry must still land once it answers.
    refused_at = asyncio.get_running_loop().time()
    window = settings.lease_timeout_s + settings.call_timeout_s

    async def outlasted() -> bool:
        return asyncio.get_running_loop().time() - refused_at > 2 * window

    await eventually(outlasted, 5 * SEC, "the outage outlasting a repair window")
    assert await reader.entries(REF) == []
    store.down = False

    async def stored() -> list[str] | None:
        sessions = [e.session for e in await reader.entries(REF)]
        return sessions or None

    assert await eventually(stored, 5 * SEC, "the refused entry put by the lease rounds") == ["s1"]


class LeaseRefused(MemoryPresenceStore):
    """The twin, refusing the lease (a store still forming) until told otherwise."""

    def __init__(self, mesh: MemoryMesh) -> None:
        super().__init__(mesh)
        self.down = True
        self.tries = asyncio.Event()

    async def renew_lease(self, gateway: str, after: int | None = None) -> int:
        self.tries.set()
        if self.down:
            raise BrokerUnavailable("the store is forming")
        return await super().renew_lease(gateway, after)


async def test_a_store_forming_at_start_is_info_then_warning_then_started(
    gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    from arqonbus_server.gateway.state.presence import START_GRACE_S

    now = [100.0]
    store = LeaseRefused(gateways.mesh)
    service = PresenceService(store, "gwa", FAST, monotonic=lambda: now[0])
    caplog.set_level("INFO", logger="arqonbus.gateway.presence")
    await service.start()  # refused: the gateway serves, rounds retry
    gateways.services.append(service)
    not_started = [r for r in caplog.records if "presence not started" in r.getMessage()]
    assert [r.levelname for r in not_started] == ["INFO"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # nothing else either

    now[0] += START_GRACE_S  # still refused after the grace: now an operator must know
    store.tries.clear()
    await asyncio.wait_for(store.tries.wait(), 3 * SEC)

    async def warned() -> bool:
        return any(
            r.levelname == "WARNING" and "presence not started" in r.getMessage()
            for r in caplog.records
        )

    await eventually(warned, 3 * SEC, "a warning once the grace has passed")
    store.down = False

    async def leased() -> bool:
        return "gwa" in await gateways.store().leases()

    await eventually(leased, 3 * SEC, "the lease taken by a later round")
