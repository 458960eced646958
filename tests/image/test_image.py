"""The image for real: 3 NATS nodes and 2 gateways as podman containers, a client on each gateway.

Every container runs with host networking on free 127.0.0.1 ports. The test publishes through one
gateway and receives through the other, then stops each gateway with `podman stop` (SIGTERM, the
image's STOPSIGNAL) and checks that its client is closed with 1012 (drained). Every container it
started is removed by the ID that `podman run` returned.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from arqonbus_server.mesh.local import free_port
from tests.timeouts import eventually

IMAGE = os.environ.get("ARQONBUS_IMAGE", "localhost/arqonbus:dev")
PODMAN = os.environ.get("PODMAN", "podman")
HOST = "127.0.0.1"


def podman(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} -> {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout.strip()


class Containers:
    """The containers this test started, by ID; all are removed at the end."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.run_id = uuid.uuid4().hex[:8]

    def run(self, name: str, *args: str) -> str:
        cid = podman(
            "run",
            "--detach",
            "--name",
            f"arqonbus-image-test-{self.run_id}-{name}",
            "--network",
            "host",
            *args,
        )
        self.ids.append(cid)
        return cid

    def logs(self) -> str:
        out = []
        for cid in self.ids:
            done = subprocess.run(
                [PODMAN, "logs", "--tail", "30", cid],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            out.append(f"--- {cid[:12]}\n{done.stdout}{done.stderr}")
        return "\n".join(out)

    def remove_all(self) -> None:
        for cid in reversed(self.ids):
            subprocess.run(
                [PODMAN, "rm", "--force", "--volumes", "--time", "5", cid],
                capture_output=True,
                timeout=60,
                check=False,
            )


@pytest.fixture
def containers() -> Iterator[Containers]:
    started = Containers()
    try:
        yield started
    finally:
        started.remove_all()


def nats_config(name: str, client_port: int, cluster_port: int, routes: list[str]) -> str:
    route_lines = "\n".join(f'    "{route}"' for route in routes)
    return (
        f'server_name: "{name}"\n'
        f'listen: "{HOST}:{client_port}"\n'
        "jetstream {\n"
        '  store_dir: "/data"\n'
        "  sync_interval: always\n"
        "}\n"
        "cluster {\n"
        '  name: "arqonbus-image-test"\n'
        f'  listen: "{HOST}:{cluster_port}"\n'
        f"  routes: [\n{route_lines}\n  ]\n"
        "}\n"
    )


def write_nats_configs(
    folder: Path, client_ports: list[int], cluster_ports: list[int]
) -> list[Path]:
    """One config per node, readable by the image's non-root user when mounted read-only."""
    routes = [f"nats-route://{HOST}:{port}" for port in cluster_ports]
    folder.chmod(0o755)
    confs = []
    for i, (client_port, cluster_port) in enumerate(zip(client_ports, cluster_ports, strict=True)):
        conf = folder / f"n{i}.conf"
        conf.write_text(nats_config(f"n{i}", client_port, cluster_port, routes))
        conf.chmod(0o644)
        confs.append(conf)
    return confs


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


async def wait_ready(port: int, containers: Containers, timeout: float = 90) -> None:
    async def ready() -> bool:
        return await asyncio.to_thread(http_status, port, "/readyz") == 200

    try:
        await eventually(ready, timeout, f"gateway on {port} ready")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{containers.logs()}") from None


async def recv_json(ws: ClientConnection, timeout: float = 15) -> dict[str, Any]:
    return dict(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


def test_image_metadata() -> None:
    image = json.loads(podman("image", "inspect", IMAGE))[0]
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["arqonbus"]
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])
    labels = config["Labels"]
    for key in ("title", "version", "revision", "created", "licenses", "source"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    tools = podman(
        "run",
        "--rm",
        "--network",
        "host",
        "--no-healthcheck",
        "--entrypoint",
        "sh",
        IMAGE,
        "-c",
        "command -v gcc cc make pip apt-get || true",
    )
    # apt-get is part of Debian's base; no compiler, make or pip in the final stage.
    assert [Path(tool).name for tool in tools.split()] in ([], ["apt-get"])


@pytest.mark.timeout(300)
async def test_mesh_from_image_publishes_across_gateways_and_drains(
    containers: Containers, tmp_path: Path
) -> None:
    # -- 3 NATS JetStream nodes: the image's nats-server, configs mounted read-only
    client_ports = [free_port(HOST) for _ in range(3)]
    cluster_ports = [free_port(HOST) for _ in range(3)]
    confs = write_nats_configs(tmp_path, client_ports, cluster_ports)
    for i, conf in enumerate(confs):
        containers.run(
            f"n{i}",
            "--no-healthcheck",
            "-v",
            f"{conf}:/etc/nats/nats.conf:ro",
            "--entrypoint",
            "nats-server",
            IMAGE,
            "-c",
            "/etc/nats/nats.conf",
        )
    nats_urls = ",".join(f"nats://{HOST}:{port}" for port in client_ports)

    # -- 2 gateways: the image's default command
    gw_ports = [free_port(HOST) for _ in range(2)]
    gw_ids = [
        containers.run(
            f"gw{i}",
            "-e",
            f"ARQONBUS_LISTEN={HOST}:{port}",
            "-e",
            f"ARQONBUS_NODE_ID=gw{i}",
            IMAGE,
            "gateway",
            "--nats",
            nats_urls,
            "--auth",
            "dev",
            "--insecure-dev-auth",
        )
        for i, port in enumerate(gw_ports)
    ]
    for port in gw_ports:
        await wait_ready(port, containers)
    for cid in gw_ids:  # the image's HEALTHCHECK, run once by hand (no systemd timers here)
        podman("healthcheck", "run", cid)

    # -- a client on each gateway: bob joins on gw1, alice publishes on gw0
    tenant = "t" + uuid.uuid4().hex[:10]
    url = "ws://{}:{}/ws?token=dev:{}:{}"
    async with (
        connect(url.format(HOST, gw_ports[0], tenant, "alice")) as alice,
        connect(url.format(HOST, gw_ports[1], tenant, "bob")) as bob,
    ):
        assert (await recv_json(alice))["type"] == "welcome"
        welcome = await recv_json(bob)
        assert welcome["payload"]["node"] == "gw1"
        await bob.send(
            json.dumps(
                {
                    "id": "join-1",
                    "type": "command",
                    "room": "science",
                    "channel": "general",
                    "payload": {"command": "join_channel", "parameters": {}},
                }
            )
        )
        joined = await recv_json(bob)
        assert joined["type"] == "command_response", joined
        assert joined["payload"]["status"] == "success", joined
        event_id = uuid.uuid4().hex
        await alice.send(
            json.dumps(
                {
                    "id": event_id,
                    "type": "event",
                    "room": "science",
                    "channel": "general",
                    "payload": {"message": "hello from the image"},
                }
            )
        )
        ack = await recv_json(alice)
        assert ack["type"] == "ack", ack
        assert ack["payload"]["seq"] >= 1
        got = await recv_json(bob)
        assert got["type"] == "event" and got["id"] == event_id, got
        assert got["from"] == "alice" and got["seq"] == ack["payload"]["seq"]
        assert got["payload"] == {"message": "hello from the image"}

        # -- podman stop: SIGTERM drains each gateway, its client is closed with 1012
        for ws, cid, port in ((alice, gw_ids[0], gw_ports[0]), (bob, gw_ids[1], gw_ports[1])):
            stop = asyncio.create_task(asyncio.to_thread(podman, "stop", "--time", "40", cid))
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            assert ws.close_code == 1012, (ws.close_code, ws.close_reason)
            await stop
            state = json.loads(podman("inspect", cid))[0]["State"]
            assert state["Status"] == "exited"
            assert state["ExitCode"] == 0, containers.logs()
            assert await asyncio.to_thread(http_status, port, "/healthz") == 0  # gone
