"""The Python SDK against real gateways and a real 3-node JetStream cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import orjson
import pytest
from nats.js import JetStreamManager
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from arqonbus import (
    Ack,
    AuthenticationError,
    Client,
    ClientClosed,
    CommandFailed,
    CommandRequest,
    ConnectionFailed,
    ConnectionRejected,
    Event,
    Forbidden,
    Gap,
    Internal,
    InvalidEnvelope,
    InvalidName,
    MessageTooLarge,
    NoResponders,
    NotJoined,
    Subscription,
    Timeout,
    Unavailable,
    UnknownCommand,
)
from arqonbus.errors import ERROR_CLASSES, error_from_wire
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.mesh.local import LocalCluster, free_port
from arqonbus_server.shared.errors import CATALOGUE
from arqonbus_server.shared.subjects import SubjectScheme
from tests.conftest import gateway_url
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

ROOM = "science"
CHANNEL = "general"


async def take(sub: Subscription, count: int, timeout: float = 20.0) -> list[Event | Gap]:
    """The next ``count`` items of a subscription."""
    items: list[Event | Gap] = []
    async with asyncio.timeout(timeout):
        async for item in sub:
            items.append(item)
            if len(items) >= count:
                break
    return items


def seqs(items: list[Event | Gap]) -> list[int]:
    return [item.seq for item in items if isinstance(item, Event)]


async def publish_n(client: Client, count: int, prefix: str, channel: str = CHANNEL) -> list[Ack]:
    """Publish one at a time (each acked before the next), so store order is send order."""
    return [await client.publish(ROOM, channel, {"n": n}, id=f"{prefix}{n}") for n in range(count)]


# -- publish, subscribe, history ------------------------------------------------------------


async def test_publish_returns_the_ack_and_a_repeated_id_is_a_duplicate(
    start_gateway, sdk_client, tenant
):
    gw = await start_gateway()
    client = await sdk_client(gateway_url(gw), tenant, "alice")

    first = await client.publish(ROOM, CHANNEL, {"n": 1}, id="e1")
    again = await client.publish(ROOM, CHANNEL, {"n": "ignored"}, id="e1")
    fresh = await client.publish(ROOM, CHANNEL, {"n": 2})

    assert first.request_id == "e1" and first.seq >= 1 and not first.duplicate
    assert again == Ack("e1", first.seq, duplicate=True)
    assert len(fresh.request_id) == 32 and fresh.seq > first.seq and not fresh.duplicate
    assert client.connected and client.welcome is not None and client.welcome.node == "gw0"


async def test_async_for_subscription_gets_live_events_once_in_order(
    start_gateway, sdk_client, tenant
):
    gw = await start_gateway()
    writer = await sdk_client(gateway_url(gw), tenant, "alice")
    reader = await sdk_client(gateway_url(gw), tenant, "bob")
    await writer.publish(ROOM, CHANNEL, {"before": "the join"})

    sub = await reader.subscribe(ROOM, CHANNEL).start()
    joined_at = sub.last_seq
    acks = await publish_n(writer, 5, "live-")
    items = await take(sub, 5)

    assert joined_at is not None and joined_at < acks[0].seq
    assert seqs(items) == [a.seq for a in acks]
    first = items[0]
    assert isinstance(first, Event)
    assert (first.room, first.channel, first.id, first.from_, first.payload) == (
        ROOM,
        CHANNEL,
        "live-0",
        "alice",
        {"n": 0},
    )
    assert first.raw["seq"] == first.seq and first.timestamp.endswith("Z")
    assert sub.last_seq == acks[-1].seq

    await sub.close()
    assert [item async for item in sub] == []  # a closed subscription ends its iterator


async def test_since_seq_replays_stored_events_then_goes_live(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    writer = await sdk_client(gateway_url(gw), tenant, "alice")
    reader = await sdk_client(gateway_url(gw), tenant, "bob")
    stored = await publish_n(writer, 3, "stored-")

    async with reader.subscribe(ROOM, CHANNEL, since_seq=stored[0].seq) as sub:
        replayed = await take(sub, 2)
        live = await publish_n(writer, 2, "live-")
        later = await take(sub, 2)

    assert seqs(replayed) == [a.seq for a in stored[1:]]
    assert seqs(later) == [a.seq for a in live]
    dup = await reader.subscribe(ROOM, "dup").start()
    with pytest.raises(ValueError, match="already has a subscription"):
        await reader.subscribe(ROOM, "dup").start()
    await dup.close()


async def test_callback_subscriptions_sync_and_async_keep_order(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    writer = await sdk_client(gateway_url(gw), tenant, "alice")
    reader = await sdk_client(gateway_url(gw), tenant, "bob")
    sync_items: list[Event | Gap] = []
    async_items: list[Event | Gap] = []
    sync_done, async_done = asyncio.Event(), asyncio.Event()

    def on_sync(item: Event | Gap) -> None:
        sync_items.append(item)
        if len(sync_items) == 4:
            sync_done.set()

    first_in, release = asyncio.Event(), asyncio.Event()

    async def on_async(item: Event | Gap) -> None:
        async_items.append(item)
        if len(async_items) == 1:
            first_in.set()
            await release.wait()  # suspended: the next item must wait for this one
        if isinstance(item, Event) and item.payload["n"] == 1:
            raise RuntimeError("a failing callback does not stop the subscription")
        if len(async_items) == 4:
            async_done.set()

    sync_sub = await reader.on(ROOM, CHANNEL, on_sync)
    async_sub = await reader.on(ROOM, "other", on_async)
    acks = await publish_n(writer, 4, "a-")
    other = await publish_n(writer, 4, "b-", channel="other")
    async with asyncio.timeout(15 * SEC):
        await first_in.wait()
    assert len(async_items) == 1  # all 4 acked, yet no second call while the first waits
    release.set()
    async with asyncio.timeout(15 * SEC):
        await sync_done.wait()
        await async_done.wait()
    await sync_sub.close()
    await async_sub.close()

    assert seqs(sync_items) == [a.seq for a in acks]
    assert seqs(async_items) == [a.seq for a in other]


async def test_history_follows_pages_and_caps_the_total(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    client = await sdk_client(gateway_url(gw), tenant, "alice")
    acks = await publish_n(client, 25, "h-")
    all_seqs = [a.seq for a in acks]

    pages = [p async for p in client.history(ROOM, CHANNEL, limit=None, page_size=10).pages()]
    capped = await client.history(ROOM, CHANNEL, limit=15, page_size=10).list()
    tail = await client.history(ROOM, CHANNEL, since_seq=all_seqs[19]).list()
    empty = await client.history(ROOM, "nothing-here").list()

    assert [len(p.events) for p in pages] == [10, 10, 5]
    assert [p.more for p in pages] == [True, True, False]
    assert pages[0].next_since_seq == all_seqs[9]
    assert [e.seq for p in pages for e in p.events] == all_seqs
    assert [e.seq for e in capped] == all_seqs[:15]
    assert [e.id for e in tail] == [f"h-{n}" for n in range(20, 25)]
    assert empty == []


# -- errors ---------------------------------------------------------------------------------


async def test_server_errors_raise_their_exception_classes(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    client = await sdk_client(gateway_url(gw), tenant, "alice")

    with pytest.raises(InvalidName) as bad_room:
        await client.publish("sci.ence", CHANNEL, {"n": 1}, id="bad-room")
    with pytest.raises(InvalidName):
        await client.subscribe("no spaces", CHANNEL).start()
    with pytest.raises(NotJoined) as not_joined:
        await client._request(ROOM, CHANNEL, "leave_channel", {}, timeout=5 * SEC)
    with pytest.raises(UnknownCommand):
        await client.command(ROOM, CHANNEL, "not.a.name")

    assert bad_room.value.code == "invalid_name" and bad_room.value.request_id == "bad-room"
    assert not bad_room.value.retryable and "sci.ence" in bad_room.value.message
    assert not_joined.value.code == "not_joined"
    # The connection survives errors.
    assert (await client.publish(ROOM, CHANNEL, {"still": "works"})).seq >= 1


async def test_bad_input_is_refused_before_it_is_sent(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    client = await sdk_client(gateway_url(gw), tenant, "alice")

    with pytest.raises(InvalidEnvelope):
        await client.publish(ROOM, CHANNEL, {}, id="")
    with pytest.raises(InvalidEnvelope):
        await client.publish(ROOM, CHANNEL, {}, id="bad\nid")
    with pytest.raises(MessageTooLarge):
        await client.publish(ROOM, CHANNEL, {"blob": "x" * 70_000})
    with pytest.raises(ValueError, match="built-in"):
        await client.command(ROOM, CHANNEL, "join_channel")
    with pytest.raises(ValueError, match="built-in"):
        client.handles(ROOM, CHANNEL, "history")
    assert client.connected


def test_every_server_error_code_has_an_exception_class():
    assert set(CATALOGUE) <= set(ERROR_CLASSES)
    for code, error in CATALOGUE.items():
        exc = error_from_wire({"code": code, "message": "m", "retryable": error.retryable}, "r1")
        assert (exc.code, exc.message, exc.request_id, exc.retryable) == (
            code,
            "m",
            "r1",
            error.retryable,
        )
        assert type(exc) is ERROR_CLASSES[code]
    custom = error_from_wire({"code": "pool_exhausted", "message": "busy", "retryable": True})
    assert (
        isinstance(custom, CommandFailed) and custom.code == "pool_exhausted" and custom.retryable
    )
    assert isinstance(error_from_wire({"code": "internal"}), Internal)


async def test_bad_token_and_unreachable_gateways_fail_connect(start_gateway, tenant):
    gw = await start_gateway()
    bad = Client(gateway_url(gw), "not-a-token", connect_timeout=5)
    with pytest.raises(AuthenticationError, match="malformed token"):
        await bad.connect()
    await bad.close()

    nowhere = Client(f"ws://127.0.0.1:{free_port()}/ws", f"dev:{tenant}:a", connect_timeout=0.5)
    with pytest.raises(ConnectionFailed, match="connection refused"):
        await nowhere.connect()
    await nowhere.close()
    with pytest.raises(ClientClosed):
        await nowhere.publish(ROOM, CHANNEL, {})


async def test_retryable_errors_are_retried_with_the_same_id_then_raised(tenant, caplog, tmp_path):
    # A gateway whose store became unreachable answers unavailable to everything (it has
    # loaded its security state: a gateway that never reached NATS refuses handshakes).
    cluster = LocalCluster(tmp_path / "nats", nodes=1)
    await cluster.start(timeout=30 * SEC)
    settings = load_settings(
        nats=cluster.url_csv,
        listen="127.0.0.1:0",
        auth="dev",
        publish_timeout_s=0.3,
        health_interval_s=60,  # no health check sends the client away during the test
    )
    gw = Gateway(settings)
    await gw.start()
    try:
        await gw.wait_ready(30)
        async with Client(gateway_url(gw), f"dev:{tenant}:a", max_backoff=0.1) as client:
            await client.publish(ROOM, "warm-up", {"creates": "the stream"})
            await cluster.kill_node(0)
            with caplog.at_level(logging.DEBUG, logger="arqonbus.client"):
                # Budgets of 3 s: many 0.3 s attempts each, even on a loaded machine.
                with pytest.raises(Unavailable) as publish:
                    await client.publish(ROOM, CHANNEL, {"n": 1}, id="u-1", timeout=3.0 * SEC)
                with pytest.raises(Unavailable):
                    await client.history(ROOM, CHANNEL, timeout=3.0 * SEC).list()
                with pytest.raises(Timeout):
                    await client.subscribe(ROOM, CHANNEL).start(timeout=3.0 * SEC)
            assert client.connected  # errors, not a reason to reconnect
    finally:
        await gw.close()
        await cluster.stop()

    assert publish.value.request_id == "u-1" and publish.value.retryable
    messages = [r.getMessage() for r in caplog.records]
    assert sum("publish of u-1 failed" in m for m in messages) >= 2  # resent, then raised
    assert any("join of science/general failed" in m for m in messages)


# -- resume ---------------------------------------------------------------------------------


async def test_subscription_resumes_on_another_gateway_without_loss_or_duplicate(
    start_gateway, sdk_client, tenant
):
    gw_a = await start_gateway()
    gw_b = await start_gateway()
    writer = await sdk_client(gateway_url(gw_b), tenant, "writer")
    await writer.publish(ROOM, "warm-up", {"creates": "the stream"})
    reader = await sdk_client([gateway_url(gw_a), gateway_url(gw_b)], tenant, "reader")
    assert reader.url == gateway_url(gw_a)
    sub = await reader.subscribe(ROOM, CHANNEL).start()

    publishing = asyncio.create_task(publish_n(writer, 40, "e-"))
    try:
        before = await take(sub, 10)
        await gw_a.close()  # the reader's gateway goes away mid-stream
        after = await take(sub, 30)
        acks = await publishing
    finally:
        publishing.cancel()

    assert seqs(before + after) == [a.seq for a in acks]
    assert reader.url == gateway_url(gw_b)
    assert (await reader.publish(ROOM, CHANNEL, {"after": "failover"})).seq > acks[-1].seq


async def behind_a_proxy(
    start_gateway: Any, sdk_client: Any, tcp_proxy: Any, tenant: str
) -> tuple[Any, Client, Subscription, Client]:
    """A gateway; a watcher subscribed to the channel on it directly (the tenant's stream
    made); and "alice", connected through a TCP proxy that can drop or cut traffic."""
    gw = await start_gateway()
    proxy = await tcp_proxy(gw.address[1])
    watcher = await sdk_client(gateway_url(gw), tenant, "watcher")
    await watcher.publish(ROOM, "warm-up", {"creates": "the stream"})
    watch = await watcher.subscribe(ROOM, CHANNEL).start()
    client = await sdk_client(proxy.url, tenant, "alice")
    return proxy, watcher, watch, client


async def test_publish_lost_on_the_way_is_resent_with_the_same_id(
    start_gateway, sdk_client, tcp_proxy, tenant
):
    proxy, _, watch, client = await behind_a_proxy(start_gateway, sdk_client, tcp_proxy, tenant)

    proxy.current.drop_upstream = True  # the frame never reaches the gateway
    publishing = asyncio.create_task(client.publish(ROOM, CHANNEL, {"n": 1}, id="lost-1"))
    async with asyncio.timeout(10 * SEC):
        await proxy.current.dropped_upstream.wait()
    proxy.cut_all()
    ack = await asyncio.wait_for(publishing, 15 * SEC)

    assert ack.request_id == "lost-1" and not ack.duplicate
    assert len(proxy.pipes) == 2  # it came back through a new connection
    (event,) = await take(watch, 1)
    assert isinstance(event, Event) and (event.id, event.seq) == ("lost-1", ack.seq)


async def test_unacked_publish_resent_after_a_drop_is_acked_as_duplicate_and_delivered_once(
    start_gateway, sdk_client, tcp_proxy, tenant
):
    proxy, watcher, watch, client = await behind_a_proxy(
        start_gateway, sdk_client, tcp_proxy, tenant
    )
    own = await client.subscribe(ROOM, CHANNEL).start()
    first = await publish_n(client, 3, "before-")
    assert seqs(await take(own, 3)) == [a.seq for a in first]

    proxy.current.drop_downstream = True  # stored, but the ack (and deliveries) are lost
    publishing = asyncio.create_task(client.publish(ROOM, CHANNEL, {"n": 1}, id="unacked-1"))
    stored = await take(watch, 4)
    proxy.cut_all()
    ack = await asyncio.wait_for(publishing, 15 * SEC)
    later = await publish_n(client, 2, "after-")
    mine = await take(own, 3)

    assert stored[-1].id == "unacked-1"  # type: ignore[union-attr]
    assert ack == Ack("unacked-1", seqs(stored)[-1], duplicate=True)
    assert seqs(mine) == [ack.seq] + [a.seq for a in later]  # once each, in order
    assert [e.seq for e in await watcher.history(ROOM, CHANNEL).list()] == seqs(stored) + [
        a.seq for a in later
    ]


async def test_publish_many_acks_each_event_in_order_and_a_lost_ack_resends_the_batch(
    start_gateway, sdk_client, tcp_proxy, tenant
):
    proxy, _, watch, client = await behind_a_proxy(start_gateway, sdk_client, tcp_proxy, tenant)

    acks = await client.publish_many(ROOM, CHANNEL, [{"n": n} for n in range(200)])
    assert [a.seq for a in acks] == sorted({a.seq for a in acks}) and len(acks) == 200
    assert all(len(a.request_id) == 32 and not a.duplicate for a in acks)
    delivered = await take(watch, 200)
    assert [(e.id, e.seq) for e in delivered] == [(a.request_id, a.seq) for a in acks]  # type: ignore[union-attr]

    # Stored, but the ack is lost: the SDK resends the frame after the reconnect, and the
    # events come back as duplicates with their seqs, delivered once.
    proxy.current.drop_downstream = True
    ids = [f"lost-ack-{n}" for n in range(50)]
    publishing = asyncio.create_task(
        client.publish_many(ROOM, CHANNEL, [{"n": n} for n in range(50)], ids)
    )
    stored = await take(watch, 50)
    proxy.cut_all()
    resent = await asyncio.wait_for(publishing, 15 * SEC)
    assert [(a.request_id, a.seq, a.duplicate) for a in resent] == [
        (e.id, e.seq, True)
        for e in stored  # type: ignore[union-attr]
    ]
    after = await client.publish(ROOM, CHANNEL, {"after": True})
    (next_event,) = await take(watch, 1)
    assert isinstance(next_event, Event) and next_event.seq == after.seq  # nothing twice


async def test_publish_many_refuses_bad_batches_before_or_at_the_gateway(
    start_gateway, sdk_client, tenant
):
    gw = await start_gateway()
    client = await sdk_client(gateway_url(gw), tenant, "alice")
    with pytest.raises(ValueError, match="1-500"):
        await client.publish_many(ROOM, CHANNEL, [])
    with pytest.raises(ValueError, match="1-500"):
        await client.publish_many(ROOM, CHANNEL, [{}] * 501)
    with pytest.raises(ValueError, match="its own id"):
        await client.publish_many(ROOM, CHANNEL, [{}, {}], ["same", "same"])
    with pytest.raises(TypeError):
        await client.publish_many(ROOM, CHANNEL, [{}, "text"])  # type: ignore[list-item]
    with pytest.raises(MessageTooLarge):
        await client.publish_many(ROOM, CHANNEL, [{"pad": "x" * 1000}] * 100)
    reader = await sdk_client(gateway_url(gw), tenant, "reader:read-only")
    with pytest.raises(Forbidden) as refused:
        await reader.publish_many(ROOM, CHANNEL, [{"n": 1}])
    assert refused.value.request_id is not None
    # The client goes on: a batch after the refusals is stored.
    assert len(await client.publish_many(ROOM, CHANNEL, [{"n": 1}, {"n": 2}])) == 2


async def test_gap_reaches_the_application(start_gateway, sdk_client, tenant, nats_cluster):
    gw = await start_gateway()
    client = await sdk_client(gateway_url(gw), tenant, "alice")
    doomed = await publish_n(client, 3, "doomed-")
    await purge_stream(nats_cluster, tenant, gw.settings.subject_prefix)
    survivors = await publish_n(client, 2, "survivor-")

    sub = await client.subscribe(ROOM, CHANNEL, since_seq=doomed[0].seq).start()
    items = await take(sub, 3)

    assert items[0] == Gap(ROOM, CHANNEL, doomed[0].seq, survivors[0].seq)
    assert seqs(items[1:]) == [a.seq for a in survivors]


async def test_full_queue_pauses_and_resumes_without_loss_or_duplicate(
    start_gateway, sdk_client, tenant
):
    gw = await start_gateway()
    writer = await sdk_client(gateway_url(gw), tenant, "writer")
    reader = await sdk_client(gateway_url(gw), tenant, "reader", queue_size=10)
    await writer.publish(ROOM, "warm-up", {"creates": "the stream"})
    sub = await reader.subscribe(ROOM, CHANNEL).start()

    acks = await publish_n(writer, 120, "p-")  # the reader takes nothing meanwhile
    items = await take(sub, 120, timeout=30 * SEC)

    # Nothing duplicated is left in the queue: the next item is the next event published.
    marker = await writer.publish(ROOM, CHANNEL, {"after": "the burst"})
    (after,) = await take(sub, 1)

    assert seqs(items) == [a.seq for a in acks]
    assert sub.pause_count >= 1
    assert isinstance(after, Event) and after.seq == marker.seq
    assert sub.last_seq == marker.seq


# -- service commands -----------------------------------------------------------------------


async def test_service_handler_answers_results_and_its_own_errors(
    start_gateway, sdk_client, tenant
):
    gw = await start_gateway()
    service = Client(gateway_url(gw), f"dev:{tenant}:db_service")
    seen: list[CommandRequest] = []

    @service.handles("services", "database", "status")
    async def status(request: CommandRequest) -> dict[str, Any]:
        seen.append(request)
        if request.parameters.get("check") == "disk":
            raise CommandFailed("unknown_check", "no such check: disk", retryable=True)
        if request.parameters.get("check") == "boom":
            raise KeyError("secret detail")
        return {"active_connections": 15, "check": request.parameters["check"]}

    try:
        await service.connect()  # registers the decorated handler before it returns
        caller = await sdk_client(gateway_url(gw), tenant, "api")
        result = await caller.command("services", "database", "status", {"check": "pool"})
        with pytest.raises(CommandFailed) as failed:
            await caller.command("services", "database", "status", {"check": "disk"})
        with pytest.raises(Internal) as crashed:
            await caller.command("services", "database", "status", {"check": "boom"})
        await service.unregister_handler("services", "database", "status")
        with pytest.raises(NoResponders):
            await caller.command("services", "database", "status", {"check": "pool"})
    finally:
        await service.close()

    assert result == {"active_connections": 15, "check": "pool"}
    assert (failed.value.code, failed.value.message, failed.value.retryable) == (
        "unknown_check",
        "no such check: disk",
        True,
    )
    assert crashed.value.message == "handler failed: KeyError"
    request = seen[0]
    assert (request.room, request.channel, request.command, request.from_) == (
        "services",
        "database",
        "status",
        "api",
    )
    assert request.delivery_id.startswith("dlv_") and request.caller_request_id
    assert request.timeout_ms == 5000 and request.parameters == {"check": "pool"}


# -- close codes, against a scripted server ----------------------------------------------
#
# The real gateway cannot be made to send 4500-4999 or to refuse a token after it accepted
# it; this stand-in speaks just enough of the protocol (welcome, join, events) to script them.


class ScriptedGateway:
    """Per connection, one step: an HTTP status to refuse with, or a close code to send after
    the first join has been answered and the channel's events from ``since_seq`` delivered."""

    def __init__(self, steps: list[int], events: int = 2) -> None:
        self.steps = steps
        self.events = events
        self.connections = 0
        self.joins: list[dict[str, Any]] = []
        self._server: Server | None = None

    async def __aenter__(self) -> ScriptedGateway:
        self._server = await serve(
            self._session, "127.0.0.1", 0, process_request=self._refuse, compression=None
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/ws"

    def _step(self) -> int:
        self.connections += 1
        return self.steps[min(self.connections, len(self.steps)) - 1]

    def _refuse(self, connection: ServerConnection, request: Request) -> Response | None:
        step = self._step()
        if step < 1000:
            return connection.respond(step, '{"error":"scripted","message":"scripted refusal"}')
        connection.close_code_to_send = step  # type: ignore[attr-defined]
        return None

    async def _session(self, ws: ServerConnection) -> None:
        code: int = ws.close_code_to_send  # type: ignore[attr-defined]
        await ws.send(orjson.dumps({"version": "1.0", "type": "welcome", "payload": {
            "session_id": "s", "node": "scripted", "protocol": "1.0", "limits": {}}}).decode())  # fmt: skip
        async for raw in ws:
            message = orjson.loads(raw)
            if message["type"] != "command" or message["payload"]["command"] != "join_channel":
                continue
            params = message["payload"]["parameters"]
            self.joins.append(params)
            reply = {"request_id": message["id"], "status": "success", "result": {"last_seq": 0}}
            await ws.send(orjson.dumps({"version": "1.0", "type": "command_response",
                "room": ROOM, "channel": CHANNEL, "payload": reply}).decode())  # fmt: skip
            for seq in range(params.get("since_seq", 0) + 1, self.events + 1):
                await ws.send(orjson.dumps({"version": "1.0", "type": "event", "id": f"e{seq}",
                    "room": ROOM, "channel": CHANNEL, "from": "x", "timestamp": "t",
                    "payload": {"n": seq}, "seq": seq}).decode())  # fmt: skip
            await ws.close(code, "scripted")


async def test_close_4001_resumes_and_4500_range_stops_everything():
    async with ScriptedGateway([4001, 4501], events=2) as server:
        client = Client(server.url, "dev:t:a", max_backoff=0.2)
        await client.connect()
        try:
            sub = client.subscribe(ROOM, CHANNEL, since_seq=0)
            items: list[Event | Gap] = []
            with pytest.raises(ConnectionRejected) as rejected:
                async with asyncio.timeout(10 * SEC):
                    async for item in sub:
                        items.append(item)
            with pytest.raises(ConnectionRejected):
                await client.publish(ROOM, CHANNEL, {"n": 1})
        finally:
            await client.close()

    assert seqs(items) == [1, 2]  # once each, across the 4001 resume
    assert rejected.value.close_code == 4501 and not rejected.value.retryable
    assert server.connections == 2  # never retried after 4501
    assert server.joins[0] == {"since_seq": 0, "batch": True} and server.joins[1]["since_seq"] in (
        0,
        1,
        2,
    )
    assert client.error is rejected.value


async def test_http_503_moves_on_and_401_on_reconnect_is_fatal():
    async with (
        ScriptedGateway([503]) as draining,
        ScriptedGateway([1012, 401], events=1) as flaky,
    ):
        client = Client([draining.url, flaky.url], "dev:t:a", max_backoff=0.2)
        await client.connect()
        try:
            assert client.url == flaky.url and draining.connections == 1
            sub = await client.subscribe(ROOM, CHANNEL).start()
            with pytest.raises(AuthenticationError, match="scripted refusal"):
                async with asyncio.timeout(10 * SEC):
                    async for _ in sub:
                        pass
        finally:
            await client.close()


# -- helpers --------------------------------------------------------------------------------


@asynccontextmanager
async def jetstream(cluster: LocalCluster) -> AsyncIterator[JetStreamManager]:
    nc = await nats.connect(cluster.urls[0])
    try:
        yield nc.jsm()
    finally:
        await nc.close()


async def purge_stream(cluster: LocalCluster, tenant: str, prefix: str) -> None:
    """What retention does, at once: every stored event of the tenant is gone."""
    async with jetstream(cluster) as jsm:
        await jsm.purge_stream(SubjectScheme(prefix).stream_name(tenant))
