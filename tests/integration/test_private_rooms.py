"""Private rooms, invites, bans and mutes across two gateways (real NATS, real clients)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.state.rooms import RoomDirectory, RoomSettings
from tests.conftest import GatewayFactory, gateway_url
from tests.support import Message, WsClient

ROOM = "lobby"
KEY = "open-sesame-42"


class Opened:
    def __init__(self) -> None:
        self.clients: list[WsClient] = []

    async def __call__(self, gw: Gateway, tenant: str, principal: str, role: str = "") -> WsClient:
        token = f"dev:{tenant}:{principal}" + (f":{role}" if role else "")
        client = await WsClient.open(gateway_url(gw), token)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


async def two_gateways(start_gateway: GatewayFactory) -> tuple[Gateway, Gateway]:
    gw_a, gw_b = await start_gateway(), await start_gateway()
    for gw in (gw_a, gw_b):
        assert await gw.security.wait_ready(gw.security.rooms, 10)
    return gw_a, gw_b


async def room_state(
    gw: Gateway, tenant: str, check: Callable[[RoomSettings | None], bool], timeout: float = 5.0
) -> None:
    """Wait until ``gw``'s copy of the room's settings satisfies ``check``."""
    directory = RoomDirectory.of(gw.security)
    seen = asyncio.Event()

    def on_update(t: str, room: str, settings: RoomSettings | None) -> None:
        if (t, room) == (tenant, ROOM) and check(settings):
            seen.set()

    directory.on_update(on_update)
    if check(directory.get(tenant, ROOM)):
        return
    await asyncio.wait_for(seen.wait(), timeout)


async def ok(
    client: WsClient, name: str, params: Message | None = None, channel: str = "ctl"
) -> Any:
    reply = await client.command(ROOM, channel, name, params or {})
    assert reply["payload"]["status"] == "success", reply["payload"]
    return reply["payload"]["result"]


async def refused(
    client: WsClient, name: str, params: Message | None = None, channel: str = "chat"
) -> str:
    reply = await client.command(ROOM, channel, name, params or {})
    assert reply["payload"]["status"] == "error", reply
    code: str = reply["payload"]["error"]["code"]
    return code


async def test_private_room_needs_its_key_on_every_gateway(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gw_a, gw_b = await two_gateways(start_gateway)
    opened = Opened()
    try:
        admin = await opened(gw_a, tenant, "root", "admin")
        info = await ok(admin, "room_configure", {"private": True, "key": KEY})
        assert info["private"] and info["has_key"] and "key_hash" not in info
        await room_state(gw_b, tenant, lambda s: s is not None and s.private)

        alice = await opened(gw_b, tenant, "alice", "member")
        assert await refused(alice, "join_channel") == "room_key_required"
        assert (
            await refused(alice, "join_channel", {"room_key": "wrong-key"}) == "room_key_required"
        )
        # Not a member yet: publishing, history, calls and handlers are refused too.
        refusal = await alice.publish(ROOM, "chat", {"text": "hi"})
        assert refusal["type"] == "error" and refusal["payload"]["code"] == "forbidden"
        assert await refused(alice, "history") == "room_key_required"
        assert await refused(alice, "svc_echo", {}) == "room_key_required"
        assert await refused(alice, "register_handler", {"command": "echo"}) == "room_key_required"

        await ok(alice, "join_channel", {"room_key": KEY}, channel="chat")
        ack = await alice.publish(ROOM, "chat", {"text": "in"})
        assert ack["type"] == "ack", ack
        await ok(alice, "history", channel="chat")
        # Another room of the same tenant is not affected.
        other = await alice.command("elsewhere", "chat", "join_channel", {})
        assert other["payload"]["status"] == "success"
        # The admin joins without a key; room_info never shows the hash.
        await ok(admin, "join_channel", channel="chat")
        shown = await ok(admin, "room_info")
        assert shown["has_key"] and "key_hash" not in shown and KEY not in str(shown)
    finally:
        await opened.close()


async def test_invite_only_room_admits_invited_principals_and_admins(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gw_a, gw_b = await two_gateways(start_gateway)
    opened = Opened()
    try:
        admin = await opened(gw_a, tenant, "root", "admin")
        await ok(admin, "room_configure", {"invite_only": True, "private": True, "key": KEY})
        await room_state(gw_b, tenant, lambda s: s is not None and s.invite_only)
        bob = await opened(gw_b, tenant, "bob", "member")
        assert await refused(bob, "join_channel", {"room_key": KEY}) == "forbidden"

        result = await ok(admin, "room_invite", {"principal": "bob"})
        assert result == {"room": ROOM, "principal": "bob", "invited": True}
        await room_state(gw_b, tenant, lambda s: s is not None and "bob" in s.invited)
        await ok(bob, "join_channel", channel="chat")  # invited: no key needed
        assert (await bob.publish(ROOM, "chat", {"n": 1}))["type"] == "ack"

        await ok(admin, "room_uninvite", {"principal": "bob"})
        await room_state(gw_b, tenant, lambda s: s is not None and "bob" not in s.invited)
        bob2 = await opened(gw_b, tenant, "bob", "member")
        assert await refused(bob2, "join_channel") == "forbidden"
        root_b = await opened(gw_b, tenant, "root2", "admin")
        await ok(root_b, "join_channel", channel="chat")
    finally:
        await opened.close()


async def test_a_ban_removes_the_member_on_another_gateway_and_refuses_it_after(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gw_a, gw_b = await two_gateways(start_gateway)
    opened = Opened()
    try:
        admin = await opened(gw_a, tenant, "root", "admin")
        alice = await opened(gw_b, tenant, "alice", "member")
        carol = await opened(gw_b, tenant, "carol", "member")
        for client in (alice, carol):
            await client.join(ROOM, "chat")
            await client.join(ROOM, "news")
        await alice.join("elsewhere", "chat")

        start = len(alice.received)
        began = time.monotonic()
        result = await ok(admin, "room_ban", {"principal": "alice", "reason": "spam"})
        assert result["banned"] and result["until"] is None
        kicked = await alice.wait_for(
            lambda m: m["type"] == "error" and m["payload"]["code"] == "banned", 5, start
        )
        assert time.monotonic() - began < 1.0
        assert kicked["payload"]["room"] == ROOM
        assert kicked["payload"]["channels"] == ["chat", "news"]
        assert "spam" in kicked["payload"]["message"]

        # No longer a member: new events of the room do not reach alice; carol stays.
        assert (await admin.publish(ROOM, "chat", {"after": "ban"}))["type"] == "ack"
        await carol.wait_for(lambda m: m["type"] == "event" and m["payload"] == {"after": "ban"})
        assert await refused(alice, "join_channel") == "banned"
        refusal = await alice.publish(ROOM, "chat", {"text": "let me in"})
        assert refusal["type"] == "error" and refusal["payload"]["code"] == "banned"
        assert "retry_after_ms" not in refusal["payload"]
        assert await refused(alice, "history") == "banned"
        # Its other rooms are untouched.
        assert (await alice.publish("elsewhere", "chat", {"ok": 1}))["type"] == "ack"
        assert not any(m["payload"] == {"after": "ban"} for m in alice.events(ROOM))

        await ok(admin, "room_unban", {"principal": "alice"})
        await room_state(gw_b, tenant, lambda s: s is not None and "alice" not in s.banned)
        await alice.join(ROOM, "chat")
    finally:
        await opened.close()


async def test_a_timed_ban_ends_by_itself(start_gateway: GatewayFactory, tenant: str) -> None:
    gw_a, gw_b = await two_gateways(start_gateway)
    opened = Opened()
    try:
        admin = await opened(gw_a, tenant, "root", "admin")
        result = await ok(admin, "room_ban", {"principal": "dave", "duration_s": 1.5})
        assert result["banned"] and result["until"] > time.time()
        await room_state(gw_b, tenant, lambda s: s is not None and "dave" in s.banned)
        dave = await opened(gw_b, tenant, "dave", "member")
        assert await refused(dave, "join_channel") == "banned"
        refusal = await dave.publish(ROOM, "chat", {"n": 1})
        assert refusal["payload"]["code"] == "banned"
        wait_ms = refusal["payload"]["retry_after_ms"]
        assert 0 < wait_ms <= 1600
        # The time the gateway said the ban ends: its clock is moved there, not waited for.
        gw_b.rooms.clock = lambda: time.time() + wait_ms / 1000
        await dave.join(ROOM, "chat")
        assert (await dave.publish(ROOM, "chat", {"n": 2}))["type"] == "ack"
    finally:
        await opened.close()


async def test_a_muted_member_reads_but_cannot_publish(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gw_a, gw_b = await two_gateways(start_gateway)
    opened = Opened()
    try:
        admin = await opened(gw_a, tenant, "root", "admin")
        erin = await opened(gw_b, tenant, "erin", "member")
        await erin.join(ROOM, "chat")
        await ok(admin, "room_mute", {"principal": "erin"})
        await room_state(gw_b, tenant, lambda s: s is not None and "erin" in s.muted)

        refusal = await erin.publish(ROOM, "chat", {"text": "hello?"})
        assert refusal["type"] == "error" and refusal["payload"]["code"] == "muted"
        assert "retry_after_ms" not in refusal["payload"]
        # Still a member: it reads new events, joins other channels, reads history.
        assert (await admin.publish(ROOM, "chat", {"from": "admin"}))["type"] == "ack"
        await erin.wait_for(lambda m: m["type"] == "event" and m["payload"] == {"from": "admin"})
        await erin.join(ROOM, "news")
        await ok(erin, "history", channel="chat")

        await ok(admin, "room_mute", {"principal": "erin", "duration_s": 60})
        await room_state(
            gw_b, tenant, lambda s: s is not None and s.muted.get("erin", None) is not None
            and s.muted["erin"].until is not None
        )  # fmt: skip
        timed = await erin.publish(ROOM, "chat", {"text": "still?"})
        assert timed["payload"]["code"] == "muted"
        assert 50_000 < timed["payload"]["retry_after_ms"] <= 60_001

        await ok(admin, "room_unmute", {"principal": "erin"})
        await room_state(gw_b, tenant, lambda s: s is not None and "erin" not in s.muted)
        assert (await erin.publish(ROOM, "chat", {"text": "back"}))["type"] == "ack"
    finally:
        await opened.close()


async def test_members_cannot_run_admin_commands_and_parameters_are_checked(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gw_a, _ = await two_gateways(start_gateway)
    opened = Opened()
    try:
        member = await opened(gw_a, tenant, "mallory", "member")
        for name, params in (
            ("room_configure", {"private": True, "key": KEY}),
            ("room_invite", {"principal": "mallory"}),
            ("room_uninvite", {"principal": "x"}),
            ("room_ban", {"principal": "root"}),
            ("room_unban", {"principal": "mallory"}),
            ("room_mute", {"principal": "root"}),
            ("room_unmute", {"principal": "mallory"}),
            ("room_info", {}),
        ):
            assert await refused(member, name, params) == "forbidden", name
        assert RoomDirectory.of(gw_a.security).get(tenant, ROOM) is None

        admin = await opened(gw_a, tenant, "root", "admin")
        for name, params in (
            ("room_ban", {}),
            ("room_ban", {"principal": "a b"}),
            ("room_ban", {"principal": "x", "duration_s": -5}),
            ("room_mute", {"principal": "x", "duration_s": "soon"}),
            ("room_configure", {}),
            ("room_configure", {"key": "short"}),
            ("room_configure", {"private": "yes"}),
        ):
            assert await refused(admin, name, params) == "invalid_parameters", (name, params)
        info = await ok(admin, "room_info")
        assert info["configured"] is False
    finally:
        await opened.close()


async def test_room_settings_are_per_tenant(start_gateway: GatewayFactory, tenant: str) -> None:
    gw_a, gw_b = await two_gateways(start_gateway)
    other = tenant + "y"
    opened = Opened()
    try:
        alice_x = await opened(gw_b, tenant, "alice", "member")
        alice_y = await opened(gw_b, other, "alice", "member")
        for client in (alice_x, alice_y):
            await client.join(ROOM, "chat")
        admin_x = await opened(gw_a, tenant, "root", "admin")
        await ok(admin_x, "room_ban", {"principal": "alice"})
        await ok(admin_x, "room_configure", {"private": True, "key": KEY})
        await alice_x.wait_for(lambda m: m["type"] == "error" and m["payload"]["code"] == "banned")
        await room_state(gw_b, tenant, lambda s: s is not None and s.private)
        assert await refused(alice_x, "join_channel", {"room_key": KEY}) == "banned"

        # Tenant Y's alice in tenant Y's lobby: still joined, no key, no ban.
        assert (await alice_y.publish(ROOM, "chat", {"y": 1}))["type"] == "ack"
        await alice_y.wait_for(lambda m: m["type"] == "event" and m["payload"] == {"y": 1})
        assert not any(m["type"] == "error" for m in alice_y.received)
        fresh_y = await opened(gw_b, other, "alice", "member")
        await fresh_y.join(ROOM, "news")
        admin_y = await opened(gw_b, other, "root", "admin")
        assert (await ok(admin_y, "room_info"))["configured"] is False
    finally:
        await opened.close()


async def test_concurrent_admins_on_two_gateways_lose_no_update(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gw_a, gw_b = await two_gateways(start_gateway)
    opened = Opened()
    try:
        admin_a = await opened(gw_a, tenant, "root", "admin")
        admin_b = await opened(gw_b, tenant, "root2", "admin")
        names = [f"p{i}" for i in range(12)]
        await asyncio.gather(
            *(
                ok(admin_a if i % 2 else admin_b, "room_invite", {"principal": name})
                for i, name in enumerate(names)
            )
        )
        info = await ok(admin_a, "room_info")
        assert sorted(info["invited"]) == sorted(names)
    finally:
        await opened.close()
