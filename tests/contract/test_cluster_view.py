"""The ClusterView's guarantees (mesh/ports.py), against every implementation."""

from __future__ import annotations

import time

from tests.contract.conftest import Mesh
from tests.timeouts import eventually

LONG_TTL_S = 60.0
SHORT_TTL_S = 1.0
EXPIRY_SLACK_S = 1.0  # the store's expiry delay, and a busy 2-core machine


async def test_gateways_returns_the_latest_heartbeat_of_each_node_in_node_order(
    mesh: Mesh,
) -> None:
    first, second = await mesh.cluster_views(2)
    await first.announce("node-b", b'{"n":"b1"}', LONG_TTL_S)
    await first.announce("node-b", b'{"n":"b2"}', LONG_TTL_S)
    await second.announce("node-a", b'{"n":"a1"}', LONG_TTL_S)
    assert await first.gateways() == [b'{"n":"a1"}', b'{"n":"b2"}']
    assert await second.gateways() == [b'{"n":"a1"}', b'{"n":"b2"}']


async def test_a_heartbeat_leaves_the_view_once_its_ttl_has_passed(mesh: Mesh) -> None:
    view, other = await mesh.cluster_views(2)
    announced = time.monotonic()
    await view.announce("dies", b"d", SHORT_TTL_S)
    assert await other.gateways() == [b"d"]

    async def gone() -> bool:
        remaining = await other.gateways()
        assert remaining in ([], [b"d"])
        return remaining == []

    await eventually(gone, SHORT_TTL_S + EXPIRY_SLACK_S, "the heartbeat aged out")
    assert time.monotonic() - announced >= SHORT_TTL_S * 0.9  # not before its TTL


async def test_announcing_again_keeps_a_node_in_the_view(mesh: Mesh) -> None:
    (view,) = await mesh.cluster_views(1)
    deadline = time.monotonic() + 2 * SHORT_TTL_S
    while time.monotonic() < deadline:  # each turn awaits the store: bounded by the deadline
        await view.announce("alive", b"a", SHORT_TTL_S)
        assert await view.gateways() == [b"a"]


async def test_withdraw_removes_the_node_at_once_and_only_it(mesh: Mesh) -> None:
    first, second = await mesh.cluster_views(2)
    await first.announce("leaving", b"l", LONG_TTL_S)
    await first.announce("staying", b"s", LONG_TTL_S)
    await second.withdraw("leaving")
    assert await first.gateways() == [b"s"]
    await second.withdraw("never-announced")  # not an error
    await first.announce("leaving", b"back", LONG_TTL_S)
    assert await first.gateways() == [b"back", b"s"]


async def test_a_node_id_that_is_not_a_subject_token_still_announces(mesh: Mesh) -> None:
    (view,) = await mesh.cluster_views(1)
    await view.announce("host.example.com-1234", b"h", LONG_TTL_S)
    assert await view.gateways() == [b"h"]
    await view.withdraw("host.example.com-1234")
    assert await view.gateways() == []


async def test_nats_servers_lists_every_server_and_the_connected_one(mesh: Mesh) -> None:
    (view,) = await mesh.cluster_views(1)
    servers = await view.nats_servers(timeout=2.0)
    assert [s.url for s in servers] == sorted(s.url for s in servers)
    assert len(servers) == (3 if mesh.kind == "jetstream" else 1)
    assert all(s.reachable and s.name and s.jetstream for s in servers)
    assert len({s.name for s in servers}) == len(servers)
    connected = [s for s in servers if s.connected]
    assert len(connected) == 1
    assert view.connected_server() == (connected[0].name, connected[0].url)
