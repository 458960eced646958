"""The connection core's state, its inputs' shapes, and the helpers every decision shares."""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from arqonbus_server.shared import authz
from arqonbus_server.shared.core.effects import Audit, Effect, Send
from arqonbus_server.shared.core.rooms import RoomView, Standing
from arqonbus_server.shared.envelope import (
    ClientCommand,
    ClientEvent,
    ClientEventBatch,
    ClientMessage,
    encode_command_response,
    encode_error,
    parse_client_frame,
)
from arqonbus_server.shared.errors import (
    FORBIDDEN,
    INTERNAL,
    NO_RESPONDERS,
    QUOTA_EXCEEDED,
    TIMEOUT,
    UNAVAILABLE,
    ArqonError,
)
from arqonbus_server.shared.subjects import ChannelRef

GATEWAY = "arqonbus"  # the ``from`` of the gateway's own command responses
# Authorization decisions memoized per connection, per (permission, room, channel); the memo
# is emptied when it reaches this size (a connection may publish to many channels).
DECISION_MEMO_MAX = 1024
# A connection over its rate limit is audited at most once per this many seconds.
RATE_AUDIT_EVERY_S = 10.0
# Room for the Nats-Msg-Id header and protocol framing next to a stored envelope.
NATS_HEADER_ROOM = 512
# A handler's answer is accepted this long after the caller's timeout_ms (reply in flight).
ANSWER_GRACE_S = 0.5

# Audit event types the core records (gateway/state/audit.py lists them all).
AUDIT_FORBIDDEN = "forbidden"
AUDIT_POLICY_BLOCKED = "policy_blocked"
AUDIT_RATE_LIMITED = "rate_limited"
AUDIT_ADMIN_ACTION = "admin_action"
AUDIT_AGENT_REGISTERED = "agent_registered"
# The content-policy refusals recorded as ``policy_blocked`` (shared/inspect.py).
POLICY_CODES = frozenset({"policy_violation", "invalid_payload"})
_RULE_NAME = re.compile(r"""rule (?:'([^']*)'|"([^"]*)")""")


def rule_name(detail: str) -> str:
    """The content-policy rule a refusal's message names (shared/inspect.py quotes it), or ""."""
    match = _RULE_NAME.search(detail)
    return (match.group(1) or match.group(2) or "") if match else ""


class Failure(StrEnum):
    """How a port call failed, as the shell saw it; the core picks the error to send."""

    UNAVAILABLE = "unavailable"  # NATS unreachable or the stream lost
    QUOTA = "quota"  # the tenant's stored bytes are at their quota
    NO_RESPONDERS = "no_responders"  # no handler took the service command
    TIMEOUT = "timeout"  # no answer in time
    MALFORMED = "malformed"  # a handler's reply did not decode
    INTERNAL = "internal"  # anything else (a bug): logged by the shell


def failure_error(failure: Failure, request_id: str, detail: str | None = None) -> ArqonError:
    code = {
        Failure.UNAVAILABLE: UNAVAILABLE,
        Failure.QUOTA: QUOTA_EXCEEDED,
        Failure.NO_RESPONDERS: NO_RESPONDERS,
        Failure.TIMEOUT: TIMEOUT,
    }.get(failure, INTERNAL)
    return ArqonError(code, detail, request_id)


