"""Faults: a slow consumer, drain on SIGTERM, kill -9 of a gateway, one NATS node lost.

Each test breaks one real part (a socket, a gateway process, a nats-server process) while traffic
flows, then checks the guarantees of the protocol: nothing acknowledged is lost, nothing is stored
or delivered twice, and clients are told (by close code) to reconnect and resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from arqonbus_server.gateway.admin.dev import http_status
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.gateway.ws.session import Session
from arqonbus_server.mesh.local import LocalCluster
from tests.conftest import gateway_url, new_cluster
from tests.support import Message, WsClient
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

ROOM, CHANNEL = "ops", "feed"
SLOW_BUFFER = 64 * 1024
CLOSE_FRAME_MAX = 2 + 2 + 123  # header, code, longest reason a close frame may carry


# -- helpers ------------------------------------------------------------------------------------


def event_frame(msg_id: str, payload: Message | None = None) -> Message:
    return {
        "id": msg_id,
        "type": "event",
        "room": ROOM,
        "channel": CHANNEL,
        "payload": payload or {"id": msg_id},
    }


class AckLog:
    """Every ack seen by any publisher of a test: id -> seq, and a way to wait for a count."""

    def __init__(self) -> None:
        self.seqs: dict[str, int] = {}
        self.duplicates: set[str] = set()
        self._changed = asyncio.Condition()

    async def record(self, reply: Message) -> None:
        assert reply["type"] == "ack", reply
        msg_id, seq = reply["payload"]["request_id"], reply["payload"]["seq"]
        assert self.seqs.setdefault(msg_id, seq) == seq, f"{msg_id} acked with two seqs"
        if reply["payload"].get("duplicate"):
            self.duplicates.add(msg_id)
        async with self._changed:
            self._changed.notify_all()

    def count(self, prefix: str = "") -> int:
        return sum(1 for msg_id in self.seqs if msg_id.startswith(prefix))

    async def wait_count(self, count: int, timeout: float, prefix: str = "") -> None:
        """Wait until ``count`` ids starting with ``prefix`` are acked."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.count(prefix) >= count)


async def publish_pipelined(
    client: WsClient,
    ids: Iterable[str],
    acks: AckLog,
    window: int = 8,
    sent: list[str] | None = None,
) -> list[str]:
    """Publish with up to ``window`` unacked; on connection loss return the ids left unacked."""
    ids = list(ids)
    sent = [] if sent is None else sent
    pending: deque[tuple[str, int]] = deque()  # id, and where its reply can start

    async def take_ack() -> None:
        msg_id, start = pending.popleft()
        await acks.record(await client.reply_to(msg_id, start=start))

    try:
        for msg_id in ids:
            pending.append((msg_id, len(client.received)))
            await client.send(event_frame(msg_id))
            sent.append(msg_id)
            if len(pending) >= window:
                await take_ack()
        while pending:
            await take_ack()
    except (ConnectionError, ConnectionClosed):
        return [msg_id for msg_id in ids if msg_id not in acks.seqs]
    return []


async def publish_with_retry(
    client: WsClient, msg_id: str, acks: AckLog, attempts: int = 20
) -> int:
    """Publish one event; retry the same id on a retryable error. Returns how many retries."""
    for attempt in range(attempts):
        reply = await client.publish(ROOM, CHANNEL, {"id": msg_id}, id=msg_id)
        if reply["type"] == "ack":
            await acks.record(reply)
            return attempt
        assert reply["type"] == "error" and reply["payload"]["retryable"], reply
        assert reply["payload"]["code"] == "unavailable", reply
    raise AssertionError(f"{msg_id} not acked after {attempts} attempts")


async def history_page(client: WsClient, since: int, attempts: int = 5) -> Message:
    """One page of history; a retryable refusal (the link still settling after a node came
    back) is asked again, as a client would, a bounded number of times."""
    for _ in range(attempts):
        reply = await client.command(ROOM, CHANNEL, "history", {"since_seq": since, "limit": 1000})
        if reply["payload"]["status"] == "success":
            return reply
        assert reply["payload"]["error"]["retryable"], reply
    raise AssertionError(f"history failed {attempts} times; last: {reply}")


