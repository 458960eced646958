"""Service commands over the wire protocol: register_handler, routing by NATS request/reply
with one queue group per command, no_responders, timeout, handler errors, isolation, drain."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from tests.conftest import gateway_url
from tests.support import Message, WsClient
from tests.timeouts import SEC

ROOM, CHANNEL = "services", "database"


async def register(client: WsClient, command: str = "status") -> Message:
    reply = await client.command(ROOM, CHANNEL, "register_handler", {"command": command})
    assert reply["payload"] == {
        "request_id": reply["payload"]["request_id"],
        "status": "success",
        "result": {"command": command},
    }, reply
    return reply


async def serve(handler: WsClient, count: int, result: Message, stop: asyncio.Event) -> None:
    """Answer every delivery that arrives (up to ``count``) with ``result``."""
    start = 0
    for _ in range(count):
        waiter = asyncio.ensure_future(handler.next_delivery(start, timeout=30 * SEC))
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            return
        stopper.cancel()
        delivery = waiter.result()
        start = handler.received.index(delivery) + 1
        await handler.answer(delivery, result | {"handled_by": handler.welcome["payload"]["node"]})  # type: ignore[index]


def error_of(reply: Message) -> Message:
    assert reply["type"] == "command_response", reply
    assert reply["payload"]["status"] == "error", reply
    return reply["payload"]["error"]


async def test_a_command_reaches_a_handler_on_another_gateway_and_its_answer_comes_back(
    start_gateway, clients, tenant
):
    gw_a, gw_b = await start_gateway(), await start_gateway()
    db = await clients(gateway_url(gw_b), tenant, "db_service")
    api = await clients(gateway_url(gw_a), tenant, "api_service")
    await register(db)

    cmd_id = await api.send_command(ROOM, CHANNEL, "status", {"check": "connection_pool"}, 5000)
    delivery = await db.next_delivery()
    assert delivery["type"] == "command"
    assert delivery["id"].startswith("dlv_") and len(delivery["id"]) == 36
    assert (delivery["room"], delivery["channel"], delivery["from"]) == (
        ROOM,
        CHANNEL,
        "api_service",
    )
    assert delivery["timestamp"].endswith("Z")
    assert delivery["payload"] == {
        "command": "status",
        "parameters": {"check": "connection_pool"},
        "request_id": cmd_id,
        "timeout_ms": 5000,
    }
    answer_id = await db.answer(delivery, {"active_connections": 15, "max_connections": 100})

    reply = await api.reply_to(cmd_id)
    assert reply["type"] == "command_response"
    assert reply["id"] == answer_id
    assert (reply["room"], reply["channel"], reply["from"]) == (ROOM, CHANNEL, "db_service")
    assert reply["payload"] == {
        "request_id": cmd_id,
        "status": "success",
        "result": {"active_connections": 15, "max_connections": 100},
    }
    # Nothing is sent back to the handler for a good answer.
    assert not [m for m in db.received if m["type"] == "error"]


async def test_commands_are_balanced_across_handlers_on_two_gateways_each_answered_once(
    start_gateway, clients, tenant
):
    gw_a, gw_b = await start_gateway(), await start_gateway()
    handlers = [
        await clients(gateway_url(gw_a), tenant, "db_1"),
        await clients(gateway_url(gw_b), tenant, "db_2"),
    ]
    for handler in handlers:
        await register(handler)
    caller = await clients(gateway_url(gw_a), tenant, "api")
    total = 60
    stop = asyncio.Event()
    servers = [asyncio.create_task(serve(h, total, {"ok": True}, stop)) for h in handlers]
    try:
        ids = [await caller.send_command(ROOM, CHANNEL, "status") for _ in range(total)]
        replies = [await caller.reply_to(i, timeout=20 * SEC) for i in ids]
    finally:
        stop.set()
        await asyncio.gather(*servers)
    assert all(r["payload"]["status"] == "success" for r in replies), replies
    by_handler = Counter(r["from"] for r in replies)
    assert set(by_handler) == {"db_1", "db_2"}, by_handler
    # Each command went to exactly one handler.
    assert len(handlers[0].deliveries()) + len(handlers[1].deliveries()) == total
    assert by_handler["db_1"] == len(handlers[0].deliveries())
    replies_per_id = Counter(
        m["payload"]["request_id"] for m in caller.received if m["type"] == "command_response"
    )
    assert all(replies_per_id[i] == 1 for i in ids)


async def test_no_handler_answers_no_responders_at_once_not_after_the_timeout(
    start_gateway, clients, tenant
):
    gw = await start_gateway()
    api = await clients(gateway_url(gw), tenant, "api")
    started = time.monotonic()
    # With a 60 s timeout, an answer within 5 s can only be NATS's no-responders status.
    reply = await api.command(ROOM, CHANNEL, "status", timeout_ms=60_000, reply_timeout=5)
    elapsed = time.monotonic() - started
    error = error_of(reply)
    assert error["code"] == "no_responders"
    assert error["retryable"] is True
    assert reply["from"] == "arqonbus"
    print(f"no_responders after {elapsed * 1000:.1f} ms")


async def test_a_slow_handler_gets_timeout_and_its_late_answer_is_refused(
    start_gateway, clients, tenant
):
    gw = await start_gateway()
    db = await clients(gateway_url(gw), tenant, "db")
    api = await clients(gateway_url(gw), tenant, "api")
    await register(db)
    cmd_id = await api.send_command(ROOM, CHANNEL, "status", timeout_ms=300)
    delivery = await db.next_delivery()
    reply = await api.reply_to(cmd_id)
    error = error_of(reply)
    assert error["code"] == "timeout"
    assert "300 ms" in error["message"]
    # A late answer is either dropped (the caller stopped waiting) or refused once the
    # gateway forgot the delivery; a second answer to the same delivery is always refused.
    await db.answer(delivery, {"late": True})
    second = await db.answer(delivery, {"late": "again"})
    refusal = await db.wait_for(
        lambda m: m["type"] == "error" and m["payload"]["request_id"] == second
    )
    assert refusal["payload"]["code"] == "unknown_request"
    await api.publish("r", "c", {"barrier": True})  # everything before it has been read
    responses = [m for m in api.received if m["type"] == "command_response"]
    assert len(responses) == 1


async def test_a_handler_error_reaches_the_caller_as_sent(start_gateway, clients, tenant):
    gw = await start_gateway()
    db = await clients(gateway_url(gw), tenant, "db")
    api = await clients(gateway_url(gw), tenant, "api")
    await register(db)
    cmd_id = await api.send_command(ROOM, CHANNEL, "status")
    delivery = await db.next_delivery()
    await db.answer(
        delivery,
        error={
            "code": "pool_exhausted",
            "message": "all 100 connections are busy",
            "retryable": True,
        },
    )
    reply = await api.reply_to(cmd_id)
    assert reply["from"] == "db"
    assert error_of(reply) == {
        "code": "pool_exhausted",
        "message": "all 100 connections are busy",
        "retryable": True,
    }


async def test_another_tenants_handler_is_never_reached(start_gateway, clients, tenant):
    gw = await start_gateway()
    other = await clients(gateway_url(gw), tenant + "x", "db")
    await register(other)
    api = await clients(gateway_url(gw), tenant, "api")
    reply = await api.command(ROOM, CHANNEL, "status", reply_timeout=5)
    assert error_of(reply)["code"] == "no_responders"
    assert other.deliveries() == []


async def test_a_handler_serves_only_its_room_channel_and_command(start_gateway, clients, tenant):
    gw = await start_gateway()
    db = await clients(gateway_url(gw), tenant, "db")
    await register(db)
    api = await clients(gateway_url(gw), tenant, "api")
    for room, channel, name in [
        (ROOM, "other", "status"),
        ("r2", CHANNEL, "status"),
        (ROOM, CHANNEL, "stats"),
    ]:
        reply = await api.command(room, channel, name, reply_timeout=5)
        assert error_of(reply)["code"] == "no_responders"
    assert db.deliveries() == []


async def test_unregister_stops_deliveries_and_twice_is_not_registered(
    start_gateway, clients, tenant
):
    gw = await start_gateway()
    db = await clients(gateway_url(gw), tenant, "db")
    api = await clients(gateway_url(gw), tenant, "api")
    await register(db)
    await register(db)  # idempotent
    reply = await db.command(ROOM, CHANNEL, "unregister_handler", {"command": "status"})
    assert reply["payload"]["result"] == {"command": "status"}
    assert error_of(await api.command(ROOM, CHANNEL, "status"))["code"] == "no_responders"
    again = await db.command(ROOM, CHANNEL, "unregister_handler", {"command": "status"})
    assert error_of(again)["code"] == "not_registered"


async def test_a_handler_that_disconnects_with_a_command_pending_fails_it_at_once(
    start_gateway, clients, tenant
):
    gw = await start_gateway()
    db = await clients(gateway_url(gw), tenant, "db")
    api = await clients(gateway_url(gw), tenant, "api")
    await register(db)
    cmd_id = await api.send_command(ROOM, CHANNEL, "status", timeout_ms=60_000)
    await db.next_delivery()
    await db.close()
    reply = await api.reply_to(cmd_id, timeout=5 * SEC)
    error = error_of(reply)
    assert error["code"] == "unavailable"
    assert "closed" in error["message"]
    # And it no longer receives commands.
    assert error_of(await api.command(ROOM, CHANNEL, "status"))["code"] == "no_responders"


async def test_bad_registrations_and_calls_get_stable_codes(start_gateway, clients, tenant):
    gw = await start_gateway(max_handlers_per_connection=2, command_timeout_max_s=10)
    db = await clients(gateway_url(gw), tenant, "db")
    limits = db.welcome["payload"]["limits"]  # type: ignore[index]
    assert limits["max_handlers"] == 2
    assert limits["command_timeout_max_ms"] == 10_000
    for params in ({}, {"command": "a.b"}, {"command": "history"}, {"command": 5}):
        reply = await db.command(ROOM, CHANNEL, "register_handler", params)
        assert error_of(reply)["code"] == "invalid_parameters", params
    await register(db, "one")
    await register(db, "two")
    third = await db.command(ROOM, CHANNEL, "register_handler", {"command": "three"})
    assert error_of(third)["code"] == "limit_exceeded"
    for timeout_ms in (0, 10_001, "5", 1.5):
        reply = await db.command(ROOM, CHANNEL, "one", timeout_ms=timeout_ms)  # type: ignore[arg-type]
        assert error_of(reply)["code"] == "invalid_parameters", timeout_ms
    assert error_of(await db.command(ROOM, CHANNEL, "a.b"))["code"] == "unknown_command"


async def test_bad_answers_get_errors_and_the_connection_lives(start_gateway, clients, tenant):
    gw = await start_gateway()
    db = await clients(gateway_url(gw), tenant, "db")
    start = len(db.received)
    await db.send(
        {
            "id": "ans1",
            "type": "command_response",
            "room": ROOM,
            "channel": CHANNEL,
            "payload": {"request_id": "dlv_nothing", "status": "success", "result": {}},
        }
    )
    await db.send(
        {
            "id": "ans2",
            "type": "command_response",
            "room": ROOM,
            "channel": CHANNEL,
            "payload": {"request_id": "dlv_x", "status": "maybe"},
        }
    )
    first = await db.wait_for(lambda m: m["type"] == "error", start=start)
    assert (first["payload"]["code"], first["payload"]["request_id"]) == ("unknown_request", "ans1")
    second = await db.wait_for(
        lambda m: m["type"] == "error" and m["payload"]["request_id"] == "ans2", start=start
    )
    assert second["payload"]["code"] == "invalid_envelope"
    assert (await db.publish("r", "c", {"still": "open"}))["type"] == "ack"


async def test_a_draining_handler_gateway_still_delivers_the_answer_it_owes(
    start_gateway, clients, tenant
):
    gw_a, gw_b = await start_gateway(), await start_gateway(drain_timeout_s=10)
    db = await clients(gateway_url(gw_b), tenant, "db")
    api = await clients(gateway_url(gw_a), tenant, "api")
    await register(db)
    cmd_id = await api.send_command(ROOM, CHANNEL, "status", timeout_ms=20_000)
    delivery = await db.next_delivery()
    drain = asyncio.create_task(gw_b.drain())
    # Draining takes the handler out of the queue group at once ...
    await asyncio.wait_for(_until_unregistered(api), 10 * SEC)
    # ... but the answer it owes still gets through.
    await db.answer(delivery, {"answered": "while draining"})
    reply = await api.reply_to(cmd_id)
    assert reply["payload"]["result"] == {"answered": "while draining"}
    await drain
    assert db.close_code == 1012


async def _until_unregistered(api: WsClient) -> None:
    for _ in range(100):  # bounded; each round trip is one request to NATS
        reply = await api.command(ROOM, CHANNEL, "status", timeout_ms=100)
        if error_of(reply)["code"] == "no_responders":
            return
    raise AssertionError("the draining handler stayed registered")


async def test_a_connection_that_calls_its_own_handler_never_blocks_its_answers(
    start_gateway, clients, tenant
):
    """Calls are bounded apart from publishes: at the bound a call is refused at once, and
    the connection keeps reading the answers it owes as a handler."""
    gw = await start_gateway(max_in_flight=2)
    both = await clients(gateway_url(gw), tenant, "both")
    await register(both, "echo")
    ids = [await both.send_command(ROOM, CHANNEL, "echo", {"n": n}, 10_000) for n in range(3)]
    refused = await both.reply_to(ids[2], timeout=5 * SEC)
    assert error_of(refused)["code"] == "limit_exceeded"
    start = 0
    for _ in range(2):
        delivery = await both.next_delivery(start)
        start = both.received.index(delivery) + 1
        await both.answer(delivery, {"echo": delivery["payload"]["parameters"]["n"]})
    answers = [await both.reply_to(i, timeout=5 * SEC) for i in ids[:2]]
    assert [a["payload"]["result"] for a in answers] == [{"echo": 0}, {"echo": 1}]


async def test_a_mistyped_built_in_is_unknown_command_unless_a_service_has_the_name(
    start_gateway, clients, tenant
):
    """A name no service handles that looks like a built-in command gets unknown_command (not
    retryable) naming the built-in, instead of no_responders ("start the service"). A service
    registered under such a name is still reached; other names still get no_responders."""
    gw_a, gw_b = await start_gateway(), await start_gateway()
    api = await clients(gateway_url(gw_a), tenant, "api")
    for name, meant in [
        ("subscribe", "join_channel"),
        ("unsubscribe", "leave_channel"),
        ("histroy", "history"),
        ("JOIN_CHANNEL", "join_channel"),
    ]:
        reply = await api.command(ROOM, CHANNEL, name, {"since_seq": 0}, reply_timeout=5)
        error = error_of(reply)
        assert error["code"] == "unknown_command", reply
        assert error["retryable"] is False, reply
        assert error["message"].startswith(f"unknown command '{name}'; did you mean {meant}? ")
        assert reply["from"] == "arqonbus"
    for name in ("status", "explode"):  # no built-in is close: the service is just not there
        error = error_of(await api.command(ROOM, CHANNEL, name, reply_timeout=5))
        assert (error["code"], error["retryable"]) == ("no_responders", True), name

    svc = await clients(gateway_url(gw_b), tenant, "svc")
    await register(svc, "subscribe")
    cmd_id = await api.send_command(ROOM, CHANNEL, "subscribe", {"topic": "x"})
    delivery = await svc.next_delivery()
    assert delivery["payload"]["command"] == "subscribe"
    assert delivery["payload"]["parameters"] == {"topic": "x"}
    await svc.answer(delivery, {"subscribed": "x"})
    reply = await api.reply_to(cmd_id)
    assert (reply["from"], reply["payload"]["status"]) == ("svc", "success"), reply
    assert reply["payload"]["result"] == {"subscribed": "x"}
