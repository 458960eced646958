"""Resume from a seq on any gateway, join semantics, retention gaps, leave, and history paging."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from nats.js import JetStreamManager

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.mesh.streams import StreamPolicy, tenant_stream_config
from arqonbus_server.shared.subjects import SubjectScheme
from tests.conftest import gateway_url
from tests.support import Message, WsClient
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration

ROOM = "science"
CHANNEL = "general"


async def publish_many(
    client: WsClient, channel: str, count: int, prefix: str, room: str = ROOM
) -> list[int]:
    """Send ``count`` events without waiting, then collect their acks; the acked seqs in order."""
    ids = [f"{prefix}{n}" for n in range(count)]
    for n, msg_id in enumerate(ids):
        await client.send(
            {"id": msg_id, "type": "event", "room": room, "channel": channel, "payload": {"n": n}}
        )
    seqs = []
    for msg_id in ids:
        ack = await client.reply_to(msg_id)
        assert ack["type"] == "ack", ack
        seqs.append(ack["payload"]["seq"])
    return seqs


async def connect_writer(clients, gateway: Gateway, tenant: str) -> WsClient:
    """A client whose tenant's stream already exists.

    A burst of pipelined publishes that creates the stream can be stored out of send order
    (reported as a product bug; see the report), which is not what these tests are about.
    """
    writer: WsClient = await clients(gateway_url(gateway), tenant, "writer")
    ack = await writer.publish(ROOM, "warm-up", {"creates": "the stream"})
    assert ack["type"] == "ack", ack
    return writer


def event_with_id(msg_id: str) -> Any:
    return lambda m: m["type"] == "event" and m["id"] == msg_id


def seqs_of(events: list[Message]) -> list[int]:
    return [e["seq"] for e in events]


class Publisher:
    """Publishes one event at a time, each acked before the next, until stopped."""

    def __init__(self, client: WsClient, channel: str, prefix: str, limit: int = 500) -> None:
        self.client, self.channel, self.prefix, self.limit = client, channel, prefix, limit
        self.seqs: list[int] = []
        self._stop = asyncio.Event()
        self._progress = asyncio.Condition()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            for n in range(self.limit):
                if self._stop.is_set():
                    return
                msg_id = f"{self.prefix}{n}"
                ack = await self.client.publish(ROOM, self.channel, {"n": n}, id=msg_id)
                assert ack["type"] == "ack", ack
                async with self._progress:
                    self.seqs.append(ack["payload"]["seq"])
                    self._progress.notify_all()
        finally:
            async with self._progress:  # wake waiters at once if the publisher fails
                self._progress.notify_all()

    async def wait_acked(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: len(self.seqs) >= count or self.task.done())
        assert len(self.seqs) >= count, f"publisher stopped after {len(self.seqs)} acks"

    async def stop(self) -> list[int]:
        self._stop.set()
        await asyncio.wait_for(self.task, 10 * SEC)
        return self.seqs


async def test_resume_on_other_gateway_has_no_loss_and_no_duplicate(start_gateway, clients, tenant):
    g1, g2 = await start_gateway(), await start_gateway()
    writer = await connect_writer(clients, g1, tenant)
    reader = await clients(gateway_url(g1), tenant, "reader")
    assert await reader.join(ROOM, CHANNEL) == {"last_seq": 0}
    acked = await publish_many(writer, CHANNEL, 10, "before-")
    seen_first = await reader.wait_events(10)
    last_seen = seen_first[-1]["seq"]
    await reader.close()

    acked += await publish_many(writer, CHANNEL, 10, "away-")
    publisher = Publisher(writer, CHANNEL, "seam-")
    try:
        await publisher.wait_acked(3)
        rejoined = await clients(gateway_url(g2), tenant, "reader")
        result = await rejoined.join(ROOM, CHANNEL, since_seq=last_seen)
        acked_at_join = len(publisher.seqs)
        await publisher.wait_acked(acked_at_join + 5)
    finally:
        acked += await publisher.stop()
    marker = await writer.publish(ROOM, CHANNEL, {"marker": True}, id="marker")
    acked.append(marker["payload"]["seq"])
    await rejoined.wait_for(event_with_id("marker"), timeout=15 * SEC)

    assert "gap" not in result
    assert result["last_seq"] >= acked[19]
    seen = seqs_of(seen_first) + seqs_of(rejoined.events(ROOM, CHANNEL))
    assert len(seen) == len(set(seen)), "duplicate at the seam"
    assert seen == sorted(acked)


async def test_join_without_since_seq_gets_only_later_events(start_gateway, clients, tenant):
    g1, g2 = await start_gateway(), await start_gateway()
    writer = await connect_writer(clients, g1, tenant)
    reader = await clients(gateway_url(g2), tenant, "reader")
    earlier = await publish_many(writer, CHANNEL, 3, "old-")
    history = await writer.command(ROOM, CHANNEL, "history", {"since_seq": 0})

    result = await reader.join(ROOM, CHANNEL)

    assert result == {"last_seq": earlier[-1]}
    assert result["last_seq"] == history["payload"]["result"]["events"][-1]["seq"]
    ack = await writer.publish(ROOM, CHANNEL, {"n": "new"}, id="new")
    await reader.wait_for(event_with_id("new"))
    assert seqs_of(reader.events()) == [ack["payload"]["seq"]]


async def test_join_since_zero_replays_everything_then_goes_live(start_gateway, clients, tenant):
    g1, g2 = await start_gateway(), await start_gateway()
    writer = await connect_writer(clients, g1, tenant)
    reader = await clients(gateway_url(g2), tenant, "reader")
    stored = await publish_many(writer, CHANNEL, 5, "stored-")
    await publish_many(writer, "elsewhere", 2, "other-")

    result = await reader.join(ROOM, CHANNEL, since_seq=0)
    replayed = await reader.wait_events(5)
    live = await publish_many(writer, CHANNEL, 3, "live-")
    events = await reader.wait_events(8)

    assert result == {"last_seq": stored[-1]}
    assert seqs_of(replayed[:5]) == stored
    assert seqs_of(events) == stored + live
    assert [e["id"] for e in events] == [f"stored-{n}" for n in range(5)] + [
        f"live-{n}" for n in range(3)
    ]


# -- retention -------------------------------------------------------------------------------


@asynccontextmanager
async def jetstream(cluster: LocalCluster) -> AsyncIterator[JetStreamManager]:
    nc = await nats.connect(cluster.urls[0])
    try:
        yield nc.jsm()
    finally:
        await nc.close()


async def wait_until_dropped(
    cluster: LocalCluster, gateway: Gateway, tenant: str, upto_seq: int, timeout: float = 10.0
) -> None:
    """Poll the stream until retention has dropped every event up to ``upto_seq``."""
    stream = SubjectScheme(gateway.settings.subject_prefix).stream_name(tenant)
    async with jetstream(cluster) as jsm:

        async def dropped() -> bool:
            return (await jsm.stream_info(stream)).state.first_seq > upto_seq

        await eventually(dropped, timeout, f"retention dropped every seq up to {upto_seq}")


async def provision_short_lived_stream(
    cluster: LocalCluster, gateway: Gateway, tenant: str, max_age_s: float
) -> None:
    """The tenant's stream as the gateway would make it, but with a max age of seconds.

    Settings refuse a max age below the 2-minute dedupe window (JetStream does too), so a
    gateway cannot create this stream itself; it finds it and uses it. One replica: each
    replica expires on its own clock, and window() and replay() may read different replicas
    (reported separately), which this test is not about.
    """
    policy = StreamPolicy(max_age_s=max_age_s, dedupe_window_s=max_age_s)
    scheme = SubjectScheme(gateway.settings.subject_prefix)
    async with jetstream(cluster) as jsm:
        await jsm.add_stream(tenant_stream_config(scheme, tenant, policy, replicas=1))


async def drop_everything_stored(cluster: LocalCluster, gateway: Gateway, tenant: str) -> None:
    """What retention does, at once: the stream's first seq moves past every stored event."""
    stream = SubjectScheme(gateway.settings.subject_prefix).stream_name(tenant)
    async with jetstream(cluster) as jsm:
        await jsm.purge_stream(stream)
        state = (await jsm.stream_info(stream)).state
    assert state.messages == 0 and state.first_seq == state.last_seq + 1


