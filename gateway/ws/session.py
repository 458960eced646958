"""One connection's asyncio shell: read frames, feed the core, execute its effects.

Every decision (parsing, rate admission, authorization, room rules, limits, the error of each
outcome) is the sans-I/O core's (shared/core/). This shell moves bytes, awaits the ports the
effects name (broker, hub, room directory, authenticator), arms timers, and feeds each
outcome back to the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import orjson

from arqonbus_server.gateway.auth import agent as auth_agent
from arqonbus_server.gateway.auth.base import (
    Authenticator,
    AuthError,
    AuthUnavailable,
    Credentials,
    Principal,
    check_credentials,
)
from arqonbus_server.gateway.http.metrics import NO_METRICS, NoMetrics, message_kind
from arqonbus_server.gateway.policies import policy_for
from arqonbus_server.gateway.state.admin import GatewayCommands
from arqonbus_server.gateway.state.audit import AuditLog
from arqonbus_server.gateway.state.limits import (
    ConnectionLimits,
    RateLimits,
    rate_specs,
    welcome_limits,
)
from arqonbus_server.gateway.state.rooms import RoomDirectory, RoomLimits, run_admin_command
from arqonbus_server.gateway.state.security import SecurityState
from arqonbus_server.gateway.tracing import Tracing, now_ns
from arqonbus_server.gateway.tracing import counters as trace_counters
from arqonbus_server.gateway.ws.hub import Hub, JoinResult, Member
from arqonbus_server.gateway.ws.transport import Socket
from arqonbus_server.mesh.broker import (
    Broker,
    BrokerUnavailable,
    LiveSubscription,
    NoResponders,
    PublishItem,
    PublishResult,
    RequestTimeout,
    ServiceRequest,
    StoreQuotaExceeded,
)
from arqonbus_server.shared import commands
from arqonbus_server.shared.core import Connection, ConnectionConfig, Failure, Now
from arqonbus_server.shared.core import effects as fx
from arqonbus_server.shared.core.rates import RateSpec
from arqonbus_server.shared.core.state import failure_error
from arqonbus_server.shared.envelope import (
    ClientEventBatch,
    ClientMessage,
    encode_error,
    encode_welcome,
    parse_client_frame,
    with_seq,
    with_seq_epoch,
    with_trace,
)
from arqonbus_server.shared.errors import (
    INTERNAL,
    INVALID_PARAMETERS,
    UNAVAILABLE,
    ArqonError,
    CloseCode,
)
from arqonbus_server.shared.settings import Settings
from arqonbus_server.shared.subjects import ChannelRef

log = logging.getLogger("arqonbus.gateway.session")

# A handler registered a moment ago on another NATS server may not be known on ours yet
# (interest spreads over the cluster's routes asynchronously). Ask again after these
# pauses before answering no_responders; together they stay under 100 ms.
_NO_RESPONDERS_RETRY_S = (0.01, 0.02, 0.03)
_FAILED = object()  # a port call whose failure was already fed back to the core
T = TypeVar("T")
R = TypeVar("R")

_last_stamp: tuple[int, str] = (-1, "")


def utc_timestamp() -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2025-01-01T12:00:00.000Z (formatted once per ms)."""
    global _last_stamp
    ms = time.time_ns() // 1_000_000
    if ms != _last_stamp[0]:
        text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        _last_stamp = (ms, text.replace("+00:00", "Z"))
    return _last_stamp[1]


class _ClockedRates:
    """The core's rate admission over the gateway's meters, on the registry's clock."""

    __slots__ = ("limits",)

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits

    def admit_at(self, size: int, now: float, msgs: int = 1) -> float:
        return self.limits.admit(size, msgs)

    def charge_at(self, size: int, now: float) -> None:
        self.limits.charge(size)


def _new_id() -> str:
    return uuid.uuid4().hex


def _parse(data: bytes, max_bytes: int) -> ClientMessage:
    # Looked up here at each call: tests/integration/test_errors.py replaces this module's
    # parse_client_frame with one that fails, to check that a bug answers ``internal``.
    return parse_client_frame(data, max_bytes)


