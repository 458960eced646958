"""The AuditSink's guarantees (mesh/ports.py), against every implementation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson

from arqonbus_server.mesh.ports import AuditSink
from tests.contract.conftest import Mesh


def tenant() -> str:
    return "c" + uuid.uuid4().hex[:12]


async def append(sink: AuditSink, tenant: str, type_: str, n: int, event_id: str = "") -> int:
    event_id = event_id or uuid.uuid4().hex
    body = orjson.dumps({"id": event_id, "tenant": tenant, "type": type_, "n": n})
    return await sink.append(tenant, type_, event_id, body)


async def test_events_read_back_oldest_first_with_seq_strictly_increasing(mesh: Mesh) -> None:
    sink, t = await mesh.audit(), tenant()
    seqs = [await append(sink, t, "forbidden" if n % 2 else "auth_failed", n) for n in range(5)]
    assert seqs == sorted(set(seqs))
    events, more = await sink.read(t)
    assert [e["n"] for e in events] == [0, 1, 2, 3, 4]
    assert more is False


async def test_the_same_event_id_is_stored_once(mesh: Mesh) -> None:
    sink, t = await mesh.audit(), tenant()
    first = await append(sink, t, "forbidden", 1, event_id="same")
    again = await append(sink, t, "forbidden", 1, event_id="same")
    assert again == first
    events, _ = await sink.read(t)
    assert [e["n"] for e in events] == [1]


async def test_read_filters_by_type_since_and_limit(mesh: Mesh) -> None:
    sink, t = await mesh.audit(), tenant()
    for n in range(6):
        await append(sink, t, "forbidden" if n % 2 else "auth_failed", n)
    forbidden, _ = await sink.read(t, types=["forbidden"])
    assert [e["n"] for e in forbidden] == [1, 3, 5]
    both, _ = await sink.read(t, types=["forbidden", "auth_failed"])
    assert [e["n"] for e in both] == list(range(6))
    first, more = await sink.read(t, limit=4)
    assert ([e["n"] for e in first], more) == ([0, 1, 2, 3], True)
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await sink.read(t, since=future) == ([], False)
    past = datetime.now(UTC) - timedelta(hours=1)
    assert len((await sink.read(t, since=past))[0]) == 6


async def test_tenants_are_isolated_and_an_unknown_tenant_has_no_events(mesh: Mesh) -> None:
    sink, t1, t2 = await mesh.audit(), tenant(), tenant()
    await append(sink, t1, "forbidden", 1)
    await append(sink, t2, "forbidden", 2)
    assert [e["n"] for e in (await sink.read(t1))[0]] == [1]
    assert [e["n"] for e in (await sink.read(t2))[0]] == [2]
    assert await sink.read(tenant()) == ([], False)
