"""``arqonbus dev``: a local NATS cluster plus gateways, each its own process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from arqonbus_server.mesh.containers import (
    ContainerCluster,
    ContainerEngineUnavailable,
    UnknownNatsBackend,
    backend_from_env,
    make_cluster,
)
from arqonbus_server.mesh.local import DataDirInUse, LocalCluster, NatsServerNotFound, free_port
from arqonbus_server.shared.errors import LocalClusterError

log = logging.getLogger("arqonbus.dev")

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


async def http_status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """GET a path on 127.0.0.1-style hosts; the status code, or None if nothing answers."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def http_get(host: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET a path (``Connection: close``): (status, body). Raises OSError or TimeoutError."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    return (int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0), body


class GatewayFailed(LocalClusterError, RuntimeError):
    """A gateway process exited before it was ready."""


async def wait_http_ready(
    host: str, port: int, proc: asyncio.subprocess.Process, timeout: float
) -> None:
    """Wait until /readyz answers 200, or raise if the process dies or time runs out."""
    async with asyncio.timeout(timeout):
        while await http_status(host, port, "/readyz") != 200:
            if proc.returncode is not None:
                raise GatewayFailed(f"the gateway on port {port} exited with {proc.returncode}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.1)


def gateway_command(nats: str, host: str, port: int, node_id: str, auth: str | None) -> list[str]:
    """The argv of one dev gateway; ``auth`` None leaves the methods to ``ARQONBUS_AUTH``."""
    command = [
        sys.executable, "-m", "arqonbus_server.gateway", "gateway",
        "--nats", nats, "--listen", f"{host}:{port}", "--node-id", node_id,
        "--insecure-dev-auth",  # a local dev mesh: dev tokens on purpose (when dev is on)
    ]  # fmt: skip
    return command if auth is None else [*command, "--auth", auth]


def dev_auth(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(the ``--auth`` to pass, or None to let the environment's win; the methods in force)."""
    from_env = environ.get("ARQONBUS_AUTH", "").strip()
    if from_env:
        return None, from_env
    return "dev", "dev"


async def spawn_gateway(
    nats: str, host: str, port: int, node_id: str, auth: str | None = "dev"
) -> asyncio.subprocess.Process:
    # The chat demo (/demo/chat) is on in the dev mesh unless the environment says otherwise.
    env = {"ARQONBUS_DEMO_PAGES": "true", **os.environ}
    return await asyncio.create_subprocess_exec(
        *gateway_command(nats, host, port, node_id, auth),
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


async def stop_process(proc: asyncio.subprocess.Process, timeout: float) -> None:
    """SIGTERM (drain), then SIGKILL after ``timeout``; only this process, by PID."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _check_ports(host: str, first: int, count: int, what: str, flag: str) -> None:
    import socket

    for port in range(first, first + count):
        with socket.socket() as sock:
            # Same option the servers use, so ports in TIME_WAIT after a stop count as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                raise SystemExit(
                    f"arqonbus dev: {what} port {port} on {host} is in use: stop the other "
                    f"process or pass {flag} with a free port (a second dev mesh also needs "
                    "its own --data-dir)"
                ) from None


def _data_dir_in_use(exc: DataDirInUse, data_dir: Path) -> str:
    by = f"(pid {exc.holder_pid})" if exc.holder_pid else "(another process)"
    return (
        f"arqonbus dev: {data_dir} is in use by another dev mesh {by}. Stop it, or run a "
        "second mesh on its own data directory and ports, e.g. "
        "`arqonbus dev --data-dir .arqonbus-2 --port 8865 --nats-port 4322`"
    )


# The dev mesh serves plain ws:// (its banner, readiness probe and examples say so); these
# would make its gateways (which inherit the environment) serve TLS instead.
_NOT_FOR_DEV = ("ARQONBUS_TLS_CERT", "ARQONBUS_TLS_KEY")


def _refuse_production_env(environ: Mapping[str, str]) -> str | None:
    """Why ``arqonbus dev`` cannot run with this environment, or None."""
    found = [name for name in _NOT_FOR_DEV if environ.get(name)]
    if not found:
        return None
    return (
        f"arqonbus dev: unset {' and '.join(found)}: the dev mesh serves plain ws:// on "
        "127.0.0.1. To try TLS, run `arqonbus gateway --tls-cert ... --tls-key ...` against "
        "the dev mesh's NATS."
    )


async def run_dev(args: argparse.Namespace) -> int:
    refused = _refuse_production_env(os.environ)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    data_dir: Path = args.data_dir.resolve()
    try:
        backend = args.nats_backend or backend_from_env(os.environ)
        cluster = _dev_cluster(backend, data_dir / "nats", args)
        # Before anything else: a second mesh on these files would corrupt the first one's.
        cluster.lock_data_dir()
    except (NatsServerNotFound, UnknownNatsBackend, ContainerEngineUnavailable) as exc:
        print(f"arqonbus dev: {exc}", file=sys.stderr)
        return 2
    except DataDirInUse as exc:
        print(_data_dir_in_use(exc, args.data_dir), file=sys.stderr)
        return 2
    _check_ports(args.host, args.nats_port, args.nats_nodes, "NATS", "--nats-port")
    _check_ports(args.host, args.port, args.gateways, "gateway", "--port")
    auth_flag, auth = dev_auth(os.environ)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateways: list[asyncio.subprocess.Process] = []
    try:
        engine = cluster.engine if isinstance(cluster, ContainerCluster) else None
        how = f", as containers of {engine}" if engine else ""
        print(
            f"starting {args.nats_nodes} NATS node(s) in {data_dir / 'nats'}{how} ...", flush=True
        )
        await cluster.start()
        ports = [args.port + i for i in range(args.gateways)]
        if ports:
            print(f"starting {len(ports)} gateway(s), auth: {auth} ...", flush=True)
        for i, port in enumerate(ports):
            gateways.append(
                await spawn_gateway(cluster.url_csv, args.host, port, f"gw{i}", auth_flag)
            )
        for proc, port in zip(gateways, ports, strict=True):
            await wait_http_ready(args.host, port, proc, READY_TIMEOUT_S)
        _print_banner(cluster, args.host, ports, gateways, auth, auth_flag is None)
        await _supervise(stop, gateways, ports)
    except (GatewayFailed, TimeoutError) as exc:
        reason = exc if isinstance(exc, GatewayFailed) else "a gateway was not ready in time"
        print(f"arqonbus dev: {reason}; its log is above", file=sys.stderr)
        return 1
    finally:
        print("stopping gateways (drain) and NATS ...", flush=True)
        await asyncio.gather(*(stop_process(p, STOP_TIMEOUT_S) for p in gateways))
        await cluster.stop()
        print("stopped; data kept in", data_dir, flush=True)
    return 0


def _dev_cluster(backend: str, base_dir: Path, args: argparse.Namespace) -> LocalCluster:
    """The dev mesh's NATS: the wheel's nats-server, or containers (``--nats-backend``)."""
    if backend == "container":
        # testcontainers logs each create at INFO ("Pulling image" for a local image, too).
        logging.getLogger("testcontainers").setLevel(logging.WARNING)
    return make_cluster(
        backend, base_dir, args.nats_nodes, host=args.host, client_port=args.nats_port
    )


async def _supervise(
    stop: asyncio.Event, gateways: list[asyncio.subprocess.Process], ports: list[int]
) -> None:
    """Wait for Ctrl-C; report (once) any gateway that exits on its own."""
    reported: set[int] = set()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        for proc, port in zip(gateways, ports, strict=True):
            if proc.returncode is not None and port not in reported:
                reported.add(port)
                log.warning(
                    "gateway on port %d exited with %s; the others keep serving",
                    port,
                    proc.returncode,
                )


def _print_banner(
    cluster: LocalCluster,
    host: str,
    ports: list[int],
    gateways: list[asyncio.subprocess.Process],
    auth: str,
    auth_from_env: bool,
) -> None:
    lines = ["", "ArqonBus dev mesh is up.", f"  NATS:      {cluster.url_csv}"]
    for port, proc in zip(ports, gateways, strict=True):
        lines.append(f"  gateway:   ws://{host}:{port}/ws   (pid {proc.pid})")
    if ports:
        lines += _auth_lines(auth, auth_from_env)
        lines.append(
            f"  dashboard: http://{host}:{ports[0]}/dashboard   (sign in with a tenant admin's "
            "token, e.g. dev:demo:ops)"
        )
        failover = ",".join(f"ws://{host}:{port}/ws" for port in ports)
        lines.append(
            f"  chat demo: http://{host}:{ports[0]}/demo/chat?gateways={failover}   (any dev token)"
        )
        lines += [
            "",
            f"  try:  python -m websockets 'ws://{host}:{ports[0]}/ws?token=dev:demo:alice'",
        ]
    else:
        lines += [
            "  gateways:  none (--gateways 0). Start your own against this NATS, e.g.",
            f"    arqonbus gateway --nats {cluster.url_csv} --listen {host}:8765 --auth apikey",
        ]
    lines += ["  Ctrl-C stops everything.", ""]
    print("\n".join(lines), flush=True)


def _auth_lines(auth: str, from_env: bool) -> list[str]:
    source = "  (from ARQONBUS_AUTH)" if from_env else ""
    lines = [f"  auth:      {auth}{source}"]
    if "dev" in auth.split(","):
        lines.append("  dev token: dev:demo:alice   (any dev:<tenant>:<principal> works)")
    else:
        lines.append("  dev tokens are off: unset ARQONBUS_AUTH (or add dev to it) to use them")
    return lines


__all__ = ["free_port", "http_status", "run_dev", "stop_process", "wait_http_ready"]