class Identity(Protocol):
    """The authenticated principal (gateway/auth/base.py Principal)."""

    @property
    def tenant(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def grants(self) -> tuple[str, ...]: ...
    @property
    def expires_at(self) -> float | None: ...
    @property
    def method(self) -> str: ...
    @property
    def credential_id(self) -> str: ...


class RateAdmission(Protocol):
    """The connection's rate meters (shared/core/rates.py ConnectionRates)."""

    def admit_at(self, size: int, now: float, msgs: int = 1) -> float: ...
    def charge_at(self, size: int, now: float) -> None: ...


class RoomLookup(Protocol):
    """The gateway's copy of every room's settings: one dict lookup."""

    def get(self, tenant: str, room: str) -> RoomView | None: ...


class ContentCheck(Protocol):
    """Content policies (shared/inspect.py Policy): the event to store and its tags."""

    def check_event(
        self, event: ClientEvent, tenant: str, principal: str
    ) -> tuple[ClientEvent, list[str]]: ...


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """The limits and capabilities one connection runs with (from Settings and the ports)."""

    session_id: str
    subject_prefix: str = "arq"
    max_envelope_bytes: int = 65536
    max_in_flight: int = 1000
    max_channels: int = 1000
    max_handlers: int = 100
    send_buffer_bytes: int = 1048576
    command_timeout_ms: int = 5000
    command_timeout_max_ms: int = 60000
    max_payload: int = 1048576  # NATS max_payload of the broker
    can_refresh: bool = True  # an authenticator can check refresh_token's credential
    has_security: bool = True  # NATS security state: agents and room administration


class AuditThrottle:
    """At most one record per key per ``window_s`` and ``per_window`` records per window in
    all (the rest counted in ``overflow``): a client repeating a refused action cannot flood
    the audit stream. The same rule as gateway/state/audit.py's, with the time passed in."""

    def __init__(self, window_s: float = 10.0, per_window: int = 20, max_keys: int = 256) -> None:
        self._window = window_s
        self._per_window = per_window
        self._max_keys = max_keys
        self._last: dict[Hashable, list[float]] = {}  # key -> [recorded at, repeats since]
        self._window_start = float("-inf")
        self._in_window = 0
        self.overflow = 0

    def check(self, key: Hashable, now: float) -> int | None:
        """The ``repeats`` to record with this one, or None to skip it."""
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self._window:
            entry[1] += 1
            return None
        if now - self._window_start >= self._window:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self._per_window:
            self.overflow += 1
            return None
        self._in_window += 1
        repeats = int(entry[1]) if entry is not None else 0
        if entry is None and len(self._last) >= self._max_keys:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self._window}
            if len(self._last) >= self._max_keys:
                self._last.clear()
        self._last[key] = [now, 0]
        return repeats

    def take_overflow(self) -> int:
        overflow, self.overflow = self.overflow, 0
        return overflow


