"""The sans-I/O core of the ArqonBus client: frames in, frames and events out.

:class:`ClientProtocol` holds every piece of client-side state and makes every decision of
the protocol, without I/O: no sockets, no asyncio, no clocks. The asyncio :class:`Client`
is a shell around it that moves frames and awaits. The same rules, written as JSON
fixtures in ``clients/conformance/``, hold for every SDK.

Use::

    core = ClientProtocol()
    core.connection_made(welcome)       # rejoin with since_seq, resend unacked events
    request_id = core.publish("science", "general", {"message": "hi"})
    for frame in core.data_to_send():   # bytes: one JSON text frame each
        ...                             # send it
    for event in core.receive(message): # a parsed incoming frame (a dict)
        ...                             # Acked, Delivered, CommandResult, ...
    core.connection_lost()

The rules it keeps (docs/protocol.md, "Never losing your place"):

* An event stays unacknowledged until its ``ack`` or ``error`` arrives; each new connection
  resends it with the same ``id`` (the gateway deduplicates by id).
* Each subscription has a cursor: ``last_seq``, the seq of the last event handed to the
  application. A new connection rejoins with ``since_seq`` = the cursor; events that were
  queued but not handed are dropped and come again.
* An event is accepted only after the reply to the subscription's current join (the gateway
  sends it before the first event of the membership) and only when its seq is greater than
  the last one accepted: a replayed event is never delivered twice.
* Retention gaps (a join result with ``gap``, a ``gap`` frame) become :class:`GapDetected`.
* A full queue pauses the subscription (it leaves the channel); once the application has
  taken half of the queue it rejoins from the last accepted seq.
* Presence (docs/presence.md): ``presence`` frames of a subscription joined with
  ``presence_events`` become :class:`PresenceReceived` and are queued (bounded: on overflow
  the queue is replaced by one ``overflow`` event). A subscription that keeps its member list
  asks for a fresh snapshot (:class:`MembersStale`) after every join (also after a resume)
  and after an ``overflow`` frame. The connection's presence state and metadata
  (:meth:`ClientProtocol.remember_presence`) are set again first on each new connection.
* A ``kicked`` or ``room_deleted`` error pushed without a request ends the room's
  subscriptions the way a ban does: they fail with the error and are not rejoined.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from arqonbus.errors import (
    ArqonBusError,
    InvalidEnvelope,
    Kicked,
    MessageTooLarge,
    RoomDeleted,
    error_from_wire,
)
from arqonbus.models import Ack, CommandRequest, Event, Gap, Welcome
from arqonbus.presence import MemberView, PresenceEvent

__all__ = [
    "DEFAULT_LIMITS",
    "PROTOCOL_VERSION",
    "Acked",
    "BatchAcked",
    "ClientProtocol",
    "CommandResult",
    "Delivered",
    "ErrorReceived",
    "GapDetected",
    "JoinRetry",
    "Joined",
    "MembersStale",
    "Paused",
    "PresenceReceived",
    "ProtocolEvent",
    "PublishFailed",
    "RemovedFromRoom",
    "ServiceRequest",
    "SubscriptionFailed",
    "SubscriptionState",
    "random_id",
]

PROTOCOL_VERSION = "1.0"
DEFAULT_LIMITS = {"max_envelope_bytes": 65536, "max_in_flight": 1000, "history_max_limit": 1000}
ID_MAX = 128
BATCH_EVENTS_MAX = 500  # events in one events frame (docs/protocol.md#batches-of-events)
PRESENCE_QUEUE_MAX = 1000  # presence frames a subscription holds for the application
ERROR_MESSAGE_MAX = 1024

IdFactory = Callable[[str], str]
"""Makes a fresh id with a prefix (``"join"``, ``"leave"``, a command's name; ``""``: none)."""


def random_id(prefix: str) -> str:
    """``<prefix>_<uuid4 hex>``, or the bare hex for an empty prefix."""
    return f"{prefix}_{uuid.uuid4().hex}" if prefix else uuid.uuid4().hex


def check_id(value: str) -> None:
    """Raise :class:`InvalidEnvelope` unless ``value`` is a valid envelope ``id``."""
    if not isinstance(value, str) or not 1 <= len(value) <= ID_MAX or not value.isprintable():
        raise InvalidEnvelope(
            f"id {value!r} is not valid: it must be a string of 1-{ID_MAX} printable characters"
        )


def encode_envelope(
    kind: str,
    request_id: str,
    room: str,
    channel: str,
    payload: dict[str, Any],
    trace: dict[str, str] | None = None,
) -> bytes:
    """One client envelope as the JSON text of a frame (``trace``: W3C trace context)."""
    envelope: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "id": request_id,
        "type": kind,
        "room": room,
        "channel": channel,
        "payload": payload,
    }
    if trace:
        envelope["trace"] = trace
    return orjson.dumps(envelope)


