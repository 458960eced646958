"""`arqonbus gateway --workers N`: N real gateway processes on one port, over the real cluster.

Clients of one port land on both workers (SO_REUSEPORT), see one bus, a worker killed with
SIGKILL is restarted, and SIGTERM to the supervisor drains and stops every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from arqonbus_server.gateway.admin.dev import http_status, stop_process
from arqonbus_server.mesh.local import LocalCluster, free_port, free_port_run
from tests.support import WsClient
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def text_of(path: str) -> str:
    return Path(path).read_text(errors="replace")


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


async def ready(port: int) -> bool:
    return await http_status("127.0.0.1", port, "/readyz") == 200


async def test_workers_share_a_port_restart_and_drain(
    nats_cluster: LocalCluster, tenant: str
) -> None:
    port, admin = free_port(), free_port_run(2)
    log = tempfile.NamedTemporaryFile()  # noqa: SIM115  # closed below
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_") or k.endswith("SERVER")
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", "gateway", "--workers", "2",
        "--listen", f"127.0.0.1:{port}", "--nats", nats_cluster.url_csv, "--auth", "dev",
        "--insecure-dev-auth", "--node-id", "wk",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log,
        env={**env, "ARQONBUS_WORKER_ADMIN_PORT": str(admin)}, start_new_session=True,
    )  # fmt: skip
    clients: list[WsClient] = []
    try:

        async def both_ready() -> bool:
            return await ready(admin) and await ready(admin + 1)

        await eventually(both_ready, 60 * SEC, "both workers answer /readyz on their ports")

        async def supervising() -> bool:  # the supervisor saw them ready too (a kill before
            # that is a worker failing to start: the supervisor then stops them all)
            return "2 workers serving" in text_of(log.name)

        await eventually(supervising, 10 * SEC, "the supervisor reports both workers serving")
        workers = children(proc.pid)
        assert len(workers) == 2

        # One port, two processes: the kernel spreads connections over both workers.
        url = f"ws://127.0.0.1:{port}/ws"
        for i in range(16):
            clients.append(await WsClient.connect(url, tenant, f"u{i}"))
        nodes = {c.welcome["payload"]["node"] for c in clients if c.welcome is not None}
        assert nodes == {"wk-w0", "wk-w1"}

        # One bus: a member on one worker gets what a client of the other publishes.
        member = next(c for c in clients if c.welcome and c.welcome["payload"]["node"] == "wk-w1")
        sender = next(c for c in clients if c.welcome and c.welcome["payload"]["node"] == "wk-w0")
        await member.join("r", "c")
        for n in range(3):
            assert (await sender.publish("r", "c", {"n": n}))["type"] == "ack"
        events = await member.wait_events(3, "r", "c")
        assert [e["payload"]["n"] for e in events] == [0, 1, 2]

        # A worker killed outright is replaced; the port keeps serving meanwhile.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            now = children(proc.pid)
            return len(now) == 2 and victim not in now and await both_ready()

        await eventually(replaced, 60 * SEC, "the killed worker is replaced and ready")
        late = await WsClient.connect(url, tenant, "late")
        clients.append(late)
        assert late.welcome is not None and late.welcome["payload"]["node"] in nodes

        # SIGTERM: every worker drains and exits, then the supervisor exits 0.
        workers = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60 * SEC):
            code = await proc.wait()
        log.seek(0)
        assert code == 0, log.read().decode(errors="replace")[-3000:]
        assert alive(workers) == set()
        assert "exited with -9: restarting" in text_of(log.name)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for pid in children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await stop_process(proc, 20)
        print(text_of(log.name)[-4000:])  # shown when the test fails
        log.close()


async def test_a_worker_that_cannot_start_stops_them_all(nats_cluster: LocalCluster) -> None:
    admin = free_port_run(2)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("ARQONBUS_") or k.endswith("SERVER")
    }
    with socket.socket() as taken:  # worker 1's admin port belongs to someone else
        taken.bind(("127.0.0.1", admin + 1))
        taken.listen()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arqonbus_server.gateway", "gateway", "--workers", "2",
            "--listen", f"127.0.0.1:{free_port()}", "--nats", nats_cluster.url_csv,
            "--auth", "dev", "--insecure-dev-auth", "--node-id", "bad",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
            env={**env, "ARQONBUS_WORKER_ADMIN_PORT": str(admin)},
        )  # fmt: skip
        try:
            async with asyncio.timeout(60 * SEC):
                _, err = await proc.communicate()
        finally:
            await stop_process(proc, 20)
    text = err.decode(errors="replace")
    assert proc.returncode == 1, text[-3000:]
    assert f"127.0.0.1:{admin + 1} (the gateway's admin listener) is already in use" in text
    assert "worker bad-w1 exited with 2 while starting" in text