async def test_join_after_retention_dropped_events_reports_gap(
    start_gateway, clients, tenant, nats_cluster
):
    gw = await start_gateway()
    await provision_short_lived_stream(nats_cluster, gw, tenant, max_age_s=1.0)
    writer = await connect_writer(clients, gw, tenant)
    dropped = await publish_many(writer, CHANNEL, 3, "doomed-")
    await wait_until_dropped(nats_cluster, gw, tenant, dropped[-1])
    survivor = (await writer.publish(ROOM, CHANNEL, {"n": "survivor"}, id="survivor"))["payload"]
    reader = await clients(gateway_url(gw), tenant, "reader")

    result = await reader.join(ROOM, CHANNEL, since_seq=0)
    await reader.wait_for(event_with_id("survivor"))

    assert survivor["seq"] > dropped[-1]
    assert result == {
        "last_seq": survivor["seq"],
        "gap": True,
        "first_available_seq": survivor["seq"],
    }
    assert [e["id"] for e in reader.events()] == ["survivor"]


async def test_join_after_dropped_events_reports_gap_and_replays_survivors(
    start_gateway, clients, tenant, nats_cluster
):
    gw = await start_gateway()
    writer = await connect_writer(clients, gw, tenant)
    dropped = await publish_many(writer, CHANNEL, 3, "doomed-")
    await drop_everything_stored(nats_cluster, gw, tenant)
    survivors = await publish_many(writer, CHANNEL, 2, "survivor-")
    reader = await clients(gateway_url(gw), tenant, "reader")

    result = await reader.join(ROOM, CHANNEL, since_seq=dropped[0])
    await reader.wait_for(event_with_id("survivor-1"))
    live = await writer.publish(ROOM, CHANNEL, {"n": "live"}, id="live")
    await reader.wait_for(event_with_id("live"))

    assert result == {"last_seq": survivors[-1], "gap": True, "first_available_seq": survivors[0]}
    assert seqs_of(reader.events()) == [*survivors, live["payload"]["seq"]]


