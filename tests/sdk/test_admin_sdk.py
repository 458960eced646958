"""The built-in admin commands through the SDK and ``arqonbus admin``, against real gateways
on the real cluster: allowed and refused by role, typed errors, pushed kicks and deletions."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

import orjson
import pytest

from arqonbus import (
    ADMIN_COMMANDS,
    BUILTIN_COMMANDS,
    Client,
    Forbidden,
    InvalidParameters,
    Kicked,
    RoomDeleted,
    RoomExists,
    RoomNotFound,
)
from tests.conftest import gateway_url
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

ROOM, CHANNEL = "ops", "alerts"
NEW_COMMANDS = {"ping", "status", "list_rooms", "list_channels", "channel_info"} | {
    "create_room",
    "configure_room",
    "delete_room",
    "kick",
}


def test_the_new_commands_are_admin_commands_and_presence_ones_are_built_in() -> None:
    assert NEW_COMMANDS <= ADMIN_COMMANDS
    assert {"presence", "occupancy", "set_presence"} <= BUILTIN_COMMANDS - ADMIN_COMMANDS


async def test_ping_needs_no_permission(start_gateway, tenant):
    gw = await start_gateway()
    async with Client(gateway_url(gw), f"dev:{tenant}:reader:read-only") as reader:
        pong = await reader.ping()
    assert pong["pong"] is True and pong["gateway"] == "gw0"
    assert isinstance(pong["time"], int | float)


async def test_status_answers_for_this_gateway_and_the_mesh(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    await start_gateway()
    owner = await sdk_client(gateway_url(gw), tenant, "boss")

    status = await owner.status()

    assert status["gateway"] == "gw0"
    assert status["connections"]["tenant"] == 1
    assert status["connections"]["gateway"] >= 1
    assert status["gateways"] >= 2 and status["uptime_s"] >= 0


async def test_a_room_is_created_listed_configured_and_deleted(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    owner = await sdk_client(gateway_url(gw), tenant, "boss")
    acks = [await owner.publish(ROOM, CHANNEL, {"n": n}) for n in range(3)]

    created = await owner.create_room(ROOM, retention_s=7200, presence=True)
    with pytest.raises(RoomExists):
        await owner.create_room(ROOM)
    configured = await owner.configure_room(ROOM, max_message_bytes=2048, retention_s=None)
    rooms = await owner.list_rooms()
    channels = await owner.list_channels(ROOM)
    info = await owner.channel_info(ROOM, CHANNEL)

    assert (created["room"], created["retention_s"], created["presence"]) == (ROOM, 7200, True)
    assert configured["max_message_bytes"] == 2048 and configured["retention_s"] is None
    assert [r["room"] for r in rooms["rooms"]] == [ROOM] and rooms["next_cursor"] is None
    assert rooms["rooms"][0]["configured"] is True and rooms["rooms"][0]["messages"] == 3
    assert channels["channels"] == [{"channel": CHANNEL, "messages": 3, "last_seq": acks[-1].seq}]
    assert (info["messages"], info["last_seq"], info["presence"]) == (3, acks[-1].seq, True)

    with pytest.raises(ValueError, match="confirm"):
        await owner.delete_room(ROOM, confirm="wrong")
    with pytest.raises(InvalidParameters):
        await owner.admin(ROOM, "delete_room", {"confirm": "wrong"})
    deleted = await owner.delete_room(ROOM, confirm=ROOM)
    assert deleted["room"] == ROOM and deleted["events_removed"] == 3
    assert [e async for e in owner.history(ROOM, CHANNEL)] == []
    with pytest.raises(RoomNotFound):
        await owner.delete_room(ROOM, confirm=ROOM)


async def test_bad_room_settings_are_refused_and_the_connection_lives_on(
    start_gateway, sdk_client, tenant
):
    gw = await start_gateway()
    owner = await sdk_client(gateway_url(gw), tenant, "boss")
    for name, value in (("retention_s", -1), ("retention_s", 60), ("max_message_bytes", 0)):
        with pytest.raises(InvalidParameters, match=name):
            await owner.create_room("bad", **{name: value})
    with pytest.raises(ValueError, match="unknown room setting"):
        await owner.create_room("bad", colour="blue")
    assert (await owner.ping())["pong"] is True


async def test_admin_commands_are_refused_without_the_admin_permission(start_gateway, tenant):
    gw = await start_gateway()
    async with Client(gateway_url(gw), f"dev:{tenant}:mia:member") as member:
        for call in (
            member.status(),
            member.list_rooms(),
            member.create_room(ROOM),
            member.kick(ROOM, "bob"),
            member.delete_room(ROOM, confirm=ROOM),
        ):
            with pytest.raises(Forbidden, match="admin"):
                await call
        assert (await member.ping())["pong"] is True


async def test_a_kick_ends_the_principals_subscriptions_on_every_gateway_and_it_may_rejoin(
    start_gateway, sdk_client, tenant
):
    gw0, gw1 = await start_gateway(), await start_gateway()
    owner = await sdk_client(gateway_url(gw0), tenant, "boss")
    mallory = await sdk_client(gateway_url(gw1), tenant, "mallory")
    sub = await mallory.subscribe(ROOM, CHANNEL).start()

    result = await owner.kick(ROOM, "mallory", reason="spam")

    assert result == {"room": ROOM, "principal": "mallory", "kicked": True}
    with pytest.raises(Kicked) as kicked:
        async with asyncio.timeout(10 * SEC):
            async for _ in sub:
                pass
    assert (kicked.value.room, kicked.value.reason) == (ROOM, "spam")
    again = await mallory.subscribe(ROOM, CHANNEL).start()  # a kick is not a ban
    await owner.publish(ROOM, CHANNEL, {"after": "kick"})
    async with asyncio.timeout(10 * SEC):
        event = await anext(aiter(again))
    assert event.payload == {"after": "kick"}  # type: ignore[union-attr]


async def test_deleting_a_room_ends_its_members_subscriptions(start_gateway, sdk_client, tenant):
    gw0, gw1 = await start_gateway(), await start_gateway()
    owner = await sdk_client(gateway_url(gw0), tenant, "boss")
    member = await sdk_client(gateway_url(gw1), tenant, "bob")
    await owner.publish(ROOM, CHANNEL, {"n": 1})
    sub = await member.subscribe(ROOM, CHANNEL).start()

    await owner.delete_room(ROOM, confirm=ROOM)

    with pytest.raises(RoomDeleted):
        async with asyncio.timeout(10 * SEC):
            async for _ in sub:
                pass


# -- arqonbus admin, as a subprocess ---------------------------------------------------------

ARQONBUS = (sys.executable, "-c", "import sys; from arqonbus_server.gateway.admin.cli import main; "
            "sys.exit(main())")  # fmt: skip


@dataclass
class Run:
    code: int
    out: str
    err: str


async def arqonbus_admin(*args: str, url: str, token: str) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_")}
    env |= {"ARQONBUS_URL": url, "ARQONBUS_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        *ARQONBUS,
        "admin",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60 * SEC)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def test_the_cli_runs_each_command_through_a_gateway(start_gateway, sdk_client, tenant):
    gw = await start_gateway()
    url, token = gateway_url(gw), f"dev:{tenant}:boss"
    writer = await sdk_client(url, tenant, "alice")
    await writer.publish(ROOM, CHANNEL, {"n": 1})

    ping = await arqonbus_admin("ping", url=url, token=token)
    created = await arqonbus_admin("create-room", ROOM, "--retention", "2h", "--json", url=url,
                                   token=token)  # fmt: skip
    again = await arqonbus_admin("create-room", ROOM, url=url, token=token)
    rooms = await arqonbus_admin("list-rooms", url=url, token=token)
    info = await arqonbus_admin("channel-info", f"{ROOM}/{CHANNEL}", "--json", url=url,
                                token=token)  # fmt: skip
    refused = await arqonbus_admin("status", url=url, token=f"dev:{tenant}:mia:member")
    usage = await arqonbus_admin("delete-room", ROOM, "--confirm", "nope", url=url, token=token)
    deleted = await arqonbus_admin("delete-room", ROOM, "--confirm", ROOM, url=url, token=token)

    assert (ping.code, ping.out.startswith("pong from gateway gw0")) == (0, True), ping.err
    assert created.code == 0 and orjson.loads(created.out)["retention_s"] == 7200
    assert again.code == 1 and "room_exists" in again.err
    assert rooms.code == 0 and rooms.out.splitlines()[0].split()[0] == "ROOM"
    assert ROOM in rooms.out.splitlines()[1]
    assert info.code == 0 and orjson.loads(info.out)["messages"] == 1
    assert refused.code == 1 and "forbidden" in refused.err
    assert usage.code == 2 and f"--confirm {ROOM}" in usage.err
    assert deleted.code == 0 and "removed 1 event(s)" in deleted.out
