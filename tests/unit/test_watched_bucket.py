"""The watched copy of a KV bucket catching up with the store (mesh/watched.py), on the
in-memory twin (held to the JetStream bucket by tests/contract/test_state.py)."""

from __future__ import annotations

import asyncio
import logging

from arqonbus_server.mesh.memory import MemoryMesh, MemoryStateStore
from arqonbus_server.mesh.ports import BrokerUnavailable
from arqonbus_server.mesh.watched import START_GRACE_S, WatchedBucket
from tests.timeouts import SEC, eventually


async def watched_copy(mesh: MemoryMesh) -> WatchedBucket:
    watched = WatchedBucket("keys", lambda: MemoryStateStore(mesh).bucket("keys"))
    watched.start()
    await asyncio.wait_for(watched.ready.wait(), 5 * SEC)
    return watched


async def test_a_write_made_elsewhere_is_in_the_copy_once_caught_up_returns() -> None:
    mesh = MemoryMesh()
    watched = await watched_copy(mesh)
    try:
        writer = await MemoryStateStore(mesh).bucket("keys")
        await writer.put("t.k1", b"new")
        assert watched.get("t.k1") is None  # the watch has not run yet: a plain miss
        assert await watched.caught_up(5 * SEC)
        assert watched.get("t.k1") == b"new"
        await writer.delete("t.k1")
        assert await watched.caught_up(5 * SEC)
        assert watched.get("t.k1") is None
    finally:
        await watched.close()


async def test_a_copy_loaded_after_a_delete_is_current_at_once() -> None:
    # The delete is the store's latest revision and the initial load shows no change for
    # it: the copy still knows it holds every write up to there.
    mesh = MemoryMesh()
    kv = await MemoryStateStore(mesh).bucket("keys")
    await kv.put("t.a", b"1")
    await kv.put("t.gone", b"x")
    await kv.delete("t.gone")
    watched = await watched_copy(mesh)
    try:
        assert watched.revision == await kv.last_revision()
        assert await watched.caught_up(5 * SEC)
    finally:
        await watched.close()


async def test_concurrent_misses_share_one_query_and_a_copy_not_loaded_is_not_current() -> None:
    mesh = MemoryMesh()
    idle = WatchedBucket("keys", lambda: MemoryStateStore(mesh).bucket("keys"))
    assert not await idle.caught_up(5 * SEC)  # never started: nothing to catch up with
    watched = await watched_copy(mesh)
    queries = 0
    kv = watched.kv
    assert kv is not None
    last_revision = kv.last_revision

    async def counted() -> int:
        nonlocal queries
        queries += 1
        return await last_revision()

    kv.last_revision = counted  # type: ignore[method-assign]
    try:
        await (await MemoryStateStore(mesh).bucket("keys")).put("t.k", b"v")
        assert await asyncio.gather(*(watched.caught_up(5 * SEC) for _ in range(5))) == [True] * 5
        assert queries == 1 and watched.get("t.k") == b"v"
    finally:
        await watched.close()


async def test_close_ends_a_catch_up_in_progress_with_false() -> None:
    mesh = MemoryMesh()
    watched = await watched_copy(mesh)
    kv = watched.kv
    assert kv is not None

    async def far_ahead() -> int:
        return 1_000  # a revision the copy will not reach

    kv.last_revision = far_ahead  # type: ignore[method-assign]
    waiting = asyncio.ensure_future(watched.caught_up(30 * SEC))

    async def started() -> bool:
        return watched._sync is not None and not watched._sync.done()

    await eventually(started, 3 * SEC, "a catch-up in progress")
    await watched.close()
    assert await asyncio.wait_for(waiting, 3 * SEC) is False


async def test_a_bucket_not_there_at_start_is_info_then_warning(caplog) -> None:
    # A gateway starting with its cluster (another one creating the buckets) sees "stream
    # not found" for a moment: INFO during the start grace, WARNING once it lasts.
    mesh, now = MemoryMesh(), [100.0]
    attempts: asyncio.Queue[int] = asyncio.Queue()
    count = 0

    async def open_kv():
        nonlocal count
        count += 1
        attempts.put_nowait(count)
        if count < 3:
            raise BrokerUnavailable("stream not found")
        return await MemoryStateStore(mesh).bucket("keys")

    watched = WatchedBucket("keys", open_kv, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="arqonbus.mesh.kv")
    watched.start()
    try:
        async with asyncio.timeout(10 * SEC):
            assert await attempts.get() == 1
            assert await attempts.get() == 2  # the first failure has been logged
            now[0] += START_GRACE_S  # the store stays away past the grace
            assert await attempts.get() == 3
            await watched.ready.wait()
        levels = [(r.levelname, "still forming" in r.getMessage()) for r in caplog.records]
        assert levels == [("INFO", True), ("WARNING", False)]
    finally:
        await watched.close()
