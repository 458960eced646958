"""The ArqonBus client: one WebSocket connection, reconnect and resume, exactly-once delivery.

Design
------
Every protocol decision and the state it needs (unacked events, subscription cursors and
queues, joins, pending commands, error mapping) live in the sans-I/O core
:class:`arqonbus._protocol.ClientProtocol`. This module is the asyncio shell around it: it
connects, reads frames into the core, sends the frames the core produces, and turns the
core's events into resolved futures, woken iterators and log lines.

One background task owns the socket. It connects (trying the gateway URLs in turn, with
jittered exponential backoff), reads frames and dispatches each one synchronously, in frame
order, then reconnects when the connection drops. Nothing else reads the socket.

On every (re)connect the client

* rejoins every subscription with ``since_seq`` = the last seq handed to the application
  (events that were queued but not handed yet are dropped and come again),
* registers every service handler again, and
* resends every unacknowledged publish with the same ``id`` (the gateway deduplicates by id,
  so an event that had been stored is acked with ``duplicate=True`` and its original seq).

A subscription accepts an event only when its seq is greater than the last seq it accepted,
and only after the ``command_response`` of its current join has been read (the gateway sends
that response before the first event of the membership). So the application sees every stored
event once, in seq order, across gateway crashes, drains (1012), slow-consumer closes (4001)
and network failures. Retention gaps are never silent: the iterator yields a :class:`Gap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import math
import random
import re
import socket
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
    WebSocketException,
)
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from arqonbus._admin import AdminCommands
from arqonbus._protocol import (
    PROTOCOL_VERSION,
    Acked,
    BatchAcked,
    ClientProtocol,
    CommandResult,
    Delivered,
    ErrorReceived,
    GapDetected,
    Joined,
    JoinRetry,
    MembersStale,
    Paused,
    PresenceReceived,
    ProtocolEvent,
    PublishFailed,
    RemovedFromRoom,
    ServiceRequest,
    SubscriptionFailed,
    SubscriptionState,
    answer_error,
    answer_result,
)
from arqonbus._tracing import ClientTracing
from arqonbus.errors import (
    ArqonBusError,
    AuthenticationError,
    ClientClosed,
    CommandFailed,
    ConnectionFailed,
    ConnectionLost,
    ConnectionRejected,
    HandshakeRefusal,
    Internal,
    RateLimited,
    Timeout,
    Unavailable,
)
from arqonbus.models import Ack, CommandRequest, Event, Gap, HistoryPage, Welcome
from arqonbus.presence import (
    PRESENCE_STATES,
    Member,
    MemberView,
    Occupancy,
    PresenceEvent,
    PresencePage,
)

if TYPE_CHECKING:
    from arqonbus.agent import AgentCredentials

__all__ = [
    "BUILTIN_COMMANDS",
    "Client",
    "CommandHandler",
    "History",
    "Subscription",
    "SubscriptionCallback",
]

log = logging.getLogger("arqonbus.client")
# websockets logs the handshake's headers and every frame at DEBUG, tokens included: its
# logger stays at INFO whatever the application's level.
_WS_LOG = logging.getLogger("arqonbus.client.websockets")
_WS_LOG.setLevel(logging.INFO)

ADMIN_COMMANDS = frozenset(
    {
        "ping",
        "status",
        "list_rooms",
        "list_channels",
        "channel_info",
        "create_room",
        "configure_room",
        "delete_room",
        "kick",
        "room_configure",
        "room_invite",
        "room_uninvite",
        "room_ban",
        "room_unban",
        "room_mute",
        "room_unmute",
        "room_info",
        "register_agent",
    }
)
BUILTIN_COMMANDS = ADMIN_COMMANDS | frozenset(
    {
        "join_channel",
        "leave_channel",
        "history",
        "register_handler",
        "unregister_handler",
        "limits",
        "refresh_token",
        "presence",
        "occupancy",
        "set_presence",
    }
)
SERVICE_FIRST = frozenset({"ping", "status"})
"""Built-in names services use too: in any room but ``_system`` they are service commands
(:meth:`Client.command`, :meth:`Client.handles`); the gateway's own ``ping`` and ``status``
are sent to room ``_system`` (:meth:`Client.ping`, :meth:`Client.status`)."""
_NOT_FOR_SERVICES = BUILTIN_COMMANDS - SERVICE_FIRST
PRESENCE_PAGE_MAX = 1000  # the most members one presence page holds
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_INITIAL_BACKOFF = 0.05
_MAX_RETRY_AFTER_S = 60.0  # the most a gateway's retry_after_ms can make the client wait

CommandHandler = Callable[[CommandRequest], Awaitable[dict[str, Any] | None]]
"""``async def handler(request: CommandRequest) -> dict``: the result of a service command."""

SubscriptionCallback = Callable[[Event | Gap], Awaitable[None] | None]
"""A callback for :meth:`Client.on`: sync or async, called once per item, in order."""

_H = TypeVar("_H", bound=Callable[..., Any])


_T = TypeVar("_T")


def _is_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.match(value) is not None


def _backoff(attempt: int, cap: float) -> float:
    """Jittered exponential backoff: about 0.05 s, 0.1 s, 0.2 s, ... up to ``cap``."""
    return random.uniform(0.5, 1.0) * min(cap, _INITIAL_BACKOFF * 2.0 ** min(attempt, 30))


def _round_delay(rounds: int, cap: float, asked: float) -> float:
    """The pause after a round of failed attempts: backoff, or what a gateway asked (plus up
    to 50% jitter, so clients told the same wait do not come back together), capped at 60 s."""
    if asked > 0:
        return min(60.0, asked * random.uniform(1.0, 1.5))
    return _backoff(rounds, cap)


def _describe(exc: BaseException) -> str:
    """A short, human reason for a failed connection attempt."""
    if isinstance(exc, InvalidStatus):
        return _describe_refusal(_refusal(exc))
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionClosed):
        return "the connection closed before the welcome message"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _describe_refusal(refusal: HandshakeRefusal) -> str:
    """``HTTP 503 (unavailable): starting: ...``: the status, then the gateway's own reason."""
    text = f"HTTP {refusal.status}" + (f" ({refusal.code})" if refusal.code else "")
    if refusal.message:
        return f"{text}: {refusal.message}"
    if refusal.code:
        return text
    if refusal.status == 503:
        return f"{text}: the gateway cannot take connections now (it gave no reason)"
    return text


_REASON_MAX = 300  # the most of a gateway's reason a refusal keeps
_CODE_PREFIX = re.compile(r"([A-Za-z0-9_-]{1,64}): (.+)\Z", re.DOTALL)


def _one_line(text: str) -> str:
    """Server text made safe for one log or terminal line: no control characters, bounded."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."


def _refusal(exc: InvalidStatus) -> HandshakeRefusal:
    """What the gateway said when it refused the upgrade, from its JSON body.

    The gateway answers ``{"error": code, "message": text}``, or ``{"error": "code: text"}``
    (draining, cut off from NATS). A body that is not JSON is kept as text; an empty one gives
    an empty code and message.
    """
    status = exc.response.status_code
    body = exc.response.body or b""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return HandshakeRefusal(status, "", _one_line(body[:1000].decode(errors="replace")))
    if not isinstance(data, dict):
        return HandshakeRefusal(status, "", "")
    error, message = data.get("error"), data.get("message")
    error = error.strip() if isinstance(error, str) else ""
    message = message.strip() if isinstance(message, str) else ""
    if not message and (prefixed := _CODE_PREFIX.match(error)):
        error, message = prefixed.group(1), prefixed.group(2)
    if _is_name(error):
        return HandshakeRefusal(status, error, _one_line(message))
    # Not a code: a free-text reason of its own.
    return HandshakeRefusal(status, "", _one_line(": ".join(t for t in (error, message) if t)))


def _http_error_message(exc: InvalidStatus) -> str:
    """The gateway's reason for a refusal (its message, else its code); "" when it gave none."""
    refusal = _refusal(exc)
    return refusal.message or refusal.code


