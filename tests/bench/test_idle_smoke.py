"""The idle-connections workload opens real sessions and measures the server's RSS."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from arqonbus_server.mesh.local import LocalCluster
from bench.idle import run_idle
from bench.peers import start_peer
from tests.support import GatewayProcess
from tests.timeouts import SEC

N = 300


def _check(report: dict[str, Any], kind: str) -> None:
    assert report["kind"] == kind
    assert report["errors"]["count"] == 0, report
    assert report["n_open"] == N, report
    assert report["clients"] >= 2  # the multi-process, multi-source-address path
    assert report["upgrades_per_s"] > 0, report
    assert report["rss_per_conn_kb"] > 0, report
    assert report["server_rss_after_kb"] > report["server_rss_before_kb"]
    assert report["dropped_while_held"] == 0, report


@pytest.mark.integration
async def test_idle_against_gateway(
    nats_cluster: LocalCluster,
    gateway_processes: Callable[..., Awaitable[GatewayProcess]],
) -> None:
    # Two gateway processes: connections are spread over both and RSS is summed.
    gateways = [await gateway_processes(nats_cluster.url_csv) for _ in range(2)]
    targets = [(gw.proc.pid, gw.url) for gw in gateways if gw.proc is not None]
    assert len(targets) == 2
    report = await run_idle("arqonbus", targets, N, timeout=15 * SEC)
    _check(report, "arqonbus")
    assert report["targets"] == 2


async def test_idle_against_python_socketio() -> None:
    peer = await start_peer("socketio-py", 0)
    try:
        report = await run_idle("socketio-py", [(peer.pid, peer.url)], N, timeout=15 * SEC)
    finally:
        await peer.stop()
    _check(report, "socketio-py")