async def test_resume_after_every_later_event_was_dropped_reports_gap(
    start_gateway, clients, tenant, nats_cluster
):
    """A client that saw seq N must be told that events after N are gone, even if none remain."""
    gw = await start_gateway()
    writer = await connect_writer(clients, gw, tenant)
    seqs = await publish_many(writer, CHANNEL, 3, "doomed-")
    await drop_everything_stored(nats_cluster, gw, tenant)
    reader = await clients(gateway_url(gw), tenant, "reader")

    result = await reader.join(ROOM, CHANNEL, since_seq=seqs[0])

    assert result.get("gap") is True, f"events {seqs[1:]} were dropped silently: {result}"
    assert result.get("first_available_seq") == seqs[-1] + 1, result


async def test_resume_at_the_newest_seq_after_a_drop_is_not_a_gap(
    start_gateway, clients, tenant, nats_cluster
):
    gw = await start_gateway()
    writer = await connect_writer(clients, gw, tenant)
    seqs = await publish_many(writer, CHANNEL, 3, "seen-")
    await drop_everything_stored(nats_cluster, gw, tenant)
    reader = await clients(gateway_url(gw), tenant, "reader")

    result = await reader.join(ROOM, CHANNEL, since_seq=seqs[-1])
    ack = await writer.publish(ROOM, CHANNEL, {"n": "next"}, id="next")
    await reader.wait_for(event_with_id("next"))

    assert "gap" not in result, result
    assert seqs_of(reader.events()) == [ack["payload"]["seq"]]


# -- leave -----------------------------------------------------------------------------------


