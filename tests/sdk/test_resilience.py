"""The SDK's promise under faults: the application sees every acked event exactly once, in
order, through a gateway kill -9 and a rolling restart of every gateway. Real gateway
processes, a real 3-node JetStream cluster."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from arqonbus import Ack, Client, Event, Gap, Subscription
from arqonbus_server.mesh.local import LocalCluster
from tests.support import GatewayProcess
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

ROOM, CHANNEL = "plant", "sensors"


@dataclass
class Received:
    """What the application saw, in the order it saw it."""

    events: list[Event] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def consume(self, subscription: Subscription) -> None:
        async for item in subscription:
            async with self.changed:
                if isinstance(item, Gap):
                    self.gaps.append(item)
                else:
                    self.events.append(item)
                    self.arrived_at.append(time.monotonic())
                self.changed.notify_all()

    async def wait_for_seq(self, seq: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: bool(self.events) and self.events[-1].seq >= seq)


@dataclass
class Publisher:
    """A steady publisher: one event after another, each awaited, until told to stop."""

    client: Client
    acks: list[Ack] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self, limit: int = 5000) -> None:
        for n in range(limit):
            if self.stop.is_set():
                return
            event_id = f"e{n}"
            ack = await self.client.publish(ROOM, CHANNEL, {"n": n}, id=event_id, timeout=30 * SEC)
            async with self.progress:
                self.ids.append(event_id)
                self.acks.append(ack)
                self.acked_at.append(time.monotonic())
                self.progress.notify_all()

    async def wait_acked(self, count: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout), self.progress:
            await self.progress.wait_for(lambda: len(self.acks) >= count)


def assert_exactly_once_in_order(publisher: Publisher, received: Received) -> None:
    acked = sorted(ack.seq for ack in publisher.acks)
    assert len(set(acked)) == len(acked), "two publishes were acked with one seq"
    seen = [event.seq for event in received.events]
    duplicates = [seq for seq, n in Counter(seen).items() if n > 1]
    missing = sorted(set(acked) - set(seen))
    assert not duplicates, f"duplicated at the application: {duplicates[:20]}"
    assert not missing, f"acked but never delivered: {missing[:20]} of {len(acked)}"
    assert seen == acked, "delivered out of order, or something unacked was delivered"
    assert [event.payload["n"] for event in received.events] == list(range(len(acked)))
    assert received.gaps == []


async def start_gateways(cluster: LocalCluster, count: int) -> list[GatewayProcess]:
    gateways = [GatewayProcess(cluster.url_csv) for _ in range(count)]
    await asyncio.gather(*(g.start() for g in gateways))
    return gateways


@contextlib.asynccontextmanager
async def stopped_at_exit(gateways: list[GatewayProcess]):  # type: ignore[no-untyped-def]
    try:
        yield gateways
    finally:
        for gateway in gateways:
            await gateway.stop()


async def test_kill_9_of_the_subscribers_gateway_loses_and_doubles_nothing(
    nats_cluster: LocalCluster, tenant: str
) -> None:
    gateways = await start_gateways(nats_cluster, 2)
    doomed, survivor = gateways
    async with (
        stopped_at_exit(gateways),
        Client(
            [doomed.url, survivor.url], f"dev:{tenant}:dashboard", max_backoff=0.5
        ) as sub_client,
        Client([survivor.url], f"dev:{tenant}:sensor") as pub_client,
    ):
        received = Received()
        subscription = await sub_client.subscribe(ROOM, CHANNEL).start()
        assert sub_client.url == doomed.url
        consumer = asyncio.create_task(received.consume(subscription))
        publisher = Publisher(pub_client)
        publishing = asyncio.create_task(publisher.run())
        try:
            await publisher.wait_acked(100)
            await received.wait_for_seq(publisher.acks[50].seq)
            killed_at = time.monotonic()
            doomed.signal(signal.SIGKILL)
            await doomed.wait_exit(10)
            await publisher.wait_acked(len(publisher.acks) + 200)
        finally:
            publisher.stop.set()
            await publishing
        await received.wait_for_seq(publisher.acks[-1].seq)
        assert sub_client.url == survivor.url
        await subscription.close()
        await consumer
    assert_exactly_once_in_order(publisher, received)
    # Resume time: from the kill to the first event published after it reaching the app.
    first_after = next(i for i, t in enumerate(publisher.acked_at) if t > killed_at)
    resumed = received.arrived_at[first_after] - killed_at
    print(f"kill -9: {len(publisher.acks)} acked, all delivered once; resumed in {resumed:.3f} s")
    assert resumed < 5.0


async def test_rolling_restart_of_every_gateway_zero_loss_zero_duplicates(
    nats_cluster: LocalCluster, tenant: str
) -> None:
    gateways = await start_gateways(nats_cluster, 2)
    urls = [g.url for g in gateways]
    restarted: list[GatewayProcess] = []
    async with (
        stopped_at_exit(restarted),
        Client(urls, f"dev:{tenant}:writer", max_backoff=0.5) as pub_client,
        Client(urls[::-1], f"dev:{tenant}:reader", max_backoff=0.5) as sub_client,
    ):
        received = Received()
        subscription = await sub_client.subscribe(ROOM, CHANNEL).start()
        consumer = asyncio.create_task(received.consume(subscription))
        publisher = Publisher(pub_client)
        publishing = asyncio.create_task(publisher.run())
        try:
            for old in gateways:
                before = len(publisher.acks)
                old.signal(signal.SIGTERM)
                assert await old.wait_exit(30) == 0, await old.stderr()
                fresh = GatewayProcess(nats_cluster.url_csv, port=old.port)
                restarted.append(fresh)
                await fresh.start()
                # Progress continues through each drain.
                await publisher.wait_acked(before + 100)
        finally:
            publisher.stop.set()
            await publishing
            for old in gateways:
                await old.stop()
        await received.wait_for_seq(publisher.acks[-1].seq)
        await subscription.close()
        await consumer
    assert_exactly_once_in_order(publisher, received)
    assert len(publisher.acks) == len(set(publisher.ids))
    print(f"rolling restart: {len(publisher.acks)} acked, all delivered once")