def answer_error(
    request: CommandRequest, code: str, message: str, retryable: bool
) -> dict[str, Any]:
    """The payload of a handler's error answer (``message`` cut to 1024 characters)."""
    return {
        "request_id": request.delivery_id,
        "status": "error",
        "error": {"code": code, "message": message[:ERROR_MESSAGE_MAX], "retryable": retryable},
    }


def answer_result(request: CommandRequest, result: dict[str, Any]) -> dict[str, Any]:
    """The payload of a handler's successful answer."""
    return {"request_id": request.delivery_id, "status": "success", "result": result}


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acked:
    """The store acknowledged the unacked event ``request_id``."""

    request_id: str
    seq: int
    duplicate: bool

    def ack(self) -> Ack:
        return Ack(self.request_id, self.seq, self.duplicate)


@dataclass(frozen=True, slots=True)
class BatchAcked:
    """The store acknowledged every event of the unacked ``events`` frame ``request_id``:
    ``seqs[i]`` is event i's, ``duplicates`` the indexes of those stored before."""

    request_id: str
    seqs: tuple[int, ...]
    duplicates: frozenset[int]

    def acks(self, ids: Sequence[str]) -> list[Ack]:
        return [
            Ack(i, seq, n in self.duplicates)
            for n, (i, seq) in enumerate(zip(ids, self.seqs, strict=True))
        ]


@dataclass(frozen=True, slots=True)
class PublishFailed:
    """The gateway refused the unacked event ``request_id``; it is no longer unacked."""

    request_id: str
    error: ArqonBusError


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The answer to a command: ``result`` on success, else ``error``."""

    request_id: str
    result: dict[str, Any] | None
    error: ArqonBusError | None


@dataclass(frozen=True, slots=True)
class Delivered:
    """An event was accepted into its subscription's queue (take it with ``take``)."""

    event: Event


@dataclass(frozen=True, slots=True)
class GapDetected:
    """Retention removed events of a subscription; the gap is queued like an event."""

    gap: Gap


@dataclass(frozen=True, slots=True)
class Joined:
    """A subscription's join succeeded; events of the channel are accepted from now on."""

    room: str
    channel: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class JoinRetry:
    """A join failed with a retryable error: call ``rejoin`` after a backoff.

    ``attempt`` counts the failures before this one (0 for the first).
    """

    room: str
    channel: str
    attempt: int
    error: ArqonBusError


@dataclass(frozen=True, slots=True)
class SubscriptionFailed:
    """A subscription ended with ``error`` (join refused, or removed by a ban)."""

    room: str
    channel: str
    error: ArqonBusError


@dataclass(frozen=True, slots=True)
class Paused:
    """A subscription's queue was full: it left the channel and resumes once drained."""

    room: str
    channel: str
    queued: int


@dataclass(frozen=True, slots=True)
class ServiceRequest:
    """A service command for one of this client's handlers; answer with ``encode_answer``."""

    request: CommandRequest


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """An ``error`` frame that answers nothing pending (worth a log line)."""

    request_id: str | None
    error: ArqonBusError


@dataclass(frozen=True, slots=True)
class RemovedFromRoom:
    """A ban removed this connection from ``channels`` of ``room`` (pushed by the gateway)."""

    room: str
    channels: tuple[str, ...]
    error: ArqonBusError


@dataclass(frozen=True, slots=True)
class PresenceReceived:
    """A ``presence`` frame for a subscription; queued for ``take_presence``."""

    event: PresenceEvent


@dataclass(frozen=True, slots=True)
class MembersStale:
    """A subscription's member list must be read again (after a join, or an overflow frame).

    Its snapshot ``generation`` has begun (frames are buffered meanwhile): read every
    ``presence`` page into ``state.members.add_page(generation, page)``, then ``finish``.
    """

    room: str
    channel: str
    generation: int


