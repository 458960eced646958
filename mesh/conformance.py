"""Static proof, for mypy, that every implementation satisfies its port (mesh/ports.py).

The behaviour behind the signatures is checked by the contract suite, tests/contract/.
Nothing here runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from arqonbus_server.mesh.audit import JetStreamAuditSink
    from arqonbus_server.mesh.cluster import JetStreamClusterView
    from arqonbus_server.mesh.jetstream import JetStreamBroker
    from arqonbus_server.mesh.kv import JetStreamBucket, JetStreamStateStore
    from arqonbus_server.mesh.memory import (
        MemoryAuditSink,
        MemoryBroker,
        MemoryBucket,
        MemoryClusterView,
        MemoryPresenceStore,
        MemoryStateStore,
        _MemoryPresenceWatch,
    )
    from arqonbus_server.mesh.ports import (
        AuditSink,
        Broker,
        ClusterView,
        KVBucket,
        PresenceStore,
        PresenceWatch,
        StateStore,
    )
    from arqonbus_server.mesh.presence import JetStreamPresenceStore, _JetStreamPresenceWatch

    def _brokers(real: JetStreamBroker, twin: MemoryBroker) -> list[Broker]:
        return [real, twin]

    def _state_stores(real: JetStreamStateStore, twin: MemoryStateStore) -> list[StateStore]:
        return [real, twin]

    def _buckets(real: JetStreamBucket, twin: MemoryBucket) -> list[KVBucket]:
        return [real, twin]

    def _audit_sinks(real: JetStreamAuditSink, twin: MemoryAuditSink) -> list[AuditSink]:
        return [real, twin]

    def _cluster_views(real: JetStreamClusterView, twin: MemoryClusterView) -> list[ClusterView]:
        return [real, twin]

    def _presence_stores(
        real: JetStreamPresenceStore, twin: MemoryPresenceStore
    ) -> list[PresenceStore]:
        return [real, twin]

    def _presence_watches(
        real: _JetStreamPresenceWatch, twin: _MemoryPresenceWatch
    ) -> list[PresenceWatch]:
        return [real, twin]