async def stored_events(client: WsClient) -> list[Message]:
    """The whole stored history of the channel, page by page (bounded)."""
    events: list[Message] = []
    since = 0
    for _ in range(100):
        reply = await history_page(client, since)
        result = reply["payload"]["result"]
        events += result["events"]
        since = result["next_since_seq"]
        if not result["more"]:
            return events
    raise AssertionError("history did not end within 100 pages")


def assert_stored_once(events: list[Message], acks: AckLog) -> None:
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an id was stored twice"
    assert {e["id"]: e["seq"] for e in events} == acks.seqs


async def wait_for_seq(client: WsClient, seq: int, timeout: float = 20.0) -> list[int]:
    """Wait until ``client`` has received the event with ``seq``; return every seq it got."""
    await client.wait_for(lambda m: m["type"] == "event" and m["seq"] >= seq, timeout)
    return [e["seq"] for e in client.events(ROOM, CHANNEL)]


# -- 1. slow consumer ---------------------------------------------------------------------------


async def open_stalled_client(url: str, tenant: str) -> ClientConnection:
    """A member of the channel that then stops reading: tiny receive buffer, queue of one."""
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    ws = await websockets.connect(
        f"{url}?token=dev:{tenant}:slow", sock=sock, max_queue=1, ping_interval=None
    )
    assert orjson.loads(await ws.recv())["type"] == "welcome"
    await ws.send(orjson.dumps(join_frame("join-slow")).decode())
    reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10 * SEC))
    assert reply["type"] == "command_response" and reply["payload"]["status"] == "success", reply
    return ws


def join_frame(command_id: str) -> Message:
    return {
        "id": command_id,
        "type": "command",
        "room": ROOM,
        "channel": CHANNEL,
        "payload": {"command": "join_channel", "parameters": {}},
    }


async def read_until_closed(ws: ClientConnection, limit: int) -> list[Message]:
    """Read what the gateway queued for a stalled client, up to its close frame."""
    received: list[Message] = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(15 * SEC):
            for _ in range(limit):
                received.append(orjson.loads(await ws.recv()))
    return received


def session_of(gateway: Gateway, principal: str) -> Session:
    [session] = [s for s in gateway.sessions if s.principal.id == principal]
    return session


async def peak_buffered(session: Session, stop: asyncio.Event) -> int:
    """Sample the session's transport buffer on every loop iteration until ``stop``."""
    peak = 0
    while not stop.is_set():
        peak = max(peak, session.socket.buffered)
        await asyncio.sleep(0)  # one loop iteration: a monitor, not a synchronization
    return peak


