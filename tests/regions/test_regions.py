"""Regions end to end: a real supercluster (3+3+3 NATS nodes and a witness), the real
``arqonbus mesh`` CLI, one gateway per region.

Run with `make test-regions`. The measured figures (cross-region latency, failover time) are
printed; they are not asserted (habit 8: benchmarks, not timed tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.mesh.regions import RegionOps
from arqonbus_server.mesh.supercluster import LocalSupercluster, free_port_mesh
from arqonbus_server.shared.regions import MeshFile, Placement
from chaos.regions import RegionMesh, region_loss, region_tenants
from chaos.scenarios import Outcome, Plan, run_scenario
from chaos.workload import ChannelRef, Workload
from tests.conftest import gateway_url
from tests.support import WsClient
from tests.timeouts import SEC, eventually

REGIONS = {"east": 3, "west": 3, "south": 3}
TENANTS = [
    {"name": "acme", "home": "east", "mirrors": ["west", "south"], "max_age_s": 3600},
    {"name": "fo", "home": "east", "mirrors": ["west", "south"], "max_age_s": 3600},
    *region_tenants(["rl"], home="east"),  # region loss through the gateways (acks: mirrored)
]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
async def supercluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[LocalSupercluster]:
    base = tmp_path_factory.mktemp("supercluster")
    mesh = free_port_mesh(REGIONS, TENANTS, witness=True, store_root=str(base))
    cluster = LocalSupercluster(mesh, base)
    await cluster.start(timeout=90 * SEC)
    try:
        yield cluster
    finally:
        await cluster.stop()


def write_mesh(mesh: MeshFile, path: Path, **tenant_changes: Any) -> Path:
    data = mesh.model_dump(mode="json")
    for tenant in data["tenants"]:
        tenant.update(tenant_changes)
    path.write_text(yaml.safe_dump(data))
    return path


async def arqonbus(*args: str) -> tuple[int, str]:
    """The real CLI as a child process: its exit code and its output (stdout + stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120 * SEC)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.fixture(scope="module")
