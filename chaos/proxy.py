"""An asyncio TCP fault proxy to put between a client (a gateway) and one NATS server.

``FaultProxy(upstream_host, upstream_port)`` listens on 127.0.0.1:<free port> once started; point
the client at ``proxy.url`` (``nats://127.0.0.1:<port>``). Every accepted connection gets its own
upstream connection, and bytes are pumped both ways. The mode applies at once to existing and new
connections:

* ``passthrough()``: forward as they come (the initial mode).
* ``delay(ms)``: forward each chunk ``ms`` after it was read, in order, in both directions (the
  reading side keeps reading, so this adds latency without cutting throughput).
* ``stall()``: a black hole: nothing is forwarded either way and reading stops (beyond what one
  stream reader buffers), but every socket stays open. Peers notice only through their own
  timeouts (e.g. NATS pings).
* ``refuse()``: new connections are closed at once with a TCP RST (as by a server that is gone);
  existing ones keep flowing (add ``reset()`` to drop them too).

``await reset()`` is an action, not a mode: it aborts every current connection with an RST to both
peers (SO_LINGER 0), keeps accepting, and leaves the mode as it was.

Memory is bounded: per connection and direction, at most ``QUEUE_CHUNKS`` chunks of at most
``CHUNK_BYTES`` wait in the delay queue, and while stalled nothing is read, so TCP flow control
pushes back on the sender.

``stats`` counts bytes forwarded each way and connections accepted, refused, reset and ended;
``await wait_for(predicate, timeout)`` waits on a stats condition.

Note for NATS: a server in a cluster advertises its peers' client URLs to clients (INFO
``connect_urls``) and nats-py adds them to its server list, so a client may reconnect to a peer
directly, around the proxy. Put a proxy in front of every node the client is given, and run the
servers with ``cluster { no_advertise: true }``, or use a single-node upstream, when every byte
must cross the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Self

log = logging.getLogger("arqonbus.chaos.proxy")

CHUNK_BYTES = 64 * 1024
QUEUE_CHUNKS = 16
CONNECT_TIMEOUT_SECONDS = 5.0
_EOF = None


class Mode(enum.Enum):
    PASSTHROUGH = "passthrough"
    DELAY = "delay"
    STALL = "stall"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class ProxyStats:
    bytes_up: int = 0  # client -> upstream, forwarded
    bytes_down: int = 0  # upstream -> client, forwarded
    accepted: int = 0  # connections proxied (an upstream connection was made)
    refused: int = 0  # connections closed at once in refuse mode
    upstream_failures: int = 0  # connections closed because the upstream did not accept
    reset: int = 0  # connections aborted by reset()
    ended: int = 0  # proxied connections that are over, for any reason
    active: int = 0  # proxied connections open now


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: the client side, the upstream side, and the pumps between them."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.task: asyncio.Task[None] | None = None
        self.pumps: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        self.pumps = pumps = [
            asyncio.create_task(self._direction(self.client[0], self.upstream[1], up=True)),
            asyncio.create_task(self._direction(self.upstream[0], self.client[1], up=False)),
        ]
        try:
            # Either side closing (or failing) ends the whole connection.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for _, writer in (self.client, self.upstream):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    def abort(self) -> None:
        for _, writer in (self.client, self.upstream):
            _abort_with_rst(writer)
        for pump in self.pumps:  # they may be parked on a stall
            pump.cancel()

    async def _direction(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, up: bool
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        reader = asyncio.create_task(self._read(src, queue))
        try:
            await self._write(dst, queue, up=up)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await reader

    async def _read(
        self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        try:
            while True:
                await proxy._flowing.wait()  # stalled: read nothing, let TCP push back
                data = await src.read(CHUNK_BYTES)
                if not data:
                    break
                await queue.put((loop.time() + proxy._delay_seconds, data))
        except OSError:
            pass
        await queue.put(_EOF)

    async def _write(
        self,
        dst: asyncio.StreamWriter,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        *,
        up: bool,
    ) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not _EOF:
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            await proxy._flowing.wait()  # a chunk read just before stall() is held too
            dst.write(data)
            await dst.drain()
            if up:
                proxy._count(bytes_up=len(data))
            else:
                proxy._count(bytes_down=len(data))


class FaultProxy:
    """A TCP proxy from 127.0.0.1:<port> to ``upstream_host:upstream_port`` with injectable faults."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._mode = Mode.PASSTHROUGH
        self._delay_seconds = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stats = ProxyStats()
        self._changed = asyncio.Event()  # set and replaced on every stats change

    # -- lifecycle

    async def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._server = await asyncio.start_server(self._accept, self.host, 0, limit=CHUNK_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("proxy %s -> %s:%d", self.url, self.upstream_host, self.upstream_port)
        return self

    async def close(self) -> None:
        """Stop listening and abort every connection. Idempotent."""
        if self._server is not None:
            self._server.close()
        links = list(self._links)
        for link in links:
            link.abort()
        tasks = [link.task for link in links if link.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- views

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FaultProxy not started")
        return f"nats://{self.host}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def stats(self) -> ProxyStats:
        return replace(self._stats, active=len(self._links))

    async def wait_for(self, predicate: Callable[[ProxyStats], bool], timeout: float) -> ProxyStats:
        """Return the stats once ``predicate(stats)`` holds; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not predicate(stats := self.stats):
                await self._changed.wait()
            return stats

    # -- modes

    def passthrough(self) -> None:
        self._set_mode(Mode.PASSTHROUGH, 0.0)

    def delay(self, ms: float) -> None:
        if ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {ms}")
        self._set_mode(Mode.DELAY, ms / 1000)

    def stall(self) -> None:
        self._set_mode(Mode.STALL, 0.0)

    def refuse(self) -> None:
        self._set_mode(Mode.REFUSE, 0.0)

    async def reset(self) -> int:
        """Abort every current connection with an RST to both peers; return how many."""
        links = list(self._links)
        for link in links:
            link.abort()
        await asyncio.gather(
            *(link.task for link in links if link.task is not None), return_exceptions=True
        )
        self._count(reset=len(links))
        log.info("proxy %s: reset %d connection(s)", self.url, len(links))
        return len(links)

    def _set_mode(self, mode: Mode, delay_seconds: float) -> None:
        self._mode = mode
        self._delay_seconds = delay_seconds
        if mode is Mode.STALL:
            self._flowing.clear()
        else:
            self._flowing.set()
        log.info(
            "proxy %s: %s%s",
            self.url,
            mode.value,
            f" {delay_seconds * 1000:g} ms" * (mode is Mode.DELAY),
        )

    # -- connections

    def _count(self, **deltas: int) -> None:
        values = {key: getattr(self._stats, key) + delta for key, delta in deltas.items()}
        self._stats = replace(self._stats, **values)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode is Mode.REFUSE:
            _abort_with_rst(writer)
            self._count(refused=1)
            return
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                upstream = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port, limit=CHUNK_BYTES
                )
        except (OSError, TimeoutError) as exc:
            log.info("proxy %s: upstream did not accept: %r", self.url, exc)
            _abort_with_rst(writer)
            self._count(upstream_failures=1)
            return
        link = _Link(self, (reader, writer), upstream)
        link.task = asyncio.current_task()
        self._links.add(link)
        self._count(accepted=1)
        try:
            await link.run()
        finally:
            self._links.discard(link)
            self._count(ended=1)