async def test_slow_consumer_is_closed_4001_while_others_get_everything(
    start_gateway, clients, tenant, request
):
    gw = await start_gateway(send_buffer_bytes=SLOW_BUFFER)
    url = gateway_url(gw)
    normal = await clients(url, tenant, "normal")
    await normal.join(ROOM, CHANNEL)
    stalled = await open_stalled_client(url, tenant)
    request.addfinalizer(stalled.transport.abort)  # closed even if an assertion fails first
    slow_session = session_of(gw, "slow")
    publisher = await clients(url, tenant, "pub")
    acks = AckLog()
    stop = asyncio.Event()
    monitor = asyncio.create_task(peak_buffered(slow_session, stop))
    blob = "x" * 12_000
    published: list[str] = []
    try:
        for batch in range(40):  # at most 640 events of 12 KB: far beyond any socket buffer
            ids = [f"e{batch}-{n}" for n in range(16)]
            for msg_id in ids:
                await publisher.send(event_frame(msg_id, {"blob": blob}))
            for msg_id in ids:
                await acks.record(await publisher.reply_to(msg_id))
            published += ids
            if not slow_session.socket.is_open:
                break
        # Traffic after the close still reaches the healthy member.
        tail = [f"tail-{n}" for n in range(5)]
        assert await publish_pipelined(publisher, tail, acks) == []
        published += tail
    finally:
        stop.set()
        peak = await monitor
    assert not slow_session.socket.is_open, "the stalled client was never closed"

    events = await normal.wait_events(len(published), ROOM, CHANNEL, timeout=30 * SEC)
    assert [e["id"] for e in events] == published
    assert [e["seq"] for e in events] == [acks.seqs[i] for i in published]
    frame = max(len(orjson.dumps(e)) for e in events) + 10  # payload + frame header
    assert peak <= SLOW_BUFFER + frame + CLOSE_FRAME_MAX, f"buffer peaked at {peak} bytes"

    got = await read_until_closed(stalled, limit=len(published) + 2)
    got_events = [m for m in got if m["type"] == "event"]
    assert stalled.close_code == 4001
    # What it did get is an in-order prefix: nothing silently skipped before the close.
    assert [e["id"] for e in got_events] == published[: len(got_events)]
    assert len(got_events) < len(published)

    resumed = await clients(url, tenant, "slow")
    since = got_events[-1]["seq"] if got_events else 0
    await resumed.join(ROOM, CHANNEL, since_seq=since)
    rest = await resumed.wait_events(
        len(published) - len(got_events), ROOM, CHANNEL, timeout=30 * SEC
    )
    assert [e["id"] for e in got_events + rest] == published


# -- 2. drain on SIGTERM ------------------------------------------------------------------------


async def test_sigterm_drains_acks_in_flight_and_closes_1012(
    nats_cluster, gateway_processes, clients, tenant
):
    gw_a = await gateway_processes(nats_cluster.url_csv)
    gw_b = await gateway_processes(nats_cluster.url_csv)
    alice = await clients(gw_a.url, tenant, "alice")
    ids, sent, acks_a = [f"d{n}" for n in range(3000)], [], AckLog()
    sender = asyncio.create_task(publish_pipelined(alice, ids, acks_a, window=400, sent=sent))
    await acks_a.wait_count(
        100, timeout=20 * SEC
    )  # traffic is flowing, publishes in flight: SIGTERM
    gw_a.signal(signal.SIGTERM)

    async with asyncio.timeout(15 * SEC):
        await alice.closed.wait()
    # Draining turns /readyz off before any session is closed (or the process is gone).
    status = await http_status("127.0.0.1", gw_a.port, "/readyz", timeout=0.5 * SEC)
    assert status != 200, "/readyz still 200 after SIGTERM"
    await asyncio.wait_for(sender, 10 * SEC)
    with pytest.raises((InvalidStatus, OSError)):  # 503 while draining, refused once stopped
        await websockets.connect(f"{gw_a.url}?token=dev:{tenant}:late", open_timeout=5)
    assert await gw_a.wait_exit(timeout=10 * SEC + 5) == 0  # drain_timeout_s defaults to 10

    acked_by_a = {m["payload"]["request_id"] for m in alice.received if m["type"] == "ack"}
    assert len(acked_by_a) <= len(sent) < len(ids), "SIGTERM did not land mid-stream"
    again = await clients(gw_b.url, tenant, "alice")  # same principal: same dedupe keys
    acks = AckLog()
    assert await publish_pipelined(again, sent, acks, window=64) == []
    assert_stored_once(await stored_events(again), acks)
    assert acked_by_a <= acks.duplicates
    # Drain finishes publishes in flight and acks them before 1012: none is stored yet unacked.
    assert alice.close_code == 1012
    assert sorted(acks.duplicates - acked_by_a) == []


# -- 3. kill -9 of a gateway under traffic ------------------------------------------------------


