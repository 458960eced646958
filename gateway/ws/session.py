"""One connection: decode -> authorize -> act -> encode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

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
from arqonbus_server.gateway.http.admission import retry_after_ms
from arqonbus_server.gateway.policies import policy_for
from arqonbus_server.gateway.state import audit as auditing
from arqonbus_server.gateway.state.audit import (
    ADMIN_ACTION,
    AGENT_REGISTERED,
    RATE_LIMITED,
    AuditLog,
)
from arqonbus_server.gateway.state.limits import RateLimits, rate_specs, welcome_limits
from arqonbus_server.gateway.state.rooms import (
    CALL_ACTION,
    RoomDirectory,
    RoomSettings,
    room_key_param,
    run_admin_command,
)
from arqonbus_server.gateway.state.security import SecurityState
from arqonbus_server.gateway.state.tenant_limits import RateSpec
from arqonbus_server.gateway.ws.hub import Hub
from arqonbus_server.gateway.ws.transport import Socket
from arqonbus_server.mesh.broker import (
    Broker,
    BrokerUnavailable,
    LiveSubscription,
    NoResponders,
    RequestTimeout,
    ServiceRequest,
    StoreQuotaExceeded,
)
from arqonbus_server.shared import authz, commands
from arqonbus_server.shared.envelope import (
    ClientCommand,
    ClientEvent,
    ClientResponse,
    ResponseError,
    encode_ack,
    encode_command_response,
    encode_delivery,
    encode_error,
    encode_response,
    encode_stored_event,
    encode_welcome,
    parse_client_frame,
    with_seq,
)
from arqonbus_server.shared.errors import (
    FORBIDDEN,
    INTERNAL,
    INVALID_PARAMETERS,
    LIMIT_EXCEEDED,
    MESSAGE_RATE_LIMITED,
    MESSAGE_TOO_LARGE,
    NO_RESPONDERS,
    NOT_JOINED,
    NOT_REGISTERED,
    QUOTA_EXCEEDED,
    TIMEOUT,
    UNAVAILABLE,
    UNKNOWN_REQUEST,
    ArqonError,
    CloseCode,
    ErrorCode,
)
from arqonbus_server.shared.inspect import with_tags
from arqonbus_server.shared.service import MalformedServiceMessage, ServiceCall, ServiceReply
from arqonbus_server.shared.settings import Settings
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme

log = logging.getLogger("arqonbus.gateway.session")

# Room for the Nats-Msg-Id header and protocol framing next to the stored envelope.
_NATS_HEADER_ROOM = 512
# A handler's answer is accepted this long after the caller's timeout_ms (reply in flight).
_ANSWER_GRACE_S = 0.5
GATEWAY = "arqonbus"
# A handler registered a moment ago on another NATS server may not be known on ours yet
# (interest spreads over the cluster's routes asynchronously). Ask again after these
# pauses before answering no_responders; together they stay under 100 ms.
_NO_RESPONDERS_RETRY_S = (0.01, 0.02, 0.03)
# Authorization decisions memoized per connection, per (permission, room, channel); the memo
# is emptied when it reaches this size (a connection may publish to many channels).
_DECISION_MEMO_MAX = 1024
# A connection over its rate limit is audited at most once per this many seconds.
_RATE_AUDIT_EVERY_S = 10.0


_last_stamp: tuple[int, str] = (-1, "")


def utc_timestamp() -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2025-01-01T12:00:00.000Z (formatted once per ms)."""
    global _last_stamp
    ms = time.time_ns() // 1_000_000
    if ms != _last_stamp[0]:
        text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        _last_stamp = (ms, text.replace("+00:00", "Z"))
    return _last_stamp[1]


