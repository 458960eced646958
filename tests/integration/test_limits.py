"""Rate limits and quotas against real gateways and a real NATS cluster (gateway/state/limits.py).

Waiting for ``retry_after_ms`` after a refusal is the protocol itself (the gateway says when
the bucket has a token again), not a synchronisation with some other event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.mesh.local import LocalCluster
from tests.conftest import GatewayFactory, gateway_url
from tests.support import WsClient, jetstream_manager, new_id
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

Connect = Callable[..., Awaitable[WsClient]]
ROOM, CHANNEL = "lim", "general"


class StoppedClock:
    """A monotonic clock that stands still until ``advance``."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def event(msg_id: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "event",
        "room": ROOM,
        "channel": CHANNEL,
        "payload": payload or {},
    }


async def burst(client: WsClient, count: int, payload: dict[str, Any] | None = None) -> list[Any]:
    """Send ``count`` events back to back, then return the reply to each, in order."""
    start = len(client.received)
    ids = [new_id("b") for _ in range(count)]
    for msg_id in ids:
        await client.send(event(msg_id, payload))
    return [await client.reply_to(msg_id, start=start) for msg_id in ids]


def refused(replies: list[Any]) -> list[Any]:
    return [r for r in replies if r["type"] == "error" and r["payload"]["code"] == "rate_limited"]


async def stored_ids(client: WsClient) -> list[str]:
    reply = await client.command(ROOM, CHANNEL, "history", {"limit": 1000})
    return [e["id"] for e in reply["payload"]["result"]["events"]]