class _AttemptFailed(Exception):
    """One connection attempt failed; try the next URL.

    ``retry_after`` (seconds) is how long the gateway asked us to wait before trying it again
    (HTTP 429 with ``Retry-After`` / ``retry_after_ms``); 0 when it did not say. ``refusal``
    is the gateway's HTTP answer when it refused the upgrade.
    """

    def __init__(
        self,
        message: str,
        retry_after: float = 0.0,
        refusal: HandshakeRefusal | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.refusal = refusal
        self.timed_out = timed_out  # the attempt ran out of its time


def _retry_after(exc: InvalidStatus) -> float:
    """Seconds a 429 asks to wait: the body's ``retry_after_ms``, else ``Retry-After``."""
    try:
        data = orjson.loads(exc.response.body or b"")
        ms = data.get("retry_after_ms") if isinstance(data, dict) else None
        if isinstance(ms, int | float) and not isinstance(ms, bool) and 0 <= ms <= 3_600_000:
            return float(ms) / 1000
    except orjson.JSONDecodeError:
        pass
    header = exc.response.headers.get("Retry-After", "")
    return float(header) if header.isdigit() and int(header) <= 3600 else 0.0


class Client(AdminCommands):
    """An ArqonBus connection that reconnects and resumes by itself.

    ``urls`` is one gateway URL (``ws://host:port/ws``) or several; the client connects to
    any of them and moves to the next one when one fails. ``token`` is sent as
    ``Authorization: Bearer <token>`` (dev mode: ``dev:<tenant>:<principal>``).

    Use it as ``async with Client(urls, token) as client: ...``, or call :meth:`connect`
    and :meth:`close`.

    Timeouts: ``connect_timeout`` bounds the first :meth:`connect` (and each attempt);
    ``request_timeout`` is the default of every call that has no timeout of its own.
    ``max_backoff`` caps the delay between reconnect attempts. ``queue_size`` is the
    default bound of each subscription's queue. ``handler_concurrency`` bounds how many
    service commands the client's handlers run at once. ``tracer_provider`` (an
    OpenTelemetry ``TracerProvider``; needs ``arqonbus[tracing]``) makes a PRODUCER span
    per publish, whose context goes in the event's ``trace`` field, and a CONSUMER span per
    delivered event; every event carries its creation context as ``event.trace_context``.

    ``proxy``: ``True`` (the default) connects through the proxy the environment names
    (``https_proxy``, ``http_proxy``, ``all_proxy``, ``no_proxy``, as websockets reads
    them), looked up once per gateway URL for the life of the client rather than at every
    reconnect; ``None`` connects directly; a URL (``http://proxy:3128``) uses that proxy.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str | None = None,
        *,
        agent: AgentCredentials | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 10.0,
        max_backoff: float = 5.0,
        queue_size: int = 10_000,
        handler_concurrency: int = 64,
        ping_interval: float | None = 20.0,
        max_frame_bytes: int = 64 * 1024 * 1024,
        tracer_provider: Any = None,
        proxy: str | bool | None = True,
    ) -> None:
        url_list = [u.strip() for u in urls.split(",")] if isinstance(urls, str) else list(urls)
        url_list = [u for u in url_list if u]
        if not url_list:
            raise ValueError("no gateway URL given: pass at least one ws://host:port/ws")
        for url in url_list:
            try:
                parse_uri(url)
            except InvalidURI as exc:
                raise ValueError(f"{url!r} is not a WebSocket URL (ws://host:port/ws)") from exc
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if handler_concurrency < 1:
            raise ValueError("handler_concurrency must be at least 1")
        if (token is None) == (agent is None):
            raise ValueError("pass exactly one credential: a token, or agent=AgentCredentials(...)")
        self.urls: list[str] = url_list
        self._token = token
        self._agent = agent
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_backoff = max_backoff
        self.queue_size = queue_size
        self._ping_interval = ping_interval
        self._max_frame_bytes = max_frame_bytes
        self._proxy: str | bool | None = proxy
        self._proxies: dict[str, str | None] = {}  # proxy=True: each URL's, looked up once
        # OpenTelemetry spans (arqonbus/_tracing.py), only with a tracer provider.
        self._tracing = ClientTracing(tracer_provider) if tracer_provider is not None else None

        self._conn: ClientConnection | None = None
        self._url: str | None = None
        self._url_index = 0
        self._welcome: Welcome | None = None
        self._core = ClientProtocol()  # every protocol decision and its state
        self._ready_event = asyncio.Event()  # set while ready, closing or failed
        self._closing = False
        self._fatal: ArqonBusError | None = None
        self._run_task: asyncio.Task[None] | None = None

        # Unacked publishes' callers: an event's Ack, or an events frame's BatchAcked.
        self._acks: dict[str, asyncio.Future[Ack | BatchAcked]] = {}
        self._slot_freed = asyncio.Event()
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subs: dict[tuple[str, str], Subscription] = {}
        self._handlers: dict[tuple[str, str, str], CommandHandler] = {}
        self._handler_slots = asyncio.Semaphore(handler_concurrency)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rate_slot_at = 0.0  # when the next rate-limited resend may go (_retry_delay)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while a connection is up and resumed."""
        return self._ready

    @property
    def _ready(self) -> bool:
        return self._core.connected

    @property
    def url(self) -> str | None:
        """The URL of the current (or last) connection."""
        return self._url

    @property
    def welcome(self) -> Welcome | None:
        """The welcome message of the current (or last) connection."""
        return self._welcome

    @property
    def error(self) -> ArqonBusError | None:
        """The fatal error that stopped the client (bad token, close code 4500-4999), if any."""
        return self._fatal

    async def connect(self) -> None:
        """Connect to one of the gateways, then keep the connection up in the background.

        Raises :class:`ConnectionFailed` if no gateway answered within ``connect_timeout``
        and :class:`AuthenticationError` if a gateway refused the token. Handlers registered
        before this call are registered before it returns (failures are logged).
        """
        if self._closing:
            raise ClientClosed("the client is closed; create a new one")
        if self._run_task is not None:
            raise RuntimeError("connect() was already called")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        conn, welcome = await self._open_first(deadline)
        resume = self._attach(conn, welcome)
        self._run_task = asyncio.create_task(self._run(conn), name="arqonbus-connection")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(resume), max(0.1, deadline - loop.time()))

    async def close(self) -> None:
        """Close the connection and stop reconnecting.

        Pending publishes and commands fail with :class:`ClientClosed`; subscription
        iterators end; handler and callback tasks are cancelled.
        """
        if self._closing:
            return
        self._closing = True
        self._core.connection_lost()
        self._ready_event.set()
        self._slot_freed.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5.0)
        if self._run_task is not None:
            self._run_task.cancel()
            await asyncio.gather(self._run_task, return_exceptions=True)
        closed = ClientClosed("the client was closed")
        self._fail_pending(closed, publishes=True)
        for sub in list(self._subs.values()):
            sub._end()
        self._subs.clear()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- publishing -------------------------------------------------------------------------

    async def publish(
        self,
        room: str,
        channel: str,
        payload: dict[str, Any],
        id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> Ack:
        """Publish one event and wait until the store acknowledged it.

        ``id`` is the idempotency key (default: a fresh uuid4 hex). Until the ack arrives the
        event stays in the client's unacked set; if the connection drops it is resent with
        the same ``id`` after the reconnect (while disconnected, the call waits). At most
        ``welcome.limits.max_in_flight`` publishes are in flight at once; more wait.

        Raises the mapped :class:`ArqonBusError` when the gateway rejects the event, and
        :class:`Timeout` when no ack arrived within ``timeout`` (default
        ``request_timeout``). After a timeout the outcome is unknown: publish again with the
        **same** ``id`` to be sure (a stored event is acked with ``duplicate=True``).
        Retryable errors (``unavailable``, ``internal``) are retried with the same ``id``
        and backoff; the error is raised only when the timeout leaves no room for another
        attempt.
        """
        if self._tracing is not None:
            return await self._publish_traced(self._tracing, room, channel, payload, id, timeout)
        msg_id, frame = self._core.encode_event(room, channel, payload, id)
        ack = await self._publish_frame(msg_id, frame, timeout)
        assert isinstance(ack, Ack)
        return ack

    async def publish_many(
        self,
        room: str,
        channel: str,
        payloads: Sequence[dict[str, Any]],
        ids: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> list[Ack]:
        """Publish up to 500 events to one channel in one ``events`` frame and wait until
        the store acknowledged all of them: their acks, in order.

        The events are stored in the list's order, each exactly as :meth:`publish` would
        store it (``ids``: their idempotency keys, default fresh ones). The frame counts as
        one publish in flight. Everything :meth:`publish` says of resends holds for the
        frame as a whole: unacked, it is resent after a reconnect; retryable errors are
        retried with the same ids, and what was stored comes back as duplicates.

        Raises ``ValueError`` for an empty list, more than 500 events or repeated ids, and
        the mapped :class:`ArqonBusError` when the gateway refuses the frame (one event
        refused by a content policy or a size limit refuses all: nothing is stored; the
        error's ``event_index`` and ``event_id`` name it).
        """
        if self._tracing is not None:
            span, trace = self._tracing.start_send(room, channel)
            batch_id = ""
            try:
                batch_id, event_ids, frame = self._core.encode_events(
                    room, channel, payloads, ids, trace
                )
                acked = await self._publish_frame(batch_id, frame, timeout)
            except BaseException as exc:
                self._tracing.end_send(span, batch_id, None, exc)
                raise
            assert isinstance(acked, BatchAcked)
            self._tracing.end_send(span, batch_id, acked.seqs[-1] if acked.seqs else None, None)
            return acked.acks(event_ids)
        batch_id, event_ids, frame = self._core.encode_events(room, channel, payloads, ids)
        acked = await self._publish_frame(batch_id, frame, timeout)
        assert isinstance(acked, BatchAcked)
        return acked.acks(event_ids)

    async def _publish_traced(
        self,
        tracing: ClientTracing,
        room: str,
        channel: str,
        payload: dict[str, Any],
        id: str | None,
        timeout: float | None,
    ) -> Ack:
        """:meth:`publish` inside a PRODUCER span whose context is the event's ``trace``."""
        span, trace = tracing.start_send(room, channel)
        msg_id = id or ""
        try:
            msg_id, frame = self._core.encode_event(room, channel, payload, id, trace)
            ack = await self._publish_frame(msg_id, frame, timeout)
            assert isinstance(ack, Ack)
        except BaseException as exc:
            tracing.end_send(span, msg_id, None, exc)
            raise
        tracing.end_send(span, msg_id, ack.seq, None)
        return ack

    async def _publish_frame(
        self, msg_id: str, frame: bytes, timeout: float | None
    ) -> Ack | BatchAcked:
        self._check_usable()
        if msg_id in self._acks:
            raise ValueError(f"a publish with id {msg_id!r} is already waiting for its ack")
        budget = self.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        attempt = 0
        last_error: ArqonBusError | None = None
        while True:
            try:
                return await self._publish_once(msg_id, frame, deadline)
            except (Unavailable, Internal, RateLimited) as exc:
                # Retryable, and safe: a resend with the same id is never stored twice.
                delay = self._retry_delay(exc, attempt, deadline)
                attempt += 1
                if delay is None:
                    raise
                log.debug("publish of %s failed (%s); resending", msg_id, exc)
                last_error = exc
                await asyncio.sleep(delay)
            except TimeoutError:
                if last_error is not None:
                    # The budget ran out during a resend: the store's own answer says more.
                    raise last_error from None
                raise Timeout(
                    f"no ack for event {msg_id!r} within {budget:g}s; it may or may not be "
                    "stored: publish again with the same id to be sure",
                    request_id=msg_id,
                ) from None

    async def _publish_once(self, msg_id: str, frame: bytes, deadline: float) -> Ack | BatchAcked:
        """Send once (and again after each reconnect) until the ack or an error arrives."""
        future: asyncio.Future[Ack | BatchAcked] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout_at(deadline):
                while self._core.in_flight >= self._core.limits["max_in_flight"]:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    self._check_usable()
                if msg_id in self._acks:
                    raise ValueError(f"a publish with id {msg_id!r} is already waiting for its ack")
                self._core.send_event(msg_id, frame)
                self._acks[msg_id] = future
                await self._send_pending()
                return await future
        finally:
            if self._acks.get(msg_id) is future:
                del self._acks[msg_id]
                self._core.forget_event(msg_id)
                self._slot_freed.set()

    # -- subscribing ------------------------------------------------------------------------

    def subscribe(
        self,
        room: str,
        channel: str,
        since_seq: int | None = None,
        *,
        queue_size: int | None = None,
        room_key: str | None = None,
        presence: bool | None = None,
        presence_events: bool | None = None,
        track_members: bool = False,
    ) -> Subscription:
        """A subscription to one channel: an async iterator of :class:`Event` and :class:`Gap`.

        Nothing is sent until the first iteration or ``await sub.start()``. Without
        ``since_seq`` delivery starts now; with ``since_seq=N`` every stored event with
        ``seq > N`` comes first. ``queue_size`` (default: the client's) bounds the events
        held for the application; when it is full the subscription pauses and later resumes
        from the store, so nothing is lost and memory stays bounded.

        One client holds at most one subscription per room and channel. ``room_key``
        enters a private room (sent with every join, also after a reconnect).

        Presence (docs/presence.md): ``presence=True`` enters this connection in the
        channel's presence, ``presence_events=True`` delivers ``presence`` frames as
        :class:`PresenceEvent` items of ``sub.presence()`` (needs the ``presence``
        permission: else the join fails with :class:`Forbidden`); ``None`` leaves each to the
        room's default. ``track_members=True`` keeps ``sub.members``, the channel's member
        list, by snapshot + diff; it needs presence events, and is read again after every
        resume and every overflow frame.
        """
        if since_seq is not None and (
            isinstance(since_seq, bool) or not isinstance(since_seq, int) or since_seq < 0
        ):
            raise ValueError("since_seq must be an integer >= 0")
        size = self.queue_size if queue_size is None else queue_size
        if size < 1:
            raise ValueError("queue_size must be at least 1")
        if track_members and presence_events is False:
            raise ValueError("track_members needs presence events: drop presence_events=False")
        sub = Subscription(self, room, channel, since_seq, size, room_key)
        state = sub._state
        state.presence, state.presence_events = presence, presence_events
        if track_members:
            state.members = MemberView()
            if presence_events is None:
                state.presence_events = True
        return sub

    async def on(
        self,
        room: str,
        channel: str,
        callback: SubscriptionCallback,
        since_seq: int | None = None,
        *,
        queue_size: int | None = None,
    ) -> Subscription:
        """Subscribe and call ``callback`` for each :class:`Event` or :class:`Gap`.

        The callback may be sync or async. It is called in order, one item at a time. An
        exception in the callback is logged and delivery goes on with the next item. Returns
        the started subscription; ``await sub.close()`` stops it.
        """
        sub = self.subscribe(room, channel, since_seq, queue_size=queue_size)
        await sub.start()
        sub._callback_task = self._spawn(self._run_callback(sub, callback))
        return sub

    async def _run_callback(self, sub: Subscription, callback: SubscriptionCallback) -> None:
        try:
            async for item in sub:
                try:
                    result = callback(item)
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("callback for %s/%s failed on %r", sub.room, sub.channel, item)
        except ArqonBusError as exc:
            log.error("subscription %s/%s stopped: %s", sub.room, sub.channel, exc)

    # -- history ----------------------------------------------------------------------------

    def history(
        self,
        room: str,
        channel: str,
        since_seq: int = 0,
        limit: int | None = 100,
        *,
        page_size: int | None = None,
        timeout: float | None = None,
        room_key: str | None = None,
    ) -> History:
        """Stored events of a channel with ``seq > since_seq``, without joining it.

        ``async for event in client.history(...)`` yields :class:`Event` objects;
        ``async for page in client.history(...).pages()`` yields :class:`HistoryPage`
        objects. Pages follow ``next_since_seq`` while the gateway says ``more``. ``limit``
        caps the total number of events (``None``: everything); ``page_size`` (default: up
        to ``welcome.limits.history_max_limit``) caps each request. Each page request is
        retried internally across reconnects, within ``timeout`` (default
        ``request_timeout``).
        """
        if isinstance(since_seq, bool) or not isinstance(since_seq, int) or since_seq < 0:
            raise ValueError("since_seq must be an integer >= 0")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError("limit must be an integer >= 1, or None for no limit")
        if page_size is not None and page_size < 1:
            raise ValueError("page_size must be at least 1")
        return History(self, room, channel, since_seq, limit, page_size, timeout, room_key)

    # -- commands ---------------------------------------------------------------------------

    async def command(
        self,
        room: str,
        channel: str,
        command: str,
        params: dict[str, Any] | None = None,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        """Call a service command and return its result.

        The gateway routes the command to one connection that registered a handler for it on
        this room and channel, and waits ``timeout`` seconds for the answer (sent as
        ``payload.timeout_ms``). The client waits ``timeout`` + 1 s for the reply.

        Raises :class:`NoResponders` when no handler is registered, :class:`Timeout` when
        the handler did not answer in time (it may still have run the command),
        :class:`CommandFailed` (or the mapped class) for the handler's own error, and
        :class:`ConnectionLost` if the connection dropped before the reply: commands are not
        idempotent, so the client does not resend them.

        Built-in commands cannot be sent this way (``ValueError``): use :meth:`subscribe`,
        :meth:`history` and :meth:`register_handler`. ``ping`` and ``status`` can
        (:data:`SERVICE_FIRST`): outside room ``_system`` they are service commands.
        """
        if command in _NOT_FOR_SERVICES:
            raise ValueError(
                f"{command!r} is a built-in command: use subscribe(), history(), "
                "register_handler(), unregister_handler(), admin(), limits() or "
                "refresh_token()"
            )
        if params is not None and not isinstance(params, dict):
            raise TypeError("params must be a dict or None")
        timeout_ms = max(1, int(timeout * 1000))
        if self._tracing is None:
            return await self._request(
                room,
                channel,
                command,
                params or {},
                timeout=timeout + 1.0,
                extra={"timeout_ms": timeout_ms},
            )
        span, trace = self._tracing.start_call(room, channel, command)
        try:
            result = await self._request(
                room,
                channel,
                command,
                params or {},
                timeout=timeout + 1.0,
                extra={"timeout_ms": timeout_ms},
                trace=trace,
            )
        except BaseException as exc:
            self._tracing.end_call(span, exc)
            raise
        self._tracing.end_call(span, None)
        return result

    async def admin(
        self,
        room: str,
        command: str,
        params: dict[str, Any] | None = None,
        *,
        channel: str = "admin",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run a built-in admin command on ``room``; needs the ``admin`` permission there.

        ``command`` is one of :data:`ADMIN_COMMANDS`: ``room_configure`` (``private``,
        ``key``, ``invite_only``), ``room_invite``/``room_uninvite``, ``room_ban``/
        ``room_unban`` (``principal``, ``duration_s``, ``reason``), ``room_mute``/
        ``room_unmute``, ``room_info``, ``register_agent`` (``public_key``, ``name``,
        ``role``), and the room and tenant commands of docs/protocol.md (``ping``,
        ``status``, ``list_rooms``, ``list_channels``, ``channel_info``, ``create_room``,
        ``configure_room``, ``delete_room``, ``kick``; typed helpers: :meth:`ping`, ...;
        the gateway answers ``ping`` and ``status`` only in room ``_system``). Raises
        :class:`Forbidden` without the permission. Not retried.
        """
        if command not in ADMIN_COMMANDS:
            raise ValueError(
                f"{command!r} is not an admin command: use one of {sorted(ADMIN_COMMANDS)}"
            )
        budget = self.request_timeout if timeout is None else timeout
        return await self._request(room, channel, command, params or {}, timeout=budget)

    # -- presence (issue 16) ----------------------------------------------------------------

    async def presence(
        self,
        room: str,
        channel: str,
        *,
        state: str | None = None,
        page_size: int = PRESENCE_PAGE_MAX,
        timeout: float | None = None,
    ) -> list[Member]:
        """Every member present in the channel, sorted by principal (all pages read).

        ``state`` (``"online"`` or ``"idle"``) keeps only members in that state. Pages are
        read one after the other while the channel changes: for a list kept current, use
        ``subscribe(..., track_members=True)``. Needs the ``presence`` permission. Each page
        is retried across reconnects within ``timeout`` (default ``request_timeout``).
        """
        pages = self.presence_pages(
            room, channel, state=state, page_size=page_size, timeout=timeout
        )
        return [member async for page in pages for member in page.members]

    async def presence_pages(
        self,
        room: str,
        channel: str,
        *,
        state: str | None = None,
        page_size: int = PRESENCE_PAGE_MAX,
        timeout: float | None = None,
    ) -> AsyncIterator[PresencePage]:
        """The channel's members one :class:`PresencePage` at a time (for huge channels)."""
        if state is not None and state not in PRESENCE_STATES:
            raise ValueError(f"state must be 'online' or 'idle', not {state!r}")
        if isinstance(page_size, bool) or not 1 <= page_size <= PRESENCE_PAGE_MAX:
            raise ValueError(f"page_size must be 1-{PRESENCE_PAGE_MAX}")
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if cursor is not None:
                params["cursor"] = cursor
            if state is not None:
                params["state"] = state
            result = await self._request_idempotent(room, channel, "presence", params, timeout)
            page = PresencePage.from_wire(result)
            yield page
            if page.next_cursor is None or page.next_cursor in seen:
                return  # the last page (a cursor seen before would only loop)
            seen.add(page.next_cursor)
            cursor = page.next_cursor

    async def occupancy(
        self, room: str, channel: str, *, timeout: float | None = None
    ) -> Occupancy:
        """The channel's counts (members, connections, online, idle) and view position.
        Cheap: the gateway answers from its view. Needs the ``presence`` permission."""
        result = await self._request_idempotent(room, channel, "occupancy", {}, timeout)
        return Occupancy.from_wire(result)

    async def set_presence(
        self,
        state: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Set this connection's presence state and/or metadata in every channel it is
        present in, and for later joins; kept across reconnects (set again first).

        ``state``: ``"online"`` or ``"idle"``; ``metadata``: a JSON object (at most 1024
        bytes encoded, 32 keys) that replaces the previous one. Returns ``{"state",
        "metadata", "channels"}``. Raises :class:`InvalidParameters` over a limit.
        """
        if state is None and metadata is None:
            raise ValueError("pass state, metadata, or both")
        if state is not None and state not in PRESENCE_STATES:
            raise ValueError(f"state must be 'online' or 'idle', not {state!r}")
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict (a JSON object)")
        params: dict[str, Any] = {}
        if state is not None:
            params["state"] = state
        if metadata is not None:
            params["metadata"] = metadata
        budget = self.request_timeout if timeout is None else timeout
        result = await self._request("presence", "presence", "set_presence", params, budget)
        self._core.remember_presence(params)
        return result

    async def limits(self, *, timeout: float | None = None) -> dict[str, Any]:
        """This connection's limits and current usage (rates, tokens left, channels, ...)."""
        budget = self.request_timeout if timeout is None else timeout
        return await self._request("limits", "limits", "limits", {}, timeout=budget)

    async def refresh_token(self, token: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Replace the credential in place (same principal), before the old one expires.

        The gateway checks ``token`` and moves the connection's expiry (close 4004) to the
        new one's; later reconnects use it too. Returns ``{expires_at, role}``. Raises
        :class:`Forbidden` for another principal's token, :class:`InvalidParameters` for a
        token the gateway refuses.
        """
        if self._token is None:
            raise ValueError("an agent signs in afresh on each connect: no token to refresh")
        budget = self.request_timeout if timeout is None else timeout
        result = await self._request("auth", "auth", "refresh_token", {"token": token}, budget)
        self._token = token
        return result

    def handles(self, room: str, channel: str, command: str) -> Callable[[_H], _H]:
        """Decorator: answer service ``command`` on ``room``/``channel`` with the function.

        ``async def handler(request: CommandRequest) -> dict`` returns the result. Raise
        :class:`CommandFailed` to answer with an error of your own code; any other exception
        answers ``internal`` ("handler failed: <ExceptionType>") and is logged here.

        The registration is sent at connect and after every reconnect. If the client is
        connected already, it is sent at once in the background (failures are logged); use
        :meth:`register_handler` to wait for it.
        """
        self._check_handler_name(command)

        def decorate(fn: _H) -> _H:
            self._handlers[(room, channel, command)] = fn
            if self._ready:
                self._spawn(self._register_logged(room, channel, command))
            return fn

        return decorate

    async def register_handler(
        self,
        room: str,
        channel: str,
        command: str,
        fn: CommandHandler,
        *,
        timeout: float | None = None,
    ) -> None:
        """Register ``fn`` as the handler of ``command`` and wait for the gateway to confirm.

        Before :meth:`connect` it only records the handler (it is registered on connect).
        Raises the mapped error if the gateway refuses (the handler is then forgotten).
        """
        self._check_handler_name(command)
        key = (room, channel, command)
        self._handlers[key] = fn
        if self._run_task is None and not self._closing:
            return
        try:
            await self._request_idempotent(
                room, channel, "register_handler", {"command": command}, timeout
            )
        except ArqonBusError as exc:
            if not exc.retryable and self._handlers.get(key) is fn:
                del self._handlers[key]
            raise

    async def unregister_handler(
        self, room: str, channel: str, command: str, *, timeout: float | None = None
    ) -> None:
        """Stop handling ``command``. Deliveries already running still get their answer."""
        self._check_handler_name(command)
        self._handlers.pop((room, channel, command), None)
        if self._run_task is None:
            return
        # A lost connection ended the registration anyway, and it is not sent again.
        with contextlib.suppress(ConnectionLost):
            await self._request(
                room,
                channel,
                "unregister_handler",
                {"command": command},
                timeout=self.request_timeout if timeout is None else timeout,
            )

    @staticmethod
    def _check_handler_name(command: str) -> None:
        if command in _NOT_FOR_SERVICES:
            raise ValueError(f"{command!r} is a built-in command and cannot be handled")
        if not _is_name(command):
            raise ValueError(
                f"command {command!r} is not a valid name: 1-64 characters of A-Z a-z 0-9 _ -"
            )

    async def _register_logged(self, room: str, channel: str, command: str) -> None:
        try:
            await self._request(
                room, channel, "register_handler", {"command": command}, self.request_timeout
            )
        except ConnectionLost:
            log.debug(
                "registration of %s on %s/%s interrupted; redone on reconnect",
                command,
                room,
                channel,
            )
        except ArqonBusError as exc:
            log.warning("could not register handler %s on %s/%s: %s", command, room, channel, exc)

    # -- requests ---------------------------------------------------------------------------

    def _retry_delay(self, exc: ArqonBusError, attempt: int, deadline: float) -> float | None:
        """How long to wait before resending after a retryable error, or None when the wait
        would end past ``deadline`` (loop time: the caller gives up).

        Over a rate limit the gateway says when to come back (``retry_after_ms``: when its
        bucket holds one frame again). The resends of every call share one queue of slots
        spaced that far apart (a little more), so calls refused together go out again at the
        bucket's rate, not all at once, which would have all but one refused again. A slot is
        taken only by a caller that will wait for it, and the queue reaches at most
        ``_MAX_RETRY_AFTER_S`` ahead. Otherwise jittered exponential backoff.
        """
        now = asyncio.get_running_loop().time()
        if not isinstance(exc, RateLimited) or exc.retry_after_ms <= 0:
            delay = _backoff(attempt, self.max_backoff)
            return delay if now + delay < deadline else None
        spacing = min(exc.retry_after_ms * 1.05 + 1, _MAX_RETRY_AFTER_S * 1000) / 1000
        at = max(now + spacing, min(self._rate_slot_at, now + _MAX_RETRY_AFTER_S))
        if at >= deadline:
            return None
        self._rate_slot_at = at + spacing
        return at - now

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise ClientClosed("the client is closed")
        if self._run_task is None:
            raise ClientClosed("not connected: call await client.connect() or use async with")

    async def _wait_ready(self) -> ClientConnection:
        while True:
            self._check_usable()
            conn = self._conn
            if self._ready and conn is not None:
                return conn
            await self._ready_event.wait()

    async def _request(
        self,
        room: str,
        channel: str,
        command: str,
        parameters: dict[str, Any],
        timeout: float,
        extra: dict[str, Any] | None = None,
        trace: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send one command and return its result; errors raise.

        Not retried, except over a rate limit: the gateway did not act on the command, so
        it is sent again after ``retry_after_ms`` while ``timeout`` allows.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in itertools.count():
            try:
                return await self._request_once(
                    room, channel, command, parameters, deadline - loop.time(), extra, trace
                )
            except RateLimited as exc:
                delay = self._retry_delay(exc, attempt, deadline)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _request_once(
        self,
        room: str,
        channel: str,
        command: str,
        parameters: dict[str, Any],
        timeout: float,
        extra: dict[str, Any] | None = None,
        trace: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        request_id = self._core.new_request_id(command)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._wait_ready()
                self._core.command(room, channel, command, parameters, extra, request_id, trace)
                self._pending[request_id] = future
                await self._send_pending()
                return await future
        except TimeoutError:
            raise Timeout(
                f"no reply to {command} on {room}/{channel} within {timeout:g}s",
                request_id=request_id,
            ) from None
        finally:
            self._pending.pop(request_id, None)
            self._core.forget_command(request_id)

    async def _request_idempotent(
        self,
        room: str,
        channel: str,
        command: str,
        parameters: dict[str, Any],
        timeout: float | None,
    ) -> dict[str, Any]:
        """:meth:`_request`, retried on a lost connection and on retryable server errors."""
        loop = asyncio.get_running_loop()
        budget = self.request_timeout if timeout is None else timeout
        deadline = loop.time() + budget
        attempt = 0
        last_error: ArqonBusError | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                if last_error is not None:  # the server's own answer says more
                    raise last_error
                raise Timeout(f"{command} on {room}/{channel} did not succeed within {budget:g}s")
            try:
                return await self._request(room, channel, command, parameters, remaining)
            except ConnectionLost:
                continue  # _request waits for the next connection
            except Timeout:
                if last_error is not None:  # the budget ran out during a retry
                    raise last_error from None
                raise
            except (Unavailable, Internal, RateLimited) as exc:
                delay = self._retry_delay(exc, attempt, deadline)
                attempt += 1
                if delay is None:
                    raise exc from None
                last_error = exc
                log.debug("%s on %s/%s failed (%s); retrying", command, room, channel, exc)
                await asyncio.sleep(delay)

    async def _send_on(self, conn: ClientConnection, frame: bytes) -> None:
        """Send on one specific connection; if it is gone, the reconnect logic takes over."""
        with contextlib.suppress(ConnectionClosed):
            await conn.send(frame, text=True)

    async def _send_all(self, conn: ClientConnection, frames: list[bytes]) -> None:
        for frame in frames:
            await self._send_on(conn, frame)

    async def _send_pending(self) -> None:
        """Send what the core has to send, on the current connection, in order."""
        frames = self._core.data_to_send()
        conn = self._conn
        if frames and conn is not None:
            await self._send_all(conn, frames)

    def _flush(self) -> None:
        """:meth:`_send_pending` from synchronous code (the reader, callbacks)."""
        frames = self._core.data_to_send()
        conn = self._conn
        if frames and conn is not None:
            self._spawn(self._send_all(conn, frames))

    def _spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # -- connecting -------------------------------------------------------------------------

    async def _open(self, url: str, timeout: float) -> tuple[ClientConnection, Welcome]:
        """One attempt: handshake and welcome. Raises _AttemptFailed or AuthenticationError."""
        # An agent signs in by its first frame (it signs the gateway's nonce); a token
        # travels in the handshake.
        headers = {} if self._token is None else {"Authorization": f"Bearer {self._token}"}
        try:
            conn = await ws_connect(
                url,
                proxy=self._proxy_for(url),
                additional_headers=headers,
                logger=_WS_LOG,
                open_timeout=timeout,
                compression=None,
                max_size=self._max_frame_bytes,
                max_queue=64,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
                close_timeout=5.0,
            )
        except InvalidStatus as exc:
            if exc.response.status_code == 401:
                detail = _http_error_message(exc) or "unauthorized"
                raise AuthenticationError(f"{url} refused the token: {detail}") from None
            if exc.response.status_code == 403:  # e.g. forbidden_origin: retrying cannot help
                detail = _http_error_message(exc) or "forbidden"
                raise AuthenticationError(f"{url} refused the connection: {detail}") from None
            wait = _retry_after(exc) if exc.response.status_code == 429 else 0.0
            refusal = _refusal(exc)
            raise _AttemptFailed(_describe_refusal(refusal), wait, refusal) from None
        except (OSError, TimeoutError, InvalidHandshake, WebSocketException) as exc:
            raise _AttemptFailed(_describe(exc), timed_out=isinstance(exc, TimeoutError)) from None
        try:
            raw = await asyncio.wait_for(conn.recv(), timeout)
            message = orjson.loads(raw)
            if self._agent is not None and isinstance(message, dict):
                raw = await self._sign_in(conn, url, message, timeout)
                message = orjson.loads(raw)
            if not isinstance(message, dict) or message.get("type") != "welcome":
                raise _AttemptFailed(f"expected a welcome message, got {str(raw)[:100]}")
            return conn, Welcome.from_wire(message)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)
            if isinstance(exc, _AttemptFailed | AuthenticationError | asyncio.CancelledError):
                raise
            if isinstance(exc, orjson.JSONDecodeError):
                raise _AttemptFailed("the welcome message is not JSON") from None
            if isinstance(exc, Exception):
                timed_out = isinstance(exc, TimeoutError)
                raise _AttemptFailed(_describe(exc), timed_out=timed_out) from None
            raise

    def _proxy_for(self, url: str) -> str | None:
        """The proxy for ``url``. The environment's is looked up once per URL: websockets
        would read the whole environment again at every attempt, a cost that shows when
        thousands of clients in one process reconnect at once."""
        if self._proxy is not True:
            return self._proxy or None
        if url not in self._proxies:
            self._proxies[url] = get_proxy(parse_uri(url))
        return self._proxies[url]

    async def _sign_in(
        self, conn: ClientConnection, url: str, message: dict[str, Any], timeout: float
    ) -> str | bytes:
        """Answer ``auth_required`` with the agent's signature of its nonce; the next frame."""
        assert self._agent is not None
        nonce = (message.get("payload") or {}).get("nonce")
        if message.get("type") != "auth_required" or not isinstance(nonce, str):
            raise _AttemptFailed(f"{url} offered no sign-in nonce (auth_required)")
        frame = {
            "version": PROTOCOL_VERSION,
            "id": uuid.uuid4().hex,
            "type": "auth",
            "payload": {"token": self._agent.token(nonce)},
        }
        await conn.send(orjson.dumps(frame).decode())
        try:
            return await asyncio.wait_for(conn.recv(), timeout)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if code is not None and 4500 <= code <= 4999:
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                raise AuthenticationError(f"{url} refused the agent: {reason}") from None
            raise

    def _attempt_timeout(self) -> float:
        return max(0.5, min(self.connect_timeout, 10.0))

    async def _open_first(self, deadline: float) -> tuple[ClientConnection, Welcome]:
        loop = asyncio.get_running_loop()
        reasons: dict[str, str] = {}
        refusals: dict[str, HandshakeRefusal] = {}  # the last HTTP refusal of each URL
        tried = 0
        rounds = 0
        asked = 0.0  # the longest Retry-After of this round
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                summary = "; ".join(f"{u}: {r}" for u, r in reasons.items()) or "timed out"
                raise ConnectionFailed(f"cannot reach any gateway ({summary})", refusals=refusals)
            url = self.urls[self._url_index % len(self.urls)]
            budget = min(remaining, self._attempt_timeout())
            try:
                conn, welcome = await self._open(url, budget)
                self._url = url
                return conn, welcome
            except _AttemptFailed as exc:
                if exc.timed_out and budget < self._attempt_timeout() and url in reasons:
                    # Cut short by connect_timeout, not refused: what this gateway answered
                    # before (a 503 and its reason, say) tells more than "timed out".
                    continue
                reasons[url] = str(exc)
                if exc.refusal is not None:
                    refusals[url] = exc.refusal
                else:
                    refusals.pop(url, None)
                asked = max(asked, exc.retry_after)
                log.debug("cannot connect to %s: %s", url, exc)
            self._url_index += 1
            tried += 1
            if tried % len(self.urls) == 0:
                delay = _round_delay(rounds, self.max_backoff, asked)
                rounds, asked = rounds + 1, 0.0
                await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))

    async def _reopen(self) -> tuple[ClientConnection, Welcome]:
        """Reconnect until it works (or the client closes). Raises AuthenticationError."""
        self._url_index += 1  # prefer another gateway than the one that just went away
        await asyncio.sleep(random.uniform(0.0, _INITIAL_BACKOFF))
        tried = 0
        rounds = 0
        asked = 0.0  # the longest Retry-After of this round
        while True:
            url = self.urls[self._url_index % len(self.urls)]
            try:
                conn, welcome = await self._open(url, self._attempt_timeout())
                self._url = url
                return conn, welcome
            except _AttemptFailed as exc:
                asked = max(asked, exc.retry_after)
                log.warning("cannot reconnect to %s: %s; retrying", url, exc)
            self._url_index += 1
            tried += 1
            if tried % len(self.urls) == 0:
                await asyncio.sleep(_round_delay(rounds, self.max_backoff, asked))
                rounds, asked = rounds + 1, 0.0

    def _attach(self, conn: ClientConnection, welcome: Welcome) -> asyncio.Task[None]:
        """Make ``conn`` the current connection and start resuming on it."""
        self._conn, self._welcome = conn, welcome
        return self._spawn(self._resume(conn, welcome))

    async def _run(self, conn: ClientConnection) -> None:
        """The connection task: read until the connection drops, then reconnect and resume."""
        try:
            await self._run_connections(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave callers waiting forever
            log.exception("the connection task failed")
            self._set_fatal(Internal(f"the client's connection task failed: {exc!r}"))

    async def _run_connections(self, conn: ClientConnection) -> None:
        while True:
            try:
                code, reason = await self._read(conn)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 1.0)
            self._on_disconnect()
            if self._closing:
                return
            if 4500 <= code <= 4999:
                self._set_fatal(
                    ConnectionRejected(
                        f"the gateway closed the connection with {code} ({reason or 'no reason'}): "
                        "it must not be retried as is",
                        close_code=code,
                    )
                )
                return
            log.warning(
                "connection to %s closed (%d%s); reconnecting",
                self._url,
                code,
                f" {reason}" if reason else "",
            )
            try:
                conn, welcome = await self._reopen()
            except AuthenticationError as exc:
                self._set_fatal(exc)
                return
            log.warning("reconnected to %s (node %s)", self._url, welcome.node)
            self._attach(conn, welcome)

    async def _read(self, conn: ClientConnection) -> tuple[int, str]:
        try:
            async for raw in conn:
                try:
                    message = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    log.warning("ignoring a frame that is not JSON: %r", raw[:100])
                    continue
                if not isinstance(message, dict):
                    continue
                try:
                    self._dispatch(message, conn)
                except Exception:
                    log.exception("failed to process %r", message)
        except ConnectionClosed:
            pass
        except Exception as exc:  # e.g. a transport error outside websockets' own handling
            log.warning("reading from %s failed: %r", self._url, exc)
            return 1006, ""
        return conn.close_code or 1006, conn.close_reason or ""

    async def _resume(self, conn: ClientConnection, welcome: Welcome) -> None:
        """After (re)connecting: rejoin, resend unacked publishes, register handlers."""
        # Synchronous part: what to resend is fixed at the moment the client becomes ready.
        resent = self._core.in_flight
        self._core.connection_made(welcome)
        frames = self._core.data_to_send()
        handlers = list(self._handlers)
        self._ready_event.set()
        await self._send_all(conn, frames)
        if resent:
            log.info("resent %d unacked event(s) to %s", resent, self._url)
        await asyncio.gather(*(self._register_logged(*key) for key in handlers))

    def _on_disconnect(self) -> None:
        self._core.connection_lost()
        if not self._closing and self._fatal is None:
            self._ready_event.clear()
        self._fail_pending(
            ClientClosed("the client was closed")
            if self._closing
            else ConnectionLost("the connection dropped before the reply")
        )

    def _fail_pending(self, exc: ArqonBusError, publishes: bool = False) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)
        if publishes:
            self._core.abandon()
            acks, self._acks = self._acks, {}
            for ack in acks.values():
                if not ack.done():
                    ack.set_exception(exc)
            self._slot_freed.set()

    def _set_fatal(self, exc: ArqonBusError) -> None:
        log.error("%s", exc)
        self._fatal = exc
        self._core.connection_lost()
        self._ready_event.set()
        self._fail_pending(exc, publishes=True)
        for sub in list(self._subs.values()):
            sub._fail(exc)

    # -- dispatch (runs in the reader, in frame order) -------------------------------------

    def _dispatch(self, message: dict[str, Any], conn: ClientConnection) -> None:
        for event in self._core.receive(message):
            self._handle(event, conn)
        self._flush()

    def _handle(self, event: ProtocolEvent, conn: ClientConnection) -> None:
        """Carry out what the core decided: resolve futures, wake iterators, log."""
        match event:
            case Delivered(event=item):
                if self._tracing is not None:
                    self._tracing.received(item)
                self._wake(item.room, item.channel)
            case GapDetected(gap=gap):
                self._wake(gap.room, gap.channel)
            case Acked() | BatchAcked() | PublishFailed():
                self._on_publish_answer(event)
            case CommandResult():
                self._on_command_result(event)
            case Joined(room=room, channel=channel):
                self._on_joined(room, channel)
            case JoinRetry():
                self._on_join_retry(event, conn)
            case SubscriptionFailed(room=room, channel=channel, error=error):
                self._on_subscription_failed(room, channel, error)
            case Paused(room=room, channel=channel, queued=queued):
                log.info(
                    "subscription %s/%s paused: its queue of %d events is full",
                    room,
                    channel,
                    queued,
                )
            case ServiceRequest(request=request):
                handler = self._handlers.get((request.room, request.channel, request.command))
                self._spawn(self._answer(conn, request, handler))
            case RemovedFromRoom(room=room, channels=channels, error=error):
                log.warning("removed from room %s (%s): %s", room, ", ".join(channels), error)
            case PresenceReceived(event=presence):
                sub = self._subs.get((presence.room, presence.channel))
                if sub is not None:
                    sub._presence_wakeup.set()
            case MembersStale(room=room, channel=channel, generation=generation):
                sub = self._subs.get((room, channel))
                if sub is not None:
                    self._spawn(self._read_members(sub, generation))
            case ErrorReceived(request_id=request_id, error=error):
                log.warning("the gateway reported an error for request %s: %s", request_id, error)

    def _on_publish_answer(self, event: Acked | BatchAcked | PublishFailed) -> None:
        self._slot_freed.set()
        future = self._acks.pop(event.request_id, None)
        if future is None or future.done():
            return
        if isinstance(event, Acked):
            future.set_result(event.ack())
        elif isinstance(event, BatchAcked):
            future.set_result(event)
        else:
            future.set_exception(event.error)

    def _on_command_result(self, event: CommandResult) -> None:
        future = self._pending.get(event.request_id)
        if future is None or future.done():
            return
        if event.error is not None:
            future.set_exception(event.error)
        else:
            future.set_result(event.result or {})

    def _wake(self, room: str, channel: str) -> None:
        sub = self._subs.get((room, channel))
        if sub is not None:
            sub._wakeup.set()

    def _on_joined(self, room: str, channel: str) -> None:
        sub = self._subs.get((room, channel))
        if sub is not None:
            sub._wakeup.set()
            if not sub._started.done():
                sub._started.set_result(None)

    def _on_join_retry(self, event: JoinRetry, conn: ClientConnection) -> None:
        sub = self._subs.get((event.room, event.channel))
        delay = self._retry_delay(event.error, event.attempt, math.inf) or 0.0
        log.warning(
            "join of %s/%s failed (%s); retrying in %.2fs",
            event.room,
            event.channel,
            event.error,
            delay,
        )
        if sub is not None:
            self._spawn(self._rejoin_later(sub, conn, delay))

    def _on_subscription_failed(self, room: str, channel: str, error: ArqonBusError) -> None:
        sub = self._subs.get((room, channel))
        if sub is not None and sub._state.error is error:
            del self._subs[(room, channel)]
            sub._fail(error)

    # -- subscriptions (called by Subscription) --------------------------------------------

    def _add_subscription(self, sub: Subscription) -> None:
        self._check_usable()
        key = (sub.room, sub.channel)
        existing = self._subs.get(key)
        if existing is not None and existing is not sub:
            raise ValueError(
                f"this client already has a subscription to {sub.room}/{sub.channel}: "
                "close it first, or use another Client"
            )
        self._subs[key] = sub
        self._core.subscribe(sub._state)
        self._flush()

    async def _rejoin_later(self, sub: Subscription, conn: ClientConnection, delay: float) -> None:
        await asyncio.sleep(delay)
        if conn is self._conn and self._subs.get((sub.room, sub.channel)) is sub:
            self._core.rejoin(sub._state)
            self._flush()

    def _take(self, sub: Subscription) -> Event | Gap | None:
        item = self._core.take(sub._state)
        self._flush()  # a paused subscription may rejoin now
        return item

    async def _remove_subscription(self, sub: Subscription) -> None:
        if self._subs.get((sub.room, sub.channel)) is not sub:
            return
        try:
            if self._ready and not self._closing and self._fatal is None:
                with contextlib.suppress(ArqonBusError):
                    await self._request(
                        sub.room, sub.channel, "leave_channel", {}, self.request_timeout
                    )
        finally:
            if self._subs.get((sub.room, sub.channel)) is sub:
                del self._subs[(sub.room, sub.channel)]
                self._core.unsubscribe(sub._state)

    async def _read_members(self, sub: Subscription, generation: int) -> None:
        """Read the member list snapshot ``generation`` of a subscription (MembersStale)."""
        view = sub._state.members
        if view is None:
            return
        try:
            async for page in self.presence_pages(sub.room, sub.channel):
                if not view.add_page(generation, page):
                    return  # a newer snapshot (or the end of the subscription) replaced it
            if view.finish(generation):
                sub._members_synced.set()
        except ArqonBusError as exc:
            if not sub.closed:
                log.warning("reading the members of %s/%s failed: %s", sub.room, sub.channel, exc)

    # -- service handlers ---------------------------------------------------------------------

    async def _answer(
        self, conn: ClientConnection, request: CommandRequest, handler: CommandHandler | None
    ) -> None:
        async with self._handler_slots:
            if self._tracing is None:
                payload = await self._run_handler(request, handler)
            else:
                with self._tracing.handling(request):
                    payload = await self._run_handler(request, handler)
        frame = self._core.encode_answer(request, payload)
        if conn is not self._conn or not self._ready:
            log.info(
                "answer to %s dropped: the connection that delivered it closed", request.command
            )
            return
        await self._send_on(conn, frame)

    async def _run_handler(
        self, request: CommandRequest, handler: CommandHandler | None
    ) -> dict[str, Any]:
        if handler is None:
            return answer_error(
                request,
                "not_registered",
                f"this client no longer handles {request.command!r} on "
                f"{request.room}/{request.channel}",
                True,
            )
        try:
            result: Any = handler(request)
            if inspect.isawaitable(result):
                result = await result
            if result is None:
                result = {}
            if not isinstance(result, dict):
                raise TypeError(f"the handler returned {type(result).__name__}, not a dict")
            orjson.dumps(result)  # fail here, with a clear error, if it is not JSON
        except CommandFailed as exc:
            if not _is_name(exc.code):
                log.error(
                    "handler of %s raised CommandFailed with an invalid code %r",
                    request.command,
                    exc.code,
                )
                return answer_error(
                    request, "internal", "handler failed: CommandFailed with an invalid code", True
                )
            return answer_error(request, exc.code, exc.message, exc.retryable)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception(
                "handler of %s on %s/%s failed", request.command, request.room, request.channel
            )
            return answer_error(request, "internal", f"handler failed: {type(exc).__name__}", False)
        return answer_result(request, result)


class Subscription:
    """One channel's events, in seq order, each exactly once, across reconnects.

    Iterate it (``async for item in sub``) to get :class:`Event` and :class:`Gap` items.
    The join is sent on the first iteration or by :meth:`start`. ``last_seq`` is the seq of
    the last event handed to the application (or the channel's position when the
    subscription started): persist it to resume in a later process with ``since_seq``.
    """

    def __init__(
        self,
        client: Client,
        room: str,
        channel: str,
        since_seq: int | None,
        maxsize: int,
        room_key: str | None = None,
    ) -> None:
        self._client = client
        self.room = room
        self.channel = channel
        # The cursor, the queue and the join state: the client's core decides over them.
        self._state = SubscriptionState(room, channel, since_seq, room_key, maxsize)
        self._wakeup = asyncio.Event()
        self._presence_wakeup = asyncio.Event()
        self._members_synced = asyncio.Event()
        self._start_called = False
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._callback_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Subscription {self.room}/{self.channel} last_seq={self.last_seq}>"

    @property
    def last_seq(self) -> int | None:
        """The seq of the last event handed to the application (None before the join)."""
        return self._state.last_seq

    @property
    def in_presence(self) -> bool:
        """Whether the last join entered this connection in the channel's presence."""
        return self._state.in_presence

    @property
    def presence_events(self) -> bool:
        """Whether the last join asked for ``presence`` frames (see :meth:`presence`)."""
        return self._state.watching_presence

    @property
    def members(self) -> Mapping[str, Member]:
        """The channel's members by principal, kept current (``track_members=True``).

        Empty until the first snapshot is read (:meth:`wait_members`). After a resume or an
        overflow frame the list is read again; until then it shows the last known state.
        """
        view = self._state.members
        if view is None:
            raise ValueError("subscribe with track_members=True to keep the member list")
        return view.members

    async def wait_members(self, timeout: float | None = None) -> Mapping[str, Member]:
        """Wait until the member list is read (after the first join); returns it."""
        self.members  # noqa: B018 (raises without track_members)
        if not self._start_called:
            await self.start()
        budget = self._client.request_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(self._members_synced.wait(), budget)
        except TimeoutError:
            raise Timeout(
                f"the members of {self.room}/{self.channel} were not read within {budget:g}s"
            ) from None
        return self.members

    async def presence(self) -> AsyncIterator[PresenceEvent]:
        """The channel's :class:`PresenceEvent` items, in order, until the subscription ends.

        Only for a subscription joined with presence events. At most 1000 are held for the
        application; when more arrive they are dropped and one ``overflow`` event says so
        (re-read the list with :meth:`Client.presence`, or use :attr:`members`).
        """
        if not self._start_called:
            await self.start()
        core = self._client._core
        while True:
            item = core.take_presence(self._state)
            if item is not None:
                yield item
                continue
            if self._error is not None:
                raise self._error
            if self._closed:
                return
            self._presence_wakeup.clear()
            await self._presence_wakeup.wait()

    @property
    def pause_count(self) -> int:
        """How often the subscription paused because its queue was full."""
        return self._state.pause_count

    @property
    def closed(self) -> bool:
        """True once closed, failed, or the client closed."""
        return not self._state.active

    @property
    def _error(self) -> ArqonBusError | None:
        return self._state.error

    @property
    def _closed(self) -> bool:
        return self._state.closed

    async def start(self, timeout: float | None = None) -> Subscription:
        """Join the channel and wait for the gateway to confirm (retried across reconnects).

        Raises the mapped error if the join is refused (e.g. :class:`InvalidName`), or
        :class:`Timeout` after ``timeout`` (default: the client's ``request_timeout``); the
        subscription is then closed.
        """
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ClientClosed("the subscription is closed")
        if not self._start_called:
            self._client._add_subscription(self)
            self._start_called = True
        budget = self._client.request_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._started), budget)
        except TimeoutError:
            await self.close()
            raise Timeout(
                f"joining {self.room}/{self.channel} did not succeed within {budget:g}s"
            ) from None
        return self

    async def close(self) -> None:
        """Leave the channel and end the iterator (items not yet taken are dropped)."""
        if self._closed:
            return
        self._end()
        await self._client._remove_subscription(self)
        task = self._callback_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def __aenter__(self) -> Subscription:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event | Gap:
        if not self._start_called:
            await self.start()
        while True:
            item = self._client._take(self)
            if item is not None:
                return item
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    # -- called by the client ------------------------------------------------------------

    def _end(self) -> None:
        self._state.end()
        if self._state.members is not None:
            self._state.members.clear()
        self._wakeup.set()
        self._presence_wakeup.set()
        if not self._started.done():
            self._started.set_exception(ClientClosed("the subscription was closed"))
            self._started.exception()  # retrieved: nobody may be waiting

    def _fail(self, exc: ArqonBusError) -> None:
        self._state.fail(exc)
        self._wakeup.set()
        self._presence_wakeup.set()
        if not self._started.done():
            self._started.set_exception(exc)
            self._started.exception()


class History:
    """The stored events of a channel, read page by page (see :meth:`Client.history`)."""

    def __init__(
        self,
        client: Client,
        room: str,
        channel: str,
        since_seq: int,
        limit: int | None,
        page_size: int | None,
        timeout: float | None,
        room_key: str | None = None,
    ) -> None:
        self._client = client
        self.room = room
        self.channel = channel
        self.room_key = room_key
        self.since_seq = since_seq
        self.limit = limit
        self.page_size = page_size
        self.timeout = timeout

    def pages(self) -> _PageIterator:
        """An async iterator of :class:`HistoryPage` (empty pages are skipped)."""
        return _PageIterator(self)

    def __aiter__(self) -> _EventIterator:
        return _EventIterator(_PageIterator(self))

    async def list(self) -> list[Event]:
        """Every event, collected into a list."""
        return [event async for event in self]


class _PageIterator:
    def __init__(self, history: History) -> None:
        self._h = history
        self._since = history.since_seq
        self._remaining = history.limit
        self._done = False

    def __aiter__(self) -> _PageIterator:
        return self

    async def __anext__(self) -> HistoryPage:
        h, client = self._h, self._h._client
        if self._done or (self._remaining is not None and self._remaining <= 0):
            raise StopAsyncIteration
        max_limit = client._core.limits.get("history_max_limit", 1000)
        want = min(h.page_size or max_limit, max_limit)
        if self._remaining is not None:
            want = min(want, self._remaining)
        parameters: dict[str, Any] = {"since_seq": self._since, "limit": want}
        if h.room_key is not None:
            parameters["room_key"] = h.room_key
        result = await client._request_idempotent(
            h.room, h.channel, "history", parameters, h.timeout
        )
        raw_events = result.get("events")
        events = [
            Event.from_wire(e)
            for e in (raw_events if isinstance(raw_events, list) else [])
            if isinstance(e, dict)
        ]
        next_since = result.get("next_since_seq")
        next_since = next_since if isinstance(next_since, int) else self._since
        more = result.get("more") is True
        if not events or not more or next_since <= self._since:
            self._done = True
        self._since = next_since
        if self._remaining is not None:
            self._remaining -= len(events)
        if not events:
            raise StopAsyncIteration
        return HistoryPage(events, next_since, more)


class _EventIterator:
    def __init__(self, pages: _PageIterator) -> None:
        self._pages = pages
        self._buffer: deque[Event] = deque()

    def __aiter__(self) -> _EventIterator:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            page = await self._pages.__anext__()
            self._buffer.extend(page.events)
        return self._buffer.popleft()
