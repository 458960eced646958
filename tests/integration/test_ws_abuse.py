"""Malformed and abusive WebSocket framing against a real gateway.

The attacks (raw sockets, hand-built frames) live in chaos/frames.py, which runs them
at larger counts for `make chaos`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.mesh.local import LocalCluster
from chaos.frames import (
    ATTACKS,
    MEMORY_MIX,
    RawWs,
    Target,
    attack,
    attack_many,
    round_trip,
)
from chaos.procfs import rss_bytes
from tests.conftest import GatewayFactory, gateway_url
from tests.support import GatewayProcess, WsClient

ClientFactory = Callable[..., Awaitable[WsClient]]

# Without the fragment limit in gateway/ws/transport.py, 200 of these grew the gateway by
# ~40 MiB (one-byte fragment floods held ~1 MB each); with it, by ~1 MiB.
RSS_GROWTH_BUDGET = 20 * 1024 * 1024


def target_of(gateway: Gateway, tenant: str) -> Target:
    return Target("127.0.0.1", gateway.address[1], 2 * gateway.settings.max_envelope_bytes, tenant)


async def assert_served(
    bystander: WsClient, gateway: Gateway, tenant: str, clients: ClientFactory
) -> None:
    """The bystander is still connected and answered, and a new client gets in."""
    ack = await bystander.publish("abuse", "bystander", {"after": "attack"})
    assert ack["type"] == "ack", ack
    newcomer = await clients(gateway_url(gateway), tenant, "newcomer")
    assert newcomer.welcome is not None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("oversized", "closed 1009"),  # one frame above the maximum message size
        ("fragment_overflow", "closed 1009"),  # 1 KiB fragments past the maximum in total
        ("fragment_count", "closed 1009"),  # 5000 one-byte fragments
        ("huge_length", "closed 1009"),  # declares 2**63-1 bytes, sends 16
        ("invalid_utf8", "closed 1007"),  # a text frame that is not UTF-8
        ("close_mid_message", "closed 1000"),  # a Close between fragments is answered
    ],
)
async def test_bad_framing_is_closed_and_others_are_served(
    start_gateway: GatewayFactory, tenant: str, clients: ClientFactory, name: str, expected: str
) -> None:
    gateway = await start_gateway()
    bystander = await clients(gateway_url(gateway), tenant, "bystander")

    outcome = await attack(target_of(gateway, tenant), name)

    assert outcome.ok, outcome
    assert outcome.detail == expected, outcome
    await assert_served(bystander, gateway, tenant, clients)


async def test_message_in_many_tiny_fragments_within_limits_is_processed(
    start_gateway: GatewayFactory, tenant: str, clients: ClientFactory
) -> None:
    gateway = await start_gateway()
    bystander = await clients(gateway_url(gateway), tenant, "bystander")
    target = target_of(gateway, tenant)

    outcomes = await attack_many(target, ("tiny_fragments",), 20)

    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    assert all(o.detail.endswith("then closed 1000") for o in outcomes), outcomes[0]
    await assert_served(bystander, gateway, tenant, clients)


async def test_gateway_memory_stays_bounded_under_frame_abuse(
    nats_cluster: LocalCluster,
    gateway_processes: Callable[..., Awaitable[GatewayProcess]],
    tenant: str,
) -> None:
    gateway = await gateway_processes(nats_cluster.url_csv)
    assert gateway.proc is not None
    pid = gateway.proc.pid
    target = Target("127.0.0.1", gateway.port, 2 * load_settings().max_envelope_bytes, tenant)
    bystander = await RawWs.open(target.host, target.port, target.token("bystander"))
    try:
        # Each attack once first: the gateway's own warm-up is not what is measured.
        warm = [await attack(target, name) for name in ATTACKS]
        assert all(o.ok for o in warm), [o for o in warm if not o.ok]
        before = rss_bytes(pid)

        outcomes = await attack_many(target, MEMORY_MIX, 200)

        after = rss_bytes(pid)
        assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:5]
        assert gateway.proc.returncode is None
        assert after - before < RSS_GROWTH_BUDGET, (before, after)
        assert await round_trip(bystander)
    finally:
        bystander.abort()


async def test_the_upgrade_headers_are_not_kept_for_the_connections_life(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    # A browser's upgrade carries kilobytes of headers (cookies, user agent): the gateway
    # reads them during the upgrade and keeps none of them per connection.
    gateway = await start_gateway()
    big = {"Cookie": "c=" + "x" * 4000, "User-Agent": "ua " * 100}
    alice = await WsClient.connect(gateway_url(gateway), tenant, "alice", additional_headers=big)
    try:
        (session,) = [s for s in gateway.sessions if s.principal.id == "alice"]
        conn = session.socket._conn
        assert conn.request is not None and conn.response is not None
        assert len(conn.request.headers) == 0 and len(conn.response.headers) == 0
        await alice.join("r", "c")  # and the connection works on
        assert (await alice.publish("r", "c", {"n": 1}))["type"] == "ack"
        assert len(await alice.wait_events(1, "r", "c")) == 1
    finally:
        await alice.close()
