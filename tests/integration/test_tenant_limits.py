"""Per-tenant limit overrides in NATS KV: ``arqonbus tenants`` reaches every gateway, no restart.

Real NATS cluster, two in-process gateways. Each step waits for both gateways' watched copy
of the tenant's record to change (an event), never for a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats as nats_client
import orjson
import pytest
from nats.aio.msg import Msg
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.admin import cli
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.mesh.local import LocalCluster
from tests.conftest import GatewayFactory, gateway_url
from tests.support import WsClient, jetstream_manager, new_id
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

ROOM, CHANNEL = "plan", "general"


async def tenants_cli(nats: LocalCluster | str, *argv: str) -> int:
    """``arqonbus tenants ARGV --nats URLS`` as a user runs it (its own event loop, a thread)."""
    urls = nats if isinstance(nats, str) else nats.url_csv
    return await asyncio.to_thread(cli.main, ["tenants", *argv, "--nats", urls])


@asynccontextmanager
async def stream_updated(nats: LocalCluster, stream: str) -> AsyncIterator[asyncio.Event]:
    """An event set by JetStream's advisory that ``stream``'s configuration was updated."""
    nc = await nats_client.connect(nats.urls, connect_timeout=2)
    updated = asyncio.Event()

    async def on_advisory(_msg: Msg) -> None:
        updated.set()

    try:
        await nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.UPDATED.{stream}", cb=on_advisory)
        await nc.flush()
        yield updated
    finally:
        await nc.close()


async def change(gateways: list[Gateway], tenant: str, nats: LocalCluster, *argv: str) -> None:
    """Run ``arqonbus tenants ARGV`` and wait until every gateway has seen the change."""
    seen = [asyncio.Event() for _ in gateways]
    for gateway, event in zip(gateways, seen, strict=True):
        gateway.security.tenants.on_change(
            lambda key, _value, event=event: key == tenant and event.set()
        )
    assert await tenants_cli(nats, *argv, "--tenant", tenant) == 0
    async with asyncio.timeout(10 * SEC):
        for event in seen:
            await event.wait()


async def refused_connect(url: str, tenant: str, principal: str) -> dict[str, Any]:
    with pytest.raises(InvalidStatus) as refusal:
        await WsClient.connect(url, tenant, principal)
    response = refusal.value.response
    assert response.status_code == 429
    body: dict[str, Any] = orjson.loads(response.body or b"")
    return body


async def wait_for_report(gw: Gateway, tenant: str, count: int) -> None:
    """Until ``gw`` has seen other gateways report ``count`` connections of ``tenant``."""
    seen = asyncio.Event()
    reporter = gw.conn_reports

    def check(_key: str, _value: bytes | None) -> None:
        if reporter.others(tenant) >= count:
            seen.set()

    reporter.on_report(check)
    check("", None)
    async with asyncio.timeout(20 * SEC):
        await seen.wait()


async def test_connection_cap_override_applies_to_that_tenant_only(
    start_gateway: GatewayFactory, clients: Any, nats_cluster: LocalCluster, tenant: str
) -> None:
    # The gateway default is off (max_connections_per_tenant=0).
    gw_a = await start_gateway(health_interval_s=0.5)
    gw_b = await start_gateway(health_interval_s=0.5)
    other = tenant + "b"
    await change([gw_a, gw_b], tenant, nats_cluster, "set", "--max-connections", "1")

    first = await clients(gateway_url(gw_a), tenant, "a1")
    body = await refused_connect(gateway_url(gw_a), tenant, "a2")
    assert body["error"] == "limit_exceeded" and "1 connections" in body["message"]
    # Counted over both gateways (gw_a's report reaches gw_b).
    await wait_for_report(gw_b, tenant, 1)
    await refused_connect(gateway_url(gw_b), tenant, "a3")

    # Tenant B has no override: the gateway default (off) applies.
    for i in range(3):
        await clients(gateway_url(gw_a if i % 2 else gw_b), other, f"b{i}")

    report = (await first.command(ROOM, CHANNEL, "limits"))["payload"]["result"]
    assert report["tenant"]["max_connections"] == 1
    assert report["tenant_overrides"] == ["max_connections"]
    report_b = await (await clients(gateway_url(gw_a), other, "b9")).command(
        ROOM, CHANNEL, "limits"
    )
    assert report_b["payload"]["result"]["tenant"]["max_connections"] == 0

    # Reset: the default applies again at once.
    await change([gw_a, gw_b], tenant, nats_cluster, "reset")
    await clients(gateway_url(gw_a), tenant, "a4")
    await clients(gateway_url(gw_b), tenant, "a5")


async def burst(client: WsClient, count: int) -> list[Any]:
    start = len(client.received)
    ids = [new_id("b") for _ in range(count)]
    for msg_id in ids:
        await client.send(
            {"id": msg_id, "type": "event", "room": ROOM, "channel": CHANNEL, "payload": {}}
        )
    return [await client.reply_to(msg_id, start=start) for msg_id in ids]


def rate_limited(replies: list[Any]) -> int:
    return sum(
        1 for r in replies if r["type"] == "error" and r["payload"]["code"] == "rate_limited"
    )


async def test_message_rate_override_limits_that_tenant_live_and_new_connections(
    start_gateway: GatewayFactory, clients: Any, nats_cluster: LocalCluster, tenant: str
) -> None:
    gw_a, gw_b = await start_gateway(), await start_gateway()  # default: 1000 frames/s
    other = tenant + "b"
    live = await clients(gateway_url(gw_a), tenant, "live")
    assert rate_limited(await burst(live, 5)) == 0

    await change(
        [gw_a, gw_b],
        tenant,
        nats_cluster,
        "set",
        "--msg-rate-per-conn",
        "1",
        "--msg-burst-per-conn",
        "2",
    )
    assert await tenants_cli(nats_cluster, "show", "--tenant", tenant) == 0

    fresh = await clients(gateway_url(gw_b), tenant, "fresh")
    assert fresh.welcome is not None
    assert fresh.welcome["payload"]["limits"]["msg_rate_per_conn"] == 1
    assert fresh.welcome["payload"]["limits"]["msg_burst_per_conn"] == 2
    assert rate_limited(await burst(fresh, 5)) == 3  # a burst of 2, then 1/s
    assert rate_limited(await burst(live, 5)) >= 3  # the live connection was retuned

    # Tenant B keeps the gateway's rate, on both gateways.
    for gw in (gw_a, gw_b):
        b = await clients(gateway_url(gw), other, "b")
        assert rate_limited(await burst(b, 20)) == 0
        limits = (await b.command(ROOM, CHANNEL, "limits"))["payload"]["result"]
        assert limits["rates"]["connection"]["msgs_per_s"] == 1000

    await change([gw_a, gw_b], tenant, nats_cluster, "reset")
    again = await clients(gateway_url(gw_b), tenant, "again")
    assert rate_limited(await burst(again, 20)) == 0


async def publish_until_refused(client: WsClient, tag: str) -> tuple[int, dict[str, Any] | None]:
    acked = 0
    for i in range(200):  # 32 KiB of ~1.2 kB events: full well before 200
        reply = await client.publish(ROOM, CHANNEL, {"pad": "y" * 1024}, id=f"{tag}{i}")
        if reply["type"] != "ack":
            return acked, reply["payload"]
        acked += 1
    return acked, None


async def test_stored_bytes_override_updates_the_existing_stream(
    start_gateway: GatewayFactory, clients: Any, nats_cluster: LocalCluster, tenant: str
) -> None:
    gw_a, gw_b = await start_gateway(), await start_gateway()  # default: unlimited
    other = tenant + "b"
    writer = await clients(gateway_url(gw_a), tenant, "alice")
    assert (await writer.publish(ROOM, CHANNEL, {"n": 1}))["type"] == "ack"  # stream exists

    stream = gw_a.broker.scheme.stream_name(tenant)
    async with stream_updated(nats_cluster, stream) as updated:
        await change(
            [gw_a, gw_b], tenant, nats_cluster, "set", "--max-stored-bytes", str(32 * 1024)
        )
        await asyncio.wait_for(updated.wait(), 10 * SEC)  # the gateways' update (apply_quota)
    async with jetstream_manager(nats_cluster) as jsm:
        info = await jsm.stream_info(stream)
    assert info.config.max_bytes == 32 * 1024 and info.config.discard == "new"

    acked, error = await publish_until_refused(writer, "q")
    assert error is not None and error["code"] == "quota_exceeded", error
    assert acked >= 10
    limits = (await writer.command(ROOM, CHANNEL, "limits"))["payload"]["result"]["tenant"]
    assert limits["max_stored_bytes"] == 32 * 1024

    # Tenant B (no override) is not limited.
    b = await clients(gateway_url(gw_b), other, "bob")
    acked_b, error_b = await publish_until_refused(b, "b")
    assert error_b is None and acked_b == 200

    # Reset: the stream is unlimited again.
    async with stream_updated(nats_cluster, stream) as updated:
        await change([gw_a, gw_b], tenant, nats_cluster, "reset")
        await asyncio.wait_for(updated.wait(), 10 * SEC)
    async with jetstream_manager(nats_cluster) as jsm:
        info = await jsm.stream_info(stream)
    assert info.config.max_bytes == -1
    assert (await writer.publish(ROOM, CHANNEL, {"pad": "y" * 1024}))["type"] == "ack"


async def test_cli_refuses_invalid_input_and_records_are_merged(
    nats_cluster: LocalCluster, tenant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await tenants_cli(nats_cluster, "set", "--tenant", tenant) == 2
    assert (
        await tenants_cli(nats_cluster, "set", "--max-connections", "-1", "--tenant", tenant) == 2
    )
    assert "max_connections must be between 0" in capsys.readouterr().err
    assert await tenants_cli(nats_cluster, "set", "--max-connections", "3", "--tenant", tenant) == 0
    assert (
        await tenants_cli(nats_cluster, "set", "--msg-rate-per-conn", "5", "--tenant", tenant) == 0
    )
    capsys.readouterr()
    assert await tenants_cli(nats_cluster, "show", "--tenant", tenant) == 0
    assert orjson.loads(capsys.readouterr().out) == {"max_connections": 3, "msg_rate_per_conn": 5}
    assert await tenants_cli(nats_cluster, "reset", "--tenant", tenant) == 0
    capsys.readouterr()
    assert await tenants_cli(nats_cluster, "show", "--tenant", tenant) == 0
    assert "no overrides" in capsys.readouterr().out
    assert await tenants_cli("nats://127.0.0.1:1", "show", "--tenant", tenant) == 1
