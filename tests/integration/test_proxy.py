"""FaultProxy between nats-py and a real nats-server: passthrough, delay, stall, reset, refuse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from arqonbus_server.mesh.local import LocalCluster
from chaos.proxy import FaultProxy, Mode
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

WAIT = 15.0  # generous bound on waits for an event on a busy machine


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalCluster]:
    # One node: no cluster peers advertised to clients, so every reconnect goes via the proxy.
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("proxy-nats")), nodes=1)
    await cluster.start(timeout=30 * SEC)
    try:
        yield cluster
    finally:
        await cluster.stop()


@pytest.fixture
async def proxy(server: LocalCluster) -> AsyncIterator[FaultProxy]:
    spec = server.specs[0]
    async with FaultProxy(spec.host, spec.client_port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def direct(server: LocalCluster) -> AsyncIterator[Client]:
    """A connection that does not cross the proxy; it answers requests on ``echo``."""

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    nc = await nats.connect(server.urls[0], connect_timeout=5)
    await nc.subscribe("echo", cb=echo)
    await nc.flush()
    try:
        yield nc
    finally:
        await nc.close()


@dataclass
class Events:
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    reconnected: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
async def via_proxy(proxy: FaultProxy) -> AsyncIterator[tuple[Client, Events]]:
    events = Events()

    async def on_disconnected() -> None:
        events.disconnected.set()

    async def on_reconnected() -> None:
        events.reconnected.set()

    async def on_error(exc: Exception) -> None:
        events.errors.append(repr(exc))

    nc = await nats.connect(
        proxy.url,
        connect_timeout=1,
        ping_interval=1,
        max_outstanding_pings=1,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        error_cb=on_error,
    )
    try:
        yield nc, events
    finally:
        await nc.close()


async def test_passthrough_forwards_both_ways(
    proxy: FaultProxy, direct: Client, via_proxy: tuple[Client, Events]
) -> None:
    nc, _ = via_proxy
    reply = await nc.request("echo", b"hello", timeout=5 * SEC)
    assert reply.data == b"hello"
    stats = proxy.stats
    assert (stats.accepted, stats.active) == (1, 1)
    assert stats.bytes_up > len(b"hello")
    assert stats.bytes_down > len(b"hello")
    assert proxy.mode is Mode.PASSTHROUGH


async def test_delay_adds_latency_and_keeps_order(
    proxy: FaultProxy, direct: Client, via_proxy: tuple[Client, Events]
) -> None:
    nc, _ = via_proxy
    received: list[bytes] = []
    all_in = asyncio.Event()
    count = 100

    async def collect(msg: Msg) -> None:
        received.append(msg.data)
        if len(received) == count:
            all_in.set()

    await direct.subscribe("seq", cb=collect)
    await direct.flush()

    proxy.delay(150)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await nc.request("echo", b"slow", timeout=10 * SEC)
    elapsed = loop.time() - started
    assert reply.data == b"slow"
    # The request crosses the proxy once each way: at least two delays.
    assert elapsed >= 0.3, elapsed

    for batch in range(0, count, 10):
        forwarded = proxy.stats.bytes_up
        for k in range(batch, batch + 10):
            await nc.publish("seq", str(k).encode())
        # Each batch crosses the proxy before the next is sent: the messages span many chunks.
        await proxy.wait_for(lambda stats, seen=forwarded: stats.bytes_up > seen, WAIT)
    await nc.flush(timeout=10 * SEC)
    async with asyncio.timeout(WAIT):
        await all_in.wait()
    assert received == [str(k).encode() for k in range(count)]

    proxy.passthrough()
    assert (await nc.request("echo", b"fast", timeout=5 * SEC)).data == b"fast"


async def test_stall_is_a_black_hole_until_passthrough(
    proxy: FaultProxy, direct: Client, via_proxy: tuple[Client, Events]
) -> None:
    nc, events = via_proxy
    assert (await nc.request("echo", b"before", timeout=5 * SEC)).data == b"before"

    proxy.stall()
    at_stall = proxy.stats
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request("echo", b"lost", timeout=0.5 * SEC)
    # The client's pings go unanswered, so it declares the connection stale.
    async with asyncio.timeout(WAIT):
        await events.disconnected.wait()
    stalled = proxy.stats
    assert (stalled.bytes_up, stalled.bytes_down) == (at_stall.bytes_up, at_stall.bytes_down)
    assert not events.reconnected.is_set()

    proxy.passthrough()
    async with asyncio.timeout(WAIT):
        await events.reconnected.wait()
    assert (await nc.request("echo", b"after", timeout=5 * SEC)).data == b"after"


async def test_reset_makes_the_client_reconnect(
    proxy: FaultProxy, direct: Client, via_proxy: tuple[Client, Events]
) -> None:
    nc, events = via_proxy
    assert (await nc.request("echo", b"before", timeout=5 * SEC)).data == b"before"

    assert await proxy.reset() == 1
    async with asyncio.timeout(WAIT):
        await events.reconnected.wait()
    assert events.disconnected.is_set()
    assert (await nc.request("echo", b"after", timeout=5 * SEC)).data == b"after"
    stats = proxy.stats
    assert (stats.reset, stats.accepted, stats.active) == (1, 2, 1)


async def test_refuse_closes_new_connections_until_passthrough(
    proxy: FaultProxy, direct: Client, via_proxy: tuple[Client, Events]
) -> None:
    nc, events = via_proxy
    assert (await nc.request("echo", b"before", timeout=5 * SEC)).data == b"before"

    proxy.refuse()
    await proxy.reset()
    # The client keeps trying; each attempt is closed at once.
    await proxy.wait_for(lambda s: s.refused >= 2, timeout=WAIT)
    assert not nc.is_connected
    assert not events.reconnected.is_set()

    proxy.passthrough()
    async with asyncio.timeout(WAIT):
        await events.reconnected.wait()
    assert (await nc.request("echo", b"after", timeout=5 * SEC)).data == b"after"
