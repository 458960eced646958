"""Failover picks no mirror that holds less than another: with ``acks: mirrored`` an event is
acknowledged once ANY mirror holds it, so promoting a mirror that lags another would drop
acknowledged events.

A small supercluster (3 regions of one NATS node and a witness; R1 streams). West's node is
down while events 11-20 are stored, so only south's mirror has them; then east (the home
region) is lost and west comes back, unable to catch up.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import yaml

from arqonbus_server.mesh.supercluster import LocalSupercluster, free_port_mesh
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.timeout(300)

TENANT = "lag"


@pytest.fixture
async def supercluster(tmp_path: Path) -> AsyncIterator[LocalSupercluster]:
    tenants = [{"name": TENANT, "home": "east", "mirrors": ["west", "south"], "replicas": 1}]
    regions = {"east": 1, "west": 1, "south": 1}
    mesh = free_port_mesh(regions, tenants, witness=True, store_root=str(tmp_path / "data"))
    cluster = LocalSupercluster(mesh, tmp_path)
    await cluster.start(timeout=90 * SEC)
    try:
        yield cluster
    finally:
        await cluster.stop()


async def arqonbus(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120 * SEC)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def last_seq(urls: list[str], stream: str) -> int:
    nc = await nats.connect(urls, connect_timeout=2, max_reconnect_attempts=1)
    try:
        return int((await nc.jsm(timeout=2).stream_info(stream)).state.last_seq or 0)
    finally:
        await nc.close()


async def test_failover_refuses_a_mirror_that_holds_less_than_another(
    supercluster: LocalSupercluster, tmp_path: Path
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(supercluster.mesh.model_dump(mode="json")))
    south = ",".join(supercluster.region_urls("south"))
    code, out = await arqonbus("mesh", "provision", str(path), "--nats", south)
    assert code == 0, out
    east_urls = supercluster.region_urls("east")
    south_urls = supercluster.region_urls("south")
    west_mirror, south_mirror = f"arq-mirror-west_{TENANT}", f"arq-mirror-south_{TENANT}"

    nc = await nats.connect(east_urls, connect_timeout=2)
    js = nc.jetstream(timeout=5)
    try:
        for i in range(1, 11):
            await js.publish(
                f"arq.ev.{TENANT}.room.chan", b"%d" % i, headers={"Nats-Msg-Id": str(i)}
            )

        async def both_mirrored() -> bool:
            seqs = [
                await last_seq(supercluster.region_urls(r), m)
                for r, m in (("west", west_mirror), ("south", south_mirror))
            ]
            return seqs == [10, 10]

        await eventually(both_mirrored, 30 * SEC, "both mirrors at seq 10")
        await supercluster.kill_region("west")
        for i in range(11, 21):
            await js.publish(
                f"arq.ev.{TENANT}.room.chan", b"%d" % i, headers={"Nats-Msg-Id": str(i)}
            )

        async def south_has_all() -> bool:
            return await last_seq(south_urls, south_mirror) == 20

        await eventually(south_has_all, 30 * SEC, "south's mirror at seq 20")
    finally:
        await nc.close()
    await supercluster.kill_region("east")
    await supercluster.start_region("west", timeout=60 * SEC)

    code, out = await arqonbus("mesh", "failover", TENANT, "--to", "west", "--nats", south)
    assert code == 4, out  # refused
    assert "holds up to seq 20, more than" in out and "Fail over to south" in out, out
    assert await last_seq(south_urls, south_mirror) == 20  # nothing was changed

    code, out = await arqonbus("mesh", "failover", TENANT, "--to", "south", "--nats", south)
    assert code == 0, out
    assert "epoch 2 from seq 21" in out, out
