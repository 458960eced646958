"""The one module that knows the WebSocket library (websockets, asyncio API).

Outbound frames are framed once and written straight to the transport, so a
message fanned out to N sockets is serialized and framed once, not N times.
This is safe because the server never fragments messages and never enables
compression: every frame we write is a complete, unmasked data frame, and
websockets itself also writes whole frames synchronously.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from arqonbus_server.shared.errors import CloseCode
from arqonbus_server.shared.settings import ConfigError

log = logging.getLogger("arqonbus.gateway.transport")

_OP_TEXT = 0x81  # FIN + text
_OP_BINARY = 0x82  # FIN + binary
_CLOSE_TIMEOUT_S = 5.0
_COALESCE_MAX = 64 * 1024
_BEFORE_ROUNDS = 8  # rounds of deferred writes in one flush (Socket.before_flush)
_PACED_STALL_S = 30.0  # a replay reader that takes nothing for this long is closed (4001)


def _encode_frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def encode_text_frame(payload: bytes) -> bytes:
    """One complete, unmasked server->client text frame (RFC 6455 section 5.2).

    ``payload`` must be valid UTF-8 (the gateway only sends JSON it serialized).
    """
    return _encode_frame(_OP_TEXT, payload)


def encode_binary_frame(payload: bytes) -> bytes:
    """One complete, unmasked server->client binary frame (RFC 6455 section 5.2)."""
    return _encode_frame(_OP_BINARY, payload)


class FrameCounts:
    """Messages received from and queued to clients, over all of one listener's sockets.

    Two integer increments per message, read every heartbeat (gateway/state/heartbeat.py).
    """

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0


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
        "_counts",
        "_flusher",
        "_idle_handle",
        "_idle_timeout",
        "_ka_slot",
        "_limit",
        "_loop",
        "_marks",
        "_out",
        "_out_bytes",
        "_pace_at",
        "_protocol",
        "_taken",
        "_transport",
        "read_at",
    )

    def __init__(
        self,
        conn: ServerConnection,
        send_buffer_bytes: int,
        counts: FrameCounts | None = None,
        flusher: _Flusher | None = None,
    ) -> None:
        self._conn = conn
        self._flusher = flusher if flusher is not None else _Flusher()
        self._counts = counts if counts is not None else FrameCounts()
        self._transport: asyncio.Transport = conn.transport
        self._limit = send_buffer_bytes
        self._coalesce_max = min(_COALESCE_MAX, send_buffer_bytes // 4)
        self._pace_at = send_buffer_bytes // 4
        self._closing = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._base = 0  # the transport's buffer when this turn's first frame was queued
        self._loop = asyncio.get_running_loop()
        self._protocol = cast(_ServerProtocol, conn.protocol)
        self._marks = self._protocol.marks
        self._marks.last_data_at = time.monotonic()  # the idle clock starts at the upgrade
        self._idle_timeout = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._taken = 0  # messages taken by recv (counted only with a read sampler)
        self._ka_slot = -1  # this socket's slot in its server's _Keepalive (-1: none)
        # When the message just taken was sampled (ReadSampler): when it was parsed.
        self.read_at: float | None = None

    # -- idle timeout ------------------------------------------------------------------
    # The protocol stamps each data frame as it is parsed (see _ServerProtocol); one timer per
    # connection looks at the stamp when the timeout could next expire, never per message.

    def watch_idle(self, timeout_s: float) -> None:
        """Close with 4003 once the peer has sent no data frame for ``timeout_s`` (0 = never)."""
        if timeout_s > 0:
            self._idle_timeout = timeout_s
            self._idle_handle = self._loop.call_later(timeout_s, self._check_idle)

    def stop_watching(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _check_idle(self) -> None:
        self._idle_handle = None
        if not self.is_open:
            return
        idle = time.monotonic() - self._marks.last_data_at
        if idle >= self._idle_timeout:
            self.close_soon(
                CloseCode.IDLE_TIMEOUT,
                f"idle timeout: no message for {self._idle_timeout:g} s; reconnect when needed",
            )
        else:
            self._idle_handle = self._loop.call_later(self._idle_timeout - idle, self._check_idle)

    @property
    def is_open(self) -> bool:
        return not self._closing and self._conn.protocol.state is State.OPEN

    @property
    def buffered(self) -> int:
        """Bytes accepted for this peer and not yet sent: queued this turn plus the transport's."""
        return self._out_bytes + self._transport.get_write_buffer_size()

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes keep this peer's unsent bytes within its bound (a
        burst that does not fit goes frame by frame, so the bound is overshot by at most
        one message before the 4001 close)."""
        base = self._base if self._out else self._transport.get_write_buffer_size()
        return base + self._out_bytes + size <= self._limit

    def write_frame(self, frame: bytes, frames: int = 1) -> bool:
        """Queue one framed message (or ``frames`` of them, joined). A peer that lets its
        buffer overflow is closed (4001)."""
        if self._out:
            # Not the first frame this turn: the transport's buffer has not moved since.
            if self._closing:
                return False
        else:
            if not self.is_open:
                return False
            self._base = self._transport.get_write_buffer_size()
            self._flusher.add(self)
        if self._base + self._out_bytes > self._limit:
            self.close_soon(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and resume")
            return False
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._counts.sent += frames
        if self._out_bytes >= self._coalesce_max:
            self._flush()  # a big burst: hand it to the kernel now
        return True

    def before_flush(self, write: Callable[[], None]) -> None:
        """Call ``write`` at this turn's end, just before the queued frames of this socket
        (and of every socket written this turn) go to the kernel, in the same callback:
        frames it queues go out with them."""
        self._flusher.before(write, self._loop)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out_bytes = 0
        # Never write data frames after websockets has started the closing handshake.
        if self._conn.protocol.state is State.OPEN:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])
        out.clear()

    def send(self, message: bytes) -> bool:
        """Queue one text message (``message`` is UTF-8)."""
        return self.write_frame(encode_text_frame(message))

    def send_binary(self, message: bytes) -> bool:
        """Queue one binary message."""
        return self.write_frame(encode_binary_frame(message))

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
        """The next message's payload (text or binary), or None once the connection is closed.

        A text message must be valid UTF-8 (RFC 6455 section 8.1): one that is not fails
        the connection with 1007. websockets checks this only when it decodes, so text
        is decoded here (and re-encoded: the caller parses bytes).
        """
        # Awaited here, not through recv_message: every idle connection waits in this
        # chain of coroutines for its whole life, and each frame of it is memory.
        try:
            data = self._took(await self._conn.recv())
        except ConnectionClosed:
            return None
        return data.encode() if isinstance(data, str) else data

    async def recv_message(self) -> tuple[bytes, bool] | None:
        """The next message as (payload, is_text), or None once the connection is closed
        (text as UTF-8 bytes, checked as in ``recv``)."""
        try:
            data = self._took(await self._conn.recv())
        except ConnectionClosed:
            return None
        if isinstance(data, str):
            return data.encode(), True
        return data, False

    def _took(self, data: bytes | str) -> bytes | str:
        """Count a message taken from the connection (and its sample); returns ``data``."""
        self._counts.received += 1
        if self._protocol.sampler is not None:
            marks = self._marks
            self._taken += 1
            self.read_at = None  # a sample nobody took (an auth frame's) is not this one's
            sampled = marks.sampled
            if sampled is not None and sampled[0] <= self._taken:
                marks.sampled = None
                if sampled[0] == self._taken:
                    self.read_at = sampled[1]
        return data

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
    def close_code(self) -> int | None:
        """The close code sent (ours, or our echo of the peer's), else the one received;
        None while open or when the connection ended without a close frame."""
        protocol = self._conn.protocol
        frame = protocol.close_sent or protocol.close_rcvd
        return None if frame is None else frame.code

    @property
    def remote(self) -> Any:
        return self._conn.remote_address


_pending_closes: set[asyncio.Task[None]] = set()


class _Flusher:
    """Writes every socket's frames of this event-loop turn at the turn's end, with one
    loop callback for all of them (a fan-out to N sockets made N callbacks before)."""

    __slots__ = ("_before", "_dirty", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[Socket] = []
        self._before: list[Callable[[], None]] = []
        self._scheduled = False

    def add(self, socket: Socket) -> None:
        self._dirty.append(socket)
        if not self._scheduled:
            self._scheduled = True
            socket._loop.call_soon(self._flush_all)

    def before(self, write: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self._before.append(write)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        for _ in range(_BEFORE_ROUNDS):  # a writer may ask for another: it runs now too
            if not self._before:
                break
            before, self._before = self._before, []
            for write in before:
                try:
                    write()
                except Exception:  # one writer's bug must not stop every socket's output
                    log.exception("a deferred write failed")
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        if self._before:  # asked for in the last round: the next turn's
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_all)
        for socket in dirty:
            socket._flush()


__all__ = [
    "MAX_FRAGMENTS",
    "HttpReply",
    "ListenOptions",
    "Server",
    "Socket",
    "encode_binary_frame",
    "encode_text_frame",
    "server_tls_context",
    "start_server",
]


# -- server ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpReply:
    """A plain HTTP answer given instead of a WebSocket upgrade."""

    status: int
    body: dict[str, object] | bytes  # a dict is sent as JSON; bytes as they are
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers, e.g. Retry-After
    content_type: str = "application/json"  # the type of a ``bytes`` body


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
    ssl: ssl.SSLContext | None = None  # TLS on the listener (wss://); see server_tls_context
    idle_timeout_s: float = 0.0  # 0 = off; see Socket.watch_idle
    reuse_port: bool = False  # SO_REUSEPORT: several processes share the port

    @property
    def scheme(self) -> str:
        return "wss" if self.ssl is not None else "ws"


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS 1.2+ context; ConfigError names the file that is missing or bad."""
    for name, path in (("certificate", cert_file), ("key", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"cannot read the TLS {name} file {path!r}: {exc.strerror or exc}. "
                f"Check --tls-{'cert' if name == 'certificate' else 'key'} / "
                f"ARQONBUS_TLS_{'CERT' if name == 'certificate' else 'KEY'}"
            ) from None

    def no_password() -> str:
        raise ConfigError(
            f"the TLS key file {key_file!r} is encrypted: give the gateway an unencrypted key "
            "(readable only by its user)"
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {cert_file!r} with the key {key_file!r}: "
            f"{exc.reason or exc}. Both must be PEM files, and the key must belong to the "
            "certificate"
        ) from None
    return context


# websockets logs handshake headers and frame contents at DEBUG: bearer tokens, auth frames,
# refresh_token and room keys would reach the log. At INFO it logs one line per connection
# opened and closed and per plain HTTP answer (every health probe and client: thousands of
# lines that hide the few that matter, and a log record built per connection even when a
# filter drops it), and "server listening", which the gateway logs itself. So its logger
# stays at WARNING whatever the gateway's level.
_WS_LOG = logging.getLogger("arqonbus.gateway.websockets")
_WS_LOG.setLevel(logging.WARNING)


# on_request(path with query, headers, peer IP) -> HttpReply to refuse, or a context to upgrade with
RequestHook = Callable[[str, Mapping[str, str], str], Any]
# on_socket(context, socket) runs for the life of an upgraded connection
SocketHandler = Callable[[Any, Socket], Awaitable[None]]


class AcceptGate(Protocol):
    """Admission at TCP accept, before any byte is read (see gateway/http/admission.py).

    ``acquire(peer IP)`` False drops the new connection at once. Each admitted
    connection is released once: when its HTTP request has arrived, or it closed.
    """

    def acquire(self, peer_ip: str) -> bool: ...

    def release(self, peer_ip: str) -> None: ...


def _to_response(reply: HttpReply) -> Response:
    from http import HTTPStatus

    data = reply.body if isinstance(reply.body, bytes) else orjson.dumps(reply.body)
    headers = Headers(
        [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
            *reply.headers,
        ]
    )
    return Response(reply.status, HTTPStatus(reply.status).phrase, headers, data)


_LISTEN_BACKLOG = 4096


# Fragments one message may arrive in: a maximum-size message in 512-byte pieces. Each
# queued frame costs a few hundred bytes whatever its payload, so without this bound a
# peer could make the server hold ~1 MB for 35 KB of one-byte fragments (websockets
# alone allows 4096 per message).
MAX_FRAGMENTS = 256


class _TooManyFragments(PayloadTooBig):
    """A message in more than MAX_FRAGMENTS frames: failed with 1009 like an oversized one."""

    def __init__(self, limit: int) -> None:
        super().__init__(None, limit)
        self.limit = limit

    def set_current_size(self, current_size: int | None) -> None:
        pass  # the limit is on frames, not bytes

    def __str__(self) -> str:
        return f"message in more than {self.limit} fragments"


class ReadSampler(Protocol):
    """Picks the messages to time from the socket on (gateway/http/phases.py)."""

    def read_due(self, now: float) -> bool:
        """True when the message parsed at ``now`` (time.monotonic) is to be sampled."""
        ...


class _ServerProtocol(ServerProtocol):
    """websockets' server protocol with two changes, both made as frames are parsed.

    - At most MAX_FRAGMENTS frames per message (1009 above), checked before a frame is
      queued, so a flood of tiny fragments never piles up.
    - A Close in the middle of a fragmented message is answered. RFC 6455 section 5.4:
      control frames may be injected between the fragments of a message. websockets
      fails the connection with 1002 ("incomplete fragmented message") when that frame
      is a Close; the RFC says to answer it (section 5.5.1) and to discard whatever
      follows (section 1.4). The unfinished message is dropped.

    It also stamps messages for a read sampler, when the server has one (``sampler``, set
    on a subclass per server): ``marks.sampled`` is (number of the message, time parsed)
    of the one message this connection has sampled and its session has not taken yet.
    """

    sampler: ReadSampler | None = None
    marks: _Marks  # set on every instance by _ServerConnection

    def recv_frame(self, frame: Frame) -> None:
        marks = self.marks
        marks.heard = True
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            marks.fragments = 1
            marks.last_data_at = now = time.monotonic()
            if frame.fin and self.sampler is not None:
                self._parsed(now)
        elif opcode is Opcode.CONT:
            marks.fragments += 1
            marks.last_data_at = now = time.monotonic()
            if marks.fragments > MAX_FRAGMENTS and self.current_size is not None:
                raise _TooManyFragments(MAX_FRAGMENTS)
            if frame.fin and self.sampler is not None:
                self._parsed(now)
        elif opcode is Opcode.CLOSE and self.current_size is not None:
            self.current_size = None
        super().recv_frame(frame)

    def _parsed(self, now: float) -> None:
        assert self.sampler is not None
        marks = self.marks
        marks.parsed += 1
        if marks.sampled is None and self.sampler.read_due(now):
            marks.sampled = (marks.parsed, now)


class _Marks:
    """What our protocol notes about a connection as frames arrive (_ServerProtocol).

    One object behind one attribute: websockets' protocol already has 26 attributes, and
    CPython keeps an instance's attributes inline only up to 30 shared keys; past that each
    protocol gets a dict of its own (about 1.5 KB, measured on idle connections).
    """

    __slots__ = ("fragments", "heard", "last_data_at", "parsed", "sampled")

    def __init__(self) -> None:
        self.fragments = 0  # frames of the message being received
        self.heard = True  # a frame of any kind arrived since the last keepalive ping
        self.last_data_at = time.monotonic()  # of the last data frame (the idle clock)
        self.parsed = 0  # complete data messages parsed (counted only with a sampler)
        self.sampled: tuple[int, float] | None = None


class _ServerConnection(ServerConnection):
    protocol_class: type[_ServerProtocol] = _ServerProtocol

    def __init__(self, protocol: ServerProtocol, server: Any, **kwargs: Any) -> None:
        # serve() builds a plain ServerProtocol and has no hook for its class: upgrade it
        # before the connection sees any data (the subclass adds no slots).
        protocol.__class__ = self.protocol_class
        cast(_ServerProtocol, protocol).marks = _Marks()
        super().__init__(protocol, server, **kwargs)
        # websockets keeps the writers waiting for the buffer to drain in a deque, which
        # allocates a 64-slot block at once (760 bytes on every idle connection); it only
        # appends, removes and iterates, which a list does in 56 bytes.
        if isinstance(self.drain_waiters, collections.deque):
            self.drain_waiters = cast(Any, [])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # makes recv_messages, the frames' assembler
        frames = getattr(self.recv_messages, "frames", None)
        if isinstance(getattr(frames, "queue", None), collections.deque):
            cast(Any, frames).queue = _LazyDeque()


class _LazyDeque:
    """websockets' queue of received frames, holding a deque only while it has frames.

    An empty ``collections.deque`` keeps a 64-slot block (760 bytes), and most connections
    have nothing queued most of the time. websockets' SimpleQueue uses ``len``, truth,
    ``append``, ``popleft`` and ``extendleft``; a deque (not a list) does the work, so a
    read of thousands of tiny frames stays linear.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: collections.deque[Any] | None = None  # None exactly when empty

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def __bool__(self) -> bool:
        return self._items is not None

    def append(self, item: Any) -> None:
        if self._items is None:
            self._items = collections.deque((item,))
        else:
            self._items.append(item)

    def popleft(self) -> Any:
        items = self._items
        if items is None:
            raise IndexError("pop from an empty deque")
        item = items.popleft()
        if not items:
            self._items = None
        return item

    def extendleft(self, items: Iterable[Any]) -> None:
        queue = self._items if self._items is not None else collections.deque()
        queue.extendleft(items)
        self._items = queue or None


def _connection_class(
    gate: AcceptGate | None, sampler: ReadSampler | None
) -> type[ServerConnection]:
    """This server's ServerConnection: asks ``gate`` at accept and releases it once, and
    stamps messages for ``sampler``."""
    base: type[_ServerConnection] = _ServerConnection
    if sampler is not None:
        stamped_for = sampler

        class _SampledProtocol(_ServerProtocol):
            sampler = stamped_for

        class _SampledConnection(_ServerConnection):
            protocol_class = _SampledProtocol

        base = _SampledConnection
    if gate is None:
        return base
    admit = gate

    class GatedConnection(base):  # type: ignore[valid-type,misc]
        refused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if peer else ""
            if not admit.acquire(ip):
                # Dropped before websockets sees it: no handshake task, nothing to tear down.
                self.refused = True
                cast(asyncio.Transport, transport).abort()
                return
            super().connection_made(transport)  # starts the handshake task (and its open timeout)
            released = False

            def release(_: object) -> None:
                nonlocal released
                if not released:
                    released = True
                    admit.release(ip)
                    # Not held for the connection's life once done (about 200 bytes).
                    self.connection_lost_waiter.remove_done_callback(release)

            self.request_rcvd.add_done_callback(release)
            self.connection_lost_waiter.add_done_callback(release)

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.refused:
                super().connection_lost(exc)

    return GatedConnection


_NO_CONTEXT: Final = object()  # the upgrade was answered by an HttpReply (no context)
_PING_FRAME: Final = b"\x89\x00"  # FIN + ping, no payload (server frames are unmasked)


class _Keepalive:
    """One pinger for all of a listener's connections.

    websockets would run a task per connection (a task, two coroutines, a future and a
    timer: about 1 KB on every idle connection). Here each connection sits in one of
    ``SLOTS`` sets, and every ``interval / SLOTS`` one set is visited, so a connection is
    visited once per ``interval`` and the work is spread evenly, never N pings in one turn.
    At a visit, a connection from which no frame of any kind arrived since the previous
    visit's ping is taken for dead and closed with 1011; any other is sent a ping. A dead
    peer is thus closed between one and two intervals after its last frame, as websockets
    did with ``ping_timeout = ping_interval``. The timer runs only while connections are
    registered.
    """

    SLOTS: Final = 20

    def __init__(self, interval_s: float) -> None:
        self._tick_s = interval_s / self.SLOTS
        self._slots: list[set[Socket]] = [set() for _ in range(self.SLOTS)]
        self._next_slot = 0  # where the next connection goes (round robin)
        self._visit = 0  # the slot the next tick visits
        self._count = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, socket: Socket) -> None:
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.SLOTS
        self._slots[slot].add(socket)
        socket._ka_slot = slot
        self._count += 1
        if self._timer is None:
            self._timer = socket._loop.call_later(self._tick_s, self._tick)

    def discard(self, socket: Socket) -> None:
        slot = socket._ka_slot
        if slot < 0:
            return
        socket._ka_slot = -1
        self._slots[slot].discard(socket)
        self._count -= 1
        if self._count == 0 and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        slot = self._slots[self._visit]
        self._visit = (self._visit + 1) % self.SLOTS
        for socket in slot:
            if socket._closing or socket._protocol.state is not State.OPEN:
                continue
            marks = socket._marks
            if not marks.heard:
                socket.close_soon(
                    CloseCode.KEEPALIVE_TIMEOUT,
                    "keepalive ping timeout: no frame came back; reconnect and resume",
                )
            else:
                marks.heard = False
                socket._transport.write(_PING_FRAME)
        self._timer = asyncio.get_running_loop().call_later(self._tick_s, self._tick)


_NO_HEADERS: Final = Headers()  # never written: every connection shares it after its upgrade


def _drop_handshake_headers(connection: ServerConnection) -> None:
    """Let go of the upgrade's request and response headers (about 2.8 KB a connection).

    They are read during the upgrade only (credentials, origin, subprotocol: process_request);
    websockets needs the request object itself to stay (a None request is read as "the
    handshake is still to come"), not its headers.
    """
    if connection.request is not None:
        connection.request.headers = _NO_HEADERS
    if connection.response is not None:
        connection.response.headers = _NO_HEADERS


async def start_server(
    options: ListenOptions,
    on_request: RequestHook,
    on_socket: SocketHandler,
    accept_gate: AcceptGate | None = None,
    select_subprotocol: Callable[[Sequence[str]], str | None] | None = None,
    counts: FrameCounts | None = None,
    read_sampler: ReadSampler | None = None,
) -> Server:
    """Listen for WebSocket upgrades and plain HTTP GETs on one port.

    Compression stays off on purpose: frames are built once and shared by every
    subscriber (see the module docstring). Messages above ``max_frame_bytes``, or in
    more than MAX_FRAGMENTS fragments, close 1009; text that is not UTF-8 closes 1007.
    ``counts`` (optional) counts every socket's messages in and out; ``read_sampler``
    (optional) picks messages whose parse time sockets report (``Socket.read_at``).
    """

    # (context, its cleanup): lives only from process_request to handler (or close)
    contexts: dict[int, tuple[Any, Callable[[object], None]]] = {}

    def accept(connection: ServerConnection, outcome: Any) -> Response | None:
        if isinstance(outcome, HttpReply):
            return _to_response(outcome)
        key = id(connection)

        def forget(_: object) -> None:
            contexts.pop(key, None)

        contexts[key] = (outcome, forget)
        connection.connection_lost_waiter.add_done_callback(forget)
        return None

    async def accept_later(
        connection: ServerConnection, pending: Awaitable[Any]
    ) -> Response | None:
        return accept(connection, await pending)

    def process_request(
        connection: ServerConnection, request: Request
    ) -> Response | Awaitable[Response | None] | None:
        peer = connection.remote_address
        outcome = on_request(request.path, request.headers, str(peer[0]) if peer else "")
        if inspect.isawaitable(outcome):  # e.g. a credential checked against NATS
            return accept_later(connection, outcome)
        return accept(connection, outcome)

    keepalive = _Keepalive(options.ping_interval_s)
    flusher = _Flusher()

    def take_context(connection: ServerConnection) -> Any:
        entry = contexts.pop(id(connection), None)
        if entry is None:
            return _NO_CONTEXT
        context, forget = entry
        connection.connection_lost_waiter.remove_done_callback(forget)
        return context

    async def handler(connection: ServerConnection) -> None:
        # Its locals live as long as the connection: only what the connection needs.
        context = take_context(connection)
        if context is not _NO_CONTEXT:
            _drop_handshake_headers(connection)
            socket = Socket(connection, options.send_buffer_bytes, counts, flusher)
            socket.watch_idle(options.idle_timeout_s)
            keepalive.add(socket)
            try:
                await on_socket(context, socket)
            finally:
                keepalive.discard(socket)
                socket.stop_watching()

    return await serve(
        handler,
        options.host,
        options.port,
        create_connection=_connection_class(accept_gate, read_sampler),
        process_request=process_request,
        # Browsers send a token as a subprotocol and fail a handshake that echoes none
        # of the offered ones; ``select_subprotocol`` picks which one to echo.
        select_subprotocol=(
            None
            if select_subprotocol is None
            else lambda _conn, offered: cast(Subprotocol | None, select_subprotocol(offered))
        ),
        compression=None,
        max_size=options.max_frame_bytes,
        max_queue=16,
        write_limit=options.write_high_water,
        open_timeout=options.open_timeout_s,
        ping_interval=None,  # one _Keepalive for the listener instead of a task per connection
        close_timeout=options.close_timeout_s,
        server_header="ArqonBus",
        logger=_WS_LOG,
        ssl=options.ssl,
        # The TLS handshake comes before the HTTP one: bound it the same way (slowloris).
        ssl_handshake_timeout=options.open_timeout_s if options.ssl is not None else None,
        # Room for connection bursts (a reconnect storm): the default queue of 100
        # pending connections drops handshakes under load and clients retry after 1 s.
        backlog=_LISTEN_BACKLOG,
        reuse_port=options.reuse_port or None,
    )