@dataclass(slots=True)
class Pending:
    """A command (or publish) waiting on a port: what to do with its outcome."""

    kind: str
    command: ClientCommand | None = None
    event: ClientEvent | None = None
    batch: ClientEventBatch | None = None
    ref: ChannelRef | None = None
    name: str = ""
    timeout_ms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ConnectionState:
    """State every decision reads: who, what it entered, what is in flight."""

    def __init__(
        self,
        principal: Identity,
        config: ConnectionConfig,
        rates: RateAdmission,
        content: ContentCheck,
        rooms: RoomLookup | None,
        stamp: Callable[[], str],
        new_id: Callable[[], str],
        parse: Callable[[bytes, int], ClientMessage] = parse_client_frame,
    ) -> None:
        self.principal = principal
        self.config = config
        self.rates = rates
        self.content = content
        self.rooms = rooms
        self.stamp = stamp  # server timestamps (UTC ISO 8601, ms)
        self.new_id = new_id  # fresh hex ids for responses and deliveries
        self.parse = parse  # the frame decoder (a seam for tests that break it on purpose)
        self.policy = authz.policy_for(principal.role, tuple(principal.grants))
        self.decisions: dict[tuple[authz.Permission, str, str], authz.Decision] = {}
        # Sets kept as dicts (keys only, in the order added): an empty dict is 64 bytes, an
        # empty set 216, and most connections hold these empty for their whole life.
        self.joined: dict[ChannelRef, None] = {}
        self.handlers: dict[tuple[ChannelRef, str], None] = {}
        self.publishing: dict[int, ChannelRef] = {}  # op -> channel of a publish in flight
        self.calls: dict[int, None] = {}  # ops of service calls awaiting answers
        self.deliveries: dict[str, str] = {}  # delivery id -> reply subject
        self.pending: dict[int, Pending] = {}
        self.stopping = False  # draining: frames other than answers are not acted on
        self.closed = False
        self.throttle = AuditThrottle()
        self.rate_audited = -RATE_AUDIT_EVERY_S
        self._next_op = 0

    def open_op(self, pending: Pending) -> int:
        self._next_op += 1
        self.pending[self._next_op] = pending
        return self._next_op

    # -- answers ------------------------------------------------------------------------

    def reply(
        self,
        command: ClientCommand,
        result: dict[str, Any] | None = None,
        error: ArqonError | None = None,
    ) -> Send:
        frame = encode_command_response(
            command, "resp_" + self.new_id(), GATEWAY, self.stamp(), result, error
        )
        return Send(frame)

    def refuse(self, command: ClientCommand, error: ArqonError) -> list[Effect]:
        return [self.reply(command, error=error.with_request_id(command.id))]

    @staticmethod
    def error(error: ArqonError, extra: dict[str, Any] | None = None) -> Send:
        return Send(encode_error(error, extra))

    # -- authorization and its audit ------------------------------------------------------

    def decide(self, permission: authz.Permission, room: str, channel: str) -> authz.Decision:
        key = (permission, room, channel)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.policy.decide(permission, room, channel)
            if len(self.decisions) >= DECISION_MEMO_MAX:
                self.decisions.clear()
            self.decisions[key] = decision
        return decision

    def forbidden(
        self, permission: authz.Permission, room: str, channel: str, request_id: str, now: float
    ) -> tuple[ArqonError, list[Effect]] | None:
        """``forbidden`` (and its throttled audit record) unless the principal may."""
        decision = self.decide(permission, room, channel)
        if decision.allowed:
            return None
        audit = self.audit_denial(
            AUDIT_FORBIDDEN,
            (permission, room, channel),
            now,
            permission=permission.value,
            room=room,
            channel=channel,
            reason=decision.reason,
        )
        return ArqonError(FORBIDDEN, decision.reason, request_id), audit

    def audit_denial(
        self, type_: str, key: tuple[Any, ...], now: float, **details: object
    ) -> list[Effect]:
        """A refusal for the audit stream, throttled per connection and key."""
        repeats = self.throttle.check(key, now)
        if repeats is None:
            return []
        if repeats:
            details["repeats"] = repeats
        overflow = self.throttle.take_overflow()
        if overflow:
            details["suppressed_other"] = overflow
        if self.principal.credential_id:
            details["credential_id"] = self.principal.credential_id
        details = {"method": self.principal.method, "session": self.config.session_id, **details}
        return [Audit(self.principal.tenant, type_, self.principal.id, details)]

    # -- rooms ----------------------------------------------------------------------------

    def room_settings(self, room: str) -> RoomView | None:
        return None if self.rooms is None else self.rooms.get(self.principal.tenant, room)

    def in_room(self, room: str) -> bool:
        """Did this connection enter ``room`` (a channel joined or a handler registered)?"""
        return any(ref.room == room for ref in self.joined) or any(
            ref.room == room for ref, _ in self.handlers
        )

    def standing(self, room: str, channel: str) -> Standing:
        is_admin = self.policy.decide(authz.Permission.ADMIN, room, channel).allowed
        return Standing(self.principal.id, is_admin, self.in_room(room))

    def usage(self) -> dict[str, int]:
        """This connection's counts, as the ``limits`` command reports them."""
        return {
            "channels": len(self.joined),
            "max_channels": self.config.max_channels,
            "handlers": len(self.handlers),
            "max_handlers": self.config.max_handlers,
            "in_flight": len(self.publishing),
            "calls_in_flight": len(self.calls),
            "max_in_flight": self.config.max_in_flight,
        }
