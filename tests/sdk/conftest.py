"""Fixtures for the SDK tests: connected SDK clients and a TCP proxy that can fail the network."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from arqonbus import Client


@pytest.fixture
async def sdk_client() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """Connect SDK clients (``await sdk_client(urls, tenant, principal, **options)``);
    all are closed after the test."""
    opened: list[Client] = []

    async def connect(
        urls: str | Sequence[str], tenant: str, principal: str, **options: Any
    ) -> Client:
        options.setdefault("connect_timeout", 10.0)
        client = Client(urls, f"dev:{tenant}:{principal}", **options)
        opened.append(client)
        await client.connect()
        return client

    try:
        yield connect
    finally:
        for client in opened:
            await client.close()


class _Pipe:
    """One proxied TCP connection: client <-> proxy <-> gateway."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.drop_upstream = False  # client -> gateway bytes are discarded
        self.drop_downstream = False  # gateway -> client bytes are discarded
        self.dropped_upstream = asyncio.Event()
        self.tasks = [
            asyncio.create_task(self._copy(self.client_reader, self.server_writer, True)),
            asyncio.create_task(self._copy(self.server_reader, self.client_writer, False)),
        ]

    async def _copy(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if upstream and self.drop_upstream:
                    self.dropped_upstream.set()
                    continue
                if not upstream and self.drop_downstream:
                    continue
                dst.write(data)
                await dst.drain()
        self.cut()

    def cut(self) -> None:
        """Reset both TCP connections, as a network failure would."""
        for writer in (self.client_writer, self.server_writer):
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class TcpProxy:
    """Forwards ``ws://127.0.0.1:<port>/ws`` to a gateway; tests make the network fail."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pipes: list[_Pipe] = []
        self.connected = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            server = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.pipes.append(_Pipe((reader, writer), server))
        self.connected.set()

    @property
    def current(self) -> _Pipe:
        assert self.pipes, "nothing connected through the proxy"
        return self.pipes[-1]

    def cut_all(self) -> None:
        for pipe in self.pipes:
            pipe.cut()

    async def wait_connections(self, count: int, timeout: float = 15.0) -> None:
        """Wait until ``count`` connections in total have gone through the proxy."""
        async with asyncio.timeout(timeout):
            while len(self.pipes) < count:
                self.connected.clear()
                await self.connected.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in self.pipes:
            await pipe.close()
        if self._server is not None:
            await self._server.wait_closed()


@pytest.fixture
async def tcp_proxy() -> AsyncIterator[Callable[[int], Awaitable[TcpProxy]]]:
    """Start TCP proxies to a gateway port; all are closed after the test."""
    started: list[TcpProxy] = []

    async def start(target_port: int) -> TcpProxy:
        proxy = await TcpProxy(target_port).start()
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.close()
