"""Presence across two gateways on the real 3-node cluster, through real WebSocket clients.

A member seen on one gateway is seen on the other; one principal with sessions on both is
one member; a gateway killed with SIGKILL leaves no ghost members; tenants and principals
without the ``presence`` permission see nothing; bad input keeps the connection open.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from arqonbus_server.mesh.local import LocalCluster
from tests.conftest import GatewayFactory, gateway_url
from tests.support import GatewayProcess, Message, WsClient
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration

Connect = Callable[..., Awaitable[WsClient]]
ROOM, CHANNEL = "lobby", "general"
# The documented bound for a SIGKILLed gateway's members (docs/presence.md): 4 lease
# periods without a renewal, the next lease round, and the removal.
EXPIRY_BOUND_S = 15.0


async def ok(client: WsClient, name: str, parameters: Message | None = None, **where: str) -> Any:
    reply = await client.command(
        where.get("room", ROOM), where.get("channel", CHANNEL), name, parameters or {}
    )
    assert reply["payload"]["status"] == "success", reply
    return reply["payload"]["result"]


async def refused(
    client: WsClient, name: str, parameters: Message | None = None, **where: str
) -> Message:
    reply = await client.command(
        where.get("room", ROOM), where.get("channel", CHANNEL), name, parameters or {}
    )
    assert reply["payload"]["status"] == "error", reply
    error: Message = reply["payload"]["error"]
    return error


def changes(client: WsClient) -> list[Message]:
    """Every presence change this client was sent, in order."""
    return [
        change
        for message in client.received
        if message["type"] == "presence"
        for change in message["payload"]["changes"]
    ]


async def change_seen(
    client: WsClient, action: str, principal: str, timeout: float = 10 * SEC
) -> Message:
    def seen(message: Message) -> bool:
        return message["type"] == "presence" and any(
            c["action"] == action and c["principal"] == principal
            for c in message["payload"]["changes"]
        )

    return await client.wait_for(seen, timeout=timeout)


async def two_gateways(start_gateway: GatewayFactory, **overrides: Any) -> tuple[str, str]:
    first, second = await start_gateway(**overrides), await start_gateway(**overrides)
    return gateway_url(first), gateway_url(second)


async def test_join_update_and_leave_are_seen_on_the_other_gateway(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    url_a, url_b = await two_gateways(start_gateway)
    alice = await clients(url_a, tenant, "alice")
    joined = await ok(alice, "join_channel", {"presence": True})
    assert (joined["presence"], joined["presence_events"]) == (True, True)
    bob = await clients(url_b, tenant, "bob")
    await ok(bob, "join_channel", {"presence": True})

    join = await change_seen(alice, "join", "bob")
    bob_join = next(c for c in join["payload"]["changes"] if c["principal"] == "bob")
    assert (bob_join["state"], bob_join["connections"]) == ("online", 1)

    result = await ok(bob, "set_presence", {"state": "idle", "metadata": {"skill": "triage"}})
    assert (result["state"], result["metadata"], result["channels"]) == (
        "idle",
        {"skill": "triage"},
        1,
    )
    update = await change_seen(alice, "update", "bob")
    bob_update = next(c for c in update["payload"]["changes"] if c["principal"] == "bob")
    assert (bob_update["state"], bob_update["metadata"]) == ("idle", {"skill": "triage"})

    await ok(bob, "leave_channel")
    leave = await change_seen(alice, "leave", "bob")
    positions = [m["payload"]["position"] for m in alice.received if m["type"] == "presence"]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert leave["payload"]["position"] == positions[-1]
    members = await ok(alice, "presence")
    assert [m["principal"] for m in members["members"]] == ["alice"]


async def test_one_principal_on_two_gateways_is_one_member(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    url_a, url_b = await two_gateways(start_gateway)
    watcher = await clients(url_a, tenant, "watcher")
    await ok(watcher, "join_channel", {"presence_events": True})
    phone = await clients(url_a, tenant, "carol")
    laptop = await clients(url_b, tenant, "carol")
    await ok(phone, "join_channel", {"presence": True})
    await ok(laptop, "join_channel", {"presence": True})

    async def two_connections() -> Message | None:
        page = await ok(watcher, "presence")
        return page if page["occupancy"]["connections"] == 2 else None

    page = await eventually(two_connections, 10 * SEC, "carol's second session listed")
    (carol,) = page["members"]
    assert carol["principal"] == "carol"
    assert sorted(c["gateway"] for c in carol["connections"]) == ["gw0", "gw1"]
    assert page["occupancy"] == {"members": 1, "connections": 2, "online": 1, "idle": 0}
    occupancy = await ok(watcher, "occupancy")
    assert (occupancy["members"], occupancy["connections"]) == (1, 2)

    await carol_seen_with(watcher, connections=2)  # a join (and maybe an update) said so
    await phone.close()  # one session gone: still a member
    await carol_seen_with(watcher, connections=1)
    assert [c["action"] for c in changes(watcher) if c["principal"] == "carol"][-1] == "update"
    await ok(laptop, "leave_channel")
    await change_seen(watcher, "leave", "carol")
    assert (await ok(watcher, "occupancy"))["members"] == 0


async def carol_seen_with(watcher: WsClient, connections: int) -> None:
    def latest_says_so(message: Message) -> bool:
        mine = [c for c in changes(watcher) if c["principal"] == "carol"]
        return bool(mine) and mine[-1].get("connections") == connections

    await watcher.wait_for(latest_says_so, timeout=10 * SEC)


async def test_paging_with_a_cursor_and_a_state_filter(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    url_a, url_b = await two_gateways(start_gateway)
    members = []
    for index in range(7):
        client = await clients(url_a if index % 2 else url_b, tenant, f"p{index}")
        await ok(client, "join_channel", {"presence": True})
        members.append(client)
    await ok(members[3], "set_presence", {"state": "idle"})
    reader = await clients(url_a, tenant, "reader")

    async def all_listed() -> list[str] | None:
        names: list[str] = []
        cursor = None
        for _ in range(10):
            page = await ok(
                reader, "presence", {"limit": 3, **({"cursor": cursor} if cursor else {})}
            )
            assert len(page["members"]) <= 3
            names += [m["principal"] for m in page["members"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return names if len(names) == 7 else None

    names = await eventually(all_listed, 10 * SEC, "7 members over pages of 3")
    assert names == sorted(f"p{i}" for i in range(7))

    async def idle_only() -> list[Message] | None:
        page = await ok(reader, "presence", {"state": "idle"})
        return page["members"] or None

    (idle,) = await eventually(idle_only, 10 * SEC, "p3 listed as idle")
    assert idle["principal"] == "p3"

    error = await refused(reader, "presence", {"cursor": "%%%not-a-cursor"})
    assert error["code"] == "invalid_parameters" and "cursor" in error["message"]
    error = await refused(reader, "set_presence", {"metadata": {"blob": "x" * 2000}})
    assert error["code"] == "invalid_parameters" and "1024" in error["message"]
    error = await refused(reader, "set_presence", {"state": "away"})
    assert error["code"] == "invalid_parameters"
    assert (await ok(reader, "occupancy"))["members"] == 7  # the connection stayed open


async def test_other_tenants_and_principals_without_the_permission_see_nothing(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    url_a, url_b = await two_gateways(start_gateway)
    member = await clients(url_a, tenant, "insider")
    await ok(member, "join_channel", {"presence": True, "presence_events": True})
    other_tenant = tenant + "x"
    outsider = await clients(url_b, other_tenant, "outsider")
    await ok(outsider, "join_channel", {"presence": True})
    page = await ok(outsider, "presence")
    assert [m["principal"] for m in page["members"]] == ["outsider"]

    viewer = await WsClient.open(url_b, f"dev:{tenant}:viewer1:viewer")
    try:
        error = await refused(viewer, "presence")
        assert error["code"] == "forbidden" and "presence" in error["message"]
        error = await refused(viewer, "occupancy")
        assert error["code"] == "forbidden"
        error = await refused(viewer, "join_channel", {"presence": True})
        assert error["code"] == "forbidden" and "presence_events" in error["message"]
        joined = await ok(viewer, "join_channel", {"presence": True, "presence_events": False})
        assert (joined["presence"], joined["presence_events"]) == (True, False)
        await change_seen(member, "join", "viewer1")  # it entered: the member sees it
    finally:
        await viewer.close()
    assert all(c["principal"] != "outsider" for c in changes(member))


async def test_a_sigkilled_gateways_members_expire_within_the_bound(
    nats_cluster: LocalCluster,
    gateway_processes: Callable[..., Awaitable[GatewayProcess]],
    start_gateway: GatewayFactory,
    clients: Connect,
    tenant: str,
) -> None:
    survivor = gateway_url(await start_gateway())
    doomed = await gateway_processes(nats_cluster.url_csv)
    watcher = await clients(survivor, tenant, "watcher")
    await ok(watcher, "join_channel", {"presence_events": True})
    victims = [await clients(doomed.url, tenant, f"v{i}") for i in range(3)]
    for victim in victims:
        await ok(victim, "join_channel", {"presence": True})
    for index in range(len(victims)):
        await change_seen(watcher, "join", f"v{index}")

    doomed.signal(signal.SIGKILL)
    killed = time.monotonic()
    await doomed.wait_exit(10 * SEC)
    for index in range(len(victims)):
        await change_seen(watcher, "leave", f"v{index}", EXPIRY_BOUND_S * SEC)
    expired_after = time.monotonic() - killed
    assert expired_after <= EXPIRY_BOUND_S * SEC, expired_after
    assert (await ok(watcher, "occupancy"))["members"] == 0