async def resume_on(url: str, old: WsClient, tenant: str, principal: str, clients) -> WsClient:
    """Reconnect a member whose gateway died and rejoin from its last seen seq."""
    async with asyncio.timeout(10 * SEC):
        await old.closed.wait()
    seen = old.events(ROOM, CHANNEL)
    client = await clients(url, tenant, principal)
    await client.join(ROOM, CHANNEL, since_seq=seen[-1]["seq"] if seen else 0)
    return client


async def test_kill_9_gateway_loses_no_acked_event(
    nats_cluster, gateway_processes, clients, tenant
):
    gw_a = await gateway_processes(nats_cluster.url_csv)
    gw_b = await gateway_processes(nats_cluster.url_csv)
    subs = [await clients(gw_a.url, tenant, f"s{i}") for i in range(3)]
    for sub in subs:
        await sub.join(ROOM, CHANNEL)
    pub_a = await clients(gw_a.url, tenant, "pa")
    pub_b = await clients(gw_b.url, tenant, "pb")
    acks = AckLog()
    # One publish first: two gateways creating a tenant's stream at once can stall (see report).
    await acks.record(await pub_b.publish(ROOM, CHANNEL, {"warm": True}, id="warm-up"))
    ids_a, ids_b = [f"a{n}" for n in range(300)], [f"b{n}" for n in range(300)]
    task_a = asyncio.create_task(publish_pipelined(pub_a, ids_a, acks))
    task_b = asyncio.create_task(publish_pipelined(pub_b, ids_b, acks))

    await acks.wait_count(30, timeout=20 * SEC, prefix="a")
    gw_a.signal(signal.SIGKILL)
    assert await gw_a.wait_exit(timeout=10 * SEC) == -signal.SIGKILL

    unacked = await asyncio.wait_for(task_a, 20 * SEC)
    assert 0 < len(unacked) < len(ids_a), "gateway A was not killed mid-stream"
    pub_a2 = await clients(gw_b.url, tenant, "pa")  # same principal: same dedupe keys
    resumed = [
        await resume_on(gw_b.url, sub, tenant, f"s{i}", clients) for i, sub in enumerate(subs)
    ]
    assert await publish_pipelined(pub_a2, unacked, acks) == []
    assert await asyncio.wait_for(task_b, 20 * SEC) == []

    assert set(acks.seqs) == {"warm-up", *ids_a, *ids_b}
    every_seq = sorted(acks.seqs.values())
    for old, new in zip(subs, resumed, strict=True):
        before = [e["seq"] for e in old.events(ROOM, CHANNEL)]
        after = await wait_for_seq(new, every_seq[-1])
        assert before + after == every_seq  # strictly increasing, no loss, no duplicate
    assert_stored_once(await stored_events(pub_b), acks)


# -- 4. one NATS node killed ----------------------------------------------------------------------


async def publish_until(
    client: WsClient, prefix: str, acks: AckLog, stop: asyncio.Event, limit: int = 20_000
) -> int:
    """Publish one event at a time, retrying on `unavailable`, until ``stop``; returns retries."""
    retries = 0
    for n in range(limit):
        if stop.is_set():
            return retries
        retries += await publish_with_retry(client, f"{prefix}{n}", acks)
    raise AssertionError(f"publisher never told to stop after {limit} events")


