"""The SDK's ``proxy`` option: through an HTTP CONNECT proxy (a real one on 127.0.0.1), the
environment's proxy looked up once per gateway URL, and ``proxy=None`` going direct."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from websockets.uri import WebSocketURI

import arqonbus.client as client_module
from arqonbus import Client, ConnectionRejected
from tests.sdk.test_client import CHANNEL, ROOM, ScriptedGateway
from tests.timeouts import SEC

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy")


class ConnectProxy:
    """An HTTP proxy that serves CONNECT only, and records each tunnel's target."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._tunnel, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target = head.split()[:2]
        if method != b"CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            writer.close()
            return
        self.tunnels.append(target.decode())
        host, _, port = target.decode().rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


async def run_until_rejected(client: Client) -> None:
    """Subscribe and read until the scripted gateway's 4501 stops the client."""
    await client.connect()
    sub = client.subscribe(ROOM, CHANNEL, since_seq=0)
    with pytest.raises(ConnectionRejected):
        async with asyncio.timeout(10 * SEC):
            async for _ in sub:
                pass


async def test_the_environment_s_proxy_is_used_and_looked_up_once_per_url(
    clean_proxy_env: pytest.MonkeyPatch,
) -> None:
    lookups: list[WebSocketURI] = []
    real = client_module.get_proxy

    def counting(uri: WebSocketURI) -> str | None:
        lookups.append(uri)
        return real(uri)

    clean_proxy_env.setattr(client_module, "get_proxy", counting)
    async with ConnectProxy() as proxy, ScriptedGateway([1012, 4501], events=1) as gateway:
        clean_proxy_env.setenv("http_proxy", proxy.url)
        client = Client(gateway.url, "dev:t:a", max_backoff=0.2)
        target = gateway.url.removeprefix("ws://").removesuffix("/ws")
        try:
            await run_until_rejected(client)
        finally:
            await client.close()
    assert gateway.connections == 2  # the 1012 made it reconnect
    assert proxy.tunnels == [target] * 2  # both connections went through it
    assert len(lookups) == 1  # looked up once, not at the reconnect


async def test_proxy_none_goes_direct_and_a_proxy_url_is_used_without_the_environment(
    clean_proxy_env: pytest.MonkeyPatch,
) -> None:
    async with ConnectProxy() as proxy, ScriptedGateway([4501], events=1) as gateway:
        clean_proxy_env.setenv("http_proxy", proxy.url)
        client = Client(gateway.url, "dev:t:a", proxy=None)
        try:
            await run_until_rejected(client)
        finally:
            await client.close()
        assert gateway.connections == 1 and proxy.tunnels == []
        clean_proxy_env.delenv("http_proxy")
        client = Client(gateway.url, "dev:t:a", proxy=proxy.url)
        try:
            await run_until_rejected(client)
        finally:
            await client.close()
        assert gateway.connections == 2 and len(proxy.tunnels) == 1
