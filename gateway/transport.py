"""The one module that knows the WebSocket library (websockets, asyncio API).

Outbound frames are framed once and written straight to the transport, so a
message fanned out to N sockets is serialized and framed once, not N times.
This is safe because the server never fragments messages and never enables
compression: every frame we write is a complete, unmasked text frame, and
websockets itself also writes whole frames synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from shared.errors import CloseCode

_OP_TEXT = 0x81  # FIN + text


def encode_text_frame(payload: bytes) -> bytes:
    """One complete, unmasked server->client text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((_OP_TEXT, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _OP_TEXT, 126, n) + payload
    return struct.pack("!BBQ", _OP_TEXT, 127, n) + payload


class Socket:
    """A client connection as the session and the hub see it."""

    __slots__ = ("_closing", "_conn", "_limit", "_transport")

    def __init__(self, conn: ServerConnection, send_buffer_bytes: int) -> None:
        self._conn = conn
        self._transport: asyncio.Transport = conn.transport
        self._limit = send_buffer_bytes
        self._closing = False

    @property
    def is_open(self) -> bool:
        return not self._closing and self._conn.protocol.state is State.OPEN

    @property
    def buffered(self) -> int:
        return self._transport.get_write_buffer_size()

    def write_frame(self, frame: bytes) -> bool:
        """Queue one framed message. A peer that lets its buffer overflow is closed (4001)."""
        if not self.is_open:
            return False
        if self._transport.get_write_buffer_size() > self._limit:
            self.close_soon(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and resume")
            return False
        self._transport.write(frame)
        return True

    def send(self, message: bytes) -> bool:
        return self.write_frame(encode_text_frame(message))

    async def send_paced(self, message: bytes) -> bool:
        """Send and wait while the peer's buffer is above the high-water mark (replay)."""
        if not self.send(message):
            return False
        await self._conn.drain()
        return True

    async def recv(self) -> bytes | None:
        """The next message as bytes, or None once the connection is closed."""
        try:
            data = await self._conn.recv(decode=False)
        except ConnectionClosed:
            return None
        return data if isinstance(data, bytes) else data.encode()

    def close_soon(self, code: CloseCode, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        task = asyncio.get_running_loop().create_task(self._close(code, reason))
        _pending_closes.add(task)
        task.add_done_callback(_pending_closes.discard)

    async def close(self, code: CloseCode, reason: str) -> None:
        self._closing = True
        await self._close(code, reason)

    async def _close(self, code: CloseCode, reason: str) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            await self._conn.close(int(code), reason)

    async def wait_closed(self) -> None:
        await self._conn.wait_closed()

    @property
    def remote(self) -> Any:
        return self._conn.remote_address


_pending_closes: set[asyncio.Task[None]] = set()
