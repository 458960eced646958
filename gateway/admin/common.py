"""The one skeleton of every admin command that talks to the mesh.

``with_mesh(settings, name, body)`` builds the ports from the settings (the NATS credentials
and TLS of ``ARQONBUS_NATS_*``; the audit sink with the gateways' ``ARQONBUS_AUDIT_*``
limits), connects, runs ``body(ports)``, and always closes. A mesh it cannot reach is one
message naming the fix and exit code 1; whatever the body returns is the exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from arqonbus_server.mesh.audit import JetStreamAuditSink
from arqonbus_server.mesh.cluster import JetStreamClusterView
from arqonbus_server.mesh.jetstream import JetStreamBroker, broker_from_settings
from arqonbus_server.mesh.kv import JetStreamStateStore
from arqonbus_server.mesh.ports import AuditSink, BrokerUnavailable, ClusterView, StateStore
from arqonbus_server.shared.settings import Settings

EXIT_UNREACHABLE = 1


@dataclass(frozen=True, slots=True)
class CliPorts:
    """What a one-shot admin command uses: the broker (connected by :func:`with_mesh`), the
    state store, the audit sink and the cluster view on it."""

    broker: JetStreamBroker
    state: StateStore
    audit: AuditSink
    cluster: ClusterView


def cli_ports(settings: Settings, name: str) -> CliPorts:
    """The ports of a one-shot command, not connected yet."""
    broker = broker_from_settings(settings, name)
    audit = JetStreamAuditSink.from_settings(broker, settings)
    return CliPorts(broker, JetStreamStateStore(broker), audit, JetStreamClusterView(broker))


async def with_mesh(
    settings: Settings, name: str, body: Callable[[CliPorts], Awaitable[int]]
) -> int:
    """Connect, run ``body``, close; the exit code (1 when the mesh cannot be reached)."""
    ports = cli_ports(settings, name)
    try:
        await ports.broker.connect()
        return await body(ports)
    except (BrokerUnavailable, TimeoutError, OSError) as exc:
        print(f"{name}: cannot reach NATS ({exc}). Check --nats / ARQONBUS_NATS.", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        await ports.broker.close()
