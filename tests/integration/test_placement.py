"""A gateway with a region and a placed tenant on the normal 3-node cluster (one region
stands in for several): replay from the region's own copy by its name, the primary for
what that copy lacks; publishes only into the primary; acks that wait for a mirror.

The region's copy is a mirror that stopped: a mirror of the primary, caught up, then
promoted (detached) onto a subject nobody uses. It holds seqs 1..3 while the primary goes
on, exactly like a mirror lagging behind, deterministically and without a pause switch.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig, StreamSource
from nats.js.errors import BucketNotFoundError

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.mesh.regions import RegionOps
from arqonbus_server.mesh.streams import StreamPolicy, tenant_stream_config
from arqonbus_server.shared.regions import (
    Epoch,
    Placement,
    StreamAt,
    mirror_stream_name,
    placement_kind,
)
from arqonbus_server.shared.subjects import SubjectScheme
from tests.conftest import gateway_url
from tests.integration.test_event_batches import send_batch
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration

ROOM, CHANNEL = "science", "general"
SCHEME = SubjectScheme()  # the gateways' default prefix


async def until(condition: Callable[[], object], what: str) -> None:
    async def check() -> object:
        value = condition()
        return await value if inspect.isawaitable(value) else value

    await eventually(check, 10 * SEC, what)


async def last_seq(nc: Client, stream: str) -> int:
    return (await nc.jsm().stream_info(stream)).state.last_seq


async def add_mirror(nc: Client, name: str, of: str, replicas: int = 1) -> None:
    config = StreamConfig(
        name=name,
        mirror=StreamSource(name=of),
        allow_direct=True,
        mirror_direct=False,
        num_replicas=replicas,
    )
    await nc.jsm().add_stream(config)


async def place(nc: Client, gateway: Gateway, placement: Placement) -> None:
    kind = placement_kind(gateway.settings.region)
    try:
        kv = await nc.jetstream().key_value(SCHEME.kv_bucket(kind))
    except BucketNotFoundError:
        kv = await nc.jetstream().create_key_value(bucket=SCHEME.kv_bucket(kind))
    await kv.put(placement.tenant, placement.to_json())
    await until(lambda: gateway.placements.get(placement.tenant) == placement, "placement seen")


async def test_a_placed_tenant_replays_from_its_region_then_the_primary_and_acks_when_mirrored(
    start_gateway: Callable[..., object], clients: Callable[..., object], nc: Client
) -> None:
    gateway: Gateway = await start_gateway(region="here", publish_timeout_s=1.0)  # type: ignore[misc]
    tenant = "pl" + uuid.uuid4().hex[:10]
    primary = SCHEME.stream_name(tenant)
    copy = mirror_stream_name(SCHEME, "here", tenant)
    await nc.jsm().add_stream(tenant_stream_config(SCHEME, tenant, StreamPolicy(), 3))
    at_primary = StreamAt("there", primary)
    placed = Placement(
        tenant, "there", at_primary, (StreamAt("here", copy),), (Epoch(1, 1, at_primary),), "home"
    )
    await place(nc, gateway, placed)
    writer = await clients(gateway_url(gateway), tenant, "writer")  # type: ignore[operator]
    acks = [await writer.publish(ROOM, CHANNEL, {"n": n}) for n in range(3)]
    assert [(a["payload"]["seq"], a["payload"]["epoch"]) for a in acks] == [(1, 1), (2, 1), (3, 1)]

    await add_mirror(nc, copy, primary)
    await until(lambda: _at_least(nc, copy, 3), "the mirror holds 1..3")
    frozen = (await nc.jsm().stream_info(copy)).config
    frozen.mirror, frozen.mirror_direct, frozen.subjects = None, False, [f"frozen.{tenant}.>"]
    await nc.jsm().update_stream(frozen)  # promoted onto an unused subject: stays at 3
    for n in range(3, 6):
        assert (await writer.publish(ROOM, CHANNEL, {"n": n}))["type"] == "ack"
    assert (await last_seq(nc, copy), await last_seq(nc, primary)) == (3, 6)

    asked: list[str] = []

    async def spy(msg: Msg) -> None:
        asked.append(msg.subject.rsplit(".", 1)[-1])

    sub = await nc.subscribe("$JS.API.DIRECT.GET.*", cb=spy)
    await nc.flush()
    reader = await clients(gateway_url(gateway), tenant, "reader")  # type: ignore[operator]
    result = await reader.join(ROOM, CHANNEL, since_seq=0)
    assert (result["last_seq"], result["epoch"]) == (6, 1)
    events = await reader.wait_events(6)
    assert [(e["seq"], e["payload"]["n"], e["epoch"]) for e in events] == [
        (n + 1, n, 1) for n in range(6)
    ]
    await nc.flush()
    await sub.unsubscribe()
    assert copy in asked and primary in asked, asked  # 1..3 here, 4..6 from the primary
    assert asked.index(copy) < asked.index(primary)
    page = await reader.command(ROOM, CHANNEL, "history", {"since_seq": 4, "limit": 10})
    result = page["payload"]["result"]
    assert [(e["seq"], e["epoch"]) for e in result["events"]] == [(5, 1), (6, 1)]
    assert result["epoch"] == 1  # a history page carries the epoch as deliveries do

    # acks "mirrored": the only mirror is stuck at 3, so seq 7 cannot be acknowledged.
    mirrored = Placement(tenant, "there", at_primary, placed.mirrors, placed.epochs, "mirrored")
    await place(nc, gateway, mirrored)
    refused = await writer.publish(ROOM, CHANNEL, {"n": 6}, id="e7")
    assert (refused["type"], refused["payload"]["code"]) == ("error", "unavailable")
    assert refused["payload"]["retryable"] is True
    following = mirror_stream_name(SCHEME, "far", tenant)
    await add_mirror(nc, following, primary)
    both = (StreamAt("here", copy), StreamAt("far", following))
    await place(nc, gateway, Placement(tenant, "there", at_primary, both, placed.epochs))
    ack = await writer.publish(ROOM, CHANNEL, {"n": 6}, id="e7")  # the retry, same id
    assert (ack["type"], ack["payload"]["seq"]) == ("ack", 7)
    assert await last_seq(nc, following) >= 7  # acknowledged only once mirrored
    for stream in (following, copy, primary):
        await nc.jsm().delete_stream(stream)


async def _at_least(nc: Client, stream: str, seq: int) -> bool:
    return await last_seq(nc, stream) >= seq


async def test_a_publish_into_a_stream_that_is_not_the_primary_is_refused_retryably(
    start_gateway: Callable[..., object], clients: Callable[..., object], nc: Client
) -> None:
    gateway: Gateway = await start_gateway(region="here", publish_timeout_s=1.0)  # type: ignore[misc]
    tenant = "pl" + uuid.uuid4().hex[:10]
    stale = SCHEME.stream_name(tenant)  # still captures the subjects: a stale primary
    await nc.jsm().add_stream(tenant_stream_config(SCHEME, tenant, StreamPolicy(), 3))
    moved = StreamAt("here", mirror_stream_name(SCHEME, "here", tenant))
    await place(nc, gateway, Placement(tenant, "there", moved, (), (Epoch(2, 1, moved),)))
    writer = await clients(gateway_url(gateway), tenant, "writer")  # type: ignore[operator]
    refused = await writer.publish(ROOM, CHANNEL, {"n": 0})
    assert (refused["type"], refused["payload"]["code"]) == ("error", "unavailable")
    assert await last_seq(nc, stale) == 0  # nothing stored by the stale primary
    await nc.jsm().delete_stream(stale)


async def test_a_placed_tenant_without_its_stream_is_not_created_by_the_gateway(
    start_gateway: Callable[..., object], clients: Callable[..., object], nc: Client
) -> None:
    gateway: Gateway = await start_gateway(region="here", publish_timeout_s=1.0)  # type: ignore[misc]
    tenant = "pl" + uuid.uuid4().hex[:10]
    primary = StreamAt("there", SCHEME.stream_name(tenant))
    await place(nc, gateway, Placement(tenant, "there", primary, (), (Epoch(1, 1, primary),)))
    writer = await clients(gateway_url(gateway), tenant, "writer")  # type: ignore[operator]
    refused = await writer.publish(ROOM, CHANNEL, {"n": 0})
    assert (refused["type"], refused["payload"]["retryable"]) == ("error", True)
    with pytest.raises(nats.js.errors.NotFoundError):
        await nc.jsm().stream_info(primary.stream)


async def test_a_failed_over_tenants_quota_applies_to_its_current_primary(
    start_gateway: Callable[..., object], nc: Client
) -> None:
    gateway: Gateway = await start_gateway(region="here", tenant_max_bytes=1 << 20)  # type: ignore[misc]
    tenant = "pl" + uuid.uuid4().hex[:10]
    home = StreamAt("there", SCHEME.stream_name(tenant))
    promoted = StreamAt("here", mirror_stream_name(SCHEME, "here", tenant))
    config = tenant_stream_config(SCHEME, tenant, StreamPolicy(), 3)
    config.name = promoted.stream  # the promoted mirror captures the tenant's subjects now
    await nc.jsm().add_stream(config)
    epochs = (Epoch(1, 1, home), Epoch(2, 1, promoted))
    await place(nc, gateway, Placement(tenant, "there", promoted, (), epochs))
    assert await gateway.broker.apply_quota(tenant)
    assert (await nc.jsm().stream_info(promoted.stream)).config.max_bytes == 1 << 20
    assert RegionOps.of(gateway.broker).nc is gateway.broker.nats_connection()
    await nc.jsm().delete_stream(promoted.stream)


async def test_live_events_of_a_placed_tenant_name_their_primary_and_carry_its_epoch(
    start_gateway: Callable[..., object], clients: Callable[..., object], nc: Client
) -> None:
    gateway: Gateway = await start_gateway(region="here")  # type: ignore[misc]
    tenant = "pl" + uuid.uuid4().hex[:10]
    primary = StreamAt("here", SCHEME.stream_name(tenant))
    await nc.jsm().add_stream(tenant_stream_config(SCHEME, tenant, StreamPolicy(), 3))
    epochs = (Epoch(1, 1, StreamAt("there", "gone")), Epoch(2, 1, primary))
    await place(nc, gateway, Placement(tenant, "there", primary, (), epochs, "home"))
    reader = await clients(gateway_url(gateway), tenant, "reader")  # type: ignore[operator]
    assert (await reader.join(ROOM, CHANNEL))["epoch"] == 2
    writer = await clients(gateway_url(gateway), tenant, "writer")  # type: ignore[operator]
    ack = await writer.publish(ROOM, CHANNEL, {"n": 0})
    (event,) = await reader.wait_events(1)  # live: RePublish names the stream (Nats-Stream)
    assert (ack["payload"]["epoch"], event["seq"], event["epoch"]) == (2, 1, 2)
    await nc.jsm().delete_stream(primary.stream)


async def test_an_events_frame_of_a_placed_tenant_waits_for_its_mirror_once(
    start_gateway: Callable[..., object], clients: Callable[..., object], nc: Client
) -> None:
    """With ``acks: mirrored`` a frame's events are stored in order into the primary, then
    acked together once a mirror holds the last: one wait, not one per event."""
    gateway: Gateway = await start_gateway(region="here")  # type: ignore[misc]
    tenant = "pl" + uuid.uuid4().hex[:10]
    primary = StreamAt("there", SCHEME.stream_name(tenant))
    following = StreamAt("here", mirror_stream_name(SCHEME, "here", tenant))
    await nc.jsm().add_stream(tenant_stream_config(SCHEME, tenant, StreamPolicy(), 3))
    await add_mirror(nc, following.stream, primary.stream)
    placement = Placement(
        tenant, "there", primary, (following,), (Epoch(1, 1, primary),), "mirrored"
    )
    await place(nc, gateway, placement)
    asked: list[str] = []

    async def spy(msg: Msg) -> None:
        asked.append(msg.subject)

    sub = await nc.subscribe(f"$JS.API.STREAM.INFO.{following.stream}", cb=spy)
    await nc.flush()
    writer = await clients(gateway_url(gateway), tenant, "writer")  # type: ignore[operator]
    count = 200
    events = [{"id": f"e{n}", "payload": {"n": n}} for n in range(count)]
    ack = await send_batch(writer, ROOM, CHANNEL, events)
    await nc.flush()
    await sub.unsubscribe()
    assert ack["type"] == "ack", ack
    assert ack["payload"]["seqs"] == list(range(1, count + 1))
    assert ack["payload"]["epochs"] == [1] * count
    assert await last_seq(nc, following.stream) >= count  # acknowledged only once mirrored
    # One wait polls the mirror a few times while it catches up; a wait per event would
    # ask at least once per event (each seq is new to the mirror when its wait starts).
    assert len(asked) < count // 4, f"{len(asked)} mirror infos for {count} events"
    resent = await send_batch(writer, ROOM, CHANNEL, events)  # every id carried: duplicates
    assert resent["payload"]["seqs"] == list(range(1, count + 1))
    assert resent["payload"]["duplicates"] == list(range(count))
    for stream in (following.stream, primary.stream):
        await nc.jsm().delete_stream(stream)