async def test_leave_channel_stops_delivery(start_gateway, clients, tenant):
    g1, g2 = await start_gateway(), await start_gateway()
    writer = await connect_writer(clients, g1, tenant)
    reader = await clients(gateway_url(g2), tenant, "reader")
    await reader.join(ROOM, "left")
    await reader.join(ROOM, "kept")
    await writer.publish(ROOM, "left", {"n": 1}, id="while-joined")
    await reader.wait_for(event_with_id("while-joined"))

    reply = await reader.command(ROOM, "left", "leave_channel")
    await writer.publish(ROOM, "left", {"n": 2}, id="after-leave")
    await writer.publish(ROOM, "kept", {"marker": True}, id="marker")
    await reader.wait_for(event_with_id("marker"))

    assert reply["payload"]["status"] == "success", reply
    assert [e["id"] for e in reader.events(ROOM, "left")] == ["while-joined"]


async def test_leave_channel_not_joined_is_an_error(start_gateway, clients, tenant):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    await client.join(ROOM, "once")
    assert (await client.command(ROOM, "once", "leave_channel"))["payload"]["status"] == "success"

    for channel in ("never", "once"):
        reply = await client.command(ROOM, channel, "leave_channel")
        assert reply["type"] == "command_response", reply
        assert reply["payload"]["status"] == "error", reply
        assert reply["payload"]["error"]["code"] == "not_joined", reply
        assert reply["payload"]["error"]["message"]
    ack = await client.publish(ROOM, "once", {"still": "usable"})
    assert ack["type"] == "ack", ack


# -- history ---------------------------------------------------------------------------------


async def history(client: WsClient, channel: str, **parameters: Any) -> dict[str, Any]:
    reply = await client.command(ROOM, channel, "history", parameters)
    assert reply["payload"]["status"] == "success", reply
    result: dict[str, Any] = reply["payload"]["result"]
    return result


async def test_history_pages_with_since_seq_and_limit(start_gateway, clients, tenant):
    gw = await start_gateway()
    client = await connect_writer(clients, gw, tenant)
    acked = await publish_many(client, CHANNEL, 60, "a-")
    await publish_many(client, "noise", 5, "noise-")  # same stream, other channel
    acked += await publish_many(client, CHANNEL, 45, "b-")

    pages, since = [], 0
    for _ in range(10):
        page = await history(client, CHANNEL, since_seq=since, limit=40)
        pages.append(page)
        if not page["more"]:
            break
        since = page["next_since_seq"]
    events = [e for page in pages for e in page["events"]]

    assert [len(p["events"]) for p in pages] == [40, 40, 25]
    assert [p["more"] for p in pages] == [True, True, False]
    assert [p["next_since_seq"] for p in pages] == [acked[39], acked[79], acked[-1]]
    assert seqs_of(events) == acked
    assert {(e["room"], e["channel"], e["from"]) for e in events} == {(ROOM, CHANNEL, "writer")}
    assert len((await history(client, CHANNEL))["events"]) == 100  # the default limit
    everything = await history(client, CHANNEL, since_seq=0, limit=1000)
    assert seqs_of(everything["events"]) == acked and everything["more"] is False
    tail = await history(client, CHANNEL, since_seq=acked[-1], limit=5)
    assert tail == {"events": [], "next_since_seq": acked[-1], "more": False}


@pytest.mark.parametrize(
    "parameters",
    [
        {"limit": 1001},
        {"limit": 0},
        {"limit": "10"},
        {"since_seq": -1},
        {"since_seq": 1.5},
        {"since_seq": True},
    ],
)
async def test_history_rejects_bad_parameters(start_gateway, clients, tenant, parameters):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")

    reply = await client.command(ROOM, CHANNEL, "history", parameters)

    assert reply["payload"]["status"] == "error", reply
    assert reply["payload"]["error"]["code"] == "invalid_parameters", reply
    [name] = parameters
    assert name in reply["payload"]["error"]["message"], "the message names the bad parameter"
    assert (await client.publish(ROOM, CHANNEL, {"ok": 1}))["type"] == "ack"