ProtocolEvent = (
    Acked
    | BatchAcked
    | PublishFailed
    | CommandResult
    | Delivered
    | GapDetected
    | Joined
    | JoinRetry
    | SubscriptionFailed
    | Paused
    | ServiceRequest
    | ErrorReceived
    | RemovedFromRoom
    | PresenceReceived
    | MembersStale
)


# -- subscriptions ------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class SubscriptionState:
    """One subscription's cursor, queue and join state.

    ``last_seq`` is the seq of the last event handed to the application (``take``);
    ``accepted_seq`` the last one accepted into ``items``. ``None``: not joined yet and no
    ``since_seq`` given.
    """

    room: str
    channel: str
    last_seq: int | None = None
    room_key: str | None = None
    maxsize: int = 10_000
    accepted_seq: int | None = None
    items: deque[Event | Gap] = field(default_factory=deque)
    queued_events: int = 0
    accepting: bool = False
    paused: bool = False
    pause_count: int = 0
    join_id: str | None = None
    join_failures: int = 0
    closed: bool = False
    error: ArqonBusError | None = None
    # Multi-region tenants: the epoch of ``last_seq`` and of ``accepted_seq`` (None: none
    # seen). Seqs of a new epoch restart after its fork and may repeat old numbers.
    last_epoch: int | None = None
    accepted_epoch: int | None = None
    # Presence (None: the room's default). ``members``: the member list, when kept.
    presence: bool | None = None
    presence_events: bool | None = None
    members: MemberView | None = None
    presence_items: deque[PresenceEvent] = field(default_factory=deque)
    in_presence: bool = False  # the last join result's "presence"
    watching_presence: bool = False  # ... and its "presence_events"

    def __post_init__(self) -> None:
        self.accepted_seq = self.last_seq

    @property
    def key(self) -> tuple[str, str]:
        return (self.room, self.channel)

    @property
    def active(self) -> bool:
        return not self.closed and self.error is None

    def end(self) -> None:
        """Closed by the application: nothing more is accepted, queued items are dropped."""
        self.closed = True
        self.accepting = False
        self.items.clear()
        self.queued_events = 0
        self.presence_items.clear()

    def fail(self, error: ArqonBusError) -> None:
        self.error = error
        self.accepting = False
        if self.members is not None:
            self.members.clear()


# -- the protocol -------------------------------------------------------------------------


