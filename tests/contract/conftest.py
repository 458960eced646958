"""One contract suite for the mesh's ports (mesh/ports.py), run against every implementation.

Each test takes the ``mesh`` fixture, parametrized over the implementations: ``jetstream``
(the real ones, on the session's 3-node NATS cluster from tests/conftest.py) and ``memory``
(mesh/memory.py). ``mesh.broker()`` opens another connected broker on the same cluster (a
second gateway); everything opened is closed after the test.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.js.api import StreamConfig, StreamSource

from arqonbus_server.mesh.audit import JetStreamAuditSink
from arqonbus_server.mesh.cluster import JetStreamClusterView
from arqonbus_server.mesh.jetstream import JetStreamBroker
from arqonbus_server.mesh.kv import JetStreamStateStore
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.mesh.memory import (
    MemoryAuditSink,
    MemoryBroker,
    MemoryClusterView,
    MemoryMesh,
    MemoryPresenceStore,
    MemoryStateStore,
)
from arqonbus_server.mesh.ports import AuditSink, Broker, ClusterView, PresenceStore, StateStore
from arqonbus_server.mesh.presence import JetStreamPresenceStore
from arqonbus_server.mesh.streams import StreamPolicy
from arqonbus_server.shared.regions import mirror_stream_name
from arqonbus_server.shared.subjects import KV_PRESENCE, KV_PRESENCE_LEASES, SubjectScheme

IMPLEMENTATIONS = ["jetstream", "memory"]


class Mesh:
    """The ports of one implementation, on one cluster (real or in memory)."""

    def __init__(
        self, kind: str, make_broker: Callable[[], Any], urls: list[str] | None = None
    ) -> None:
        self.kind = kind
        self._make_broker = make_broker
        self._urls = urls or []
        self.opened: list[Any] = []
        self._mirrors: list[str] = []
        self._presence_scheme: SubjectScheme | None = None
        self._presence_mesh: MemoryMesh | None = None

    async def broker(self, max_bytes_for: Callable[[str], int] | None = None) -> Broker:
        broker = self._make_broker()
        broker.max_bytes_for = max_bytes_for  # read when a stream is created
        await broker.connect()
        self.opened.append(broker)
        return broker  # type: ignore[no-any-return]

    async def state(self, on: Broker | None = None) -> StateStore:
        """A state store on broker ``on`` (default: the first one opened)."""
        broker: Any = on or await self._first_broker()
        if self.kind == "memory":
            return MemoryStateStore(broker.mesh)
        return JetStreamStateStore(broker)

    async def audit(self) -> AuditSink:
        first = await self._first_broker()
        if self.kind == "memory":
            return MemoryAuditSink(first.mesh)
        return JetStreamAuditSink(first)

    async def cluster_views(self, count: int) -> list[ClusterView]:
        """``count`` views of one mesh (as on ``count`` gateways), under a subject prefix of
        their own: the heartbeat stream and its TTL are per prefix, shared by the session."""
        scheme = SubjectScheme("ct" + uuid.uuid4().hex[:10])
        if self.kind == "memory":
            shared = MemoryMesh(scheme)
            return [MemoryClusterView(shared) for _ in range(count)]
        views: list[ClusterView] = []
        for _ in range(count):
            broker = JetStreamBroker(self._urls, scheme, StreamPolicy(), name="contract-test")
            await broker.connect()
            self.opened.append(broker)
            views.append(JetStreamClusterView(broker))
        return views

    async def presence(self) -> PresenceStore:
        """A presence store on a broker of its own (as on another gateway). Every store of
        one test shares a subject prefix of its own, so its buckets start empty; they are
        deleted after the test."""
        if self._presence_scheme is None:
            self._presence_scheme = SubjectScheme("ct" + uuid.uuid4().hex[:10])
            self._presence_mesh = MemoryMesh(self._presence_scheme)
        if self.kind == "memory":
            return MemoryPresenceStore(self._presence_mesh)
        broker = JetStreamBroker(
            self._urls, self._presence_scheme, StreamPolicy(), name="contract-test"
        )
        await broker.connect()
        self.opened.append(broker)
        return JetStreamPresenceStore(broker)

    async def add_mirror(self, tenant: str) -> str:
        """A mirror of the tenant's (existing) stream, read by its own name; its name."""
        name = mirror_stream_name(SubjectScheme(), "here", tenant)
        first = await self._first_broker()
        if self.kind == "memory":
            first.mesh.add_mirror(name, tenant)
            return name
        nc = await nats.connect(self._urls)
        try:
            await nc.jsm().add_stream(
                StreamConfig(
                    name=name,
                    mirror=StreamSource(name=SubjectScheme().stream_name(tenant)),
                    allow_direct=True,
                    mirror_direct=False,
                    num_replicas=1,
                )
            )
        finally:
            await nc.close()
        self._mirrors.append(name)
        return name

    async def _first_broker(self) -> Any:
        if not self.opened:
            await self.broker()
        return self.opened[0]

    async def close(self) -> None:
        for broker in self.opened:
            await broker.close()
        if self._mirrors:
            nc = await nats.connect(self._urls)
            try:
                for name in self._mirrors:
                    await nc.jsm().delete_stream(name)
            finally:
                await nc.close()
        if self.kind == "jetstream" and self._presence_scheme is not None:
            await self._delete_buckets(
                [self._presence_scheme.kv_bucket(k) for k in (KV_PRESENCE, KV_PRESENCE_LEASES)]
            )

    async def _delete_buckets(self, names: list[str]) -> None:
        nc = await nats.connect(self._urls)
        try:
            for name in names:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await nc.jetstream().delete_key_value(name)
        finally:
            await nc.close()


@pytest.fixture
async def jetstream_mesh(nats_cluster: LocalCluster) -> AsyncIterator[Mesh]:
    def make() -> JetStreamBroker:
        return JetStreamBroker(cluster.urls, SubjectScheme(), StreamPolicy(), name="contract-test")

    cluster = nats_cluster
    ports = Mesh("jetstream", make, cluster.urls)
    try:
        yield ports
    finally:
        await ports.close()


@pytest.fixture
async def memory_mesh() -> AsyncIterator[Mesh]:
    shared = MemoryMesh()
    ports = Mesh("memory", lambda: MemoryBroker(shared))
    try:
        yield ports
    finally:
        await ports.close()


@pytest.fixture(params=IMPLEMENTATIONS)
def mesh(request: pytest.FixtureRequest) -> Mesh:
    """The ports of each implementation in turn (the real cluster only when asked for)."""
    ports: Mesh = request.getfixturevalue(f"{request.param}_mesh")
    return ports
