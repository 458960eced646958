"""The mesh a chaos scenario runs against: a real 3-node JetStream cluster and gateway processes.

Everything here is started by the suite itself, so faults (SIGKILL, SIGSTOP, SIGTERM) only
ever hit processes it owns, by PID.
"""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any, Protocol

import nats

from arqonbus_server.gateway.admin.dev import http_get
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.shared.subjects import SubjectScheme
from tests.support import GatewayProcess


class Cluster(Protocol):
    """What a scenario needs of a NATS cluster (LocalCluster, or the namespaced one)."""

    @property
    def urls(self) -> list[str]: ...
    @property
    def url_csv(self) -> str: ...
    async def kill_node(self, i: int, sig: signal.Signals = signal.SIGKILL) -> None: ...
    async def start_node(self, i: int, wait_ready: bool = True, timeout: float = 30.0) -> None: ...
    async def stop(self) -> None: ...


# Gateways under chaos check NATS health often, so a broken link shows within seconds.
GATEWAY_ENV = {"ARQONBUS_HEALTH_INTERVAL_S": "1.0", "ARQONBUS_DRAIN_TIMEOUT_S": "10"}


class Mesh:
    """``nodes`` NATS nodes (R3 streams, sync_interval always) and ``gateways`` gateways."""

    def __init__(
        self,
        workdir: Path,
        gateways: int = 2,
        cluster: Cluster | None = None,
        gateway_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.cluster: Cluster = cluster or LocalCluster(workdir / "nats", nodes=3)
        self._own_cluster = cluster is None
        self.gateway_count = gateways
        self.gateway_env = {**GATEWAY_ENV, **(gateway_env or {})}
        self.gateways: list[GatewayProcess] = []
        self.scheme = SubjectScheme("arq")
        self.extras: dict[str, Any] = {}  # scenario-specific parts (fault proxies, ...)

    async def start(self, nats_urls: list[str] | None = None) -> None:
        """Start the cluster (if it is ours) and the gateways; ``nats_urls[i]`` per gateway."""
        if self._own_cluster:
            assert isinstance(self.cluster, LocalCluster)
            await self.cluster.start(timeout=60)
        for i in range(self.gateway_count):
            urls = nats_urls[i] if nats_urls else self.cluster.url_csv
            self.gateways.append(GatewayProcess(urls, env=self.gateway_env))
        await asyncio.gather(*(g.start(timeout=60) for g in self.gateways))

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]

    async def kill_gateway(self, i: int) -> None:
        gateway = self.gateways[i]
        gateway.signal(signal.SIGKILL)
        await gateway.wait_exit(10)

    async def drain_gateway(self, i: int) -> int:
        """SIGTERM: the gateway drains (1012 to its clients) and exits; returns its exit code."""
        gateway = self.gateways[i]
        gateway.signal(signal.SIGTERM)
        return await gateway.wait_exit(60)

    async def restart_gateway(self, i: int) -> None:
        """A new gateway process on the same port (clients know the URL)."""
        old = self.gateways[i]
        await old.stop()
        fresh = GatewayProcess(old.nats_urls, port=old.port, env=self.gateway_env)
        self.gateways[i] = fresh
        await fresh.start(timeout=60)

    async def stream_leader(self, tenant: str) -> str | None:
        """The server name that leads the tenant's stream, as the stream reports it."""
        nc = await nats.connect(
            servers=self.cluster.urls, connect_timeout=2, max_reconnect_attempts=1
        )
        try:
            info = await nc.jetstream().stream_info(self.scheme.stream_name(tenant))
        finally:
            await nc.close()
        return info.cluster.leader if info.cluster else None

    async def stop(self) -> None:
        for gateway in self.gateways:
            await gateway.stop()
        if self._own_cluster:
            await self.cluster.stop()


def pick(rng: random.Random, count: int, exclude: int | None = None) -> int:
    choices = [i for i in range(count) if i != exclude]
    return rng.choice(choices)


async def http_json(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, Any]:
    """GET a small JSON document (the gateways' /readyz); (status, body)."""
    import orjson

    status, body = await http_get(host, port, path, timeout)
    return status, orjson.loads(body) if body else None