async def test_connection_over_its_message_rate_is_refused_then_works_again(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    # 3 frames at once, then 2 per second: of 6 frames sent back to back, 3 pass.
    gw = await start_gateway(msg_rate_per_conn=2, msg_burst_per_conn=3, bytes_rate_per_conn=0)
    clock = StoppedClock()
    gw.rate_limits.clock = clock  # the buckets' time moves only when the test says
    client = await clients(gateway_url(gw), tenant, "alice")
    assert client.welcome is not None
    assert client.welcome["payload"]["limits"]["msg_rate_per_conn"] == 2
    assert client.welcome["payload"]["limits"]["msg_burst_per_conn"] == 3

    replies = await burst(client, 6)
    acked = [r for r in replies if r["type"] == "ack"]
    limited = refused(replies)
    assert len(acked) == 3 and len(limited) == 3, replies
    for reply in limited:
        payload = reply["payload"]
        assert payload["request_id"] and payload["retryable"] is True
        assert 0 < payload["retry_after_ms"] <= 500  # one token at 2/s
    assert not client.closed.is_set()  # the connection stays open

    # A refused frame was not acted on: only the acked events are stored.
    clock.advance(limited[-1]["payload"]["retry_after_ms"] / 1000)  # the advertised wait
    retried = await client.publish(ROOM, CHANNEL, {}, id=limited[0]["payload"]["request_id"])
    assert retried["type"] == "ack", retried
    # Another connection has its own bucket (the principal limit is off).
    reader = await clients(gateway_url(gw), tenant, "alice")
    assert await stored_ids(reader) == [r["payload"]["request_id"] for r in acked] + [
        limited[0]["payload"]["request_id"]
    ]


async def test_bytes_rate_refuses_large_frames(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    # 4000 bytes at once (2 s worth), then 2000 bytes/s; messages unlimited.
    gw = await start_gateway(msg_rate_per_conn=0, bytes_rate_per_conn=2000)
    client = await clients(gateway_url(gw), tenant, "alice")
    replies = await burst(client, 3, {"pad": "x" * 1500})  # about 1.6 kB per frame
    assert [r["type"] for r in replies[:2]] == ["ack", "ack"]
    (limited,) = refused(replies)
    assert limited["payload"]["request_id"] == replies[2]["payload"]["request_id"]
    # The bucket holds about 800 bytes, the frame needs about 1600: about 0.4 s at 2000/s.
    assert 200 < limited["payload"]["retry_after_ms"] <= 1000
    # Small frames still fit in what is left.
    assert (await client.publish(ROOM, CHANNEL, {"n": 1}))["type"] == "ack"


async def test_principal_rate_is_shared_by_its_connections_not_with_others(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    gw = await start_gateway(
        msg_rate_per_conn=0,
        bytes_rate_per_conn=0,
        msg_rate_per_principal=0.5,
        msg_burst_per_principal=3,
    )
    url = gateway_url(gw)
    first, second = await clients(url, tenant, "alice"), await clients(url, tenant, "alice")
    bob = await clients(url, tenant, "bob")
    other_tenant = await clients(url, tenant + "x", "alice")
    assert [r["type"] for r in await burst(first, 2)] == ["ack", "ack"]
    assert [r["type"] for r in await burst(second, 2)] == ["ack", "error"]  # 3 shared
    assert len(refused(await burst(first, 1))) == 1
    assert [r["type"] for r in await burst(bob, 3)] == ["ack"] * 3  # his own bucket
    assert [r["type"] for r in await burst(other_tenant, 3)] == ["ack"] * 3


async def test_limits_command_shows_rates_and_usage(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    gw = await start_gateway(
        msg_rate_per_conn=100,
        msg_burst_per_conn=100,
        msg_rate_per_principal=1000,
        max_connections_per_tenant=10,
        max_channels_per_connection=5,
    )
    url = gateway_url(gw)
    client = await clients(url, tenant, "alice")
    await clients(url, tenant, "alice")
    before = (await client.command(ROOM, CHANNEL, "limits"))["payload"]
    assert before["status"] == "success", before
    result = before["result"]
    assert result["rates"]["connection"]["msgs_per_s"] == 100
    assert result["rates"]["principal"]["connections_on_gateway"] == 2
    assert result["usage"]["channels"] == 0 and result["usage"]["max_channels"] == 5
    assert result["tenant"] == {"connections": 2, "max_connections": 10, "max_stored_bytes": 0}
    assert result["limits"]["max_in_flight"] > 0

    await client.join(ROOM, CHANNEL)
    for _ in range(5):
        await client.publish(ROOM, CHANNEL, {"n": 1})
    after = (await client.command(ROOM, CHANNEL, "limits"))["payload"]["result"]
    conn_before, conn_after = result["rates"]["connection"], after["rates"]["connection"]
    # The limits command itself counts: 1 + join + 5 events + this one.
    assert after["rates"]["connection"]["msgs_last_s"] >= conn_before["msgs_last_s"] + 6
    assert conn_after["bytes_last_s"] > conn_before["bytes_last_s"]
    assert conn_after["msg_tokens"] < conn_before["msg_tokens"]
    assert after["usage"]["channels"] == 1


async def test_max_channels_per_connection_answers_limit_exceeded(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    gw = await start_gateway(max_channels_per_connection=1)
    client = await clients(gateway_url(gw), tenant, "alice")
    await client.join(ROOM, "one")
    reply = await client.command(ROOM, "two", "join_channel")
    assert reply["payload"]["status"] == "error"
    assert reply["payload"]["error"]["code"] == "limit_exceeded"
    assert "1 channels" in reply["payload"]["error"]["message"]


async def test_tenant_connection_cap_refuses_with_429_and_spares_other_tenants(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    gw = await start_gateway(max_connections_per_tenant=2)
    url = gateway_url(gw)
    await clients(url, tenant, "a")
    await clients(url, tenant, "b")
    with pytest.raises(InvalidStatus) as refusal:
        await WsClient.connect(url, tenant, "c")
    response = refusal.value.response
    assert response.status_code == 429
    body = orjson.loads(response.body or b"")
    assert body["error"] == "limit_exceeded"
    assert "max_connections_per_tenant" in body["message"] and body["retry_after_ms"] > 0
    await clients(url, tenant + "x", "c")  # another tenant is unaffected


async def _wait_for_report(gw: Gateway, tenant: str, count: int) -> None:
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


async def test_tenant_connection_cap_counts_connections_on_other_gateways(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    gw_a = await start_gateway(max_connections_per_tenant=2, health_interval_s=0.5)
    gw_b = await start_gateway(max_connections_per_tenant=2, health_interval_s=0.5)
    await clients(gateway_url(gw_a), tenant, "a")
    await clients(gateway_url(gw_b), tenant, "b")
    await _wait_for_report(gw_a, tenant, 1)
    with pytest.raises(InvalidStatus) as refusal:
        await WsClient.connect(gateway_url(gw_a), tenant, "c")
    assert refusal.value.response.status_code == 429
    limits = await (await clients(gateway_url(gw_a), tenant + "x", "d")).command(
        ROOM, CHANNEL, "limits"
    )
    assert limits["payload"]["result"]["tenant"]["connections"] == 1  # its own tenant


async def test_tenant_stored_bytes_quota_refuses_new_events_and_keeps_history(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    gw = await start_gateway(tenant_max_bytes=32 * 1024, msg_rate_per_conn=0)
    url = gateway_url(gw)
    client = await clients(url, tenant, "alice")
    acked: dict[str, int] = {}
    quota_error = None
    for i in range(200):  # 32 KiB of ~1.2 kB events: full well before 200
        msg_id = f"q{i}"
        reply = await client.publish(ROOM, CHANNEL, {"pad": "y" * 1024}, id=msg_id)
        if reply["type"] == "ack":
            acked[msg_id] = reply["payload"]["seq"]
            continue
        quota_error = reply["payload"]
        break
    assert quota_error is not None, "the quota was never reached"
    assert quota_error["code"] == "quota_exceeded", quota_error
    assert quota_error["request_id"] == msg_id and quota_error["retryable"] is False
    assert len(acked) >= 10

    # Nothing acked is lost (discard NEW keeps the history), in order, each once.
    stored = await stored_ids(client)
    assert stored == list(acked)

    # Another tenant has its own quota.
    other = await clients(url, tenant + "x", "bob")
    assert (await other.publish(ROOM, CHANNEL, {"pad": "y" * 1024}))["type"] == "ack"


async def test_quota_is_applied_to_an_existing_stream(
    start_gateway: GatewayFactory, clients: Connect, tenant: str, nats_cluster: LocalCluster
) -> None:
    plain = await start_gateway()
    writer = await clients(gateway_url(plain), tenant, "alice")
    assert (await writer.publish(ROOM, CHANNEL, {"n": 1}))["type"] == "ack"
    quota = await start_gateway(tenant_max_bytes=1 << 20)
    client = await clients(gateway_url(quota), tenant, "alice")
    assert (await client.publish(ROOM, CHANNEL, {"n": 2}))["type"] == "ack"
    async with jetstream_manager(nats_cluster) as jsm:
        info = await jsm.stream_info(quota.broker.scheme.stream_name(tenant))
    assert info.config.max_bytes == 1 << 20
    assert info.config.discard == "new"  # a full tenant is refused, its history kept


async def test_garbage_and_answers_to_nothing_count_against_the_rate(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    # Frames that do not parse, and command_responses that answer no delivery, cost a token
    # each like any other frame: a flood of them is refused with rate_limited.
    gw = await start_gateway(msg_rate_per_conn=1, msg_burst_per_conn=2, bytes_rate_per_conn=0)
    client = await clients(gateway_url(gw), tenant, "alice")
    start = len(client.received)
    for _ in range(6):
        await client.send(b"{not json")
    bogus = [new_id("r") for _ in range(6)]
    for answer_id in bogus:
        await client.send(
            {
                "id": answer_id,
                "type": "command_response",
                "room": ROOM,
                "channel": CHANNEL,
                "payload": {"request_id": "nothing", "status": "success", "result": {}},
            }
        )
    for answer_id in bogus:
        await client.reply_to(answer_id, start=start)
    errors = [m["payload"]["code"] for m in client.received[start:] if m["type"] == "error"]
    assert len(errors) == 12, errors
    assert errors.count("rate_limited") >= 9, errors  # 2 at once, ~1 more per second
    assert not client.closed.is_set()
