"""`arqonbus status`: every gateway (from heartbeats) and every NATS server of a real mesh.

Two gateway processes on the session's 3-node cluster, under a subject prefix of their own
(the heartbeat stream and its TTL are per prefix) and a 0.5 s heartbeat. A gateway killed
with SIGKILL says nothing: it must leave the list once its last heartbeat is 3 intervals old.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import signal
import sys
import time
import uuid
from typing import Any

import orjson

from arqonbus_server.mesh.local import LocalCluster
from tests.support import GatewayProcess
from tests.timeouts import SEC

INTERVAL_S = 0.5
# After the kill: the last heartbeat expires within 3 intervals; a --watch reading comes
# every interval after that; plus the reading itself on a busy 2-core machine.
GONE_WITHIN_S = 3 * INTERVAL_S + INTERVAL_S + 1.0 * SEC


def mesh_env() -> dict[str, str]:
    return {
        "ARQONBUS_SUBJECT_PREFIX": "cv" + uuid.uuid4().hex[:10],
        "ARQONBUS_HEARTBEAT_INTERVAL_S": str(INTERVAL_S),
    }


async def status(env: dict[str, str], nats: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", "status", "--nats", nats, *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **env},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30 * SEC)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Watch:
    """``arqonbus status --watch --json`` as a child process, read one reading at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, env: dict[str, str], nats: str) -> Watch:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arqonbus_server.gateway", "status", "--watch", "--json",
            "--nats", nats, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env={**os.environ, **env},
        )  # fmt: skip
        return cls(proc)

    async def reading(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 10 * SEC)
        assert line, "arqonbus status --watch stopped"
        reading: dict[str, Any] = orjson.loads(line)
        return reading

    async def until(self, wanted: Any, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while not wanted(reading := await self.reading()):
                pass
        return reading

    async def stop(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            return await asyncio.wait_for(self.proc.wait(), 10 * SEC)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise


def nodes(reading: dict[str, Any]) -> set[str]:
    return {g["node"] for g in reading["gateways"]}


def connections(reading: dict[str, Any], node: str) -> int | None:
    return next((g["connections"] for g in reading["gateways"] if g["node"] == node), None)


async def test_status_lists_both_gateways_and_a_killed_one_leaves_within_3_heartbeats(
    nats_cluster: LocalCluster, gateway_processes: Any, clients: Any
) -> None:
    env = mesh_env()
    nats = nats_cluster.url_csv
    first = await gateway_processes(nats, env={**env, "ARQONBUS_REGION": "eu-test"})
    second = await gateway_processes(nats, env=env)
    names = {f"gw-{first.port}", f"gw-{second.port}"}
    await clients(second.url, "t" + uuid.uuid4().hex[:8], "alice")

    watch = await Watch.start(env, nats)
    try:
        seen = await watch.until(
            lambda r: nodes(r) == names and connections(r, f"gw-{second.port}") == 1, 15 * SEC
        )
        check_reading(seen, nats_cluster, first, second)

        first.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await first.wait_exit(10 * SEC)
        gone = await watch.until(lambda r: f"gw-{first.port}" not in nodes(r), 30 * SEC)
        assert time.monotonic() - killed_at <= GONE_WITHIN_S
        assert nodes(gone) == {f"gw-{second.port}"}  # the live one never left
    finally:
        code = await watch.stop()
    assert code == 130  # Ctrl-C ends --watch


def check_reading(
    reading: dict[str, Any],
    cluster: LocalCluster,
    first: GatewayProcess,
    second: GatewayProcess,
) -> None:
    by_node = {g["node"]: g for g in reading["gateways"]}
    one, two = by_node[f"gw-{first.port}"], by_node[f"gw-{second.port}"]
    assert (one["region"], two["region"]) == ("eu-test", "")
    assert one["version"] == importlib.metadata.version("arqonbus-server")
    assert two["connections"] == 1 and one["connections"] == 0
    assert two["msgs_out_per_s"] >= 0 and one["interval_s"] == INTERVAL_S
    cluster_urls = {url.removeprefix("nats://") for url in cluster.urls}
    servers = reading["nats"]
    assert {s["url"] for s in servers} == cluster_urls
    assert all(s["reachable"] and s["jetstream"] for s in servers)
    assert {one["nats"]["url"], two["nats"]["url"]} <= cluster_urls
    assert {one["nats"]["name"], two["nats"]["name"]} <= {s["name"] for s in servers}


async def test_status_prints_a_table_and_says_what_to_do_when_no_gateway_runs(
    nats_cluster: LocalCluster, gateway_processes: Any
) -> None:
    env = mesh_env()
    code, out, err = await status(env, nats_cluster.url_csv)
    assert code == 0, err
    assert out.startswith("Gateways: 0\n") and "arqonbus gateway --nats" in out
    assert "NATS servers: 3" in out and "this connection" in out

    gateway = await gateway_processes(nats_cluster.url_csv, env=env)
    async with asyncio.timeout(10 * SEC):
        while f"gw-{gateway.port}" not in (out := (await status(env, nats_cluster.url_csv))[1]):
            pass
    assert "Gateways: 1" in out and "NODE" in out and "REGION" in out


async def test_status_names_the_fix_when_nats_is_unreachable() -> None:
    code, out, err = await status({}, "nats://127.0.0.1:1")
    assert code == 1 and out == ""
    assert "cannot reach NATS" in err and "--nats" in err