async def provisioned(
    supercluster: LocalSupercluster, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = write_mesh(supercluster.mesh, tmp_path_factory.mktemp("file") / "mesh.yaml")
    nats = ",".join(supercluster.region_urls("west"))
    code, out = await arqonbus("mesh", "provision", str(path), "--nats", nats)
    assert code == 0, out
    assert out.count("created primary") == 3 and out.count("created mirror") == 6, out
    return path


GatewayAt = Callable[[str], Awaitable[Gateway]]


@pytest.fixture
async def gateway_in(supercluster: LocalSupercluster) -> AsyncIterator[GatewayAt]:
    started: list[Gateway] = []

    async def start(region: str) -> Gateway:
        settings = load_settings(
            nats=",".join(supercluster.region_urls(region)),
            listen="127.0.0.1:0",
            auth="dev",
            node_id=f"gw-{region}-{len(started)}",
        )
        gateway = Gateway(settings)
        await gateway.start()
        started.append(gateway)
        await gateway.wait_ready(30 * SEC)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            await gateway.close()


async def test_provision_twice_changes_nothing(supercluster: LocalSupercluster, provisioned: Path):
    nats = ",".join(supercluster.region_urls("south"))
    code, out = await arqonbus("mesh", "provision", str(provisioned), "--nats", nats)
    assert code == 0, out
    assert "nothing to do" in out and "created" not in out and "updated" not in out, out
    code, out = await arqonbus("mesh", "plan", str(provisioned), "--nats", nats)
    assert code == 0, out
    assert out.count("nothing  ") == 9, out


async def test_plan_refuses_a_shorter_retention(
    supercluster: LocalSupercluster, provisioned: Path, tmp_path: Path
):
    lower = write_mesh(supercluster.mesh, tmp_path / "lower.yaml", max_age_s=60)
    nats = ",".join(supercluster.region_urls("east"))
    code, out = await arqonbus("mesh", "plan", str(lower), "--nats", nats)
    assert code == 4, out
    assert "refuse   primary arq_acme" in out and "max_age_s 3600.0 -> 60.0" in out, out
    code, out = await arqonbus("mesh", "provision", str(lower), "--nats", nats)
    assert code == 4 and "refused" in out, out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_publish_in_one_region_reaches_the_others_in_order(
    provisioned: Path, gateway_in: GatewayAt
):
    east, west, south = [await gateway_in(r) for r in ("east", "west", "south")]
    publisher = await WsClient.connect(gateway_url(east), "acme", "alice")
    readers = [await WsClient.connect(gateway_url(g), "acme", "bob") for g in (west, south)]
    try:
        for reader in readers:
            await reader.join("r", "c")
        count = 200
        sent: dict[int, float] = {}
        acked = []
        for i in range(count):
            sent[i] = time.perf_counter()
            ack = await publisher.publish("r", "c", {"i": i})
            acked.append(ack["payload"]["seq"])
        for reader in readers:
            events = await reader.wait_events(count, timeout=30 * SEC)
            assert [e["seq"] for e in events] == acked
            assert [e["payload"]["i"] for e in events] == list(range(count))
        latencies = await _latencies(publisher, readers[0])
        print(
            f"\ncross-region publish->deliver (east->west, loopback, {len(latencies)} events): "
            f"p50 {_percentile(latencies, 0.5) * 1000:.2f} ms, "
            f"p99 {_percentile(latencies, 0.99) * 1000:.2f} ms"
        )
    finally:
        for client in (publisher, *readers):
            await client.close()


async def _latencies(publisher: WsClient, reader: WsClient, count: int = 300) -> list[float]:
    """Publish ``count`` events one by one; the time from send to delivery on ``reader``."""
    out = []
    for i in range(count):
        start = len(reader.events())
        began = time.perf_counter()
        await publisher.send(
            {"id": f"lat-{i}", "type": "event", "room": "r", "channel": "c", "payload": {"i": i}}
        )
        await reader.wait_events(start + 1, timeout=10 * SEC)
        out.append(time.perf_counter() - began)
    return out


async def test_failover_and_failback_keep_seqs(
    supercluster: LocalSupercluster, provisioned: Path, gateway_in: GatewayAt
):
    east, west = await gateway_in("east"), await gateway_in("west")
    publisher = await WsClient.connect(gateway_url(east), "fo", "alice")
    reader = await WsClient.connect(gateway_url(west), "fo", "bob")
    await reader.join("r", "c")
    acked = [(await publisher.publish("r", "c", {"i": i}))["payload"]["seq"] for i in range(20)]
    await reader.wait_events(20, timeout=15 * SEC)
    await publisher.close()
    mirror = "arq-mirror-west_fo"
    ops_nats = ",".join(supercluster.region_urls("west"))
    await _wait_mirrored(supercluster, mirror, acked[-1])

    killed = time.perf_counter()
    await east.close()
    await supercluster.kill_region("east")
    code, out = await arqonbus("mesh", "failover", "fo", "--to", "west", "--nats", ops_nats)
    assert code == 0, out
    print("\n" + out)
    seq = await _publish_in(supercluster, "west", 20)
    rto = time.perf_counter() - killed
    assert seq == acked[-1] + 1
    [*_, event] = await reader.wait_events(21, timeout=15 * SEC)
    assert event["seq"] == acked[-1] + 1
    placement = await _placement(supercluster, "fo")
    assert placement.epoch == 2 and placement.primary.stream == mirror
    assert placement.epochs[-1].start_seq == acked[-1] + 1
    print(f"failover RTO (region kill -> first ack in west, tool run at once): {rto:.2f} s")

    await supercluster.start_region("east")
    code, out = await arqonbus("mesh", "failback", "fo", "--nats", ops_nats)
    assert code == 0, out
    print(out)
    placement = await _placement(supercluster, "fo")
    assert placement.epoch == 3 and placement.primary.stream == "arq_fo"
    assert placement.epochs[-1].start_seq == acked[-1] + 2
    assert await _publish_in(supercluster, "east", 21) == acked[-1] + 2
    events = await reader.wait_events(22, timeout=15 * SEC)
    assert [e["seq"] for e in events] == list(range(1, acked[-1] + 3))

    async def plan_is_clean() -> bool:
        # The restarted region's other streams answer once they have elected leaders.
        code, _ = await arqonbus("mesh", "plan", str(provisioned), "--nats", ops_nats)
        return code == 0

    await eventually(plan_is_clean, 60 * SEC, "mesh plan: nothing to do after failback")
    await reader.close()


async def _publish_in(supercluster: LocalSupercluster, region: str, i: int) -> int:
    """Store one more event through a JetStream publish to ``region``'s servers; its seq.

    The body is a copy of the first stored envelope (as the gateway wrote it). Gateways that
    follow the placement record are tested with the gateway's region support; a plain
    gateway would try to re-create the tenant's original stream.
    """
    nc = await nats.connect(supercluster.region_urls(region))
    try:
        primary = (await _placement(supercluster, "fo")).primary.stream
        first = await nc.jsm().get_msg(primary, 1)
        assert first.subject is not None and first.data is not None
        ack = await nc.jetstream(timeout=10 * SEC).publish(
            first.subject, first.data, headers={"Nats-Msg-Id": f"fo-{i}"}
        )
        return ack.seq
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def _ops(supercluster: LocalSupercluster) -> AsyncIterator[RegionOps]:
    nc = await nats.connect(supercluster.region_urls("west"))
    try:
        yield RegionOps(nc, supercluster.mesh.scheme, say=lambda _: None)
    finally:
        await nc.close()


async def _placement(supercluster: LocalSupercluster, tenant: str) -> Placement:
    async with _ops(supercluster) as ops:
        found = await ops.placement(tenant)
    assert found is not None
    return found


async def _wait_mirrored(supercluster: LocalSupercluster, stream: str, seq: int) -> None:
    async with _ops(supercluster) as ops:

        async def caught_up() -> bool:
            info = await ops.info(stream)
            return info is not None and info.state.last_seq >= seq

        await eventually(caught_up, 15 * SEC, f"{stream} holds seq {seq}")


async def test_a_region_lost_under_load_through_real_gateways(
    supercluster: LocalSupercluster, provisioned: Path, tmp_path: Path
) -> None:
    """Issue 15's failover, through gateways: one gateway process per region
    (``ARQONBUS_REGION``), SDK publishers on east's gateway (west's and south's as
    fallbacks), SDK subscribers on west's. kill -9 every node of east and its gateway under
    load, ``arqonbus mesh failover rl --to west`` at once, load on, restart east, ``arqonbus
    mesh failback rl``, load on. The chaos ledger (chaos/workload.py) checks: every acked
    id is stored once and reaches each subscriber once, at its acked seq, in order, with no
    gap signal; the epochs go 1, 2, 3."""
    mesh = RegionMesh(tmp_path, supercluster=supercluster)
    refs = [ChannelRef("rl", "plant", f"line{c}") for c in range(2)]
    plan = Plan(long=False)

    def workload(urls: list[str], channels: list[ChannelRef]) -> Workload:
        east, west, south = (mesh.url(r) for r in ("east", "west", "south"))
        return Workload(
            urls,
            channels,
            rate=plan.rate,
            subscribers_per_channel=1,
            publisher_urls=[[east, west, south]],
            subscriber_urls=[[west, south]],
        )

    async def fault(m: RegionMesh, wl: Workload, p: Plan, o: Outcome) -> None:
        assert {c.url for n, c in wl.clients.items() if n.startswith("sub")} == {m.url("west")}
        assert {c.url for n, c in wl.clients.items() if n.startswith("pub")} == {m.url("east")}
        await region_loss(m, wl, p, o, home="east", to="west", steady_s=5.0)

    outcome = Outcome(0, "region loss", "kill east", "0 acked lost")
    await run_scenario(
        outcome, plan, tmp_path, fault, mesh=mesh, channels=refs, workload_factory=workload
    )
    row = outcome.as_dict()
    measures = row["measures"]
    latency = measures.get("publish_to_deliver_ms_before_fault", {})
    print(
        f"\nregion loss through gateways: {row['acked']} acked, RPO (acked but lost) {row['lost']}, "
        f"duplicated {row['duplicated']}, out of order {row['out_of_order']}, gaps {row['gaps']}; "
        f"RTO (kill -> first ack after the failover, tool run at once) {measures.get('rto_s')} s; "
        f"failover tool {measures.get('failover_tool_s')} s, failback tool "
        f"{measures.get('failback_tool_s')} s; publish->deliver east->west under load "
        f"p50 {latency.get('p50')} ms, p99 {latency.get('p99')} ms (n {latency.get('n')})"
    )
    for tool in ("failover_steps", "failback_steps"):
        for line in measures.get(tool, {}).get("rl", []):
            print(f"  {tool.split('_')[0]} {line}")
    for check in row["checks"]:
        print(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['what']}: {check['observed']}")
    failed = [c for c in row["checks"] if not c["ok"]]
    assert row["error"] is None, row["error"]
    assert row["acked"] > 0 and row["lost"] == 0, row["examples"]
    assert row["duplicated"] == 0 and row["out_of_order"] == 0 and row["gaps"] == 0, row["examples"]
    assert row["stored_duplicates"] == 0 and not row["subscriber_errors"], row
    assert not failed, failed
