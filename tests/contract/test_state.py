"""The StateStore's and KVBucket's guarantees (mesh/ports.py), against every implementation."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from arqonbus_server.mesh.ports import (
    InvalidKey,
    KeyExists,
    KVBucket,
    KVChange,
    KVEntry,
    RevisionMismatch,
)
from tests.contract.conftest import Mesh

WAIT_S = 10.0


async def fresh_bucket(mesh: Mesh) -> KVBucket:
    """A bucket of its own per test (the cluster is shared by the whole session)."""
    return await (await mesh.state()).bucket("ct" + uuid.uuid4().hex[:10])


async def same_bucket_elsewhere(mesh: Mesh, bucket: KVBucket) -> KVBucket:
    """The same bucket through another broker (another gateway)."""
    kind = bucket.name.removeprefix("arq_")
    return await (await mesh.state(await mesh.broker())).bucket(kind)


async def test_create_stores_only_an_absent_key_and_names_the_winner(mesh: Mesh) -> None:
    kv = await fresh_bucket(mesh)
    revision = await kv.create("k", b"first")
    assert await kv.get("k") == KVEntry("k", b"first", revision)
    with pytest.raises(KeyExists) as refused:
        await kv.create("k", b"second")
    assert (refused.value.value, refused.value.revision) == (b"first", revision)
    assert await kv.get("k") == KVEntry("k", b"first", revision)


async def test_of_concurrent_creates_on_several_gateways_exactly_one_wins(mesh: Mesh) -> None:
    kv = await fresh_bucket(mesh)
    other = await same_bucket_elsewhere(mesh, kv)
    attempts = [b.create("k", f"v{i}".encode()) for i, b in enumerate([kv, other] * 4)]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    won = [i for i, r in enumerate(results) if isinstance(r, int)]
    assert len(won) == 1
    losers = [r for r in results if not isinstance(r, int)]
    assert all(isinstance(r, KeyExists) for r in losers), [repr(r) for r in losers]
    winner = await kv.get("k")
    assert winner is not None and winner.value == f"v{won[0]}".encode()
    assert all(r.value == winner.value for r in losers if isinstance(r, KeyExists))


async def test_a_deleted_key_is_absent_and_can_be_created_again(mesh: Mesh) -> None:
    kv = await fresh_bucket(mesh)
    first = await kv.create("k", b"old")
    await kv.delete("k")
    assert await kv.get("k") is None
    again = await kv.create("k", b"new")
    assert again > first
    assert await kv.get("k") == KVEntry("k", b"new", again)
    await kv.delete("never-written")  # not an error
    assert await kv.get("never-written") is None


async def test_update_is_compare_and_set_on_the_latest_revision(mesh: Mesh) -> None:
    kv = await fresh_bucket(mesh)
    first = await kv.create("k", b"1")
    second = await kv.update("k", b"2", first)
    assert second > first
    with pytest.raises(RevisionMismatch):
        await kv.update("k", b"stale", first)
    with pytest.raises(RevisionMismatch):
        await kv.update("absent", b"x", first)
    assert await kv.get("k") == KVEntry("k", b"2", second)


async def test_of_concurrent_updates_at_one_revision_exactly_one_succeeds(mesh: Mesh) -> None:
    kv = await fresh_bucket(mesh)
    other = await same_bucket_elsewhere(mesh, kv)
    revision = await kv.create("k", b"0")
    attempts = [b.update("k", f"v{i}".encode(), revision) for i, b in enumerate([kv, other] * 3)]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert sum(isinstance(r, int) for r in results) == 1
    assert all(isinstance(r, int | RevisionMismatch) for r in results)


async def test_put_overwrites_and_revisions_strictly_increase(mesh: Mesh) -> None:
    kv = await fresh_bucket(mesh)
    revisions = [await kv.put("a", b"1"), await kv.put("b", b"2"), await kv.put("a", b"3")]
    assert revisions == sorted(set(revisions))
    assert await kv.get("a") == KVEntry("a", b"3", revisions[2])


async def test_items_is_a_sorted_snapshot_of_live_keys_under_a_prefix(mesh: Mesh) -> None:
    kv = await fresh_bucket(mesh)
    for key in ("t1.b", "t1.a", "t1.gone", "t2.a", "t1x"):
        await kv.put(key, key.encode())
    await kv.delete("t1.gone")
    assert await kv.items("t1.") == [("t1.a", b"t1.a"), ("t1.b", b"t1.b")]
    assert [k for k, _ in await kv.items()] == ["t1.a", "t1.b", "t1x", "t2.a"]
    with pytest.raises(InvalidKey):
        await kv.items("t1")


async def test_watch_gives_current_values_then_a_marker_then_changes_in_order(
    mesh: Mesh,
) -> None:
    kv = await fresh_bucket(mesh)
    await kv.put("a", b"1")
    await kv.put("gone", b"x")
    await kv.delete("gone")
    watch = await kv.watch()
    initial: dict[str, bytes | None] = {}
    changes: list[KVChange] = []
    writer = await same_bucket_elsewhere(mesh, kv)
    async with asyncio.timeout(WAIT_S):
        iterator = aiter(watch)
        while (change := await anext(iterator)) is not None:
            initial[change.key] = change.value
        b_rev = await writer.put("b", b"2")
        a_rev = await writer.update(
            "a", b"3", (await writer.get("a") or KVEntry("", b"", 0)).revision
        )
        await writer.delete("b")
        while len(changes) < 3:
            change = await anext(iterator)
            assert change is not None
            changes.append(change)
    await watch.stop()
    assert {k: v for k, v in initial.items() if v is not None} == {"a": b"1"}
    assert [(c.key, c.value) for c in changes] == [("b", b"2"), ("a", b"3"), ("b", None)]
    assert [c.revision for c in changes[:2]] == [b_rev, a_rev]
    assert changes[2].revision > a_rev


async def test_last_revision_is_the_latest_write_or_delete_seen_from_any_gateway(
    mesh: Mesh,
) -> None:
    kv = await fresh_bucket(mesh)
    assert await kv.last_revision() == 0
    written = await kv.put("a", b"1")
    assert await kv.last_revision() == written
    await kv.delete("a")
    deleted = await kv.last_revision()
    assert deleted > written
    assert await (await same_bucket_elsewhere(mesh, kv)).last_revision() == deleted


@pytest.mark.parametrize("key", ["", ".a", "a.", "a b", "a*", "a>"])
async def test_a_key_the_store_cannot_hold_is_invalid_key(mesh: Mesh, key: str) -> None:
    kv = await fresh_bucket(mesh)
    with pytest.raises(InvalidKey):
        await kv.put(key, b"x")
    with pytest.raises(InvalidKey):
        await kv.create(key, b"x")
