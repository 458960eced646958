"""The gateway's keepalive against a real gateway and raw WebSocket peers.

One pinger serves all of a listener's connections (gateway/ws/transport.py ``_Keepalive``):
each connection gets a ping once per ``ping_interval_s``; one that sent no frame at all
since its previous ping is closed with 1011. The peers here speak RFC 6455 by hand, so a
peer can choose to leave pings unanswered.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import pytest

from arqonbus_server.shared.errors import CloseCode
from tests.conftest import GatewayFactory
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

_PING, _PONG, _CLOSE, _TEXT = 0x9, 0xA, 0x8, 0x1


async def _upgraded(port: int, tenant: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?token=dev:{tenant}:raw HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10 * SEC)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def _frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next server frame as (opcode, payload); server frames are never masked."""
    first, second = await reader.readexactly(2)
    assert second & 0x80 == 0, "a server frame was masked"
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(size)


def _pong(payload: bytes) -> bytes:
    """A masked client pong echoing ``payload`` (under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | _PONG, 0x80 | len(payload))) + mask + masked


async def test_a_peer_that_answers_no_ping_is_closed_1011(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gateway = await start_gateway(ping_interval_s=0.2)
    reader, writer = await _upgraded(gateway.address[1], tenant)
    opcodes: list[int] = []
    try:
        async with asyncio.timeout(10 * SEC):
            while True:
                opcode, payload = await _frame(reader)
                opcodes.append(opcode)
                if opcode == _CLOSE:
                    break
    finally:
        writer.close()
    assert opcodes[0] == _TEXT  # the welcome
    assert _PING in opcodes, opcodes  # asked before it was judged
    (code,) = struct.unpack("!H", payload[:2])
    assert code == CloseCode.KEEPALIVE_TIMEOUT == 1011
    assert b"keepalive ping timeout" in payload[2:]


async def test_a_peer_that_answers_pings_stays_open_while_silent(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gateway = await start_gateway(ping_interval_s=0.2)
    reader, writer = await _upgraded(gateway.address[1], tenant)
    pings = 0
    try:
        # Eight pings answered, nothing else sent: four intervals and more of silence.
        async with asyncio.timeout(20 * SEC):
            while pings < 8:
                opcode, payload = await _frame(reader)
                assert opcode != _CLOSE, payload
                if opcode == _PING:
                    pings += 1
                    writer.write(_pong(payload))
    finally:
        writer.close()
    assert pings == 8
