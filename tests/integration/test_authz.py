"""Permissions against a real gateway: a read-only principal is refused with ``forbidden`` on
publish, register_handler / unregister_handler and service commands, but may join and read
history; a member may publish, handle and call. Roles come from the dev token's optional
fourth part, ``dev:<tenant>:<principal>:<role>`` (the WsClient builds
``dev:<tenant>:<principal>``, so the principal argument carries ``name:role``)."""

from __future__ import annotations

import asyncio

import pytest

from arqonbus import Client, Forbidden
from arqonbus_server.shared.errors import CATALOGUE
from tests.conftest import gateway_url
from tests.support import Message, WsClient, new_id
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

ROOM, CHANNEL = "science", "general"


def forbidden(reply: Message, request_id: str, kind: str, permission: str) -> str:
    """Assert ``reply`` is a ``forbidden`` of the documented shape; return its message."""
    assert reply["type"] == kind, reply
    payload = reply["payload"]
    assert payload["request_id"] == request_id, reply
    error = payload if kind == "error" else payload["error"]
    if kind == "command_response":
        assert payload["status"] == "error", reply
    assert error["code"] == "forbidden", reply
    assert error["retryable"] is False is CATALOGUE["forbidden"].retryable
    message: str = error["message"]
    assert f"permission {permission!r} on room {ROOM!r}, channel {CHANNEL!r}" in message
    assert "read-only" in message
    return message


async def history_events(client: WsClient) -> list[Message]:
    reply = await client.command(ROOM, CHANNEL, "history", {"since_seq": 0})
    assert reply["payload"]["status"] == "success", reply
    events: list[Message] = reply["payload"]["result"]["events"]
    return events


async def test_read_only_is_forbidden_to_write_handle_and_call_but_can_join_and_read(
    start_gateway, clients, tenant
):
    gw = await start_gateway()
    url = gateway_url(gw)
    owner = await clients(url, tenant, "alice")  # no role: an owner, as before
    handler = await clients(url, tenant, "db:member")
    reader = await clients(url, tenant, "bob:read-only")
    for i in range(2):
        ack = await owner.publish(ROOM, CHANNEL, {"n": i})
        assert ack["type"] == "ack", ack
    reply = await handler.command(ROOM, CHANNEL, "register_handler", {"command": "status"})
    assert reply["payload"]["status"] == "success", reply

    # Allowed: join (with replay), history, leave.
    joined = await reader.join(ROOM, CHANNEL, since_seq=0)
    assert joined["last_seq"] == 2
    replayed = await reader.wait_events(2)
    assert [e["payload"] for e in replayed] == [{"n": 0}, {"n": 1}]
    assert [e["payload"] for e in await history_events(reader)] == [{"n": 0}, {"n": 1}]

    # Forbidden: publish (an error frame), never stored.
    event_id = new_id("ro")
    message = forbidden(
        await reader.publish(ROOM, CHANNEL, {"n": 99}, id=event_id), event_id, "error", "publish"
    )
    assert "science:general:publish" in message  # says what grant would allow it

    # Forbidden: handler registration, built-in commands answered with command_response.
    for name in ("register_handler", "unregister_handler"):
        cmd_id = await reader.send_command(ROOM, CHANNEL, name, {"command": "status"})
        forbidden(await reader.reply_to(cmd_id), cmd_id, "command_response", "handle")

    # Forbidden: a service call, although a handler is registered; the handler gets nothing.
    cmd_id = await reader.send_command(ROOM, CHANNEL, "status", {"q": 1}, timeout_ms=2000)
    forbidden(await reader.reply_to(cmd_id), cmd_id, "command_response", "command")

    # The owner's publish after all that is seq 3: the refused event took no seq and was
    # never delivered to members.
    ack = await owner.publish(ROOM, CHANNEL, {"n": 2})
    assert ack["payload"]["seq"] == 3, ack
    delivered = await reader.wait_events(3)
    assert [e["payload"] for e in delivered] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [e["payload"] for e in await history_events(owner)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert handler.deliveries() == []

    reply = await reader.command(ROOM, CHANNEL, "leave_channel")
    assert reply["payload"]["status"] == "success", reply


async def test_member_can_publish_handle_and_call(start_gateway, clients, tenant):
    gw = await start_gateway()
    url = gateway_url(gw)
    service = await clients(url, tenant, "svc:member")
    caller = await clients(url, tenant, "carol:member")

    ack = await caller.publish(ROOM, CHANNEL, {"hello": 1})
    assert ack["type"] == "ack" and ack["payload"]["seq"] == 1, ack
    reply = await service.command(ROOM, CHANNEL, "register_handler", {"command": "status"})
    assert reply["payload"]["status"] == "success", reply

    cmd_id = await caller.send_command(ROOM, CHANNEL, "status", {}, timeout_ms=5000)
    delivery = await service.next_delivery()
    assert delivery["from"] == "carol"
    await service.answer(delivery, {"ok": True})
    answer = await caller.reply_to(cmd_id)
    assert answer["payload"]["status"] == "success", answer
    assert answer["payload"]["result"] == {"ok": True}


async def test_sdk_raises_forbidden_at_once_and_read_only_can_still_read(start_gateway, tenant):
    gw = await start_gateway()
    url = gateway_url(gw)
    async with Client(url, f"dev:{tenant}:writer") as writer:
        await writer.publish(ROOM, CHANNEL, {"n": 0})
    async with Client(url, f"dev:{tenant}:bob:read-only", request_timeout=10) as reader:
        with pytest.raises(Forbidden) as info:
            # Not retryable: raised at once, well before the request timeout.
            await asyncio.wait_for(reader.publish(ROOM, CHANNEL, {"n": 1}), 5 * SEC)
        assert info.value.code == "forbidden" and info.value.retryable is False
        assert "'publish'" in info.value.message
        with pytest.raises(Forbidden):
            await reader.command(ROOM, CHANNEL, "status", {}, timeout=2 * SEC)
        events = await reader.history(ROOM, CHANNEL).list()
        assert [e.payload for e in events] == [{"n": 0}]
