"""What the connection core asks its shell to do: frozen effects, executed in order.

Each effect that waits on a port carries an ``op`` number; the shell feeds the outcome back
to the core with that number (``publish_acked(op, ...)``, ``command_done(op, ...)``,
``command_failed(op, ...)``, ...), and executes the effects that call returns. Effects that
need no answer (``Send``, ``Audit``, ``Leave``, ``Unserve``, timers) are fire-and-forget for
the core; the shell executes them in the order given (``Unserve`` before the ``Send`` that
follows it, for example).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from arqonbus_server.shared.records import record
from arqonbus_server.shared.subjects import ChannelRef


@record
class Now:
    """The time of an input: ``monotonic`` for rates and throttles, ``wall`` (Unix s) for bans."""

    monotonic: float
    wall: float


# -- to the client ---------------------------------------------------------------------


@record
class Send:
    """One text frame to the client (already encoded)."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket with ``code`` and ``reason``."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Audit:
    """One record for the tenant's audit stream (the shell's AuditLog never blocks)."""

    tenant: str
    type: str
    principal: str
    details: dict[str, Any] = field(default_factory=dict)


# -- publishing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AwaitPublishSlot:
    """Stop reading until fewer than ``limit`` publishes other than the next one are in flight.

    Backpressure: ``publishes_in_flight`` already counts the publish that follows.
    """

    limit: int


@record
class Publish:
    """Store ``body`` (ensure the tenant's stream first, inline), then feed back
    ``publish_acked(op, seq, duplicate)`` or ``publish_failed(op, failure)``."""

    op: int
    ref: ChannelRef
    event_id: str
    body: bytes
    dedupe_key: str
    # The client's ``trace`` field (shape checked): the shell splices it, or the context of
    # its own span, into ``body`` (shared/envelope.py with_trace; gateway/tracing.py).
    trace: Mapping[str, str] | None = None
    trace_malformed: bool = False  # the client's ``trace`` was unusable: ignored, counted
    ttl_s: int | None = None  # the room's own retention: the store drops the event after it


@dataclass(frozen=True, slots=True)
class PublishBatch:
    """Store the events of an ``events`` frame (``items``, in order; each one's ``op`` is
    the batch's), ensuring the tenant's stream first, inline; then feed back
    ``batch_acked(op, results)`` or ``publish_failed(op, failure)``."""

    op: int
    ref: ChannelRef
    batch_id: str
    items: tuple[Publish, ...]
    ttl_s: int | None = None


# -- channels, history, handlers ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyRoomKey:
    """Check ``key`` against the room's key hash; feed back ``room_key_checked(op, ok)``."""

    op: int
    tenant: str
    room: str
    principal: str
    key: str


@dataclass(frozen=True, slots=True)
class Join:
    """Join the hub's channel from ``since_seq``; feed back ``joined(op, result)`` (the join
    reply's result); start live delivery after executing what ``joined`` returns."""

    op: int
    ref: ChannelRef
    since_seq: int | None
    since_epoch: int | None = None  # a placed tenant's epoch of since_seq (shared/core/resume.py)
    # Enter the channel's presence, and/or receive its presence frames (docs/presence.md);
    # the join reply's result says whether each happened.
    presence: bool = False
    presence_events: bool = False
    batch: bool = False  # deliver runs of events in ``events`` messages


@dataclass(frozen=True, slots=True)
class Leave:
    """Leave the hub's channel, and its presence if entered (no answer)."""

    ref: ChannelRef


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """Read one page of stored events (at most ``limit``, about ``budget_bytes``); feed back
    ``command_done(op, {"events": ..., "next_since_seq": ..., "more": ...})``."""

    op: int
    ref: ChannelRef
    since_seq: int
    limit: int
    budget_bytes: int


@dataclass(frozen=True, slots=True)
class Serve:
    """Join the queue group of service ``name`` on ``ref``; feed back ``handler_served(op)``."""

    op: int
    ref: ChannelRef
    name: str


@dataclass(frozen=True, slots=True)
class Unserve:
    """Leave the queue group of service ``name`` on ``ref`` (no answer). Awaited in order,
    unless ``background`` (rights dropped or a ban: nothing waits for it)."""

    ref: ChannelRef
    name: str
    background: bool = False


# -- service commands ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallService:
    """Request ``body`` from a handler of ``name`` (asking again briefly on no responders);
    feed back ``call_answered(op, reply_body)`` or ``call_failed(op, failure)``."""

    op: int
    ref: ChannelRef
    name: str
    body: bytes
    timeout_s: float
    trace: Mapping[str, str] | None = None  # the caller's ``trace`` field (for the shell's span)
    trace_malformed: bool = False


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer a service request at ``reply``. ``request_id``: on failure, feed back
    ``respond_failed(request_id)``; None: best effort, failures ignored."""

    reply: str
    body: bytes
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Call ``delivery_expired(delivery_id)`` after ``delay_s``."""

    delivery_id: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    delivery_id: str


# -- credentials, agents, room administration ------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckCredential:
    """Authenticate ``token``; feed back ``credential_checked(op, principal)``."""

    op: int
    token: str


@dataclass(frozen=True, slots=True)
class ArmExpiry:
    """(Re)arm the close-at-expiry timer: 4004 at ``expires_at`` (Unix s); None: no timer."""

    expires_at: float | None


@dataclass(frozen=True, slots=True)
class RegisterAgent:
    """Register an agent from ``parameters``; feed back ``agent_registered(op, record)``."""

    op: int
    tenant: str
    role: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RoomAdmin:
    """Run room admin command ``name``; feed back ``room_admin_done(op, result, target)``."""

    op: int
    name: str
    parameters: dict[str, Any]
    ref: ChannelRef
    actor: str


@dataclass(frozen=True, slots=True)
class RunCommand:
    """Run a presence or gateway admin command (gateway/state/admin.py) with parameters the
    core checked; feed back ``command_done(op, result)`` or ``command_failed(op, error)``."""

    op: int
    name: str
    ref: ChannelRef
    parameters: Any  # the checked parameters (shared/commands.py, shared/presence.py)
    principal: str
    session: str


@dataclass(frozen=True, slots=True)
class ReportLimits:
    """Build the ``limits`` report around ``usage``; feed back ``command_done(op, report)``."""

    op: int
    usage: dict[str, int]


Effect = (
    Send
    | Close
    | Audit
    | AwaitPublishSlot
    | Publish
    | PublishBatch
    | VerifyRoomKey
    | Join
    | Leave
    | ReadHistory
    | Serve
    | Unserve
    | CallService
    | Respond
    | ArmTimer
    | CancelTimer
    | CheckCredential
    | ArmExpiry
    | RegisterAgent
    | RoomAdmin
    | RunCommand
    | ReportLimits
)
