"""NetnsCluster: nodes in their own network namespaces; a partition cuts a node's routes.

Needs root and iproute2; without them these tests fail (NetnsError), they never skip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from chaos.netns import NetnsCluster, cleanup_stale, existing_names
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

STREAM = "PART"
CONFIG = StreamConfig(name=STREAM, subjects=["part.>"], num_replicas=3)
# Raft: a follower campaigns 4-9 s after it last heard its leader; allow a second round.
ELECTION_TIMEOUT = 40.0


async def publish_outcome(nc: Client, payload: bytes, timeout: float) -> str:
    """Publish through ``nc``; return "ack <seq>" or the name of the error it failed with."""
    try:
        ack = await nc.jetstream(timeout=timeout).publish("part.x", payload)
    except (TimeoutError, nats.errors.Error) as exc:
        return type(exc).__name__
    return f"ack {ack.seq}"


def resources(cluster: NetnsCluster) -> list[str]:
    namespaces, links = existing_names()
    return [name for name in namespaces + links if cluster.tag in name]


async def test_partitioned_leader_minority_acks_nothing_and_converges_after_heal(
    tmp_path: Path,
) -> None:
    cluster = NetnsCluster(tmp_path / "netns", nodes=3)
    async with cluster as c:
        pids = [pid for pid in c.pids if pid is not None]
        assert len(pids) == 3
        # Every node runs in its own namespace, reached from here over the client bridge.
        root_netns = os.readlink("/proc/self/ns/net")
        assert len({os.readlink(f"/proc/{pid}/ns/net") for pid in pids} - {root_netns}) == 3
        # A cleanup of stale runs leaves a live run alone.
        cleanup_stale()
        assert len(resources(c)) == 3 + 2 + 6  # namespaces, bridges, host-side veths

        async with c.connect() as nc:
            js = nc.jetstream(timeout=10 * SEC)
            await js.add_stream(CONFIG)
            acked = [(await js.publish("part.x", f"before-{k}".encode())).seq for k in range(3)]
        assert acked == [1, 2, 3]
        leader = await c.wait_stream_leader(STREAM, timeout=ELECTION_TIMEOUT)

        await c.partition(leader)
        assert c.connected_nodes() == [i for i in range(3) if i != leader]
        async with c.connect(leader) as minority:
            # The cut node is still reachable by clients, but cannot reach a quorum.
            first = asyncio.create_task(publish_outcome(minority, b"minority-1", timeout=3 * SEC))
            new_leader = await c.wait_stream_leader(
                STREAM, exclude=[leader], timeout=ELECTION_TIMEOUT
            )
            second = asyncio.create_task(publish_outcome(minority, b"minority-2", timeout=2 * SEC))
            async with c.connect() as majority:
                js = majority.jetstream(timeout=10 * SEC)
                acked += [(await js.publish("part.x", f"after-{k}".encode())).seq for k in range(3)]
            outcomes = [await first, await second]
        assert acked == [1, 2, 3, 4, 5, 6]
        assert not [o for o in outcomes if o.startswith("ack")], outcomes
        # The cut node's own replica has none of the majority's new messages.
        cut = await c.node_stream_state(leader, STREAM)
        assert cut is not None
        assert cut.last_seq == 3

        await c.heal(leader)
        assert c.partitioned == []
        healed = await c.wait_replica_last_seq(leader, STREAM, 6, timeout=30 * SEC)
        assert healed.messages == 6
        info = await asyncio.wait_for(_stream_info(c), 10 * SEC)
        assert (info.state.messages, info.state.last_seq) == (6, 6)
        assert new_leader != leader

    # stop() removed every process, namespace, veth and bridge it created.
    assert resources(cluster) == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def _stream_info(c: NetnsCluster) -> nats.js.api.StreamInfo:
    async with c.connect() as nc:
        return await nc.jetstream(timeout=5 * SEC).stream_info(STREAM)


def test_cleanup_stale_removes_leftovers_of_a_dead_run() -> None:
    tag = secrets.token_hex(2)
    while any(tag in name for names in existing_names() for name in names):
        tag = secrets.token_hex(2)
    ns, bridge = f"arqn{tag}-0", f"arqb{tag}c"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", "name", bridge, "type", "bridge"], check=True)
    # A process left inside the namespace, as a node of a killed run would be.
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"])
    try:
        removed = cleanup_stale()
        assert ns in removed
        assert bridge in removed
        assert f"pid {sleeper.pid} in {ns}" in removed
        assert sleeper.wait(timeout=10 * SEC) != 0
        namespaces, links = existing_names()
        assert ns not in namespaces
        assert bridge not in links
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], check=False, capture_output=True)