class ClientProtocol:
    """All client-side state of one ArqonBus client, across its connections.

    Frames to send accumulate until :meth:`data_to_send` takes them; they are meant for the
    current connection only (a lost connection drops them: what must survive, unacked events
    and subscriptions, is sent again by :meth:`connection_made`).
    """

    def __init__(self, new_id: IdFactory = random_id) -> None:
        self._new_id = new_id
        self.connected = False
        self.limits: dict[str, int] = dict(DEFAULT_LIMITS)
        self._outbox: list[bytes] = []
        self._unacked: dict[str, bytes] = {}  # id -> the exact frame to resend
        self._pending: set[str] = set()  # commands awaiting their command_response
        self._joins: dict[str, tuple[SubscriptionState, int | None]] = {}  # id -> (sub, since)
        self._quiet: set[str] = set()  # requests whose reply nobody awaits (leave on pause)
        self._subs: dict[tuple[str, str], SubscriptionState] = {}
        self._presence: dict[str, Any] = {}  # set_presence parameters to set on each connection

    def data_to_send(self) -> list[bytes]:
        """The frames to send now, in order (each one JSON text); empties the outbox."""
        frames, self._outbox = self._outbox, []
        return frames

    # -- connection -----------------------------------------------------------------------

    def connection_made(self, welcome: Welcome) -> None:
        """A connection is up: rejoin every subscription from its cursor, resend unacked."""
        self.limits = {**DEFAULT_LIMITS, **welcome.limits}
        self.connected = True
        if self._presence:  # before the joins, so that they enter with this state
            request_id = self._new_id("set_presence")
            self._quiet.add(request_id)
            payload = {"command": "set_presence", "parameters": dict(self._presence)}
            self._outbox.append(
                encode_envelope("command", request_id, "presence", "presence", payload)
            )
        for state in list(self._subs.values()):
            if state.active:
                self._send_join(state, reset=True)
        self._outbox.extend(self._unacked.values())

    def connection_lost(self) -> None:
        """The connection is gone: pending commands are forgotten (never resent)."""
        self.connected = False
        self._outbox.clear()
        self._pending.clear()
        self._joins.clear()
        self._quiet.clear()
        for state in self._subs.values():
            state.accepting = False
            state.join_id = None

    def abandon(self) -> None:
        """The client stops for good: unacked events are forgotten too."""
        self.connection_lost()
        self._unacked.clear()

    # -- publishing -----------------------------------------------------------------------

    def encode_event(
        self,
        room: str,
        channel: str,
        payload: dict[str, Any],
        id: str | None = None,
        trace: dict[str, str] | None = None,
    ) -> tuple[str, bytes]:
        """Check and encode an event: ``(id, frame)``. Raises before anything is sent.

        ``trace`` is the event's creation context (W3C ``traceparent``, ``tracestate``).

        ``TypeError`` for a payload that is not a JSON object, :class:`InvalidEnvelope` for
        a bad ``id``, :class:`MessageTooLarge` over ``limits.max_envelope_bytes``.
        """
        if not isinstance(payload, dict):
            raise TypeError(f"payload must be a dict (a JSON object), not {type(payload).__name__}")
        msg_id = self._new_id("") if id is None else id
        check_id(msg_id)
        try:
            frame = encode_envelope("event", msg_id, room, channel, payload, trace)
        except TypeError as exc:
            raise TypeError(f"payload is not JSON-serializable: {exc}") from None
        limit = self.limits["max_envelope_bytes"]
        if len(frame) > limit:
            raise MessageTooLarge(
                f"envelope is {len(frame)} bytes, limit is {limit}: send a smaller payload",
                request_id=msg_id,
            )
        return msg_id, frame

    def encode_events(
        self,
        room: str,
        channel: str,
        payloads: Sequence[dict[str, Any]],
        ids: Sequence[str] | None = None,
        trace: dict[str, str] | None = None,
    ) -> tuple[str, list[str], bytes]:
        """Check and encode an ``events`` frame: ``(frame id, event ids, frame)``. Raises
        before anything is sent: ``ValueError`` for an empty list, more than
        :data:`BATCH_EVENTS_MAX` events or ``ids`` of another length or with a repeat,
        ``TypeError``, :class:`InvalidEnvelope` and :class:`MessageTooLarge` as
        :meth:`encode_event` (the whole frame within ``limits.max_envelope_bytes``)."""
        if not 1 <= len(payloads) <= BATCH_EVENTS_MAX:
            raise ValueError(
                f"a batch holds 1-{BATCH_EVENTS_MAX} events, not {len(payloads)}: "
                "send more in several batches"
            )
        if ids is None:
            ids = [self._new_id("") for _ in payloads]
        elif len(ids) != len(payloads):
            raise ValueError(f"{len(ids)} ids for {len(payloads)} payloads")
        events: list[dict[str, Any]] = []
        for event_id, payload in zip(ids, payloads, strict=True):
            if not isinstance(payload, dict):
                raise TypeError(
                    f"payload must be a dict (a JSON object), not {type(payload).__name__}"
                )
            check_id(event_id)
            event: dict[str, Any] = {"id": event_id, "payload": payload}
            if trace:
                event["trace"] = trace
            events.append(event)
        if len(set(ids)) != len(ids):
            raise ValueError("each event of a batch needs its own id")
        batch_id = self._new_id("batch")
        try:
            frame = encode_envelope("events", batch_id, room, channel, {"events": events})
        except TypeError as exc:
            raise TypeError(f"payload is not JSON-serializable: {exc}") from None
        limit = self.limits["max_envelope_bytes"]
        if len(frame) > limit:
            raise MessageTooLarge(
                f"the batch is {len(frame)} bytes, limit is {limit}: send fewer or smaller "
                "events per batch",
                request_id=batch_id,
            )
        return batch_id, list(ids), frame

    def send_event(self, request_id: str, frame: bytes) -> None:
        """Keep ``frame`` unacked until its answer, and send it now if connected."""
        if request_id in self._unacked:
            raise ValueError(f"a publish with id {request_id!r} is already waiting for its ack")
        self._unacked[request_id] = frame
        if self.connected:
            self._outbox.append(frame)

    def publish(
        self, room: str, channel: str, payload: dict[str, Any], id: str | None = None
    ) -> str:
        """:meth:`encode_event` then :meth:`send_event`; returns the event's id."""
        msg_id, frame = self.encode_event(room, channel, payload, id)
        self.send_event(msg_id, frame)
        return msg_id

    def forget_event(self, request_id: str) -> None:
        """Stop resending an event (its caller gave up waiting)."""
        self._unacked.pop(request_id, None)

    def is_unacked(self, request_id: str) -> bool:
        return request_id in self._unacked

    @property
    def in_flight(self) -> int:
        """Events sent (or to send) and not yet answered."""
        return len(self._unacked)

    # -- commands -------------------------------------------------------------------------

    def command(
        self,
        room: str,
        channel: str,
        command: str,
        parameters: dict[str, Any],
        extra: dict[str, Any] | None = None,
        request_id: str | None = None,
        trace: dict[str, str] | None = None,
    ) -> str:
        """Send a command now (call it while connected); returns its request id.

        Its ``command_response`` (or ``error``) becomes a :class:`CommandResult`. A lost
        connection forgets it: commands are not idempotent, so nothing resends them.
        ``request_id`` defaults to :meth:`new_request_id`.
        """
        request_id = self.new_request_id(command) if request_id is None else request_id
        payload: dict[str, Any] = {"command": command, "parameters": parameters}
        if extra:
            payload.update(extra)
        self._pending.add(request_id)
        self._outbox.append(encode_envelope("command", request_id, room, channel, payload, trace))
        return request_id

    def remember_presence(self, parameters: dict[str, Any]) -> None:
        """A ``set_presence`` succeeded: set the same state and metadata on each new
        connection (a gateway keeps them per connection)."""
        self._presence.update({k: v for k, v in parameters.items() if k in ("state", "metadata")})

    def new_request_id(self, command: str) -> str:
        """A fresh id for a command: ``<command, cut to 20>_<unique>``."""
        return self._new_id(command[:20])

    def forget_command(self, request_id: str) -> None:
        """The caller stopped waiting: a late answer is ignored."""
        self._pending.discard(request_id)

    def encode_answer(self, request: CommandRequest, payload: dict[str, Any]) -> bytes:
        """A handler's ``command_response`` frame; an answer over the size limit becomes a
        ``message_too_large`` error answer."""
        frame = self._answer_frame(request, payload)
        limit = self.limits["max_envelope_bytes"]
        if len(frame) > limit:
            message = f"the handler's answer is {len(frame)} bytes, more than the limit {limit}"
            frame = self._answer_frame(
                request, answer_error(request, "message_too_large", message, False)
            )
        return frame

    def _answer_frame(self, request: CommandRequest, payload: dict[str, Any]) -> bytes:
        response_id = self._new_id("arq_resp")
        return encode_envelope(
            "command_response", response_id, request.room, request.channel, payload
        )

    # -- subscriptions --------------------------------------------------------------------

    def subscription(self, room: str, channel: str) -> SubscriptionState | None:
        return self._subs.get((room, channel))

    def subscribe(self, state: SubscriptionState) -> None:
        """Add a subscription; it joins now if connected, else on :meth:`connection_made`."""
        existing = self._subs.get(state.key)
        if existing is not None and existing is not state:
            raise ValueError(
                f"this client already has a subscription to {state.room}/{state.channel}: "
                "close it first, or use another Client"
            )
        self._subs[state.key] = state
        if self.connected:
            self._send_join(state, reset=True)

    def unsubscribe(self, state: SubscriptionState) -> None:
        """Forget a subscription (the caller leaves the channel with a command)."""
        if self._subs.get(state.key) is state:
            del self._subs[state.key]

    def take(self, state: SubscriptionState) -> Event | Gap | None:
        """Hand the next queued item to the application; moves the cursor past an event."""
        if not state.items:
            return None
        item = state.items.popleft()
        if isinstance(item, Event):
            state.queued_events -= 1
            state.last_seq = item.seq
            state.last_epoch = item.epoch or state.last_epoch
            self._resume_if_drained(state)
        elif item.reason == "epoch":  # the cursor moves back to the fork, in the new epoch
            state.last_seq, state.last_epoch = item.after_seq, item.epoch
        return item

    def take_presence(self, state: SubscriptionState) -> PresenceEvent | None:
        """Hand the next queued presence event to the application."""
        return state.presence_items.popleft() if state.presence_items else None

    def rejoin(self, state: SubscriptionState) -> None:
        """Retry a join after :class:`JoinRetry`, unless things moved on meanwhile."""
        if (
            self.connected
            and state.join_id is None
            and not state.accepting
            and state.active
            and self._subs.get(state.key) is state
        ):
            self._send_join(state, reset=False)

    def _resume_if_drained(self, state: SubscriptionState) -> None:
        if (
            state.paused
            and state.join_id is None
            and not state.closed
            and state.queued_events <= state.maxsize // 2
            and self.connected
        ):
            self._send_join(state, reset=False)

    def _send_join(self, state: SubscriptionState, reset: bool) -> None:
        """Make ``state`` wait for a new join and queue the join frame.

        Events are refused until the join's reply is read. With ``reset`` (a new connection)
        the queued items are dropped and the join resumes from the cursor (``last_seq``);
        without it (resuming a paused subscription) the queue is kept and the join resumes
        from the last accepted seq.
        """
        if reset:
            state.items.clear()
            state.queued_events = 0
            state.paused = False
            state.accepted_seq = state.last_seq
            state.accepted_epoch = state.last_epoch
        since = state.accepted_seq
        request_id = self._new_id("join")
        state.join_id = request_id
        state.accepting = False
        self._joins[request_id] = (state, since)
        # ``batch``: events that are ready together may come in one ``events`` message.
        parameters: dict[str, Any] = {"batch": True}
        if since is not None:
            parameters["since_seq"] = since
        if since is not None and state.accepted_epoch is not None:
            parameters["since_epoch"] = state.accepted_epoch
        if state.room_key is not None:
            parameters["room_key"] = state.room_key
        if state.presence is not None:
            parameters["presence"] = state.presence
        if state.presence_events is not None:
            parameters["presence_events"] = state.presence_events
        payload = {"command": "join_channel", "parameters": parameters}
        self._outbox.append(
            encode_envelope("command", request_id, state.room, state.channel, payload)
        )

    def _pause(self, state: SubscriptionState) -> list[ProtocolEvent]:
        """The application does not keep up: stop accepting and leave the channel.

        The refused events stay in the store; the subscription rejoins from the last
        accepted seq once the application has taken half of its queue.
        """
        state.accepting = False
        state.paused = True
        state.pause_count += 1
        if self.connected:
            request_id = self._new_id("leave")
            self._quiet.add(request_id)
            payload = {"command": "leave_channel", "parameters": {}}
            self._outbox.append(
                encode_envelope("command", request_id, state.room, state.channel, payload)
            )
        return [Paused(state.room, state.channel, state.maxsize)]

    # -- receiving ------------------------------------------------------------------------

    def receive(self, message: dict[str, Any]) -> list[ProtocolEvent]:
        """Process one incoming frame (parsed JSON object); the events it caused, in order.

        Frames of unknown types, for unknown subscriptions or requests, or malformed, are
        ignored (no event).
        """
        kind = message.get("type")
        if kind == "event":
            return self._on_event(message)
        if kind == "events":
            return self._on_events(message)
        if kind == "ack":
            return self._on_ack(_payload(message))
        if kind == "command_response":
            return self._on_response(_payload(message))
        if kind == "error":
            return self._on_error(_payload(message))
        if kind == "gap":
            return self._on_gap(message)
        if kind == "command":
            return self._on_service_request(message)
        if kind == "presence":
            return self._on_presence(message)
        return []

    def _sub_for(self, message: dict[str, Any]) -> SubscriptionState | None:
        room, channel = message.get("room"), message.get("channel")
        if isinstance(room, str) and isinstance(channel, str):
            return self._subs.get((room, channel))
        return None

    def _on_event(self, message: dict[str, Any]) -> list[ProtocolEvent]:
        state = self._sub_for(message)
        seq = message.get("seq")
        if state is None or not state.accepting or isinstance(seq, bool):
            return []
        if not isinstance(seq, int):
            return []
        epoch = message.get("epoch")
        epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
        if epoch is not None and state.accepted_epoch is not None and epoch < state.accepted_epoch:
            return []  # from before a failover this subscription has moved past
        if state.accepted_seq is not None and seq <= state.accepted_seq:
            return []  # accepted already: a resume seam (a seq up to the fork is shared)
        if state.queued_events >= state.maxsize:
            return self._pause(state)
        event = Event.from_wire(message)
        state.items.append(event)
        state.queued_events += 1
        state.accepted_seq = seq
        state.accepted_epoch = epoch if epoch is not None else state.accepted_epoch
        return [Delivered(event)]

    def _on_events(self, message: dict[str, Any]) -> list[ProtocolEvent]:
        """Several events of one channel in one message, each taken as an ``event`` message
        of that channel (others in it are ignored)."""
        payload = _payload(message)
        events = None if payload is None else payload.get("events")
        if not isinstance(events, list):
            return []
        room, channel = message.get("room"), message.get("channel")
        out: list[ProtocolEvent] = []
        for item in events:
            if (
                isinstance(item, dict)
                and item.get("room") == room
                and item.get("channel") == channel
            ):
                out.extend(self._on_event(item))
        return out

    def _on_ack(self, payload: dict[str, Any] | None) -> list[ProtocolEvent]:
        request_id = None if payload is None else payload.get("request_id")
        if payload is None or not isinstance(request_id, str):
            return []
        if self._unacked.pop(request_id, None) is None:
            return []
        seqs = payload.get("seqs")
        if isinstance(seqs, list):  # an events frame's
            duplicates = payload.get("duplicates")
            return [
                BatchAcked(
                    request_id,
                    tuple(s if isinstance(s, int) else 0 for s in seqs),
                    frozenset(duplicates if isinstance(duplicates, list) else ()),
                )
            ]
        seq = payload.get("seq")
        seq = seq if isinstance(seq, int) else 0
        return [Acked(request_id, seq, payload.get("duplicate") is True)]

    def _on_response(self, payload: dict[str, Any] | None) -> list[ProtocolEvent]:
        request_id = None if payload is None else payload.get("request_id")
        if payload is None or not isinstance(request_id, str):
            return []
        join = self._joins.pop(request_id, None)
        if join is not None:
            return self._on_join_reply(join[0], request_id, join[1], payload)
        if request_id in self._pending:
            self._pending.discard(request_id)
            return [_command_result(request_id, payload)]
        self._quiet.discard(request_id)
        return []

    def _on_error(self, payload: dict[str, Any] | None) -> list[ProtocolEvent]:
        if payload is None:
            return []
        raw_id = payload.get("request_id")
        request_id = raw_id if isinstance(raw_id, str) else None
        error = error_from_wire(payload, request_id)
        if request_id is not None:
            if self._unacked.pop(request_id, None) is not None:
                return [PublishFailed(request_id, error)]
            join = self._joins.pop(request_id, None)
            if join is not None:
                reply = {"status": "error", "error": payload}
                return self._on_join_reply(join[0], request_id, join[1], reply)
            if request_id in self._pending:
                self._pending.discard(request_id)
                return [CommandResult(request_id, None, error)]
            self._quiet.discard(request_id)
        room, channels = payload.get("room"), payload.get("channels")
        if raw_id is None and isinstance(room, str):
            if isinstance(error, Kicked | RoomDeleted) and not isinstance(channels, list):
                channels = sorted(c for r, c in self._subs if r == room)  # all of the room's
            if isinstance(channels, list):
                return self._on_removed(room, channels, error)
        return [ErrorReceived(request_id, error)]

    def _on_removed(
        self, room: str, channels: list[Any], error: ArqonBusError
    ) -> list[ProtocolEvent]:
        """Pushed: a ban, kick or room deletion removed this connection from those channels.
        Their subscriptions end with the error (after a ban rejoining would only be
        refused; after a kick or deletion the application decides whether to join again)."""
        events: list[ProtocolEvent] = []
        for channel in channels:
            state = self._subs.pop((room, channel), None) if isinstance(channel, str) else None
            if state is not None:
                state.fail(error)
                events.append(SubscriptionFailed(room, state.channel, error))
        events.append(RemovedFromRoom(room, tuple(str(c) for c in channels), error))
        return events

    def _on_gap(self, message: dict[str, Any]) -> list[ProtocolEvent]:
        state = self._sub_for(message)
        payload = _payload(message)
        if state is None or payload is None or not state.accepting:
            return []
        after, first = payload.get("after_seq"), payload.get("first_available_seq")
        if not isinstance(after, int) or not isinstance(first, int):
            return []
        gap = _gap(state, after, first, payload)
        state.items.append(gap)
        return [GapDetected(gap)]

    def _on_presence(self, message: dict[str, Any]) -> list[ProtocolEvent]:
        state = self._sub_for(message)
        if state is None or not state.accepting or not state.watching_presence:
            return []
        event = PresenceEvent.from_wire(message)
        if len(state.presence_items) >= PRESENCE_QUEUE_MAX:
            # The application does not keep up: what it missed is summed up as an overflow.
            state.presence_items.clear()
            lost = PresenceEvent(state.room, state.channel, event.position, (), True)
            state.presence_items.append(lost)
        state.presence_items.append(event)
        events: list[ProtocolEvent] = [PresenceReceived(event)]
        if state.members is not None and state.members.apply(event):
            events.append(_members_stale(state, state.members))
        return events

    def _on_service_request(self, message: dict[str, Any]) -> list[ProtocolEvent]:
        request = CommandRequest.from_wire(message)
        return [ServiceRequest(request)] if request.delivery_id else []

    def _on_join_reply(
        self,
        state: SubscriptionState,
        request_id: str,
        since: int | None,
        payload: dict[str, Any],
    ) -> list[ProtocolEvent]:
        if state.join_id != request_id or not state.active:
            return []
        state.join_id = None
        if payload.get("status") == "success":
            result = payload.get("result")
            return self._joined(state, since, result if isinstance(result, dict) else {})
        error = error_from_wire(payload.get("error"), request_id)
        if error.retryable:
            state.join_failures += 1
            return [JoinRetry(state.room, state.channel, state.join_failures - 1, error)]
        state.fail(error)
        self.unsubscribe(state)
        return [SubscriptionFailed(state.room, state.channel, error)]

    def _joined(
        self, state: SubscriptionState, since: int | None, result: dict[str, Any]
    ) -> list[ProtocolEvent]:
        last_seq = result.get("last_seq")
        last_seq = last_seq if isinstance(last_seq, int) else 0
        epoch = result.get("epoch")
        epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
        if since is None:
            state.accepted_seq = last_seq
            if state.last_seq is None:
                state.last_seq, state.last_epoch = last_seq, epoch
        if epoch is not None and result.get("reason") != "epoch":
            # Never back: a gateway answers only in the client's epoch or a newer one.
            state.accepted_epoch = max(epoch, state.accepted_epoch or epoch)
        state.paused = False
        state.accepting = True
        state.join_failures = 0
        state.in_presence = result.get("presence") is True
        state.watching_presence = result.get("presence_events") is True
        events: list[ProtocolEvent] = [Joined(state.room, state.channel, last_seq)]
        if state.members is not None and state.watching_presence:
            # Changes before this join were not seen: only a fresh snapshot is complete.
            events.append(_members_stale(state, state.members))
        if result.get("gap") is True:
            first = result.get("first_available_seq")
            after = result.get("after_seq")
            after = after if isinstance(after, int) else since or 0
            gap = _gap(state, after, first if isinstance(first, int) else 0, result)
            state.items.append(gap)
            events.append(GapDetected(gap))
        return events


