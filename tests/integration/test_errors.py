"""Every error code on a live connection, the HTTP surface, tenant isolation, and name safety."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import orjson
import pytest
import websockets
from nats.aio.msg import Msg
from websockets.exceptions import ConnectionClosed, InvalidStatus

from arqonbus_server.gateway.admin.dev import http_status
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.mesh.local import LocalCluster, free_port
from arqonbus_server.shared.errors import CATALOGUE
from tests.conftest import gateway_url
from tests.support import Message, WsClient, new_id
from tests.timeouts import SEC

pytestmark = pytest.mark.integration


def assert_error(message: Message, code: str, request_id: str | None) -> None:
    """An error frame with the four fields every error payload carries."""
    assert message["type"] == "error", message
    payload = message["payload"]
    assert payload["code"] == code, message
    assert payload["request_id"] == request_id, message
    assert isinstance(payload["message"], str) and len(payload["message"]) > 10, message
    assert payload["retryable"] is CATALOGUE[code].retryable, message


def assert_command_error(reply: Message, code: str) -> None:
    assert reply["type"] == "command_response", reply
    assert reply["payload"]["status"] == "error", reply
    assert reply["payload"]["error"]["code"] == code, reply
    assert reply["payload"]["error"]["message"], reply


async def send_and_wait_error(client: WsClient, frame: Message | str | bytes) -> Message:
    """Send a raw frame and return the next error frame."""
    start = len(client.received)
    await client.send(frame)
    return await client.wait_for(lambda m: m["type"] == "error", start=start)


async def assert_still_usable(client: WsClient) -> None:
    ack = await client.publish("r", "c", {"after": "error"})
    assert ack["type"] == "ack", ack


def event(msg_id: str, **fields: Any) -> Message:
    return {"id": msg_id, "type": "event", "room": "r", "channel": "c", "payload": {}, **fields}


# -- invalid_json / invalid_envelope ---------------------------------------------------------


async def test_invalid_json_text_and_binary_frames(start_gateway, clients, tenant):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    frames: list[str | bytes] = ["not json {", "", '{"id": "x", ', b"\xff\xfe\x80 garbage"]
    for frame in frames:
        assert_error(await send_and_wait_error(client, frame), "invalid_json", None)
        await assert_still_usable(client)


async def test_a_bug_handling_one_frame_answers_internal_and_keeps_the_connection(
    start_gateway, clients, tenant, monkeypatch
):
    from arqonbus_server.gateway.ws import session as gateway_session

    real = gateway_session.parse_client_frame

    def broken_on_marker(data: bytes, limit: int) -> object:
        if b"trip-the-bug" in data:
            raise KeyError("a stand-in for a decoder bug")
        return real(data, limit)

    monkeypatch.setattr(gateway_session, "parse_client_frame", broken_on_marker)
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    reply = await send_and_wait_error(client, orjson.dumps(event("trip-the-bug")).decode())
    assert_error(reply, "internal", None)
    await assert_still_usable(client)


P = pytest.param
ENVELOPE_CASES = [
    P({"type": "event", "room": "r", "channel": "c", "payload": {}}, False, id="missing-id"),
    P(event(""), False, id="empty-id"),
    P(event("x" * 129), False, id="id-too-long"),
    P({**event("placeholder"), "id": 42}, False, id="id-not-a-string"),
    P([event("in-a-list")], False, id="array"),
    P('"just a string"', False, id="string"),
    P("42", False, id="number"),
    P("null", False, id="null"),
    P(event("bad-type", type="ack"), True, id="server-type"),
    P(event("no-type", type=None), True, id="missing-type"),
    P(event("payload-list", payload=[1, 2]), True, id="payload-array"),
    P(event("payload-string", payload="hello"), True, id="payload-string"),
    P(event("payload-missing", payload=None), True, id="payload-null"),
    P(event("bad-version", version="2.0"), True, id="bad-version"),
    P(event("no-name", type="command", payload={"parameters": {}}), True, id="no-command"),
    P(
        event("bad-params", type="command", payload={"command": "history", "parameters": 3}),
        True,
        id="parameters-not-object",
    ),
]


@pytest.mark.parametrize(("frame", "has_id"), ENVELOPE_CASES)
async def test_invalid_envelope(start_gateway, clients, tenant, frame, has_id):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    raw = frame if isinstance(frame, str) else orjson.dumps(frame).decode()

    error = await send_and_wait_error(client, raw)

    assert_error(error, "invalid_envelope", frame["id"] if has_id else None)
    await assert_still_usable(client)


# -- invalid_name ----------------------------------------------------------------------------

BAD_NAMES = ["a.b", "*", "a*", ">", "a.>", " a", "a b", "a\tb", "a\nb", "", "x" * 65, "é"]


async def test_invalid_name_for_events_and_commands(start_gateway, clients, tenant):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    for bad in BAD_NAMES:
        for room, channel in ((bad, "c"), ("r", bad)):
            event_id = new_id()
            reply = await client.publish(room, channel, {"bad": bad}, id=event_id)
            assert_error(reply, "invalid_name", event_id)
            join_id = new_id("c")
            await client.send(
                {
                    "id": join_id,
                    "type": "command",
                    "room": room,
                    "channel": channel,
                    "payload": {"command": "join_channel"},
                }
            )
            assert_error(await client.reply_to(join_id), "invalid_name", join_id)
    await assert_still_usable(client)
    assert (await client.publish("x" * 64, "-_-", {"longest": "name"}))["type"] == "ack"


# -- commands --------------------------------------------------------------------------------


async def test_unknown_command(start_gateway, clients, tenant):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    # Names that are neither built-in nor possible service names (subject tokens).
    for name in ("explode.now", "join_channel ", "*", "x" * 65):
        reply = await client.command("r", "c", name)
        assert_command_error(reply, "unknown_command")
        await assert_still_usable(client)


async def test_invalid_parameters(start_gateway, clients, tenant):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    cases = [
        ("history", {"limit": 1001}),
        ("history", {"limit": 0}),
        ("history", {"since_seq": -5}),
        ("join_channel", {"since_seq": -1}),
        ("join_channel", {"since_seq": "3"}),
    ]
    for name, parameters in cases:
        reply = await client.command("r", "c", name, parameters)
        assert_command_error(reply, "invalid_parameters")
        await assert_still_usable(client)


async def test_command_errors_carry_retryable(start_gateway, clients, tenant):
    """Command errors tell the client whether a retry can succeed, like every other error."""
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    replies = {
        "unknown_command": await client.command("r", "c", "explode.now"),
        "no_responders": await client.command("r", "c", "explode"),
        "invalid_parameters": await client.command("r", "c", "history", {"limit": 1001}),
        "not_joined": await client.command("r", "c", "leave_channel"),
    }
    for code, reply in replies.items():
        assert_command_error(reply, code)
        assert reply["payload"]["request_id"] is not None
        error = reply["payload"]["error"]
        assert error.get("retryable") is CATALOGUE[code].retryable, reply


# -- message_too_large -----------------------------------------------------------------------


def sized_event(msg_id: str, size: int) -> str:
    """An event frame of exactly ``size`` bytes."""
    frame = orjson.dumps(event(msg_id, payload={"blob": ""})).decode()
    return frame.replace('"blob":""', '"blob":"' + "x" * (size - len(frame)) + '"')


async def test_message_too_large_up_to_twice_the_limit_is_answered(start_gateway, clients, tenant):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    assert client.welcome is not None
    limit = client.welcome["payload"]["limits"]["max_envelope_bytes"]

    start = len(client.received)
    await client.send(sized_event("at-limit", limit))
    assert (await client.reply_to("at-limit", start=start))["type"] == "ack"
    for size in (limit + 1, 2 * limit):
        error = await send_and_wait_error(client, sized_event(f"big-{size}", size))
        # docs/protocol.md: the id of an oversized frame is not read, so request_id is null.
        assert_error(error, "message_too_large", None)
        assert f"envelope is {size} bytes, limit is {limit}" in error["payload"]["message"]
        await assert_still_usable(client)


async def test_frame_above_twice_the_limit_closes_with_1009(start_gateway, clients, tenant):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    assert client.welcome is not None
    limit = client.welcome["payload"]["limits"]["max_envelope_bytes"]

    with contextlib.suppress(ConnectionClosed):
        await client.send(sized_event("huge", 2 * limit + 1))
    await asyncio.wait_for(client.closed.wait(), 10 * SEC)

    assert client.close_code == 1009
    assert not [m for m in client.received if m["type"] == "ack"]
    other = await WsClient.connect(gateway_url(gw), tenant, "bob")
    try:
        assert (await other.publish("r", "c", {"gateway": "alive"}))["type"] == "ack"
    finally:
        await other.close()


# -- unavailable -----------------------------------------------------------------------------


async def test_unavailable_when_the_store_is_unreachable(clients, tenant):
    settings = load_settings(
        nats=f"nats://127.0.0.1:{free_port()}", listen="127.0.0.1:0", auth="dev"
    )
    gw = Gateway(settings)
    await gw.start()
    try:
        host, port = gw.address
        assert await http_status(host, port, "/healthz") == 200
        assert await http_status(host, port, "/readyz") == 503
        # It never loaded bans, revocations and private rooms: it refuses to let anyone in
        # (503, retry elsewhere) rather than check against nothing.
        for _ in range(2):
            with pytest.raises(InvalidStatus) as refused:
                await clients(gateway_url(gw), tenant, "alice")
            assert refused.value.response.status_code == 503
            body = orjson.loads(refused.value.response.body)
            assert body["error"] == "unavailable" and "another gateway" in body["message"]
        assert await http_status(host, port, "/readyz") == 503
    finally:
        await gw.close()


# -- HTTP ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["", "?token=", "?token=dev:x", "?token=bogus", "?token=dev:a.b:c", "?token=dev::c",
     "?token=dev:t:p:extra", "?token=prod:t:p", "?other=dev:t:p"],
)  # fmt: skip
async def test_handshake_without_valid_token_is_401(start_gateway, query):
    # Without first-message auth, no credential at all is refused too (see test_auth_message).
    gw = await start_gateway(auth_message_timeout_s=0)

    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(gateway_url(gw) + query)

    assert info.value.response.status_code == 401


async def test_bearer_header_authenticates(start_gateway, tenant):
    gw = await start_gateway()
    header = {"Authorization": f"Bearer dev:{tenant}:bearer-bob"}
    client = WsClient(await websockets.connect(gateway_url(gw), additional_headers=header))
    try:
        welcome = await client.wait_for(lambda m: m["type"] == "welcome")
        await client.join("r", "c")
        await client.publish("r", "c", {"via": "header"}, id="bearer-1")
        [delivered] = await client.wait_events(1)
    finally:
        await client.close()
    assert welcome["payload"]["protocol"] == "1.0"
    assert delivered["from"] == "bearer-bob"

    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(
            gateway_url(gw), additional_headers={"Authorization": "Bearer dev:x"}
        )
    assert info.value.response.status_code == 401


async def test_health_endpoints_and_unknown_path(start_gateway):
    gw = await start_gateway()
    host, port = gw.address
    assert await http_status(host, port, "/healthz") == 200
    assert await http_status(host, port, "/readyz") == 200
    assert await http_status(host, port, "/nope") == 404
    assert await http_status(host, port, "/") == 404


# -- tenant isolation ------------------------------------------------------------------------


async def test_same_names_in_two_tenants_never_cross(start_gateway, clients, tenant):
    g1, g2 = await start_gateway(), await start_gateway()
    other = tenant + "b"
    # Same principal name and same room/channel in both tenants, on the same and other gateway.
    a_same = await clients(gateway_url(g1), tenant, "alice")
    b_same = await clients(gateway_url(g1), other, "alice")
    b_far = await clients(gateway_url(g2), other, "alice")
    for client in (a_same, b_same, b_far):
        await client.join("r", "c", since_seq=0)

    await a_same.publish("r", "c", {"secret": "of a"}, id="a-1")
    await b_far.publish("r", "c", {"secret": "of b"}, id="b-1")
    await a_same.publish("r", "c", {"marker": "a"}, id="a-marker")
    await b_same.publish("r", "c", {"marker": "b"}, id="b-marker")
    await a_same.wait_for(lambda m: m.get("id") == "a-marker")
    for client in (b_same, b_far):
        await client.wait_for(lambda m: m.get("id") == "b-marker")

    assert [e["id"] for e in a_same.events()] == ["a-1", "a-marker"]
    for client in (b_same, b_far):
        assert [e["id"] for e in client.events()] == ["b-1", "b-marker"]
    a_history = await a_same.command("r", "c", "history", {"since_seq": 0})
    b_history = await b_far.command("r", "c", "history", {"since_seq": 0})
    assert [e["id"] for e in a_history["payload"]["result"]["events"]] == ["a-1", "a-marker"]
    assert [e["id"] for e in b_history["payload"]["result"]["events"]] == ["b-1", "b-marker"]


async def test_dedupe_id_is_not_shared_across_tenants(start_gateway, clients, tenant):
    gw = await start_gateway()
    other = tenant + "b"
    a = await clients(gateway_url(gw), tenant, "alice")
    b = await clients(gateway_url(gw), other, "alice")
    await b.join("r", "c")

    first = await a.publish("r", "c", {"tenant": "a"}, id="shared-id")
    second = await b.publish("r", "c", {"tenant": "b"}, id="shared-id")
    [delivered] = await b.wait_events(1)

    assert first["type"] == second["type"] == "ack"
    assert "duplicate" not in second["payload"]
    assert delivered["payload"] == {"tenant": "b"}
    b_history = await b.command("r", "c", "history", {"since_seq": 0})
    assert [e["payload"] for e in b_history["payload"]["result"]["events"]] == [{"tenant": "b"}]


# -- names never reach NATS ------------------------------------------------------------------


@asynccontextmanager
async def nats_tap(cluster: LocalCluster) -> AsyncIterator[tuple[list[Msg], asyncio.Condition]]:
    """Every message on the cluster, as a plain subscriber to '>' sees it."""
    seen: list[Msg] = []
    changed = asyncio.Condition()

    async def record(msg: Msg) -> None:
        async with changed:
            seen.append(msg)
            changed.notify_all()

    nc = await nats.connect(cluster.urls[0])
    try:
        await nc.subscribe(">", cb=record)
        await nc.flush()
        yield seen, changed
    finally:
        await nc.close()


async def test_bad_names_never_reach_nats(start_gateway, clients, tenant, nats_cluster):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    await assert_still_usable(client)  # the tenant's stream exists before the tap starts
    token, marker = uuid.uuid4().hex, uuid.uuid4().hex

    async with nats_tap(nats_cluster) as (seen, changed):
        for room, channel in bad_pairs(token):
            event_id = new_id()
            reply = await client.publish(room, channel, {"poison": token}, id=event_id)
            assert_error(reply, "invalid_name", event_id)
            for command in ("join_channel", "history"):
                bad_command = {
                    "id": new_id("c"),
                    "type": "command",
                    "room": room,
                    "channel": channel,
                    "payload": {"command": command},
                }
                error = await send_and_wait_error(client, bad_command)
                assert_error(error, "invalid_name", bad_command["id"])
        ack = await client.publish("r", "c", {"marker": marker})
        assert ack["type"] == "ack", ack
        async with asyncio.timeout(10 * SEC), changed:
            await changed.wait_for(lambda: any(marker.encode() in m.data for m in seen))

    assert [m.subject for m in seen if token in m.subject or token.encode() in m.data] == []


async def test_first_publish_of_a_tenant_is_acked_while_a_wildcard_listener_runs(
    start_gateway, clients, tenant, nats_cluster
):
    """A monitoring tap on '>' (nats sub '>') must not stop a new tenant's stream from being made."""
    gw = await start_gateway(publish_timeout_s=1.0)
    client = await clients(gateway_url(gw), tenant, "alice")

    async with nats_tap(nats_cluster):
        reply = await client.publish("r", "c", {"first": "event"})

    assert reply["type"] == "ack", reply


def bad_pairs(token: str) -> list[tuple[str, str]]:
    """Invalid (room, channel) pairs that all carry ``token``, so a leak is recognisable."""
    return [
        (f"a.{token}", "c"),
        (f"{token}*", "c"),
        (f"{token}.>", "c"),
        (f"{token} x", "c"),
        (f"{token}\t", "c"),
        (f"{token}\n", "c"),
        (token * 3, "c"),  # 96 characters
        (token, ""),
        (token, "*"),
        (token, ">"),
        (token, "a.b"),
    ]