class Session:
    def __init__(
        self,
        socket: Socket,
        principal: Principal,
        hub: Hub,
        broker: Broker,
        settings: Settings,
        node_id: str,
        security: SecurityState | None = None,
        audit: AuditLog | None = None,
        authenticator: Authenticator | None = None,
        rate_limits: RateLimits | None = None,
        tracing: Tracing | None = None,
        metrics: NoMetrics = NO_METRICS,
        commands: GatewayCommands | None = None,
    ) -> None:
        self.socket = socket
        # Presence and the gateway's admin commands (gateway/state/admin.py); None: refused.
        self._commands = commands
        self._metrics = metrics  # gateway/http/metrics.py (NO_METRICS: off)
        self._phases = metrics.phases  # sampled phase timings (gateway/http/phases.py)
        self._sampled: tuple[float, float] | None = None  # (parsed, taken) of this frame
        self._kind = "invalid"  # the received-type label of the frame being handled
        self._frame_events = 1  # events in it (an ``events`` frame's count)
        self._publish_started: dict[int, float] = {}  # op -> perf_counter() when taken
        self._tracing = tracing  # None: tracing off, no span made (gateway/tracing.py)
        # refresh_token checks the new credential with the gateway's authenticator.
        self._authenticator = authenticator
        self._expiry: asyncio.TimerHandle | None = None
        self._security = security
        self._audit = audit or AuditLog(None, settings.subject_prefix)
        self.id = uuid.uuid4().hex
        self._hub = hub
        self._broker = broker
        self._settings = settings
        self._node_id = node_id
        # The task sets and the drain event below are made on first use: an empty set is
        # 216 bytes and an asyncio.Event about 900, on every idle connection otherwise.
        self._publishes: set[asyncio.Task[None]] | None = None
        self._publishing = 0  # publishes in flight: those tasks and the called-back ones
        self._publish_tasks_unstarted = 0  # (see _start_publish)
        self._publish_ended: asyncio.Future[None] | None = None  # made by _publish_end
        # Service calls are counted apart: a connection that is also a handler must keep
        # reading its answers while its own calls wait for them.
        self._calls: set[asyncio.Task[None]] | None = None
        self._served: dict[tuple[ChannelRef, str], LiveSubscription] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._deliveries_pending = False  # delivery timers armed (what _no_deliveries shows)
        self._no_deliveries: asyncio.Event | None = None  # made by finish_in_flight
        self._background: set[asyncio.Task[None]] | None = None
        content_policy = (
            security.content_policy if security is not None else policy_for(settings.policy_file)
        )
        # Rate limits (gateway/state/limits.py): this connection's buckets and its principal's.
        if rate_limits is None:  # (an empty registry is falsy: it has a length)
            rate_limits = RateLimits(*rate_specs(settings))
        self._rate_limits = rate_limits
        self._rates = self._rate_limits.open(principal.tenant, principal.id)
        # Private rooms, bans, mutes (gateway/state/rooms.py); None without NATS security state.
        self._rooms = RoomDirectory.of(security) if security is not None else None
        self.core = Connection(
            principal,
            ConnectionConfig(
                session_id=self.id,
                subject_prefix=settings.subject_prefix,
                max_envelope_bytes=settings.max_envelope_bytes,
                max_in_flight=settings.max_in_flight,
                max_channels=settings.max_channels_per_connection,
                max_handlers=settings.max_handlers_per_connection,
                send_buffer_bytes=settings.send_buffer_bytes,
                command_timeout_ms=int(settings.command_timeout_s * 1000),
                command_timeout_max_ms=int(settings.command_timeout_max_s * 1000),
                max_payload=broker.max_payload,
                can_refresh=authenticator is not None,
                has_security=security is not None,
            ),
            _ClockedRates(self._rates),
            content_policy,
            self._rooms,
            stamp=utc_timestamp,
            new_id=_new_id,
            parse=self._parse_counted,
        )

    @property
    def principal(self) -> Principal:
        return cast(Principal, self.core.principal)

    def retune_rates(self, per_connection: RateSpec, per_principal: RateSpec) -> None:
        """The tenant's limits changed (gateway/state/tenant_limits.py): new rates from now on."""
        self._rates.retune(per_connection, per_principal)

    def limits(self) -> dict[str, int | float]:
        # The rates of this connection: its tenant's overrides, else the settings.
        specs = (self._rates.connection.spec, self._rates.principal.spec)
        return {
            **welcome_limits(self._settings, specs),
            "max_envelope_bytes": self._settings.max_envelope_bytes,
            "max_in_flight": self._settings.max_in_flight,
            "history_max_limit": commands.HISTORY_MAX_LIMIT,
            "send_buffer_bytes": self._settings.send_buffer_bytes,
            "max_channels": self._settings.max_channels_per_connection,
            "max_handlers": self._settings.max_handlers_per_connection,
            "command_timeout_max_ms": int(self._settings.command_timeout_max_s * 1000),
        }

    # -- the socket loop ------------------------------------------------------------------

    def _welcome(self) -> None:
        # Its own frame, so the encoded welcome is not held for the connection's life (an
        # orjson result occupies at least 4 KiB: shared/jsonbytes.py).
        welcome = encode_welcome(self.id, self._node_id, self.limits())
        if self.socket.send(welcome):  # counted once queued, not when the socket refused it
            self._metrics.frame_sent(welcome)

    async def run(self) -> None:
        self._welcome()
        self._arm_expiry(self.principal.expires_at)
        try:
            while True:
                data = await self.socket.recv()
                if data is None:
                    break
                await self.handle(data)
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
            left = self.core.connection_lost()
            if self._commands is not None:
                self._commands.ended(self.id)
            self._rates.close()
            self._hub.leave_all(self.socket, [e.ref for e in left if isinstance(e, fx.Leave)])
            await self._close_handlers("the handler's connection closed before it answered")

    def _now(self) -> Now:
        wall = self._rooms.clock() if self._rooms is not None else time.time()
        return Now(time.monotonic(), wall)

    def _parse_counted(self, data: bytes, max_bytes: int) -> ClientMessage:
        self._kind = "invalid"
        message = _parse(data, max_bytes)
        self._kind = message_kind(message)
        self._frame_events = len(message.events) if isinstance(message, ClientEventBatch) else 1
        self._metrics.frame_received(self._kind)
        return message

    async def handle(self, data: bytes) -> None:
        if self._commands is not None:
            self._commands.activity(self.id)
        read_at = self.socket.read_at
        if read_at is not None:  # a sampled message (gateway/http/phases.py)
            self.socket.read_at = None
            self._sampled = (read_at, time.monotonic())
        elif self._sampled is not None:  # the last sampled message was no publish
            self._sampled = None
        try:
            effects = self.core.receive(data, self._now())
            if self._kind == "invalid":
                self._metrics.frame_received("invalid")
            self._metrics.frame_handled(
                self._kind, self.principal.tenant, effects, self._frame_events
            )
            self._kind = "invalid"
            await self._execute(effects)
        except Exception:
            # A bug in handling one frame must not end the connection (nor its other work).
            log.exception("session %s failed to handle a frame", self.id)
            self.socket.send(
                encode_error(ArqonError(INTERNAL, "the gateway failed to handle this frame"))
            )

    def _arm_expiry(self, expires_at: float | None) -> None:
        """Close with 4004 when the credential expires (a JWT's exp, leeway included)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if expires_at is None:
            return
        self._expiry = asyncio.get_running_loop().call_later(
            max(0.0, expires_at - time.time()),
            self.socket.close_soon,
            CloseCode.TOKEN_EXPIRED,
            "token expired: get a fresh token, reconnect and resume",
        )

    # -- executing effects ----------------------------------------------------------------

    async def _execute(self, effects: list[fx.Effect]) -> None:
        """Execute the core's effects in order, awaiting the ports they name."""
        for effect in effects:
            if not self._apply(effect):
                await self._await(effect)

    def _apply_now(self, effects: list[fx.Effect]) -> None:
        """Effects from a callback (no awaiting there): port calls run in the background."""
        for effect in effects:
            if not self._apply(effect):
                self._in_background(self._await(effect))

    def _apply(self, effect: fx.Effect) -> bool:
        """Execute an effect that needs no awaiting; False if it needs one."""
        if isinstance(effect, fx.Send):
            if self.socket.send(effect.frame):
                self._metrics.frame_sent(effect.frame)
        elif isinstance(effect, fx.Audit):
            self._audit.record(effect.tenant, effect.type, effect.principal, **effect.details)
        elif isinstance(effect, fx.Leave):
            self._hub.leave(self.socket, effect.ref)
            if self._commands is not None:
                self._commands.left(effect.ref, self.id)
        elif isinstance(effect, fx.ArmTimer):
            loop = asyncio.get_running_loop()
            self._timers[effect.delivery_id] = loop.call_later(
                effect.delay_s, self._expire, effect.delivery_id
            )
            self._set_deliveries_pending(True)
        elif isinstance(effect, fx.CancelTimer):
            timer = self._timers.pop(effect.delivery_id, None)
            if timer is not None:
                timer.cancel()
            if not self.core.has_deliveries:
                self._set_deliveries_pending(False)
        elif isinstance(effect, fx.ArmExpiry):
            self._arm_expiry(None if self.core.closed else effect.expires_at)
        elif isinstance(effect, fx.Respond) and effect.request_id is None:
            self._in_background(self._respond_quietly(effect.reply, effect.body))
        elif isinstance(effect, fx.Unserve) and effect.background:
            served = self._served.pop((effect.ref, effect.name), None)
            if served is not None:
                self._in_background(served.close())
        elif isinstance(effect, fx.CallService):
            if self._calls is None:
                self._calls = set()
            task = asyncio.create_task(self._call(effect))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        elif isinstance(effect, fx.Close):
            self.socket.close_soon(CloseCode(effect.code), effect.reason)
        else:
            return False
        return True

    async def _await(self, effect: fx.Effect) -> None:
        if isinstance(effect, fx.AwaitPublishSlot):
            while self._publishing >= effect.limit:
                # Backpressure: stop reading this socket until an ack frees a slot.
                await self._publish_end()
        elif isinstance(effect, fx.Publish | fx.PublishBatch):
            await self._start_publish(effect)
        elif isinstance(effect, fx.Unserve):
            served = self._served.pop((effect.ref, effect.name), None)
            if served is not None:
                await served.close()
        elif isinstance(effect, fx.Respond):
            await self._respond(effect)
        else:
            await self._command(effect)

    def _in_background(self, work: Awaitable[None]) -> None:
        if self._background is None:
            self._background = set()
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- events ---------------------------------------------------------------------------

    async def _start_publish(self, publish: fx.Publish | fx.PublishBatch) -> None:
        self._publish_started[publish.op] = time.perf_counter()
        request_id = publish.event_id if isinstance(publish, fx.Publish) else publish.batch_id
        try:
            # Inline, in frame order: provisioning (once per tenant) must not let a
            # later event of this connection overtake an earlier one.
            if not self._broker.stream_known(publish.ref.tenant):
                await self._broker.ensure_stream(publish.ref.tenant)
        except BrokerUnavailable as exc:
            log.warning("publish of %s failed: %s", request_id, exc)
            self._count_publish(publish, (Failure.UNAVAILABLE, None))
            self._apply_now(self.core.publish_failed(publish.op, Failure.UNAVAILABLE))
            return
        except Exception:
            log.exception("publish of %s failed", request_id)
            self._count_publish(publish, (Failure.INTERNAL, None))
            self._apply_now(self.core.publish_failed(publish.op, Failure.INTERNAL))
            return
        if self._sampled is not None and self._phases is not None:
            first = publish if isinstance(publish, fx.Publish) else publish.items[0]
            self._phases.sent(first.dedupe_key, *self._sampled)
            self._sampled = None
        self._publishing += 1
        if (
            isinstance(publish, fx.Publish)
            and self._tracing is None
            and not self._publish_tasks_unstarted
        ):
            # The usual single event: called back from the store's ack, without a task.
            # Not while a publish task has yet to start: this event would overtake it.
            if publish.trace_malformed:
                trace_counters.malformed_trace_fields += 1
            self._broker.publish_then(
                publish.ref,
                with_trace(publish.body, publish.trace),  # the client's, passed on as sent
                publish.dedupe_key,
                None,
                publish.ttl_s,
                functools.partial(self._published, publish),
            )
            return
        if self._publishes is None:
            self._publishes = set()
        self._publish_tasks_unstarted += 1
        if isinstance(publish, fx.Publish):
            task = asyncio.create_task(self._publish(publish))
        else:
            task = asyncio.create_task(self._publish_batch(publish))
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)
        task.add_done_callback(self._publish_over)

    def _published(self, publish: fx.Publish, outcome: PublishResult | BaseException) -> None:
        """A single event's outcome, called back by the broker (Broker.publish_then)."""
        try:
            if isinstance(outcome, PublishResult):
                self._apply_now(self._answer(publish, outcome))
            else:
                self._apply_now(self._answer(publish, _failure(publish.event_id, outcome)))
        finally:
            self._publish_over()

    def _publish_over(self, _: object = None) -> None:
        self._publishing -= 1
        ended = self._publish_ended
        if ended is not None and not ended.done():
            ended.set_result(None)

    async def _publish_end(self, timeout: float | None = None) -> None:
        """Return when a publish in flight ends (or after ``timeout`` s)."""
        ended = self._publish_ended
        if ended is None or ended.done():
            ended = self._publish_ended = asyncio.get_running_loop().create_future()
        await asyncio.wait((ended,), timeout=timeout)  # never cancels it for another waiter

    async def _publish(self, publish: fx.Publish) -> None:
        self._publish_tasks_unstarted -= 1
        if publish.trace_malformed:
            trace_counters.malformed_trace_fields += 1
        if self._tracing is not None:
            await self._publish_traced(publish, self._tracing)
            return
        body = with_trace(publish.body, publish.trace)  # the client's, passed on as sent
        outcome = await self._store(publish, body, None)
        self._apply_now(self._answer(publish, outcome))

    async def _publish_traced(self, publish: fx.Publish, tracing: Tracing) -> None:
        span, hop, created = tracing.start_send(publish.ref, publish.event_id, publish.trace)
        outcome = await self._store(publish, with_trace(publish.body, created), hop)
        if isinstance(outcome, PublishResult):
            tracing.end_send(span, outcome.seq, outcome.duplicate, None)
        else:
            tracing.end_send(span, None, False, failure_error(outcome[0], publish.event_id).code)
        self._apply_now(self._answer(publish, outcome))

    async def _store(
        self, publish: fx.Publish, body: bytes, headers: dict[str, str] | None
    ) -> PublishResult | tuple[Failure, str | None]:
        """Publish to the store: its result, or how it failed."""
        return await self._stored(
            publish.event_id,
            self._broker.publish(
                publish.ref, body, publish.dedupe_key, headers, ttl_s=publish.ttl_s
            ),
        )

    async def _stored(self, request_id: str, work: Awaitable[R]) -> R | tuple[Failure, str | None]:
        """The store's answer to a publish, or how it failed."""
        try:
            return await work
        except Exception as exc:
            return _failure(request_id, exc)

    async def _publish_batch(self, batch: fx.PublishBatch) -> None:
        """An ``events`` frame: its events stored together, answered by one ack (or one
        error) once every one is stored; each is traced as a single event would be."""
        self._publish_tasks_unstarted -= 1
        tracing = self._tracing
        spans: list[Any] = []
        items: list[PublishItem] = []
        for item in batch.items:
            if item.trace_malformed:
                trace_counters.malformed_trace_fields += 1
            if tracing is None:
                items.append((with_trace(item.body, item.trace), item.dedupe_key, None))
            else:
                span, hop, created = tracing.start_send(item.ref, item.event_id, item.trace)
                spans.append(span)
                items.append((with_trace(item.body, created), item.dedupe_key, hop))
        outcome = await self._stored(
            batch.batch_id, self._broker.publish_many(batch.ref, items, batch.ttl_s)
        )
        if tracing is not None:
            for index, (span, item) in enumerate(zip(spans, batch.items, strict=True)):
                if isinstance(outcome, list):
                    tracing.end_send(span, outcome[index].seq, outcome[index].duplicate, None)
                else:
                    code = failure_error(outcome[0], item.event_id).code
                    tracing.end_send(span, None, False, code)
        self._count_publish(batch, outcome)
        if isinstance(outcome, list):
            if self._phases is not None and self._phases.open:
                self._phases.acked(batch.items[0].dedupe_key)
            if self._commands is not None and not all(r.duplicate for r in outcome):
                self._commands.published(batch.ref)
            results = [(r.seq, r.duplicate, r.epoch) for r in outcome]
            self._apply_now(self.core.batch_acked(batch.op, results))
        else:
            self._apply_now(self.core.publish_failed(batch.op, *outcome))

    def _answer(
        self, publish: fx.Publish, outcome: PublishResult | tuple[Failure, str | None]
    ) -> list[fx.Effect]:
        self._count_publish(publish, outcome)
        if isinstance(outcome, PublishResult):
            if self._phases is not None and self._phases.open:
                self._phases.acked(publish.dedupe_key)
            if not outcome.duplicate and self._commands is not None:
                self._commands.published(publish.ref)
            return self.core.publish_acked(
                publish.op, outcome.seq, outcome.duplicate, outcome.epoch
            )
        return self.core.publish_failed(publish.op, *outcome)

    def _count_publish(
        self,
        publish: fx.Publish | fx.PublishBatch,
        outcome: PublishResult | list[PublishResult] | tuple[Failure, str | None],
    ) -> None:
        started = self._publish_started.pop(publish.op, None)
        tenant = publish.ref.tenant
        latency = time.perf_counter() - started if started is not None else 0.0
        if isinstance(outcome, PublishResult):
            self._metrics.publish_acked(latency, tenant, outcome.duplicate)
            return
        if isinstance(outcome, list):  # a batch's: one latency, counted per event
            duplicates = sum(1 for result in outcome if result.duplicate)
            if duplicates < len(outcome):
                self._metrics.publish_acked(latency, tenant, False, len(outcome) - duplicates)
            if duplicates:
                self._metrics.publish_acked(latency, tenant, True, duplicates)
            return
        if outcome[0] is Failure.UNAVAILABLE:
            self._metrics.jetstream_error("publish")
        request_id = publish.event_id if isinstance(publish, fx.Publish) else publish.batch_id
        events = 1 if isinstance(publish, fx.Publish) else len(publish.items)
        self._metrics.publish_refused(failure_error(outcome[0], request_id).code, tenant, events)

    async def finish_in_flight(self, timeout: float) -> None:
        """Wait for acks and answers owed to this connection, and by its handler to others."""
        deadline = time.monotonic() + timeout
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=timeout)
        while self._publishing > 0 and (left := deadline - time.monotonic()) > 0:
            await self._publish_end(left)
        if self._no_deliveries is None:
            self._no_deliveries = asyncio.Event()
            if not self._deliveries_pending:
                self._no_deliveries.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._no_deliveries.wait(), max(0.0, deadline - time.monotonic())
            )

    def _set_deliveries_pending(self, pending: bool) -> None:
        self._deliveries_pending = pending
        if self._no_deliveries is not None:
            if pending:
                self._no_deliveries.clear()
            else:
                self._no_deliveries.set()

    # -- commands: the ports they wait on -------------------------------------------------------

    async def _port(self, op: int, work: Awaitable[T], name: str) -> T | object:
        """Await a command's port; a failure is fed back to the core (then ``_FAILED``)."""
        try:
            return await work
        except ArqonError as exc:
            failure: ArqonError | Failure = exc
        except BrokerUnavailable as exc:
            log.warning("command %s failed: %s", name, exc)
            self._metrics.jetstream_error("command")
            failure = Failure.UNAVAILABLE
        except Exception:
            log.exception("command %s failed", name)
            failure = Failure.INTERNAL
        await self._execute(self.core.command_failed(op, failure))
        return _FAILED

    async def _command(self, effect: fx.Effect) -> None:
        handlers: dict[type, Callable[[Any], Awaitable[None]]] = {
            fx.VerifyRoomKey: self._verify_room_key,
            fx.Join: self._join,
            fx.ReadHistory: self._history,
            fx.Serve: self._serve,
            fx.CheckCredential: self._check_credential,
            fx.RegisterAgent: self._register_agent,
            fx.RoomAdmin: self._room_admin,
            fx.RunCommand: self._run_command,
            fx.ReportLimits: self._report_limits,
        }
        await handlers[type(effect)](effect)

    async def _verify_room_key(self, effect: fx.VerifyRoomKey) -> None:
        assert self._rooms is not None  # the core saw the room's settings in it
        settings = self._rooms.get(effect.tenant, effect.room)
        check = (
            self._rooms.key_matches(
                effect.tenant, effect.room, settings, effect.key, effect.principal
            )
            if settings is not None
            else _true()
        )
        ok = await self._port(effect.op, check, "room_key")
        if ok is not _FAILED:
            await self._execute(self.core.room_key_checked(effect.op, bool(ok)))

    async def _join(self, effect: fx.Join) -> None:
        joined = await self._port(
            effect.op,
            self._hub.join(
                self.socket, effect.ref, effect.since_seq, effect.since_epoch, effect.batch
            ),
            "join_channel",
        )
        if joined is _FAILED:
            return
        member, result = cast(tuple[Member, JoinResult], joined)
        answer = result.as_result()
        if effect.presence or effect.presence_events:
            answer.update(await self._enter_presence(effect))
        await self._execute(self.core.joined_channel(effect.op, answer))
        self._hub.start(member, result.last_seq)

    async def _enter_presence(self, effect: fx.Join) -> dict[str, bool]:
        """Enter the channel's presence and/or take its frames; the join reply says which.

        The join itself stands either way: a presence store that did not answer leaves
        ``presence`` false in the reply (the client may join again to retry)."""
        entered = False
        if self._commands is not None:
            sink = self._presence_frame if effect.presence_events else None
            try:
                entered = await self._commands.enter(
                    effect.ref, self.id, self.principal.id, present=effect.presence, sink=sink
                )
            except BrokerUnavailable as exc:
                log.warning("presence of %s in %s not entered: %s", self.id, effect.ref, exc)
        return {
            "presence": entered and effect.presence,
            "presence_events": entered and effect.presence_events,
        }

    def _presence_frame(self, frame: bytes) -> None:
        if not self.core.closed and self.socket.send(frame):
            self._metrics.frame_sent(frame)

    async def _history(self, effect: fx.ReadHistory) -> None:
        """One page of stored events, bounded by ``limit`` and by bytes (half the send buffer)."""
        page = await self._port(effect.op, self._read_page(effect), "history")
        if page is not _FAILED:
            await self._execute(self.core.command_done(effect.op, page))  # type: ignore[arg-type]

    async def _read_page(self, effect: fx.ReadHistory) -> dict[str, object]:
        if self._tracing is None:
            return await self._read_page_untraced(effect)
        start = now_ns()
        page = await self._read_page_untraced(effect)
        events = page["events"]
        count = len(events) if isinstance(events, list) else 0
        self._tracing.record_replay("history", effect.ref, start, count)
        return page

    async def _read_page_untraced(self, effect: fx.ReadHistory) -> dict[str, object]:
        started = time.perf_counter()
        events: list[orjson.Fragment] = []
        next_since, size, more = effect.since_seq, 0, False
        # A placed tenant's page is read from the streams of the placement known now: its
        # events carry that epoch, as deliveries do (docs/protocol.md#history).
        epoch = self._hub.current_epoch(effect.ref.tenant)
        replay = self._broker.replay(effect.ref, effect.since_seq + 1, None, effect.limit)
        async with contextlib.aclosing(replay) as stored_events:
            async for stored in stored_events:
                delivered = (
                    with_seq(stored.body, stored.seq)
                    if epoch is None
                    else with_seq_epoch(stored.body, stored.seq, epoch)
                )
                if events and size + len(delivered) > effect.budget_bytes:
                    more = True
                    break
                events.append(orjson.Fragment(delivered))
                size += len(delivered)
                next_since = stored.seq
        more = more or len(events) == effect.limit
        self._metrics.replayed("history", len(events), time.perf_counter() - started)
        page: dict[str, object] = {"events": events, "next_since_seq": next_since, "more": more}
        if epoch is not None:
            page["epoch"] = epoch
        return page

    async def _serve(self, effect: fx.Serve) -> None:
        ref = effect.ref
        served = await self._port(
            effect.op,
            self._broker.serve(
                ref, effect.name, lambda request: self._deliver(ref, request, effect.name)
            ),
            "register_handler",
        )
        if served is _FAILED:
            return
        self._served[(ref, effect.name)] = served  # type: ignore[assignment]
        await self._execute(self.core.handler_served(effect.op))

    async def _check_credential(self, effect: fx.CheckCredential) -> None:
        authenticator = self._authenticator
        assert authenticator is not None  # the core refuses refresh_token without one
        principal = await self._port(effect.op, _checked(authenticator, effect.token), "refresh")
        if principal is not _FAILED:
            assert isinstance(principal, Principal)
            await self._execute(self.core.credential_checked(effect.op, principal))

    async def _register_agent(self, effect: fx.RegisterAgent) -> None:
        assert self._security is not None  # the core refuses without it
        work = _registered(self._security, effect.tenant, effect.role, effect.parameters)
        record = await self._port(effect.op, work, "register_agent")
        if record is not _FAILED:
            await self._execute(self.core.agent_registered(effect.op, record))  # type: ignore[arg-type]

    async def _room_admin(self, effect: fx.RoomAdmin) -> None:
        assert self._rooms is not None  # the core refuses without security state
        work = run_admin_command(
            self._rooms,
            effect.name,
            effect.parameters,
            effect.ref.tenant,
            effect.actor,
            effect.ref.room,
            self._room_limits(),
        )
        outcome = await self._port(effect.op, work, effect.name)
        if outcome is not _FAILED:
            result, target = outcome.result, outcome.target  # type: ignore[attr-defined]
            await self._execute(self.core.room_admin_done(effect.op, result, target))

    def _room_limits(self) -> RoomLimits:
        settings = self._settings
        return RoomLimits(
            min_retention_s=settings.room_min_retention_s,
            max_retention_s=int(settings.stream_max_age_s),
            max_message_bytes=settings.max_envelope_bytes,
            max_room_bytes=settings.tenant_max_bytes,
        )

    async def _run_command(self, effect: fx.RunCommand) -> None:
        if self._commands is None:
            work: Awaitable[dict[str, Any]] = _refused(effect.name)
        else:
            work = self._commands.run(effect)
        result = await self._port(effect.op, work, effect.name)
        if result is not _FAILED:
            await self._execute(self.core.command_done(effect.op, result))  # type: ignore[arg-type]

    async def _report_limits(self, effect: fx.ReportLimits) -> None:
        await self._execute(self.core.command_done(effect.op, self._limits_report(effect.usage)))

    def _limits_report(self, usage: dict[str, int]) -> dict[str, object]:
        """The ``limits`` command: configured limits and this connection's current usage."""
        tenant = self.principal.tenant
        table = self._rate_limits.tenant_limits
        counter = self._rate_limits.tenant_connections
        if table is None:
            max_connections = self._settings.max_connections_per_tenant
            max_stored_bytes = self._settings.tenant_max_bytes
        else:
            max_connections = table.max_connections(tenant)
            max_stored_bytes = table.max_stored_bytes(tenant)
        return {
            "limits": self.limits(),
            "rates": self._rates.report(),
            "usage": usage,
            "tenant": {
                "connections": counter(tenant) if counter is not None else None,
                "max_connections": max_connections,
                "max_stored_bytes": max_stored_bytes,
            },
            "tenant_overrides": [] if table is None else sorted(table.overrides(tenant).as_dict()),
        }

    def leave_room(self, room: str, error: ArqonError) -> bool:
        """Leave every channel of ``room`` and drop its handlers (a ban); tell the client.

        Returns whether the connection was in the room.
        """
        effects = self.core.leave_room(room, error)
        self._apply_now(effects)
        return bool(effects)

    # -- service commands ---------------------------------------------------------------------

    async def _call(self, call: fx.CallService) -> None:
        if call.trace_malformed:
            trace_counters.malformed_trace_fields += 1
        span, headers = (
            (None, None)
            if self._tracing is None
            else self._tracing.start_call(call.ref, call.name, call.trace)
        )
        try:
            body = await self._request(call.ref, call.name, call.body, call.timeout_s, headers)
        except NoResponders:
            outcome = Failure.NO_RESPONDERS
        except RequestTimeout:
            outcome = Failure.TIMEOUT
        except BrokerUnavailable as exc:
            log.warning("command %s failed: %s", call.name, exc)
            outcome = Failure.UNAVAILABLE
        except Exception:
            log.exception("command %s failed", call.name)
            outcome = Failure.INTERNAL
        else:
            self._metrics.service_call("answered")
            if span is not None:
                Tracing.end_call(span, None)
            self._apply_now(self.core.call_answered(call.op, body))
            return
        self._metrics.service_call(outcome.value)
        if span is not None:
            Tracing.end_call(span, outcome.value)
        self._apply_now(self.core.call_failed(call.op, outcome))

    async def _request(
        self,
        ref: ChannelRef,
        name: str,
        body: bytes,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        for pause in _NO_RESPONDERS_RETRY_S:
            try:
                return await self._broker.request(ref, name, body, timeout, headers)
            except NoResponders:
                await asyncio.sleep(pause)
        return await self._broker.request(ref, name, body, timeout, headers)

    def _deliver(self, ref: ChannelRef, request: ServiceRequest, name: str) -> None:
        """A command for this connection's handler arrived from NATS (maybe from any gateway)."""
        trace = None
        if self._tracing is not None:
            trace = self._tracing.serve_call(ref, name, request.headers)
        effects = self.core.service_request(
            ref, request.reply, request.body, self.socket.is_open, trace
        )
        if not effects:
            log.warning("dropped a malformed service request on %s", ref)
        self._apply_now(effects)

    def _expire(self, delivery_id: str) -> None:
        self._timers.pop(delivery_id, None)
        self.core.delivery_expired(delivery_id)
        if not self.core.has_deliveries:
            self._set_deliveries_pending(False)

    async def _respond(self, respond: fx.Respond) -> None:
        try:
            await self._broker.respond(respond.reply, respond.body)
        except BrokerUnavailable as exc:
            log.warning("answer %s could not be sent: %s", respond.request_id, exc)
            if respond.request_id is not None:
                await self._execute(self.core.respond_failed(respond.request_id))

    async def _respond_quietly(self, reply: str, body: bytes) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self._broker.respond(reply, body)

    async def _close_handlers(self, reason: str) -> None:
        await self._execute(self.core.close_handlers(reason))
        if self._background:
            await asyncio.wait(set(self._background), timeout=2.0)

    # -- shutdown ----------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop taking frames, let acks and answers in flight finish, then close 1012."""
        await self._execute(self.core.begin_drain())
        await self.finish_in_flight(timeout)
        await self._close_handlers("the handler's gateway is draining")
        await self.socket.close(CloseCode.SERVICE_RESTART, "server draining: reconnect elsewhere")


def _failure(request_id: str, exc: BaseException) -> tuple[Failure, str | None]:
    """How a publish failed, from what the store raised (logged unless it is a refusal)."""
    if isinstance(exc, StoreQuotaExceeded):
        return Failure.QUOTA, str(exc)
    if isinstance(exc, BrokerUnavailable):
        log.warning("publish of %s failed: %s", request_id, exc)
        return Failure.UNAVAILABLE, None
    log.error("publish of %s failed", request_id, exc_info=exc)
    return Failure.INTERNAL, None


async def _true() -> bool:
    return True


async def _refused(name: str) -> dict[str, Any]:
    raise ArqonError(UNAVAILABLE, f"{name} needs the gateway's NATS state")


async def _checked(authenticator: Authenticator, token: str) -> Principal:
    """refresh_token's credential, refusals as the errors the client gets."""
    try:
        return await check_credentials(authenticator, Credentials(token))
    except AuthUnavailable as exc:
        raise ArqonError(UNAVAILABLE, str(exc)) from None
    except AuthError as exc:
        raise ArqonError(INVALID_PARAMETERS, f"parameter 'token' was refused: {exc}") from None


async def _registered(
    security: SecurityState, tenant: str, role: str, parameters: dict[str, Any]
) -> dict[str, str]:
    try:
        record = await auth_agent.register_from_session(security, tenant, role, parameters)
    except auth_agent.RegistrationError as exc:
        raise ArqonError(INVALID_PARAMETERS, str(exc)) from None
    return {
        "agent_id": record.agent_id,
        "tenant": record.tenant,
        "name": record.name,
        "role": record.role,
    }
