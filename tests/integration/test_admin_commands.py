"""The built-in admin commands on two gateways of the real cluster: allowed and refused by
role, audited, per-room retention, delete_room, kick on every gateway, and bad input."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import GatewayFactory, gateway_url
from tests.support import Message, WsClient
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration

Connect = Callable[..., Awaitable[WsClient]]


async def run(client: WsClient, room: str, name: str, parameters: Message | None = None) -> Message:
    reply = await client.command(room, "general", name, parameters or {})
    payload: Message = reply["payload"]
    return payload


async def ok(client: WsClient, room: str, name: str, parameters: Message | None = None) -> Any:
    payload = await run(client, room, name, parameters)
    assert payload["status"] == "success", payload
    return payload["result"]


async def error(client: WsClient, room: str, name: str, parameters: Message | None = None) -> str:
    payload = await run(client, room, name, parameters)
    assert payload["status"] == "error", payload
    code: str = payload["error"]["code"]
    return code


async def as_role(url: str, tenant: str, principal: str, role: str) -> WsClient:
    return await WsClient.open(url, f"dev:{tenant}:{principal}:{role}")


# (command, parameters, the least role allowed) on room "r1" (ping and status: on the
# gateway's own room); refused one rank below.
ROLE_TABLE: list[tuple[str, Message, str]] = [
    ("ping", {}, "viewer"),
    ("status", {}, "admin"),
    ("list_rooms", {}, "admin"),
    ("list_channels", {}, "admin"),
    ("channel_info", {}, "admin"),
    ("create_room", {"presence": True}, "admin"),
    ("configure_room", {"invite_only": False}, "admin"),
    ("kick", {"principal": "nobody"}, "admin"),
    ("room_info", {}, "admin"),
    ("delete_room", {"confirm": "r1"}, "admin"),
    ("presence", {}, "read-only"),
    ("occupancy", {}, "read-only"),
]
BELOW = {"admin": "member", "read-only": "viewer"}


async def test_each_admin_command_is_allowed_and_refused_by_role(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    url = gateway_url(await start_gateway())
    seed = await as_role(url, tenant, "seeder", "member")
    opened = [seed]
    try:
        assert (await seed.publish("r1", "general", {"n": 1}))["type"] == "ack"
        for name, parameters, least in ROLE_TABLE:
            allowed = await as_role(url, tenant, f"ok-{name}", least)
            opened.append(allowed)
            room = "_system" if name in ("ping", "status") else "r1"
            result = await ok(allowed, room, name, parameters)
            assert isinstance(result, dict), (name, result)
            lower = BELOW.get(least)
            if lower is None:
                continue
            below = await as_role(url, tenant, f"no-{name}", lower)
            opened.append(below)
            assert await error(below, room, name, parameters) == "forbidden", name
    finally:
        for client in opened:
            await client.close()


async def test_status_ping_listing_and_channel_info_answer_from_the_store(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    url_a, url_b = gateway_url(await start_gateway()), gateway_url(await start_gateway())
    owner = await clients(url_a, tenant, "owner")
    for room, channel, count in (("alpha", "c1", 2), ("alpha", "c2", 1), ("beta", "c1", 3)):
        for index in range(count):
            assert (await owner.publish(room, channel, {"i": index}))["type"] == "ack"
    await ok(owner, "gamma", "create_room", {"retention_s": 7200, "presence": True})

    pong = await ok(owner, "_system", "ping")
    assert (pong["pong"], pong["gateway"]) == (True, "gw0")
    status = await ok(owner, "_system", "status")
    assert status["gateway"] == "gw0" and status["connections"]["tenant"] == 1
    assert status["gateways"] >= 2 and status["uptime_s"] >= 0

    other = await clients(url_b, tenant, "owner2")

    async def listed_with_gamma() -> Message | None:
        # Configured rooms come from gateway B's copy of the room records, which the
        # records' watch brings up to date: gamma, created on A, shows there within moments.
        listing: Message = await ok(other, "any", "list_rooms")
        names = [row["room"] for row in listing["rooms"]]
        return listing if "gamma" in names else None

    rooms = await eventually(listed_with_gamma, 10 * SEC, "gamma listed on the other gateway")
    by_name = {row["room"]: row for row in rooms["rooms"]}
    assert sorted(by_name) == ["alpha", "beta", "gamma"]
    assert (by_name["alpha"]["channels"], by_name["alpha"]["messages"]) == (2, 3)
    assert (by_name["gamma"]["configured"], by_name["gamma"]["messages"]) == (True, 0)
    assert by_name["beta"]["last_seq"] == max(row["last_seq"] for row in rooms["rooms"])
    first = await ok(other, "any", "list_rooms", {"limit": 2})
    assert [r["room"] for r in first["rooms"]] == ["alpha", "beta"]
    rest = await ok(other, "any", "list_rooms", {"limit": 2, "cursor": first["next_cursor"]})
    assert ([r["room"] for r in rest["rooms"]], rest["next_cursor"]) == (["gamma"], None)

    channels = await ok(other, "alpha", "list_channels")
    assert [(c["channel"], c["messages"]) for c in channels["channels"]] == [("c1", 2), ("c2", 1)]
    reply = await other.command("beta", "c1", "channel_info", {})
    info = reply["payload"]["result"]
    assert (info["messages"], info["bytes_exact"]) == (3, True)
    assert info["first_seq"] < info["last_seq"] and info["bytes"] > 0
    gamma = (await other.command("gamma", "c9", "channel_info", {}))["payload"]["result"]
    assert (gamma["retention_s"], gamma["presence"], gamma["messages"]) == (7200, True, 0)
    assert gamma["occupancy"]["members"] == 0

    assert await error(other, "gamma", "create_room") == "room_exists"
    configured = await ok(other, "gamma", "configure_room", {"max_message_bytes": 300})
    assert (configured["max_message_bytes"], configured["retention_s"]) == (300, 7200)

    async def refused_as_too_big() -> Message | None:
        # The setting reaches the other gateway through the room record's watch.
        reply = await owner.publish("gamma", "c1", {"text": "x" * 400})
        return reply if reply["type"] == "error" else None

    too_big = await eventually(refused_as_too_big, 10 * SEC, "the room's size limit applied")
    assert (too_big["payload"]["code"], too_big["payload"]["max_bytes"]) == (
        "message_too_large",
        300,
    )


async def test_a_room_with_its_own_retention_loses_its_events_and_others_keep_theirs(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    url = gateway_url(await start_gateway(room_min_retention_s=1))
    owner = await clients(url, tenant, "owner")
    await ok(owner, "short", "create_room", {"retention_s": 2})
    for room in ("short", "long"):
        for index in range(3):
            assert (await owner.publish(room, "general", {"i": index}))["type"] == "ack"

    async def short_is_empty() -> bool:
        page = await ok(owner, "short", "history", {"since_seq": 0})
        return not page["events"]

    await eventually(short_is_empty, 30 * SEC, "the short-retention room's events expired")
    kept = await ok(owner, "long", "history", {"since_seq": 0})
    assert [e["payload"]["i"] for e in kept["events"]] == [0, 1, 2]
    # the room's retention is bounded: 0 and negative values, and beyond the tenant's
    for bad in (0, -5, "1h", 10**12):
        code = await error(owner, "short", "configure_room", {"retention_s": bad})
        assert code == "invalid_parameters", bad
    assert (await ok(owner, "_system", "ping"))["pong"]


async def test_delete_room_removes_events_presence_and_members_on_every_gateway(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    url_a, url_b = gateway_url(await start_gateway()), gateway_url(await start_gateway())
    owner = await clients(url_a, tenant, "owner")
    member = await clients(url_b, tenant, "member1")
    assert (await member.command("doomed", "general", "join_channel", {"presence": True}))[
        "payload"
    ]["status"] == "success"
    for index in range(4):
        assert (await owner.publish("doomed", "general", {"i": index}))["type"] == "ack"
    assert (await owner.publish("kept", "general", {"i": 0}))["type"] == "ack"

    assert await error(owner, "doomed", "delete_room") == "invalid_parameters"
    assert await error(owner, "doomed", "delete_room", {"confirm": "kept"}) == "invalid_parameters"
    assert await error(owner, "never", "delete_room", {"confirm": "never"}) == "room_not_found"
    result = await ok(owner, "doomed", "delete_room", {"confirm": "doomed"})
    # The member's entry goes with the kick of everyone (its gateway applies it) or with
    # the removal of the room's presence, whichever comes first: 1 or 0 removed here.
    assert result["events_removed"] == 4 and result["presence_removed"] in (0, 1)

    pushed = await member.wait_for(
        lambda m: m["type"] == "error" and m["payload"]["code"] == "room_deleted", 10 * SEC
    )
    assert pushed["payload"]["room"] == "doomed"
    assert (await ok(owner, "doomed", "history", {"since_seq": 0}))["events"] == []
    assert len((await ok(owner, "kept", "history", {"since_seq": 0}))["events"]) == 1
    assert (await ok(owner, "doomed", "occupancy"))["members"] == 0
    rooms = [r["room"] for r in (await ok(owner, "any", "list_rooms"))["rooms"]]
    assert "doomed" not in rooms and "kept" in rooms
    # later events of the room get seqs above every earlier one: resuming clients never repeat
    assert (await owner.publish("doomed", "general", {"i": 99}))["type"] == "ack"


async def test_kick_removes_a_principals_sessions_in_the_room_on_every_gateway(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    url_a, url_b = gateway_url(await start_gateway()), gateway_url(await start_gateway())
    admin = await clients(url_a, tenant, "boss")
    bob_a = await clients(url_a, tenant, "bob")
    bob_b = await clients(url_b, tenant, "bob")
    carol = await clients(url_b, tenant, "carol")
    for client in (bob_a, bob_b, carol):
        await client.join("room1", "general")
    await bob_b.join("room2", "general")

    assert await error(admin, "room1", "kick", {"principal": "bob", "reason": "x" * 300}) == (
        "invalid_parameters"
    )
    kicked = await ok(admin, "room1", "kick", {"principal": "bob", "reason": "spam"})
    assert kicked == {"room": "room1", "principal": "bob", "kicked": True}
    for bob in (bob_a, bob_b):
        frame = await bob.wait_for(
            lambda m: m["type"] == "error" and m["payload"]["code"] == "kicked", 10 * SEC
        )
        assert (frame["payload"]["room"], frame["payload"]["reason"]) == ("room1", "spam")

    assert (await admin.publish("room1", "general", {"after": True}))["type"] == "ack"
    await carol.wait_events(1, "room1", "general")
    assert (await admin.publish("room2", "general", {"other": True}))["type"] == "ack"
    await bob_b.wait_events(1, "room2", "general")  # other rooms untouched
    assert bob_a.events("room1") == [] and bob_b.events("room1") == []
    assert carol.close_code is None
    await bob_a.join("room1", "general")  # a kick is not a ban: joining again works

    audit = await ok(admin, "room1", "room_info")
    assert audit["configured"] is False  # a kick alone does not configure the room


async def test_a_room_with_max_bytes_keeps_its_newest_events_and_others_keep_all(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    gateway = await start_gateway()
    owner = await clients(gateway_url(gateway), tenant, "owner")
    assert await error(owner, "capped", "create_room", {"max_bytes": 100}) == "invalid_parameters"
    created = await ok(owner, "capped", "create_room", {"max_bytes": 2000})
    assert created["max_bytes"] == 2000
    for room in ("capped", "open"):
        for index in range(30):
            reply = await owner.publish(room, "general", {"i": index, "text": "x" * 150})
            assert reply["type"] == "ack"

    async def trimmed() -> Message | None:
        info = (await owner.command("capped", "general", "channel_info", {}))["payload"]
        return info["result"] if info["result"]["bytes"] <= 2000 else None

    info = await eventually(trimmed, 20 * SEC, "the capped room trimmed to its max_bytes")
    assert info["max_bytes"] == 2000 and 0 < info["messages"] < 30
    kept = await ok(owner, "capped", "history", {"since_seq": 0})
    numbers = [event["payload"]["i"] for event in kept["events"]]
    assert numbers == list(range(30 - len(numbers), 30))  # the newest, in order, none skipped
    assert len((await ok(owner, "open", "history", {"since_seq": 0}))["events"]) == 30
