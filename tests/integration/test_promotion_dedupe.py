"""A resend after a promotion is stored once.

An event the old primary stored and its mirror copied, but that was never acknowledged (its
region died first), is resent by its publisher with the same id. The promoted mirror (3
replicas) does not remember the ids it copied, so the gateway answers the resend as the
duplicate it is (mesh/carried_ids.py). On the normal 3-node cluster: the primary deleted and
its mirror promoted exactly as `arqonbus mesh failover` does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from nats.aio.client import Client

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.mesh.regions import RegionOps
from arqonbus_server.mesh.streams import StreamPolicy, tenant_stream_config
from arqonbus_server.shared.regions import Epoch, Placement, StreamAt, mirror_stream_name, promoted
from arqonbus_server.shared.subjects import SubjectScheme
from tests.conftest import gateway_url
from tests.integration.test_placement import add_mirror, last_seq, place, until

pytestmark = pytest.mark.integration

ROOM, CHANNEL = "ops", "feed"
SCHEME = SubjectScheme()


async def test_a_resend_of_an_event_stored_before_a_promotion_is_a_duplicate(
    start_gateway: Callable[..., object], clients: Callable[..., object], nc: Client
) -> None:
    gateway: Gateway = await start_gateway(region="west")  # type: ignore[misc]
    tenant = "pd" + uuid.uuid4().hex[:10]
    primary = SCHEME.stream_name(tenant)
    mirror = mirror_stream_name(SCHEME, "west", tenant)
    await nc.jsm().add_stream(tenant_stream_config(SCHEME, tenant, StreamPolicy(), 3))
    at_primary, at_mirror = StreamAt("east", primary), StreamAt("west", mirror)
    placed = Placement(tenant, "east", at_primary, (at_mirror,), (Epoch(1, 1, at_primary),), "home")
    await place(nc, gateway, placed)
    writer = await clients(gateway_url(gateway), tenant, "writer")  # type: ignore[operator]
    acks = [await writer.publish(ROOM, CHANNEL, {"n": n}, id=f"e{n}") for n in range(1, 4)]
    assert [a["payload"]["seq"] for a in acks] == [1, 2, 3]

    await add_mirror(nc, mirror, primary, replicas=3)
    await until(lambda: _holds(nc, mirror, 3), "the mirror holds 1..3")
    ops = RegionOps(nc, SCHEME, say=lambda line: None)
    new = promoted(placed, "west", 3)
    await ops._delete(primary)
    await ops._promote(mirror, tenant, new)
    await place(nc, gateway, new)

    again = await writer.publish(ROOM, CHANNEL, {"n": 2}, id="e2")  # the resend
    assert again["type"] == "ack", again
    assert (again["payload"]["seq"], again["payload"].get("duplicate")) == (2, True), again
    assert again["payload"]["epoch"] == 1  # stored in epoch 1
    fresh = await writer.publish(ROOM, CHANNEL, {"n": 4}, id="e4")
    assert (fresh["payload"]["seq"], fresh["payload"]["epoch"]) == (4, 2)
    assert await last_seq(nc, mirror) == 4  # e2 stored once


async def _holds(nc: Client, stream: str, seq: int) -> bool:
    return await last_seq(nc, stream) >= seq
