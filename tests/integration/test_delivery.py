"""Delivery across gateways, ack after store, dedupe, from overwritten, order."""

from __future__ import annotations

from tests.conftest import gateway_url


async def test_event_reaches_member_on_other_gateway_with_seq(start_gateway, clients, tenant):
    g1, g2 = await start_gateway(), await start_gateway()
    alice = await clients(gateway_url(g1), tenant, "alice")
    bob = await clients(gateway_url(g2), tenant, "bob")
    assert (await bob.join("science", "general")) == {"last_seq": 0}

    ack = await alice.publish(
        "science", "general", {"message": "Hello everyone!"}, id="arq_msg_001"
    )

    assert ack["type"] == "ack"
    seq = ack["payload"]["seq"]
    [event] = await bob.wait_events(1)
    assert event["seq"] == seq
    assert event["id"] == "arq_msg_001"
    assert event["payload"] == {"message": "Hello everyone!"}
    assert event["from"] == "alice"
    assert event["room"] == "science" and event["channel"] == "general"
    assert event["timestamp"].endswith("Z")


async def test_client_supplied_from_is_overwritten(start_gateway, clients, tenant):
    gw = await start_gateway()
    alice = await clients(gateway_url(gw), tenant, "alice")
    await alice.join("r", "c")
    await alice.publish(
        "r", "c", {"x": 1}, **{"from": "mallory", "timestamp": "1999-01-01T00:00:00.000Z"}
    )
    [event] = await alice.wait_events(1)
    assert event["from"] == "alice"
    assert event["timestamp"] != "1999-01-01T00:00:00.000Z"


async def test_resend_same_id_returns_same_seq_and_delivers_once(start_gateway, clients, tenant):
    g1, g2 = await start_gateway(), await start_gateway()
    alice = await clients(gateway_url(g1), tenant, "alice")
    bob = await clients(gateway_url(g2), tenant, "bob")
    await bob.join("r", "c")
    first = await alice.publish("r", "c", {"n": 1}, id="dup-1")
    again = await alice.publish("r", "c", {"n": 1}, id="dup-1")
    marker = await alice.publish("r", "c", {"n": 2}, id="after")
    assert again["payload"]["seq"] == first["payload"]["seq"]
    assert again["payload"].get("duplicate") is True
    events = await bob.wait_events(2)
    assert [e["id"] for e in events] == ["dup-1", "after"]
    assert events[1]["seq"] == marker["payload"]["seq"]


async def test_all_subscribers_on_all_gateways_see_one_order(start_gateway, clients, tenant):
    gateways = [await start_gateway() for _ in range(2)]
    readers = [await clients(gateway_url(g), tenant, f"r{i}") for i, g in enumerate(gateways * 2)]
    for reader in readers:
        await reader.join("ops", "feed")
    writers = [await clients(gateway_url(g), tenant, f"w{i}") for i, g in enumerate(gateways)]
    for n in range(40):
        await writers[n % 2].send(
            {"id": f"e{n}", "type": "event", "room": "ops", "channel": "feed", "payload": {"n": n}}
        )
    for n in range(40):
        ack = await writers[n % 2].reply_to(f"e{n}")
        assert ack["type"] == "ack", ack
    orders = []
    for reader in readers:
        events = await reader.wait_events(40)
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == 40
        orders.append([e["id"] for e in events])
    assert all(order == orders[0] for order in orders)


async def test_ack_comes_only_after_the_event_is_stored(start_gateway, clients, tenant):
    gw = await start_gateway()
    alice = await clients(gateway_url(gw), tenant, "alice")
    ack = await alice.publish("r", "c", {"k": "v"}, id="stored-1")
    reply = await alice.command("r", "c", "history", {"since_seq": 0})
    events = reply["payload"]["result"]["events"]
    assert [(e["id"], e["seq"]) for e in events] == [("stored-1", ack["payload"]["seq"])]


async def test_a_member_that_joins_with_batch_takes_runs_of_events_in_events_messages(
    start_gateway, clients, tenant
):
    """The same events, in the same order, as a member without ``batch``: replayed and live,
    several in one ``events`` message (docs/protocol.md#batched-delivery)."""
    g1, g2 = await start_gateway(), await start_gateway()
    alice = await clients(gateway_url(g1), tenant, "alice")

    async def publish_frame(name: str, count: int) -> list[int]:
        events = [{"id": f"{name}-{n}", "payload": {"n": n}} for n in range(count)]
        frame = {"id": name, "type": "events", "room": "r", "channel": "c"}
        await alice.send({**frame, "payload": {"events": events}})
        ack = await alice.reply_to(name)
        assert ack["type"] == "ack", ack
        seqs: list[int] = ack["payload"]["seqs"]
        return seqs

    stored = await publish_frame("before", 100)
    bob = await clients(gateway_url(g2), tenant, "bob")
    carol = await clients(gateway_url(g2), tenant, "carol")
    assert (await bob.join("r", "c", since_seq=0, batch=True))["last_seq"] == stored[-1]
    await carol.join("r", "c", since_seq=0)
    replayed = await bob.wait_events(100)
    joined_at = len(bob.received)
    live = await publish_frame("after", 100)

    batched, plain = await bob.wait_events(200), await carol.wait_events(200)
    assert [e["seq"] for e in batched] == stored + live
    assert batched == plain  # each event exactly as an event message carries it
    assert [e["id"] for e in replayed] == [f"before-{n}" for n in range(100)]
    assert [m["type"] for m in carol.received if m["type"].startswith("event")] == ["event"] * 200
    runs = [m for m in bob.received[joined_at:] if m["type"] == "events"]
    assert runs, "the live events came one by one"
    assert all((m["room"], m["channel"]) == ("r", "c") for m in runs)
    assert len([m for m in bob.received if m["type"] in ("event", "events")]) < 100
