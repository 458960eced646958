"""PresenceService on the real store: two gateways' services on the session's NATS cluster.

Each service has a broker of its own (as two gateway processes would), under a subject prefix
of this test's own so its presence buckets start empty; they are deleted afterwards. One
service is abandoned (its loops stopped, nothing removed: what SIGKILL leaves); the other
must hide its members at once and remove them from the store within the documented bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import nats
import orjson
import pytest

from arqonbus_server.gateway.state.presence import PresenceService, PresenceSettings
from arqonbus_server.mesh.jetstream import JetStreamBroker
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.mesh.presence import JetStreamPresenceStore
from arqonbus_server.mesh.streams import StreamPolicy
from arqonbus_server.shared.presence import PresenceQuery
from arqonbus_server.shared.subjects import (
    KV_PRESENCE,
    KV_PRESENCE_LEASES,
    ChannelRef,
    SubjectScheme,
)
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration

REF = ChannelRef("acme", "lobby", "general")
SETTINGS = PresenceSettings(batch_ms=50, idle_s=0, lease_interval_s=0.25, lease_timeout_s=1.0)
# Seen dead within lease_timeout_s + 2 intervals (module docstring), then one removal.
GONE_WITHIN_S = SETTINGS.lease_timeout_s + 2 * SETTINGS.lease_interval_s + 2.0 * SEC


class Cluster:
    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.scheme = SubjectScheme("ps" + uuid.uuid4().hex[:10])
        self.brokers: list[JetStreamBroker] = []
        self.services: list[PresenceService] = []

    async def store(self) -> JetStreamPresenceStore:
        broker = JetStreamBroker(self.urls, self.scheme, StreamPolicy(), name="presence-test")
        await broker.connect()
        self.brokers.append(broker)
        return JetStreamPresenceStore(broker)

    async def service(self, gateway: str) -> PresenceService:
        service = PresenceService(await self.store(), gateway, SETTINGS)
        await service.start()
        self.services.append(service)
        return service

    async def close(self) -> None:
        for service in self.services:
            await service.stop()
        for broker in self.brokers:
            await broker.close()
        nc = await nats.connect(self.urls)
        try:
            for kind in (KV_PRESENCE, KV_PRESENCE_LEASES):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await nc.jetstream().delete_key_value(self.scheme.kv_bucket(kind))
        finally:
            await nc.close()


@pytest.fixture
async def cluster(nats_cluster: LocalCluster) -> AsyncIterator[Cluster]:
    made = Cluster(nats_cluster.urls)
    try:
        yield made
    finally:
        await made.close()


async def test_an_abandoned_gateways_members_expire(cluster: Cluster) -> None:
    a, b = await cluster.service("gwa"), await cluster.service("gwb")
    received: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    await b.enter(REF, "w1", "watcher", lambda data: received.put_nowait(orjson.loads(data)))
    await b.occupancy(REF)  # b's mirror has its snapshot
    await a.enter(REF, "s1", "alice", None)
    await a.enter(REF, "s2", "alice", None)

    async def two_connections() -> dict[str, object] | None:
        page = await b.page(REF, PresenceQuery())
        members = {m["principal"]: m for m in page["members"]}
        alice = members.get("alice")
        return page if alice is not None and len(alice["connections"]) == 2 else None

    page = await eventually(two_connections, 5 * SEC, "alice's two sessions seen by gwb")
    assert page["occupancy"] == {"members": 2, "connections": 3, "online": 2, "idle": 0}

    await a.stop()  # abandoned: no close, no removal, no renewal
    loop = asyncio.get_running_loop()
    abandoned_at = loop.time()

    async def leave_of_alice() -> None:
        while True:
            frame = await received.get()
            changes = frame["payload"].get("changes")
            assert isinstance(changes, list)
            if any(c["action"] == "leave" and c["principal"] == "alice" for c in changes):
                return

    async with asyncio.timeout(GONE_WITHIN_S):
        await leave_of_alice()
    # Not before its lease ran out: counted from its last renewal, up to an interval earlier.
    assert loop.time() - abandoned_at >= SETTINGS.lease_timeout_s - SETTINGS.lease_interval_s
    occupancy = await b.occupancy(REF)
    assert (occupancy["members"], occupancy["connections"]) == (1, 1)

    store = await cluster.store()

    async def removed() -> bool:
        entries = await store.entries(REF)
        return [e.principal for e in entries] == ["watcher"] and "gwa" not in await store.leases()

    await eventually(removed, GONE_WITHIN_S, "gwa's entries and lease removed from the store")
