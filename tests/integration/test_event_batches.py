"""``events`` frames (docs/protocol.md#batches-of-events) through real gateways on the real
3-node cluster: one ack with every event's seq, delivered in the list's order on every
gateway, resends answered as duplicates, bad frames refused whole, metrics per event."""

from __future__ import annotations

from typing import Any

from tests.conftest import gateway_url
from tests.integration.test_metrics import eventually, value
from tests.support import WsClient, new_id


def events_frame(batch_id: str, room: str, channel: str, events: list[dict[str, Any]]) -> dict:
    return {
        "id": batch_id,
        "type": "events",
        "room": room,
        "channel": channel,
        "payload": {"events": events},
    }


async def send_batch(
    client: WsClient, room: str, channel: str, events: list[dict[str, Any]], batch_id: str = ""
) -> dict[str, Any]:
    batch_id = batch_id or new_id("b")
    start = len(client.received)
    await client.send(events_frame(batch_id, room, channel, events))
    return await client.reply_to(batch_id, start=start)


async def test_a_batch_is_acked_once_and_delivered_in_its_order_on_every_gateway(
    start_gateway, clients, tenant
):
    g1, g2 = await start_gateway(), await start_gateway()
    alice = await clients(gateway_url(g1), tenant, "alice")
    near = await clients(gateway_url(g1), tenant, "near")
    far = await clients(gateway_url(g2), tenant, "far")
    for member in (near, far):
        await member.join("r", "c")
    single = await alice.publish("r", "c", {"n": -1}, id="before")
    events = [{"id": f"e{i}", "payload": {"n": i}} for i in range(300)]
    events[7]["id"] = "before"  # stored already: a duplicate with its first seq
    ack = await send_batch(alice, "r", "c", events, "batch-1")

    assert ack["type"] == "ack" and ack["room"] == "r" and ack["channel"] == "c"
    payload = ack["payload"]
    assert payload["request_id"] == "batch-1" and payload["duplicates"] == [7]
    seqs = payload["seqs"]
    assert len(seqs) == 300 and seqs[7] == single["payload"]["seq"]
    fresh = seqs[:7] + seqs[8:]
    assert fresh == sorted(set(fresh)) and fresh[0] > seqs[7]  # stored in the list's order
    for member in (near, far):
        delivered = await member.wait_events(300, "r", "c")  # "before" and 299 new
        assert [e["id"] for e in delivered] == ["before"] + [
            e["id"] for e in events if e["id"] != "before"
        ]
        assert [e["seq"] for e in delivered] == [seqs[7], *fresh]
        assert all(e["from"] == "alice" for e in delivered)
        assert [e["payload"]["n"] for e in delivered[1:4]] == [0, 1, 2]

    # The same frame again (a client's resend after a lost ack): every event a duplicate.
    again = await send_batch(alice, "r", "c", events, "batch-1")
    assert again["payload"]["seqs"] == seqs
    assert again["payload"]["duplicates"] == list(range(300))
    after = await alice.publish("r", "c", {"n": 1000}, id="after")
    delivered = await far.wait_events(301, "r", "c")
    assert [e["id"] for e in delivered[300:]] == ["after"]  # the resend delivered nothing
    assert delivered[-1]["seq"] == after["payload"]["seq"]

    # History reads them back like any events.
    history = await far.command("r", "c", "history", {"since_seq": fresh[0] - 1, "limit": 3})
    assert [e["id"] for e in history["payload"]["result"]["events"]] == ["e0", "e1", "e2"]


async def test_a_bad_batch_is_refused_whole_and_the_connection_carries_on(
    start_gateway, clients, tenant
):
    gateway = await start_gateway()
    alice = await clients(gateway_url(gateway), tenant, "alice")
    reader = await clients(gateway_url(gateway), tenant, "reader:read-only")
    await alice.join("r", "c")
    cases = [
        ([], "invalid_envelope", "payload.events"),
        ([{"id": "x", "payload": {}}] * 2, "invalid_envelope", "each event of a batch"),
        ([{"id": "x", "payload": "text"}], "invalid_envelope", "payload.events[0].payload"),
        ([{"id": str(i), "payload": {}} for i in range(501)], "invalid_envelope", "1-500"),
    ]
    for events, code, named in cases:
        error = await send_batch(alice, "r", "c", events)
        assert error["type"] == "error" and error["payload"]["code"] == code, error
        assert named in error["payload"]["message"]
    forbidden = await send_batch(reader, "r", "c", [{"id": "x", "payload": {}}])
    assert forbidden["payload"]["code"] == "forbidden"
    # Nothing of a refused frame was stored; both connections still work.
    ack = await alice.publish("r", "c", {"n": 1})
    assert ack["type"] == "ack"
    [event] = await alice.wait_events(1, "r", "c")
    assert event["seq"] == ack["payload"]["seq"]
    assert (await reader.command("_system", "general", "ping"))["payload"]["status"] == "success"


async def test_metrics_count_each_event_of_a_batch(start_gateway, clients, tenant):
    gateway = await start_gateway()
    alice = await clients(gateway_url(gateway), tenant, "alice")
    reader = await clients(gateway_url(gateway), tenant, "reader:read-only")
    await send_batch(alice, "r", "c", [{"id": f"m{i}", "payload": {}} for i in range(40)])
    await send_batch(alice, "r", "c", [{"id": f"m{i}", "payload": {}} for i in range(30, 50)])
    forbidden = [{"id": "a", "payload": {}}, {"id": "b", "payload": {}}]
    assert (await send_batch(reader, "r", "c", forbidden))["payload"]["code"] == "forbidden"
    found = await eventually(
        gateway, lambda s: value(s, "arqonbus_frames_received_total", type="events") >= 3
    )
    assert value(found, "arqonbus_publishes_acked_total", duplicate="false") == 50
    assert value(found, "arqonbus_publishes_acked_total", duplicate="true") == 10
    assert value(found, "arqonbus_publishes_refused_total", code="forbidden") == 2