@dataclass(slots=True)
class _Delivery:
    """A service command handed to this connection's handler, awaiting its answer."""

    reply: str
    timer: asyncio.TimerHandle


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
    ) -> None:
        self.socket = socket
        # refresh_token checks the new credential with the gateway's authenticator.
        self._authenticator = authenticator
        self._expiry: asyncio.TimerHandle | None = None
        self._security = security
        self._audit = audit or AuditLog(None, settings.subject_prefix)
        self.principal = principal
        self.id = uuid.uuid4().hex
        self._hub = hub
        self._broker = broker
        self._settings = settings
        self._scheme = SubjectScheme(settings.subject_prefix)
        self._node_id = node_id
        self._joined: set[ChannelRef] = set()
        self._in_flight: set[asyncio.Task[None]] = set()
        # Service calls are counted apart: a connection that is also a handler must keep
        # reading its answers while its own calls wait for them.
        self._calls: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._closed = False
        self._handlers: dict[tuple[ChannelRef, str], LiveSubscription] = {}
        self._deliveries: dict[str, _Delivery] = {}
        self._no_deliveries = asyncio.Event()
        self._no_deliveries.set()
        self._background: set[asyncio.Task[None]] = set()
        self._policy = authz.policy_for(principal.role, tuple(principal.grants))
        self._content_policy = (
            security.content_policy if security is not None else policy_for(settings.policy_file)
        )
        self._decisions: dict[tuple[authz.Permission, str, str], authz.Decision] = {}
        # Rate limits (gateway/state/limits.py): this connection's buckets and its principal's.
        if rate_limits is None:  # (an empty registry is falsy: it has a length)
            rate_limits = RateLimits(*rate_specs(settings))
        self._rate_limits = rate_limits
        self._rates = self._rate_limits.open(principal.tenant, principal.id)
        self._rate_audited = -_RATE_AUDIT_EVERY_S
        # Audit: a client repeating a refused action gets one record per 10 s (with a count).
        self._audit_throttle = auditing.AuditThrottle()
        # Private rooms, bans, mutes (gateway/state/rooms.py); None without NATS security state.
        self._rooms = RoomDirectory.of(security) if security is not None else None

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

    async def run(self) -> None:
        self.socket.send(encode_welcome(self.id, self._node_id, self.limits()))
        self._expiry = self._close_at_expiry()
        try:
            while True:
                data = await self.socket.recv()
                if data is None:
                    break
                await self.handle(data)
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
            self._closed = True
            self._rates.close()
            self._hub.leave_all(self.socket, list(self._joined))
            self._joined.clear()
            await self._close_handlers("the handler's connection closed before it answered")

    def _close_at_expiry(self) -> asyncio.TimerHandle | None:
        """Close with 4004 when the credential expires (a JWT's exp, leeway included)."""
        expires_at = self.principal.expires_at
        if expires_at is None:
            return None
        delay = max(0.0, expires_at - time.time())
        return asyncio.get_running_loop().call_later(
            delay,
            self.socket.close_soon,
            CloseCode.TOKEN_EXPIRED,
            "token expired: get a fresh token, reconnect and resume",
        )

    async def handle(self, data: bytes) -> None:
        try:
            try:
                message = parse_client_frame(data, self._settings.max_envelope_bytes)
            except ArqonError:
                # A frame that does not parse counts like any other: garbage floods are
                # limited too (and answered with rate_limited instead of an error each).
                if wait := self._rates.admit(len(data)):
                    self._refuse_rate(None, wait)
                    return
                raise
            if isinstance(message, ClientResponse):
                if message.request_id in self._deliveries:
                    # An answer owed to a waiting caller: taken even while draining and
                    # never refused by the rate limits; its bytes are counted.
                    self._rates.charge(len(data))
                    await self._answer(message)
                elif wait := self._rates.admit(len(data)):  # answers to nothing: a flood
                    self._refuse_rate(message.id, wait)
                else:
                    await self._answer(message)  # unknown_request
            elif self._stopping:
                # Draining: drain() acks what is in flight, then closes 1012. Other frames
                # that arrive meanwhile are not acted on (the client resends them
                # elsewhere); reading on keeps the close handshake from stalling.
                return
            elif wait := self._rates.admit(len(data)):
                self._refuse_rate(message.id, wait)
            elif isinstance(message, ClientEvent):
                await self._start_publish(message)
            elif commands.is_builtin(message.command):
                await self._run_command(message)
            else:
                await self._start_call(message)
        except ArqonError as exc:
            self.socket.send(encode_error(exc))
        except Exception:
            # A bug in handling one frame must not end the connection (nor its other work).
            log.exception("session %s failed to handle a frame", self.id)
            self.socket.send(
                encode_error(ArqonError(INTERNAL, "the gateway failed to handle this frame"))
            )

    def _refuse_rate(self, request_id: str | None, wait_s: float) -> None:
        """``rate_limited`` with ``retry_after_ms``: the frame is not acted on."""
        retry_ms = retry_after_ms(wait_s)
        error = ArqonError(MESSAGE_RATE_LIMITED, f"retry after {retry_ms} ms", request_id)
        self.socket.send(encode_error(error, {"retry_after_ms": retry_ms}))
        now = time.monotonic()
        if now - self._rate_audited >= _RATE_AUDIT_EVERY_S:
            self._rate_audited = now
            self._audit.record(
                self.principal.tenant,
                RATE_LIMITED,
                self.principal.id,
                session=self.id,
                retry_after_ms=retry_ms,
            )

    # -- events -------------------------------------------------------------------

    async def _wait_for_slot(self) -> None:
        while len(self._in_flight) >= self._settings.max_in_flight:
            # Backpressure: stop reading this socket until an ack or answer frees a slot.
            await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _start_publish(self, event: ClientEvent) -> None:
        self._authorize(authz.Permission.PUBLISH, event.room, event.channel, event.id)
        if self._rooms is not None:  # a room without settings: one dict lookup
            room_settings = self._rooms.get(self.principal.tenant, event.room)
            if room_settings is not None and self._refuse_publish(room_settings, event):
                return
        # Content policies run before anything is stored (and may redact or tag).
        try:
            event, tags = self._content_policy.check_event(
                event, self.principal.tenant, self.principal.id
            )
        except ArqonError as exc:
            if exc.code in auditing.POLICY_CODES:
                self._audit_denial(
                    auditing.POLICY_BLOCKED,
                    ("policy", exc.code, event.room, event.channel),
                    rule=auditing.rule_name(exc.detail or ""),
                    code=exc.code,
                    room=event.room,
                    channel=event.channel,
                    reason=exc.detail or "",
                )
            raise
        await self._wait_for_slot()
        ref = ChannelRef(self.principal.tenant, event.room, event.channel)
        body = with_tags(encode_stored_event(event, self.principal.id, utc_timestamp()), tags)
        if len(body) > self._broker.max_payload - _NATS_HEADER_ROOM:
            raise ArqonError(
                MESSAGE_TOO_LARGE, "the stored envelope exceeds the NATS max_payload", event.id
            )
        try:
            # Inline, in frame order: provisioning (once per tenant) must not let a
            # later event of this connection overtake an earlier one.
            await self._broker.ensure_stream(ref.tenant)
        except BrokerUnavailable as exc:
            log.warning("publish of %s failed: %s", event.id, exc)
            raise ArqonError(UNAVAILABLE, request_id=event.id) from None
        key = self._scheme.dedupe_key(ref, self.principal.id, event.id)
        self._track(asyncio.create_task(self._publish(event, ref, body, key)))

    async def _publish(self, event: ClientEvent, ref: ChannelRef, body: bytes, key: str) -> None:
        try:
            result = await self._broker.publish(ref, body, key)
        except StoreQuotaExceeded as exc:
            self.socket.send(encode_error(ArqonError(QUOTA_EXCEEDED, str(exc), event.id)))
            return
        except BrokerUnavailable as exc:
            log.warning("publish of %s failed: %s", event.id, exc)
            self.socket.send(encode_error(ArqonError(UNAVAILABLE, request_id=event.id)))
            return
        except Exception:
            log.exception("publish of %s failed", event.id)
            self.socket.send(encode_error(ArqonError(INTERNAL, request_id=event.id)))
            return
        self.socket.send(
            encode_ack(event.id, event.room, event.channel, result.seq, result.duplicate)
        )

    async def finish_in_flight(self, timeout: float) -> None:
        """Wait for acks and answers owed to this connection, and by its handler to others."""
        deadline = time.monotonic() + timeout
        if self._in_flight or self._calls:
            await asyncio.wait(self._in_flight | self._calls, timeout=timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._no_deliveries.wait(), max(0.0, deadline - time.monotonic())
            )

    # -- authorization -----------------------------------------------------------------

    def _authorize(
        self, permission: authz.Permission, room: str, channel: str, request_id: str
    ) -> None:
        """Raise ``forbidden`` unless the principal has ``permission`` on room/channel."""
        key = (permission, room, channel)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._policy.decide(permission, room, channel)
            if len(self._decisions) >= _DECISION_MEMO_MAX:
                self._decisions.clear()
            self._decisions[key] = decision
        if not decision.allowed:
            self._audit_denial(
                auditing.FORBIDDEN,
                key,
                permission=permission.value,
                room=room,
                channel=channel,
                reason=decision.reason,
            )
            raise ArqonError(FORBIDDEN, decision.reason, request_id)

    def _audit_denial(self, type_: str, key: tuple[str, ...], **details: object) -> None:
        """Record a refusal in the tenant's audit stream, throttled per session and key."""
        repeats = self._audit_throttle.check(key)
        if repeats is None:
            return
        if repeats:
            details["repeats"] = repeats
        overflow = self._audit_throttle.take_overflow()
        if overflow:
            details["suppressed_other"] = overflow
        if self.principal.credential_id:
            details["credential_id"] = self.principal.credential_id
        self._audit.record(
            self.principal.tenant,
            type_,
            self.principal.id,
            method=self.principal.method,
            session=self.id,
            **details,
        )

    # -- commands -------------------------------------------------------------------

    async def _run_command(self, command: ClientCommand) -> None:
        ref = ChannelRef(self.principal.tenant, command.room, command.channel)
        try:
            name = command.command
            permission = authz.permission_for_command(name)
            if permission is not None:
                self._authorize(permission, command.room, command.channel, command.id)
            if name in commands.ROOM_ADMIN_COMMANDS:
                await self._room_admin(command, ref)
            elif name == commands.JOIN_CHANNEL:
                await self._join(command, ref)
            elif name == commands.LEAVE_CHANNEL:
                self._leave(command, ref)
            elif name == commands.HISTORY:
                await self._history(command, ref)
            elif name == commands.REFRESH_TOKEN:
                await self._refresh_token(command)
            elif name == commands.REGISTER_AGENT:
                await self._register_agent(command)
            elif name == commands.REGISTER_HANDLER:
                await self._register(command, ref)
            elif name == commands.LIMITS:
                self._reply(command, self._limits_report())
            else:
                await self._unregister(command, ref)
        except ArqonError as exc:
            self._reply(command, error=exc.with_request_id(command.id))
        except BrokerUnavailable as exc:
            log.warning("command %s failed: %s", command.command, exc)
            self._reply(command, error=ArqonError(UNAVAILABLE, request_id=command.id))
        except Exception:
            log.exception("command %s failed", command.command)
            self._reply(command, error=ArqonError(INTERNAL, request_id=command.id))

    # -- credential refresh and agent registration (issue 6) -----------------------------

    async def _refresh_token(self, command: ClientCommand) -> None:
        """Replace this connection's credential with a newer one of the same principal.

        A refused token is ``invalid_parameters``; a valid one for another tenant or
        principal is ``forbidden`` (reconnect to change identity). On success the role,
        grants and expiry are the new credential's, and the 4004 timer is re-armed.
        """
        token = commands.refresh_token_params(command.parameters)
        if self._authenticator is None:
            raise ArqonError(INVALID_PARAMETERS, "this gateway cannot check a new credential")
        try:
            principal = await check_credentials(self._authenticator, Credentials(token))
        except AuthUnavailable as exc:
            raise ArqonError(UNAVAILABLE, str(exc)) from None
        except AuthError as exc:
            raise ArqonError(INVALID_PARAMETERS, f"parameter 'token' was refused: {exc}") from None
        if principal.tenant != self.principal.tenant or principal.id != self.principal.id:
            raise ArqonError(
                FORBIDDEN,
                "the new credential is another tenant's or principal's: refresh_token renews "
                "this connection's own credential only (reconnect to change identity)",
            )
        self.principal = principal
        self._policy = authz.policy_for(principal.role, tuple(principal.grants))
        self._decisions.clear()
        self._drop_what_is_no_longer_allowed()
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = None if self._closed else self._close_at_expiry()
        self._reply(command, {"expires_at": principal.expires_at, "role": principal.role})

    async def _register_agent(self, command: ClientCommand) -> None:
        """Register an Ed25519 agent in the caller's tenant (admin; never above its role)."""
        # An agent acts on the whole tenant: admin of one room is not enough.
        if not self._policy.decide(authz.Permission.ADMIN, "*", "*").allowed:
            raise ArqonError(
                FORBIDDEN,
                "register_agent needs admin on the whole tenant (role owner or admin, or a "
                "*:*:admin grant)",
                command.id,
            )
        if self._security is None:
            raise ArqonError(UNAVAILABLE, "agent registration needs the gateway's NATS state")
        try:
            record = await auth_agent.register_from_session(
                self._security, self.principal.tenant, self.principal.role, command.parameters
            )
        except auth_agent.RegistrationError as exc:
            raise ArqonError(INVALID_PARAMETERS, str(exc)) from None
        self._audit.record(
            self.principal.tenant,
            AGENT_REGISTERED,
            self.principal.id,
            agent_id=record.agent_id,
            role=record.role,
        )
        self._reply(
            command,
            {
                "agent_id": record.agent_id,
                "tenant": record.tenant,
                "name": record.name,
                "role": record.role,
            },
        )

    def _reply(
        self,
        command: ClientCommand,
        result: dict[str, object] | None = None,
        error: ArqonError | None = None,
    ) -> None:
        self.socket.send(
            encode_command_response(
                command, "resp_" + uuid.uuid4().hex, GATEWAY, utc_timestamp(), result, error
            )
        )

    def _tenant_overrides(self) -> list[str]:
        """The limits set for this tenant with ``arqonbus tenants set`` (gateway/state/tenant_limits.py)."""
        table = self._rate_limits.tenant_limits
        return [] if table is None else sorted(table.overrides(self.principal.tenant).as_dict())

    def _tenant_limits(self, counter: Callable[[str], int] | None) -> dict[str, object]:
        """The tenant's connection cap and stored-bytes quota: its overrides, else settings."""
        tenant = self.principal.tenant
        table = self._rate_limits.tenant_limits
        if table is None:
            max_connections = self._settings.max_connections_per_tenant
            max_stored_bytes = self._settings.tenant_max_bytes
        else:
            max_connections = table.max_connections(tenant)
            max_stored_bytes = table.max_stored_bytes(tenant)
        return {
            "connections": counter(tenant) if counter is not None else None,
            "max_connections": max_connections,
            "max_stored_bytes": max_stored_bytes,
        }

    def _limits_report(self) -> dict[str, object]:
        """The ``limits`` command: configured limits and this connection's current usage."""
        rates = self._rate_limits
        settings = self._settings
        counter = rates.tenant_connections
        return {
            "limits": self.limits(),
            "rates": self._rates.report(),
            "usage": {
                "channels": len(self._joined),
                "max_channels": settings.max_channels_per_connection,
                "handlers": len(self._handlers),
                "max_handlers": settings.max_handlers_per_connection,
                "in_flight": len(self._in_flight),
                "calls_in_flight": len(self._calls),
                "max_in_flight": settings.max_in_flight,
            },
            "tenant": self._tenant_limits(counter),
            "tenant_overrides": self._tenant_overrides(),
        }

    async def _join(self, command: ClientCommand, ref: ChannelRef) -> None:
        params = commands.join_params(command.parameters)
        await self._check_room(command, "join", room_key_param(command.parameters))
        limit = self._settings.max_channels_per_connection
        if ref not in self._joined and len(self._joined) >= limit:
            raise ArqonError(LIMIT_EXCEEDED, f"this connection already has {limit} channels")
        member, joined = await self._hub.join(self.socket, ref, params.since_seq)
        self._joined.add(ref)
        self._reply(command, joined.as_result())
        self._hub.start(member, joined.last_seq)

    def _leave(self, command: ClientCommand, ref: ChannelRef) -> None:
        if not self._hub.leave(self.socket, ref):
            raise ArqonError(NOT_JOINED)
        self._joined.discard(ref)
        self._reply(command, {})

    async def _history(self, command: ClientCommand, ref: ChannelRef) -> None:
        """One page of stored events, bounded by ``limit`` and by bytes (half the send buffer)."""
        params = commands.history_params(command.parameters)
        await self._check_room(command, "read history", room_key_param(command.parameters))
        budget = self._settings.send_buffer_bytes // 2
        events: list[orjson.Fragment] = []
        next_since, size, more = params.since_seq, 0, False
        replay = self._broker.replay(ref, params.since_seq + 1, None, params.limit)
        async with contextlib.aclosing(replay) as stored_events:
            async for stored in stored_events:
                delivered = with_seq(stored.body, stored.seq)
                if events and size + len(delivered) > budget:
                    more = True
                    break
                events.append(orjson.Fragment(delivered))
                size += len(delivered)
                next_since = stored.seq
        more = more or len(events) == params.limit
        self._reply(command, {"events": events, "next_since_seq": next_since, "more": more})

    # -- private rooms, bans, mutes (gateway/state/rooms.py) -----------------------------------

    def _in_room(self, room: str) -> bool:
        """Did this connection enter ``room`` (a channel joined or a handler registered)?"""
        return any(ref.room == room for ref in self._joined) or any(
            ref.room == room for ref, _ in self._handlers
        )

    def _is_room_admin(self, room: str, channel: str) -> bool:
        return self._policy.decide(authz.Permission.ADMIN, room, channel).allowed

    async def _check_room(self, command: ClientCommand, action: str, key: str | None) -> None:
        """Raise unless the room's settings let this principal ``action`` (banned, private...)."""
        if self._rooms is None or self._rooms.get(self.principal.tenant, command.room) is None:
            return
        await self._rooms.check_enter(
            self.principal.tenant,
            self.principal.id,
            command.room,
            is_admin=self._is_room_admin(command.room, command.channel),
            member=self._in_room(command.room),
            key=key,
            action=action,
        )

    def _refuse_publish(self, room_settings: RoomSettings, event: ClientEvent) -> bool:
        """Send the error and return True when a ban, a mute or privacy refuses the event."""
        assert self._rooms is not None  # room_settings came from it
        refusal = self._rooms.publish_refusal(
            room_settings,
            self.principal.id,
            event.room,
            is_admin=self._is_room_admin(event.room, event.channel),
            member=self._in_room(event.room),
        )
        if refusal is None:
            return False
        error, extra = refusal
        self.socket.send(encode_error(error.with_request_id(event.id), extra))
        return True

    async def _room_admin(self, command: ClientCommand, ref: ChannelRef) -> None:
        """room_configure, room_invite, room_ban, ... (``admin`` was checked by the caller)."""
        if self._rooms is None:
            raise ArqonError(UNAVAILABLE, "room settings need the gateway's NATS security state")
        outcome = await run_admin_command(
            self._rooms,
            command.command,
            command.parameters,
            ref.tenant,
            self.principal.id,
            ref.room,
        )
        if command.command != commands.ROOM_INFO:
            self._audit.record(
                ref.tenant,
                ADMIN_ACTION,
                self.principal.id,
                action=command.command,
                room=ref.room,
                target=outcome.target,
            )
        self._reply(command, outcome.result)

    def leave_room(self, room: str, error: ArqonError) -> bool:
        """Leave every channel of ``room`` and drop its handlers (a ban); tell the client.

        Returns whether the connection was in the room.
        """
        refs = [ref for ref in self._joined if ref.room == room]
        handlers = [key for key in self._handlers if key[0].room == room]
        if not refs and not handlers:
            return False
        self._drop(refs, handlers)
        channels = sorted({ref.channel for ref in refs} | {key[0].channel for key in handlers})
        self.socket.send(encode_error(error, {"room": room, "channels": channels}))
        return True

    def _drop(self, refs: list[ChannelRef], handlers: list[tuple[ChannelRef, str]]) -> None:
        """Leave these channels and stop serving these handlers (the client is told apart)."""
        for ref in refs:
            self._hub.leave(self.socket, ref)
            self._joined.discard(ref)
        for key in handlers:
            served = self._handlers.pop(key)
            task = asyncio.create_task(served.close())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _drop_what_is_no_longer_allowed(self) -> None:
        """After refresh_token narrowed the rights: leave channels and handlers it denies."""
        refs = [
            ref
            for ref in self._joined
            if not self._policy.decide(authz.Permission.SUBSCRIBE, ref.room, ref.channel).allowed
        ]
        handlers = [
            key
            for key in self._handlers
            if not self._policy.decide(authz.Permission.HANDLE, key[0].room, key[0].channel).allowed
        ]
        if not refs and not handlers:
            return
        self._drop(refs, handlers)
        dropped = sorted(
            {f"{ref.room}/{ref.channel}" for ref in refs}
            | {f"{key[0].room}/{key[0].channel}:{key[1]}" for key in handlers}
        )
        error = ArqonError(FORBIDDEN, "the refreshed credential no longer allows these")
        self.socket.send(encode_error(error, {"dropped": dropped}))

    # -- service commands: the caller's side ---------------------------------------

    async def _start_call(self, command: ClientCommand) -> None:
        """A command that is not built-in goes to one registered handler, on any gateway."""
        try:
            commands.require_service_name(command.command)
            timeout_ms = commands.service_timeout_ms(
                command.timeout_ms,
                int(self._settings.command_timeout_s * 1000),
                int(self._settings.command_timeout_max_s * 1000),
            )
            self._authorize(authz.Permission.COMMAND, command.room, command.channel, command.id)
            if self._rooms is not None and self._rooms.get(self.principal.tenant, command.room):
                # The service's own parameters never carry a room key to the gateway.
                await self._check_room(command, CALL_ACTION, None)
        except ArqonError as exc:
            self._reply(command, error=exc.with_request_id(command.id))
            return
        limit = self._settings.max_in_flight
        if len(self._calls) >= limit:
            detail = f"this connection has {limit} service commands awaiting answers"
            self._reply(command, error=ArqonError(LIMIT_EXCEEDED, detail, command.id))
            return
        ref = ChannelRef(self.principal.tenant, command.room, command.channel)
        task = asyncio.create_task(self._call(command, ref, timeout_ms))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, command: ClientCommand, ref: ChannelRef, timeout_ms: int) -> None:
        call = ServiceCall(
            command.command,
            command.parameters,
            self.principal.id,
            command.id,
            utc_timestamp(),
            timeout_ms,
        )
        try:
            body = await self._request(ref, command.command, call.encode(), timeout_ms / 1000)
            reply = ServiceReply.decode(body)
        except NoResponders:
            # No service takes this name. If it looks like a mistyped built-in command, say
            # which one (unknown_command, not retryable) instead of "start the service".
            error = commands.misspelt_builtin(command.command) or ArqonError(NO_RESPONDERS)
            self._reply(command, error=error.with_request_id(command.id))
        except RequestTimeout:
            detail = f"no answer within {timeout_ms} ms"
            self._reply(command, error=ArqonError(TIMEOUT, detail, command.id))
        except BrokerUnavailable as exc:
            log.warning("command %s failed: %s", command.command, exc)
            self._reply(command, error=ArqonError(UNAVAILABLE, request_id=command.id))
        except MalformedServiceMessage as exc:
            log.warning("command %s got a malformed reply: %s", command.command, exc)
            self._reply(command, error=ArqonError(INTERNAL, request_id=command.id))
        except Exception:
            log.exception("command %s failed", command.command)
            self._reply(command, error=ArqonError(INTERNAL, request_id=command.id))
        else:
            self.socket.send(
                encode_response(
                    command, reply.id, reply.sender, reply.timestamp, reply.result, reply.error
                )
            )

    async def _request(self, ref: ChannelRef, name: str, body: bytes, timeout: float) -> bytes:
        for pause in _NO_RESPONDERS_RETRY_S:
            try:
                return await self._broker.request(ref, name, body, timeout)
            except NoResponders:
                await asyncio.sleep(pause)
        return await self._broker.request(ref, name, body, timeout)

    # -- service commands: the handler's side --------------------------------------

    async def _register(self, command: ClientCommand, ref: ChannelRef) -> None:
        name = commands.handler_params(command.parameters)
        await self._check_room(command, "handle commands", room_key_param(command.parameters))
        key = (ref, name)
        if key not in self._handlers:
            limit = self._settings.max_handlers_per_connection
            if len(self._handlers) >= limit:
                raise ArqonError(LIMIT_EXCEEDED, f"this connection already has {limit} handlers")
            self._handlers[key] = await self._broker.serve(
                ref, name, lambda request: self._deliver(ref, request)
            )
            if self._closed or self._stopping:  # ended or draining while NATS confirmed it
                await self._handlers.pop(key).close()
                raise ArqonError(UNAVAILABLE, "the gateway is draining")
        self._reply(command, {"command": name})

    async def _unregister(self, command: ClientCommand, ref: ChannelRef) -> None:
        name = commands.handler_params(command.parameters)
        served = self._handlers.pop((ref, name), None)
        if served is None:
            raise ArqonError(NOT_REGISTERED, f"no handler for {name!r} on this channel")
        await served.close()
        self._reply(command, {"command": name})

    def _deliver(self, ref: ChannelRef, request: ServiceRequest) -> None:
        """A command for this connection's handler arrived from NATS (maybe from any gateway)."""
        try:
            call = ServiceCall.decode(request.body)
        except MalformedServiceMessage as exc:
            log.warning("dropped a malformed service request: %s", exc)
            return
        if self._closed or self._stopping or not self.socket.is_open:
            self._send_reply(request.reply, self._gateway_error(UNAVAILABLE, "handler is leaving"))
            return
        if len(self._deliveries) >= self._settings.max_in_flight:
            detail = f"the handler has {len(self._deliveries)} commands awaiting answers"
            self._send_reply(request.reply, self._gateway_error(UNAVAILABLE, detail))
            return
        delivery_id = "dlv_" + uuid.uuid4().hex
        timer = asyncio.get_running_loop().call_later(
            call.timeout_ms / 1000 + _ANSWER_GRACE_S, self._expire, delivery_id
        )
        self._deliveries[delivery_id] = _Delivery(request.reply, timer)
        self._no_deliveries.clear()
        self.socket.send(
            encode_delivery(
                delivery_id,
                ref.room,
                ref.channel,
                call.sender,
                call.timestamp,
                call.delivery_payload(),
            )
        )

    def _expire(self, delivery_id: str) -> None:
        self._pop_delivery(delivery_id)

    def _pop_delivery(self, delivery_id: str) -> _Delivery | None:
        delivery = self._deliveries.pop(delivery_id, None)
        if delivery is not None:
            delivery.timer.cancel()
        if not self._deliveries:
            self._no_deliveries.set()
        return delivery

    async def _answer(self, response: ClientResponse) -> None:
        delivery = self._pop_delivery(response.request_id)
        if delivery is None:
            raise ArqonError(
                UNKNOWN_REQUEST, f"no delivery {response.request_id[:64]!r}", response.id
            )
        body = ServiceReply(
            response.id, self.principal.id, utc_timestamp(), response.result, response.error
        ).encode()
        if len(body) > self._broker.max_payload - _NATS_HEADER_ROOM:
            body = self._gateway_error(INTERNAL, "the handler's answer exceeds NATS max_payload")
            self.socket.send(
                encode_error(ArqonError(MESSAGE_TOO_LARGE, "answer too large", response.id))
            )
        try:
            await self._broker.respond(delivery.reply, body)
        except BrokerUnavailable as exc:
            log.warning("answer %s could not be sent: %s", response.id, exc)
            raise ArqonError(UNAVAILABLE, request_id=response.id) from None

    @staticmethod
    def _gateway_error(code: ErrorCode, detail: str) -> bytes:
        error = ArqonError(code, detail)
        return ServiceReply(
            "resp_" + uuid.uuid4().hex,
            GATEWAY,
            utc_timestamp(),
            None,
            ResponseError(error.code, error.message, code.retryable),
        ).encode()

    def _send_reply(self, reply: str, body: bytes) -> None:
        task = asyncio.create_task(self._respond_quietly(reply, body))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _respond_quietly(self, reply: str, body: bytes) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self._broker.respond(reply, body)

    async def _stop_handlers(self) -> None:
        """Take this connection out of every queue group: new commands go elsewhere."""
        handlers = list(self._handlers.values())
        self._handlers.clear()
        for served in handlers:
            await served.close()

    async def _close_handlers(self, reason: str) -> None:
        await self._stop_handlers()
        for delivery_id in list(self._deliveries):
            delivery = self._pop_delivery(delivery_id)
            if delivery is not None:
                self._send_reply(delivery.reply, self._gateway_error(UNAVAILABLE, reason))
        if self._background:
            await asyncio.wait(set(self._background), timeout=2.0)

    # -- shutdown ----------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop taking frames, let acks and answers in flight finish, then close 1012."""
        self._stopping = True
        await self._stop_handlers()
        await self.finish_in_flight(timeout)
        await self._close_handlers("the handler's gateway is draining")
        await self.socket.close(CloseCode.SERVICE_RESTART, "server draining: reconnect elsewhere")
