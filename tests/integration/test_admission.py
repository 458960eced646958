"""Admission against a real gateway: the open timeout, the per-address upgrade rate (429)
and the per-address cap on unfinished handshakes.

Clients bind their sockets to distinct loopback addresses (127.0.0.x) to act as distinct
peers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from arqonbus import Client
from arqonbus_server.gateway.admin.dev import http_status
from arqonbus_server.gateway.app import Gateway
from tests.conftest import GatewayFactory, gateway_url
from tests.support import WsClient
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

Connect = Callable[..., Awaitable[WsClient]]


def upgrade_request(port: int, principal: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws?token=dev:adm:{principal} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def open_raw(
    gateway: Gateway, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gateway.address[1], local_addr=(source, 0))


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (FIN or reset)."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(4096)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def trickle_until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, every: float
) -> int:
    """Send the request line, then one header byte per ``every`` s until the server closes.

    Returns how many bytes were sent. Pacing is a bounded wait for the server's close.
    """
    line_end = request.index(b"\r\n") + 2
    writer.write(request[:line_end])
    sent = line_end
    for byte in request[line_end:-4]:  # never the final blank line: the request stays partial
        try:
            chunk = await asyncio.wait_for(reader.read(4096), every)
        except TimeoutError:
            writer.write(bytes((byte,)))
            sent += 1
            continue
        except ConnectionResetError:
            return sent
        assert chunk == b"", f"the server answered a partial request: {chunk!r}"
        return sent
    raise AssertionError(f"still open after trickling {sent} bytes")


def close_raw(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        writer.close()


async def test_unfinished_handshakes_end_at_the_open_timeout(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    gateway = await start_gateway(open_timeout_s=1.0)
    port = gateway.address[1]
    silent_reader, silent_writer = await open_raw(gateway, "127.0.0.1")
    slow_reader, slow_writer = await open_raw(gateway, "127.0.0.1")
    try:
        started = time.monotonic()
        silent, trickled = await asyncio.gather(
            read_until_closed(silent_reader, timeout=15 * SEC),
            trickle_until_closed(
                slow_reader, slow_writer, upgrade_request(port, "slow"), every=0.2
            ),
        )
        elapsed = time.monotonic() - started
    finally:
        close_raw(silent_writer)
        close_raw(slow_writer)
    assert silent == b""  # dropped without an answer
    # The trickler was still sending headers when the deadline hit: the timeout bounds the
    # whole handshake, not the gap between bytes.
    assert trickled > len(b"GET /ws?token=dev:adm:slow HTTP/1.1\r\n") + 2
    assert elapsed >= 0.9  # never before the open timeout
    # The gateway still serves well-behaved clients.
    client = await clients(gateway_url(gateway), tenant, "fine")
    assert client.welcome is not None


async def test_rate_limited_address_gets_429_while_another_connects(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    # A bucket of 3 that refills one token per 100 s: the 4th upgrade is over the limit.
    gateway = await start_gateway(conn_rate_per_ip=0.01, conn_burst_per_ip=3)
    url = gateway_url(gateway)
    for i in range(3):
        await clients(url, tenant, f"a{i}", local_addr=("127.0.0.1", 0))
    with pytest.raises(InvalidStatus) as refused:
        await WsClient.connect(url, tenant, "a3", local_addr=("127.0.0.1", 0))
    response = refused.value.response
    assert response.status_code == 429
    body = orjson.loads(response.body or b"")
    assert body["error"] == "rate_limited"
    assert isinstance(body["retry_after_ms"], int) and body["retry_after_ms"] > 0
    assert int(response.headers["Retry-After"]) >= 1
    assert int(response.headers["Retry-After"]) * 1000 >= body["retry_after_ms"]

    # Meanwhile another address upgrades, and the limited one is still refused.
    other = await clients(url, tenant, "b0", local_addr=("127.0.0.2", 0))
    assert other.welcome is not None
    with pytest.raises(InvalidStatus) as again:
        await websockets.connect(f"{url}?token=dev:{tenant}:a4", local_addr=("127.0.0.1", 0))
    assert again.value.response.status_code == 429
    # Health checks are not upgrades: never rate limited.
    assert await http_status("127.0.0.1", gateway.address[1], "/readyz") == 200
    assert gateway.conn_rate.refused == 2


async def test_pending_handshakes_are_capped_per_address(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    cap = 4
    gateway = await start_gateway(max_pending_handshakes_per_ip=cap, open_timeout_s=30.0)
    port = gateway.address[1]
    pending = [await open_raw(gateway, "127.0.0.3") for _ in range(cap)]
    extra_reader, extra_writer = await open_raw(gateway, "127.0.0.3")
    try:
        # Over the cap: dropped at accept, without an answer (the others stay pending).
        assert await read_until_closed(extra_reader, timeout=10 * SEC) == b""
        assert gateway.pending_handshakes.pending("127.0.0.3") == cap
        assert gateway.pending_handshakes.refused == 1
        # The client saw only its TCP connection end: the operator sees the drop counted.
        metrics = gateway.metrics.render()
        assert b'arqonbus_rate_limited_total{scope="pending_handshake"} 1.0' in metrics
        # Other addresses are not affected.
        other = await clients(gateway_url(gateway), tenant, "other", local_addr=("127.0.0.4", 0))
        assert other.welcome is not None
        # A pending connection that completes its request frees its slot at once.
        reader, writer = pending[0]
        writer.write(upgrade_request(port, "late"))
        async with asyncio.timeout(10 * SEC):
            status_line = await reader.readline()
        assert status_line.startswith(b"HTTP/1.1 101"), status_line
        again = await clients(gateway_url(gateway), tenant, "again", local_addr=("127.0.0.3", 0))
        assert again.welcome is not None
    finally:
        close_raw(extra_writer)
        for _, writer in pending:
            close_raw(writer)


async def test_sdk_retries_a_rate_limited_connect(
    start_gateway: GatewayFactory, clients: Connect, tenant: str
) -> None:
    # One token, and the next one 2 s later: the SDK's first attempt is refused with 429.
    gateway = await start_gateway(conn_rate_per_ip=0.5, conn_burst_per_ip=1)
    url = gateway_url(gateway)
    await clients(url, tenant, "first")
    client = Client(url, f"dev:{tenant}:sdk", connect_timeout=20.0)
    try:
        await client.connect()  # waits as the 429's Retry-After says, then connects
        assert client.connected
        # Refused once, then it waited out retry_after_ms (about 2 s, rounded up) instead of
        # hammering the gateway with its 50 ms backoff (which is refused about five times).
        assert gateway.conn_rate.refused == 1
    finally:
        await client.close()
