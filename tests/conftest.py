"""Shared fixtures: one real 3-node JetStream cluster per test session (per xdist worker)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.mesh.containers import backend_from_env, make_cluster
from arqonbus_server.mesh.local import LocalCluster
from tests.support import GatewayProcess, WsClient
from tests.timeouts import SEC

# Every test tenant that records a security event gets an audit stream, which reserves its
# max_bytes (default 1 GiB) on each of its 3 servers; the session's shared cluster ran out of
# JetStream storage reservations ("insufficient storage resources", err 10047) once enough
# tenants had one. The tests' gateways (in-process and started as processes) keep 1 MiB.
os.environ.setdefault("ARQONBUS_AUDIT_MAX_BYTES", str(1 << 20))


def new_cluster(base_dir: Path, nodes: int = 3, **kwargs: Any) -> LocalCluster:
    """A NATS cluster from the backend ARQONBUS_NATS_BACKEND names: the wheel's nats-server
    (``local``, the default) or containers (``container``; make container-test)."""
    return make_cluster(backend_from_env(os.environ), base_dir, nodes, **kwargs)


@pytest.fixture(scope="session")
async def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalCluster]:
    cluster = new_cluster(tmp_path_factory.mktemp("nats"), nodes=3)
    await cluster.start(timeout=60 * SEC)
    try:
        yield cluster
    finally:
        await cluster.stop()


@pytest.fixture
async def nc(nats_cluster: LocalCluster) -> AsyncIterator[Client]:
    """A plain nats-py connection to the shared cluster (tests that talk NATS directly)."""
    client = await nats.connect(nats_cluster.urls)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def tenant() -> str:
    """A fresh tenant per test, so tests sharing the cluster never see each other."""
    return "t" + uuid.uuid4().hex[:12]


GatewayFactory = Callable[..., Awaitable[Gateway]]


def gateway_url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.address[1]}/ws"


async def _start_gateways(nats_urls: str) -> tuple[GatewayFactory, list[Gateway]]:
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        options: dict[str, Any] = {"nats": nats_urls, "listen": "127.0.0.1:0", "auth": "dev"}
        options["node_id"] = f"gw{len(started)}"
        options.update(overrides)
        gateway = Gateway(load_settings(**options))
        await gateway.start()
        started.append(gateway)
        await gateway.wait_ready(30)
        return gateway

    return start, started


@pytest.fixture
async def start_gateway(nats_cluster: LocalCluster) -> AsyncIterator[GatewayFactory]:
    """Start in-process gateways against the shared cluster; all are closed after the test."""
    start, started = await _start_gateways(nats_cluster.url_csv)
    try:
        yield start
    finally:
        for gateway in started:
            await gateway.close()


@pytest.fixture
async def opened() -> AsyncIterator[list[WsClient]]:
    """A list to put WebSocket clients in (opened any way); all are closed after the test."""
    clients: list[WsClient] = []
    yield clients
    for client in clients:
        await client.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Awaitable[WsClient]]]:
    """Open WebSocket clients; all are closed after the test."""
    opened: list[WsClient] = []

    async def connect(url: str, tenant: str, principal: str, **kwargs: Any) -> WsClient:
        client = await WsClient.connect(url, tenant, principal, **kwargs)
        opened.append(client)
        return client

    try:
        yield connect
    finally:
        for client in opened:
            await client.close()


@pytest.fixture
async def gateway_processes() -> AsyncIterator[Callable[..., Awaitable[GatewayProcess]]]:
    """Gateways as child processes; all are stopped after the test."""
    started: list[GatewayProcess] = []

    async def start(nats_urls: str, **kwargs: Any) -> GatewayProcess:
        proc = GatewayProcess(nats_urls, **kwargs)
        started.append(proc)
        await proc.start()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            await proc.stop()


@pytest.fixture
def private_cluster_dir(tmp_path: Path) -> Path:
    return tmp_path / "nats"
