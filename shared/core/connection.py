"""The sans-I/O connection: ``receive(frame, now) -> effects``, outcomes fed back by op.

Every decision the WebSocket session makes lives here: parsing and validating frames, rate
admission, authorization and its audit, room rules, content policies, in-flight limits,
registration limits, the command dispatch and the error each outcome gets. The asyncio
shell (gateway/ws/session.py) moves bytes, awaits the ports the effects name and feeds their
outcomes back; it makes no decision of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from arqonbus_server.shared import commands as builtin
from arqonbus_server.shared.authz import Permission
from arqonbus_server.shared.core import rooms as room_rules
from arqonbus_server.shared.core.commands import CommandRules
from arqonbus_server.shared.core.effects import (
    ArmTimer,
    Audit,
    AwaitPublishSlot,
    CallService,
    CancelTimer,
    Effect,
    Leave,
    Now,
    Publish,
    PublishBatch,
    Respond,
    Send,
    Unserve,
)
from arqonbus_server.shared.core.rates import retry_after_ms
from arqonbus_server.shared.core.state import (
    ANSWER_GRACE_S,
    AUDIT_POLICY_BLOCKED,
    AUDIT_RATE_LIMITED,
    GATEWAY,
    NATS_HEADER_ROOM,
    POLICY_CODES,
    RATE_AUDIT_EVERY_S,
    Failure,
    Pending,
    failure_error,
    rule_name,
)
from arqonbus_server.shared.envelope import (
    ClientCommand,
    ClientEvent,
    ClientEventBatch,
    ClientResponse,
    ResponseError,
    encode_ack,
    encode_batch_ack,
    encode_delivery,
    encode_response,
    encode_stored_event,
    encode_trace,
)
from arqonbus_server.shared.errors import (
    INTERNAL,
    LIMIT_EXCEEDED,
    MESSAGE_RATE_LIMITED,
    MESSAGE_TOO_LARGE,
    TIMEOUT,
    UNAVAILABLE,
    UNKNOWN_REQUEST,
    ArqonError,
    ErrorCode,
)
from arqonbus_server.shared.inspect import with_tags
from arqonbus_server.shared.service import MalformedServiceMessage, ServiceCall, ServiceReply
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme

PUBLISH, COMMAND = Permission.PUBLISH, Permission.COMMAND


def _where(index: int | None, event: ClientEvent) -> dict[str, Any] | None:
    """What an error about one event of a batch adds: its place and its id."""
    return None if index is None else {"index": index, "event_id": event.id}


@functools.cache
def _scheme(prefix: str) -> SubjectScheme:
    """One scheme per prefix (a gateway has one), not one built and validated per event."""
    return SubjectScheme(prefix)


class Connection(CommandRules):
    """One client connection's decisions. Not thread-safe; one shell drives it."""

    # -- frames in ------------------------------------------------------------------------

    def receive(self, frame: bytes, now: Now) -> list[Effect]:
        """One client frame: the effects to execute, in order."""
        try:
            message = self.parse(frame, self.config.max_envelope_bytes)
        except ArqonError as exc:
            # A frame that does not parse counts like any other: garbage floods are limited
            # too (and answered with rate_limited instead of an error each).
            if wait := self.rates.admit_at(len(frame), now.monotonic):
                return self._refuse_rate(None, wait, now.monotonic)
            return [self.error(exc)]
        if isinstance(message, ClientResponse):
            return self._response(message, len(frame), now)
        if self.stopping:
            # Draining: frames other than answers are not acted on (the client resends them
            # elsewhere); the shell reads on so the close handshake does not stall.
            return []
        msgs = len(message.events) if isinstance(message, ClientEventBatch) else 1
        if wait := self.rates.admit_at(len(frame), now.monotonic, msgs):
            return self._refuse_rate(message.id, wait, now.monotonic)
        if isinstance(message, ClientEvent):
            return self._event(message, now)
        if isinstance(message, ClientEventBatch):
            return self._events(message, now)
        if builtin.gateway_answers(message.command, message.room):
            return self.run_command(message, now.monotonic, now.wall)
        return self._call(message, now)

    def _refuse_rate(self, request_id: str | None, wait_s: float, now: float) -> list[Effect]:
        """``rate_limited`` with ``retry_after_ms``: the frame is not acted on."""
        retry_ms = retry_after_ms(wait_s)
        error = ArqonError(MESSAGE_RATE_LIMITED, f"retry after {retry_ms} ms", request_id)
        effects: list[Effect] = [self.error(error, {"retry_after_ms": retry_ms})]
        if now - self.rate_audited >= RATE_AUDIT_EVERY_S:
            self.rate_audited = now
            details = {"session": self.config.session_id, "retry_after_ms": retry_ms}
            effects.append(
                Audit(self.principal.tenant, AUDIT_RATE_LIMITED, self.principal.id, details)
            )
        return effects

    # -- events ---------------------------------------------------------------------------

    def _event(self, event: ClientEvent, now: Now) -> list[Effect]:
        settings = self.room_settings(event.room)
        refused = self._publish_refused(event.room, event.channel, event.id, settings, now)
        if refused is not None:
            return refused
        stored = self._stored(event, settings, event.id, None, now.monotonic)
        if isinstance(stored, list):
            return stored
        event, body = stored
        ref = ChannelRef(self.principal.tenant, event.room, event.channel)
        effects = self._publish_slot()
        op = self.open_op(Pending("publish", event=event, ref=ref))
        self.publishing[op] = ref
        effects.append(self._publish_effect(op, ref, event, body, settings))
        return effects

    def _events(self, batch: ClientEventBatch, now: Now) -> list[Effect]:
        """An ``events`` frame: every check of a single event, for each; one refused event
        refuses the frame (nothing stored), with its ``index`` and ``event_id``."""
        settings = self.room_settings(batch.room)
        refused = self._publish_refused(batch.room, batch.channel, batch.id, settings, now)
        if refused is not None:
            return refused
        ref = ChannelRef(self.principal.tenant, batch.room, batch.channel)
        effects = self._publish_slot()
        op = self.open_op(Pending("publish", batch=batch, ref=ref))
        items: list[Publish] = []
        stamp = self.stamp()  # the frame's events arrived together
        for index, event in enumerate(batch.events):
            stored = self._stored(event, settings, batch.id, index, now.monotonic, stamp)
            if isinstance(stored, list):
                del self.pending[op]
                return stored
            checked, body = stored
            items.append(self._publish_effect(op, ref, checked, body, settings))
        self.publishing[op] = ref
        ttl_s = None if settings is None else settings.retention_s
        effects.append(PublishBatch(op, ref, batch.id, tuple(items), ttl_s))
        return effects

    def _publish_refused(
        self,
        room: str,
        channel: str,
        request_id: str,
        settings: room_rules.RoomView | None,
        now: Now,
    ) -> list[Effect] | None:
        """The answer when this principal may not publish to the channel now (permission,
        ban, mute, private room); None when it may."""
        refusal = self.forbidden(PUBLISH, room, channel, request_id, now.monotonic)
        if refusal is not None:
            error, audit = refusal
            return [*audit, self.error(error)]
        if settings is not None:
            who = self.standing(room, channel)
            refused = room_rules.publish_refusal(settings, room, who, now.wall)
            if refused is not None:
                error, extra = refused
                return [self.error(error.with_request_id(request_id), extra)]
        return None

    def _stored(
        self,
        event: ClientEvent,
        settings: room_rules.RoomView | None,
        request_id: str,
        index: int | None,
        now: float,
        stamp: str | None = None,
    ) -> tuple[ClientEvent, bytes] | list[Effect]:
        """The event as content policies leave it and its stored envelope, or the error
        (``index``: its place in a batch, told to the client with its id; ``stamp``: its
        server timestamp, when not now)."""
        try:
            # Content policies run before anything is stored (and may redact or tag).
            event, tags = self.content.check_event(event, self.principal.tenant, self.principal.id)
        except ArqonError as exc:
            audit = self._policy_audit(exc, event, now)
            return [*audit, self.error(exc.with_request_id(request_id), _where(index, event))]
        body = encode_stored_event(event, self.principal.id, stamp or self.stamp())
        body = with_tags(body, tags)
        size = len(body) if event.trace is None else len(body) + len(encode_trace(event.trace))
        if size > self.config.max_payload - NATS_HEADER_ROOM:
            detail = "the stored envelope exceeds the NATS max_payload"
            error = ArqonError(MESSAGE_TOO_LARGE, detail, request_id)
            return [self.error(error, _where(index, event))]
        room_max = None if settings is None else settings.max_message_bytes
        if room_max is not None and len(body) > room_max:
            detail = (
                f"room {event.room!r} takes events of at most {room_max} bytes as stored "
                f"(this one is {len(body)}): send a smaller payload"
            )
            error = ArqonError(MESSAGE_TOO_LARGE, detail, request_id)
            where = _where(index, event) or {}
            return [self.error(error, {"max_bytes": room_max, "room": event.room, **where})]
        return event, body

    def _policy_audit(self, exc: ArqonError, event: ClientEvent, now: float) -> list[Effect]:
        if exc.code not in POLICY_CODES:
            return []
        return self.audit_denial(
            AUDIT_POLICY_BLOCKED,
            ("policy", exc.code, event.room, event.channel),
            now,
            rule=rule_name(exc.detail or ""),
            code=exc.code,
            room=event.room,
            channel=event.channel,
            reason=exc.detail or "",
        )

    def _publish_slot(self) -> list[Effect]:
        """Backpressure: stop reading this socket until an ack frees a slot (a batch takes
        one, like a single event)."""
        if len(self.publishing) >= self.config.max_in_flight:
            return [AwaitPublishSlot(self.config.max_in_flight)]
        return []

    def _publish_effect(
        self,
        op: int,
        ref: ChannelRef,
        event: ClientEvent,
        body: bytes,
        settings: room_rules.RoomView | None,
    ) -> Publish:
        key = _scheme(self.config.subject_prefix).dedupe_key(ref, self.principal.id, event.id)
        ttl_s = None if settings is None else settings.retention_s
        return Publish(
            op, ref, event.id, body, key, event.trace, event.trace_malformed, ttl_s=ttl_s
        )

    @property
    def publishes_in_flight(self) -> int:
        return len(self.publishing)

    def publish_acked(
        self, op: int, seq: int, duplicate: bool, epoch: int | None = None
    ) -> list[Effect]:
        """The store acknowledged the publish ``op`` with ``seq`` (of ``epoch``, for a placed
        tenant): the client's ack."""
        pending = self._end_publish(op)
        event = pending.event
        assert event is not None
        return [Send(encode_ack(event.id, event.room, event.channel, seq, duplicate, epoch))]

    def batch_acked(self, op: int, results: Sequence[tuple[int, bool, int | None]]) -> list[Effect]:
        """The store acknowledged every event of the batch ``op``: ``(seq, duplicate,
        epoch)`` each, in the batch's order: one ack frame."""
        pending = self._end_publish(op)
        batch = pending.batch
        assert batch is not None and len(results) == len(batch.events)
        seqs = [seq for seq, _, _ in results]
        duplicates = [i for i, (_, duplicate, _) in enumerate(results) if duplicate]
        placed = [epoch for _, _, epoch in results if epoch is not None]
        epochs = placed if len(placed) == len(results) else None
        frame = encode_batch_ack(batch.id, batch.room, batch.channel, seqs, duplicates, epochs)
        return [Send(frame)]

    def publish_failed(self, op: int, failure: Failure, detail: str | None = None) -> list[Effect]:
        """The stream could not be ensured or the publish (of an event or a batch) failed:
        the error for the frame."""
        pending = self._end_publish(op)
        sent = pending.batch if pending.batch is not None else pending.event
        assert sent is not None
        request_id = sent.id
        if failure is not Failure.QUOTA:
            detail = None  # the reason is logged by the shell, not told to the client
        return [self.error(failure_error(failure, request_id, detail))]

    def _end_publish(self, op: int) -> Pending:
        self.publishing.pop(op, None)
        return self.pending.pop(op)

    # -- service commands: the caller's side -----------------------------------------------

    def _call(self, command: ClientCommand, now: Now) -> list[Effect]:
        """A command that is not built-in goes to one registered handler, on any gateway."""
        try:
            builtin.require_service_name(command.command)
            timeout_ms = builtin.service_timeout_ms(
                command.timeout_ms,
                self.config.command_timeout_ms,
                self.config.command_timeout_max_ms,
            )
        except ArqonError as exc:
            return self.refuse(command, exc)
        refusal = self.forbidden(COMMAND, command.room, command.channel, command.id, now.monotonic)
        if refusal is not None:
            error, audit = refusal
            return [*audit, *self.refuse(command, error)]
        refused = self._call_room_refusal(command, now.wall)
        if refused is not None:
            return self.refuse(command, refused)
        limit = self.config.max_in_flight
        if len(self.calls) >= limit:
            detail = f"this connection has {limit} service commands awaiting answers"
            return self.refuse(command, ArqonError(LIMIT_EXCEEDED, detail))
        ref = ChannelRef(self.principal.tenant, command.room, command.channel)
        op = self.open_op(Pending("call", command, ref=ref, timeout_ms=timeout_ms))
        self.calls[op] = None
        call = ServiceCall(
            command.command,
            command.parameters,
            self.principal.id,
            command.id,
            self.stamp(),
            timeout_ms,
        )
        return [
            CallService(
                op,
                ref,
                command.command,
                call.encode(),
                timeout_ms / 1000,
                command.trace,
                command.trace_malformed,
            )
        ]

    def _call_room_refusal(self, command: ClientCommand, wall: float) -> ArqonError | None:
        settings = self.room_settings(command.room)
        if settings is None:
            return None
        # The service's own parameters never carry a room key to the gateway.
        who = self.standing(command.room, command.channel)
        decision = room_rules.enter_decision(
            settings, command.room, who, None, room_rules.CALL_ACTION, wall
        )
        return decision if isinstance(decision, ArqonError) else None

    def call_answered(self, op: int, body: bytes) -> list[Effect]:
        """A handler answered the service call ``op``: its response, as it sent it."""
        command = self._end_call(op).command
        assert command is not None
        try:
            reply = ServiceReply.decode(body)
        except MalformedServiceMessage:
            return self.refuse(command, ArqonError(INTERNAL))
        frame = encode_response(
            command, reply.id, reply.sender, reply.timestamp, reply.result, reply.error
        )
        return [Send(frame)]

    def call_failed(self, op: int, failure: Failure) -> list[Effect]:
        pending = self._end_call(op)
        command = pending.command
        assert command is not None
        if failure is Failure.NO_RESPONDERS:
            # No service takes this name. If it looks like a mistyped built-in command, say
            # which one (unknown_command, not retryable) instead of "start the service".
            error = builtin.misspelt_builtin(command.command)
            if error is not None:
                return self.refuse(command, error)
        if failure is Failure.TIMEOUT:
            detail = f"no answer within {pending.timeout_ms} ms"
            return self.refuse(command, ArqonError(TIMEOUT, detail))
        return self.refuse(command, failure_error(failure, command.id))

    def _end_call(self, op: int) -> Pending:
        self.calls.pop(op, None)
        return self.pending.pop(op)

    # -- service commands: the handler's side -------------------------------------------------

    def service_request(
        self,
        ref: ChannelRef,
        reply: str,
        body: bytes,
        socket_open: bool = True,
        trace: Mapping[str, str] | None = None,
    ) -> list[Effect]:
        """A command for this connection's handler arrived (maybe from another gateway).

        ``trace`` (from the shell's span) goes in the delivered command's ``trace`` field."""
        try:
            call = ServiceCall.decode(body)
        except MalformedServiceMessage:
            return []  # nobody to tell: the caller times out
        if self.closed or self.stopping or not socket_open:
            return [Respond(reply, self.gateway_error(UNAVAILABLE, "handler is leaving"))]
        if len(self.deliveries) >= self.config.max_in_flight:
            detail = f"the handler has {len(self.deliveries)} commands awaiting answers"
            return [Respond(reply, self.gateway_error(UNAVAILABLE, detail))]
        delivery_id = "dlv_" + self.new_id()
        self.deliveries[delivery_id] = reply
        frame = encode_delivery(
            delivery_id,
            ref.room,
            ref.channel,
            call.sender,
            call.timestamp,
            call.delivery_payload(),
            trace,
        )
        return [ArmTimer(delivery_id, call.timeout_ms / 1000 + ANSWER_GRACE_S), Send(frame)]

    def delivery_expired(self, delivery_id: str) -> list[Effect]:
        """The caller stopped waiting: a later answer is ``unknown_request``."""
        self.deliveries.pop(delivery_id, None)
        return []

    @property
    def has_deliveries(self) -> bool:
        return bool(self.deliveries)

    def _response(self, response: ClientResponse, size: int, now: Now) -> list[Effect]:
        if response.request_id in self.deliveries:
            # An answer owed to a waiting caller: taken even while draining and never
            # refused by the rate limits; its bytes are counted.
            self.rates.charge_at(size, now.monotonic)
        elif wait := self.rates.admit_at(size, now.monotonic):  # answers to nothing: a flood
            return self._refuse_rate(response.id, wait, now.monotonic)
        reply = self.deliveries.pop(response.request_id, None)
        if reply is None:
            detail = f"no delivery {response.request_id[:64]!r}"
            return [self.error(ArqonError(UNKNOWN_REQUEST, detail, response.id))]
        effects: list[Effect] = [CancelTimer(response.request_id)]
        body = ServiceReply(
            response.id, self.principal.id, self.stamp(), response.result, response.error
        ).encode()
        if len(body) > self.config.max_payload - NATS_HEADER_ROOM:
            body = self.gateway_error(INTERNAL, "the handler's answer exceeds NATS max_payload")
            too_large = ArqonError(MESSAGE_TOO_LARGE, "answer too large", response.id)
            effects.append(self.error(too_large))
        return [*effects, Respond(reply, body, response.id)]

    def respond_failed(self, request_id: str) -> list[Effect]:
        """The handler's answer could not be sent on (NATS unreachable)."""
        return [self.error(ArqonError(UNAVAILABLE, request_id=request_id))]

    def gateway_error(self, code: ErrorCode, detail: str) -> bytes:
        """A service reply from the gateway itself (the handler is leaving, overloaded...)."""
        error = ArqonError(code, detail)
        response_error = ResponseError(error.code, error.message, code.retryable)
        return ServiceReply(
            "resp_" + self.new_id(), GATEWAY, self.stamp(), None, response_error
        ).encode()

    # -- the connection's end ---------------------------------------------------------------

    def leave_room(self, room: str, error: ArqonError) -> list[Effect]:
        """Leave every channel of ``room`` and drop its handlers (a ban); tell the client.

        No effects: the connection was not in the room.
        """
        refs = [ref for ref in self.joined if ref.room == room]
        handlers = [key for key in self.handlers if key[0].room == room]
        if not refs and not handlers:
            return []
        channels = sorted({ref.channel for ref in refs} | {key[0].channel for key in handlers})
        return [*self.drop(refs, handlers), self.error(error, {"room": room, "channels": channels})]

    def begin_drain(self) -> list[Effect]:
        """Stop taking frames; take this connection out of every queue group."""
        self.stopping = True
        return self.stop_handlers()

    def stop_handlers(self) -> list[Effect]:
        handlers, self.handlers = self.handlers, {}
        return [Unserve(ref, name) for ref, name in handlers]

    def connection_lost(self) -> list[Effect]:
        """The socket closed: leave every channel (then :meth:`close_handlers`)."""
        self.closed = True
        refs, self.joined = self.joined, {}
        return [Leave(ref) for ref in refs]

    def close_handlers(self, reason: str) -> list[Effect]:
        """Stop serving and tell the callers still waiting on this handler why."""
        effects = self.stop_handlers()
        for delivery_id, reply in list(self.deliveries.items()):
            del self.deliveries[delivery_id]
            effects.append(CancelTimer(delivery_id))
            effects.append(Respond(reply, self.gateway_error(UNAVAILABLE, reason)))
        return effects
