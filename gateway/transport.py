"""The one module that knows the WebSocket library (websockets, asyncio API).

Outbound frames are framed once and written straight to the transport, so a
message fanned out to N sockets is serialized and framed once, not N times.
This is safe because the server never fragments messages and never enables
compression: every frame we write is a complete, unmasked text frame, and
websockets itself also writes whole frames synchronously.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from shared.errors import CloseCode

_OP_TEXT = 0x81  # FIN + text
_CLOSE_TIMEOUT_S = 5.0
_COALESCE_MAX = 64 * 1024
_PACED_STALL_S = 30.0  # a replay reader that takes nothing for this long is closed (4001)


def encode_text_frame(payload: bytes) -> bytes:
    """One complete, unmasked server->client text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((_OP_TEXT, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _OP_TEXT, 126, n) + payload
    return struct.pack("!BBQ", _OP_TEXT, 127, n) + payload


class Socket:
    """A client connection as the session and the hub see it.

    Frames written during one event-loop turn are coalesced into one transport
    write (one syscall per socket per burst instead of one per message).
    """

    __slots__ = (
        "_base",
        "_closing",
        "_coalesce_max",
        "_conn",
        "_limit",
        "_loop",
        "_out",
        "_out_bytes",
        "_pace_at",
        "_transport",
    )

    def __init__(self, conn: ServerConnection, send_buffer_bytes: int) -> None:
        self._conn = conn
        self._transport: asyncio.Transport = conn.transport
        self._limit = send_buffer_bytes
        self._coalesce_max = min(_COALESCE_MAX, send_buffer_bytes // 4)
        self._pace_at = send_buffer_bytes // 4
        self._closing = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._base = 0  # the transport's buffer when this turn's first frame was queued
        self._loop = asyncio.get_running_loop()

    @property
    def is_open(self) -> bool:
        return not self._closing and self._conn.protocol.state is State.OPEN

    @property
    def buffered(self) -> int:
        """Bytes accepted for this peer and not yet sent: queued this turn plus the transport's."""
        return self._out_bytes + self._transport.get_write_buffer_size()

    def write_frame(self, frame: bytes) -> bool:
        """Queue one framed message. A peer that lets its buffer overflow is closed (4001)."""
        if self._out:
            # Not the first frame this turn: the transport's buffer has not moved since.
            if self._closing:
                return False
        else:
            if not self.is_open:
                return False
            self._base = self._transport.get_write_buffer_size()
            self._loop.call_soon(self._flush)
        if self._base + self._out_bytes > self._limit:
            self.close_soon(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and resume")
            return False
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes >= self._coalesce_max:
            self._flush()  # a big burst: hand it to the kernel now
        return True

    def _flush(self) -> None:
        out, self._out, self._out_bytes = self._out, [], 0
        # Never write data frames after websockets has started the closing handshake.
        if out and self._conn.protocol.state is State.OPEN:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])

    def send(self, message: bytes) -> bool:
        return self.write_frame(encode_text_frame(message))

    async def send_paced(self, message: bytes) -> bool:
        """Send and wait while the peer's buffer is above the high-water mark (replay).

        Frames accumulate (and go out in coalesced writes) until a quarter of the send
        buffer is pending; only then does the replay wait for the peer to read.
        """
        if not self.send(message):
            return False
        if self.buffered < self._pace_at:
            return True
        self._flush()
        try:
            async with asyncio.timeout(_PACED_STALL_S):
                await self._conn.drain()
        except TimeoutError:
            self.close_soon(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and resume")
            return False
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
        # A peer that stopped reading never lets the close frame out of our buffer;
        # give the handshake a bounded time, then drop the TCP connection.
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self._conn.close(int(code), reason)
        except (ConnectionClosed, OSError):
            pass
        except TimeoutError:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await self._conn.wait_closed()

    @property
    def remote(self) -> Any:
        return self._conn.remote_address


_pending_closes: set[asyncio.Task[None]] = set()

__all__ = ["HttpReply", "ListenOptions", "Server", "Socket", "encode_text_frame", "start_server"]


# -- server ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpReply:
    """A plain HTTP answer given instead of a WebSocket upgrade."""

    status: int
    body: dict[str, object]


@dataclass(frozen=True, slots=True)
class ListenOptions:
    host: str
    port: int
    max_frame_bytes: int
    send_buffer_bytes: int
    open_timeout_s: float
    ping_interval_s: float
    write_high_water: int = 64 * 1024
    close_timeout_s: float = 5.0


# on_request(path with query, headers) -> HttpReply to refuse, or a context to upgrade with
RequestHook = Callable[[str, Mapping[str, str]], Any]
# on_socket(context, socket) runs for the life of an upgraded connection
SocketHandler = Callable[[Any, Socket], Awaitable[None]]


def _to_response(reply: HttpReply) -> Response:
    from http import HTTPStatus

    data = orjson.dumps(reply.body)
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
        ]
    )
    return Response(reply.status, HTTPStatus(reply.status).phrase, headers, data)


_LISTEN_BACKLOG = 4096


async def start_server(
    options: ListenOptions, on_request: RequestHook, on_socket: SocketHandler
) -> Server:
    """Listen for WebSocket upgrades and plain HTTP GETs on one port.

    Compression stays off on purpose: frames are built once and shared by every
    subscriber (see the module docstring). Frames above ``max_frame_bytes`` close 1009.
    """

    contexts: dict[int, Any] = {}  # lives only from process_request to handler (or close)

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        outcome = on_request(request.path, request.headers)
        if isinstance(outcome, HttpReply):
            return _to_response(outcome)
        key = id(connection)
        contexts[key] = outcome
        connection.connection_lost_waiter.add_done_callback(lambda _: contexts.pop(key, None))
        return None

    async def handler(connection: ServerConnection) -> None:
        context = contexts.pop(id(connection), None)
        if context is not None:
            await on_socket(context, Socket(connection, options.send_buffer_bytes))

    return await serve(
        handler,
        options.host,
        options.port,
        process_request=process_request,
        compression=None,
        max_size=options.max_frame_bytes,
        max_queue=16,
        write_limit=options.write_high_water,
        open_timeout=options.open_timeout_s,
        ping_interval=options.ping_interval_s,
        ping_timeout=options.ping_interval_s,
        close_timeout=options.close_timeout_s,
        server_header="ArqonBus",
        # Room for connection bursts (a reconnect storm): the default queue of 100
        # pending connections drops handshakes under load and clients retry after 1 s.
        backlog=_LISTEN_BACKLOG,
    )