@pytest.mark.parametrize("victim", [2, 0], ids=["other-node", "connected-node"])
async def test_publishing_goes_on_when_a_nats_node_is_killed(
    tmp_path: Path, clients, tenant, victim: int
):
    cluster = new_cluster(tmp_path / "nats", nodes=3)  # containers too: make container-test
    await cluster.start(timeout=60 * SEC)
    # Only node 0 is given, so the gateway is surely connected to it; it learns the others
    # from the cluster, as a production client does.
    settings = load_settings(
        nats=cluster.urls[0], listen="127.0.0.1:0", auth="dev", publish_timeout_s=2.0
    )
    gateway = Gateway(settings)
    task: asyncio.Task[int] | None = None
    try:
        await gateway.start()
        await gateway.wait_ready(30)
        reader = await clients(gateway_url(gateway), tenant, "reader")
        await reader.join(ROOM, CHANNEL)
        writer = await clients(gateway_url(gateway), tenant, "writer")
        acks, stop = AckLog(), asyncio.Event()
        task = asyncio.create_task(publish_until(writer, "n", acks, stop))
        await acks.wait_count(30, timeout=20 * SEC)
        await cluster.kill_node(victim)
        await acks.wait_count(len(acks.seqs) + 30, timeout=30 * SEC)  # publishing goes on
        await cluster.start_node(victim, timeout=30 * SEC)
        await acks.wait_count(len(acks.seqs) + 30, timeout=30 * SEC)
        stop.set()
        await asyncio.wait_for(task, 30 * SEC)

        assert_stored_once(await stored_events(writer), acks)
        every_seq = sorted(acks.seqs.values())
        assert await wait_for_seq(reader, every_seq[-1]) == every_seq
    finally:
        if task is not None:
            task.cancel()
        await gateway.close()
        await cluster.stop()


async def test_a_gateway_started_while_a_node_is_down_plans_every_configured_node(
    tmp_path: Path,
) -> None:
    """Replicas come from the largest cluster known, counting the configured servers too.

    A gateway (re)started during a node outage sees only two servers in NATS's INFO; its
    new tenant streams must still be planned for three replicas, not created with two.
    """
    from arqonbus_server.mesh.jetstream import JetStreamBroker
    from arqonbus_server.mesh.streams import StreamPolicy
    from arqonbus_server.shared.subjects import SubjectScheme

    cluster = LocalCluster(tmp_path / "nats", nodes=3)
    await cluster.start()
    try:
        await cluster.kill_node(2, signal.SIGKILL)
        broker = JetStreamBroker(cluster.urls, SubjectScheme("arq"), StreamPolicy())
        await broker.connect()
        try:
            assert broker.cluster_size() == 3
        finally:
            await broker.close()
    finally:
        await cluster.stop()


async def test_link_checks_failing_after_the_gateways_own_reconnect_do_not_shed_clients(
    start_gateway, clients, tenant
):
    # A JetStream election that outlasts several checks makes the gateway drop its (alive)
    # NATS link to try another server, every 2 failed checks. The link checks that fail while
    # that reconnect runs are the gateway's own doing: they must not send its clients away.
    gw = await start_gateway(health_interval_s=600)  # only this test's checks run
    client = await clients(gateway_url(gw), tenant, "alice")
    reconnects: list[int] = []
    connected = True  # what the NATS client says when the gateway asks it to reconnect

    async def reconnect_elsewhere() -> bool:
        reconnects.append(1)
        return connected  # True: it dropped a live link

    gw.broker.reconnect_elsewhere = reconnect_elsewhere  # type: ignore[method-assign]
    for _ in range(2):  # JetStream silent, the link fine: reconnect after the 2nd check
        await gw.apply_health_check(healthy=False, link_ok=True)
    assert reconnects == [1]
    for _ in range(2):  # the link down because of that reconnect; a 2nd reconnect
        await gw.apply_health_check(healthy=False, link_ok=False)
    assert reconnects == [1, 1]
    assert (gw.link_failures, gw.cut_off) == (0, False)
    await gw.apply_health_check(healthy=True, link_ok=True)
    await client.join(ROOM, CHANNEL)  # still connected, and served
    assert not client.closed.is_set()

    # A link that stays down past the grace is a lost link: clients are sent away (4002).
    for _ in range(2):
        await gw.apply_health_check(healthy=False, link_ok=True)
    assert reconnects == [1, 1, 1]
    connected = False  # this time the link stays down: the next reconnect has none to drop
    for _ in range(2 + 3):  # 2 excused, then 3 counted
        await gw.apply_health_check(healthy=False, link_ok=False)
        assert not gw.cut_off or gw.link_failures == 3
    assert gw.cut_off
    await asyncio.wait_for(client.closed.wait(), 5 * SEC)
    assert client.close_code == 4002