def _members_stale(state: SubscriptionState, view: MemberView) -> MembersStale:
    return MembersStale(state.room, state.channel, view.begin())


def _gap(state: SubscriptionState, after: int, first: int, fields: dict[str, Any]) -> Gap:
    """A gap item; one of ``reason: "epoch"`` also resets the duplicate filter: the new
    epoch's seqs restart after ``after`` (the fork) and may repeat numbers seen before."""
    lost = fields.get("lost")
    epoch = fields.get("epoch")
    if fields.get("reason") != "epoch" or not isinstance(lost, dict) or not isinstance(epoch, int):
        return Gap(state.room, state.channel, after, first)
    state.accepted_seq, state.accepted_epoch = after, epoch

    def number(key: str) -> int:
        value = lost.get(key)
        return value if isinstance(value, int) else 0

    return Gap(
        state.room,
        state.channel,
        after,
        first,
        "epoch",
        epoch,
        number("epoch") or None,
        number("from_seq"),
        number("to_seq"),
    )


def _payload(message: dict[str, Any]) -> dict[str, Any] | None:
    payload = message.get("payload")
    return payload if isinstance(payload, dict) else None


def _command_result(request_id: str, reply: dict[str, Any]) -> CommandResult:
    if reply.get("status") == "success":
        result = reply.get("result")
        return CommandResult(request_id, result if isinstance(result, dict) else {}, None)
    return CommandResult(request_id, None, error_from_wire(reply.get("error"), request_id))
