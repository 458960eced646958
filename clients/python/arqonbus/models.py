"""Plain data the SDK hands to applications: events, gaps, acks, history pages, requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Ack", "CommandRequest", "Event", "Gap", "HistoryPage", "Welcome"]


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _trace_of(message: dict[str, Any]) -> dict[str, str] | None:
    trace = message.get("trace")
    if not isinstance(trace, dict) or not isinstance(trace.get("traceparent"), str):
        return None
    return {k: v for k, v in trace.items() if isinstance(v, str)}


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event, as delivered to a member or returned by history.

    ``from_`` is the wire field ``from``: the sender's principal. ``seq`` is the tenant
    stream's sequence number; within one channel it strictly increases (with holes that
    belong to other channels). ``raw`` is the envelope exactly as received.
    """

    room: str
    channel: str
    id: str
    from_: str
    timestamp: str
    payload: dict[str, Any]
    seq: int
    raw: dict[str, Any] = field(repr=False, compare=False)
    # The tenant's epoch (multi-region tenants only: docs/protocol.md#resume-across-a-failover).
    epoch: int | None = None

    @property
    def trace_context(self) -> dict[str, str] | None:
        """The event's creation context, W3C ``traceparent``/``tracestate`` (or None).

        Continue the trace with ``opentelemetry.propagate.extract(event.trace_context)``.
        """
        return _trace_of(self.raw)

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Event:
        """Build an event from a delivered envelope (stored envelope plus ``seq``)."""
        return cls(
            room=_str(message.get("room")),
            channel=_str(message.get("channel")),
            id=_str(message.get("id")),
            from_=_str(message.get("from")),
            timestamp=_str(message.get("timestamp")),
            payload=_dict(message.get("payload")),
            seq=_int(message.get("seq")),
            raw=message,
            epoch=_epoch(message.get("epoch")),
        )


@dataclass(frozen=True, slots=True)
class Gap:
    """Retention removed events of the channel after ``after_seq``.

    The events between ``after_seq`` and ``first_available_seq`` are gone (the latter is
    stream-wide: the oldest event the tenant's stream still holds). Delivery goes on with the
    events that remain. Treat it as data loss to reconcile, e.g. by reloading state.
    """

    room: str
    channel: str
    after_seq: int
    first_available_seq: int
    # "epoch": a failover did not carry over seqs ``lost_from_seq``..``lost_to_seq`` of
    # ``lost_epoch`` that were delivered; delivery goes on in ``epoch`` after ``after_seq``
    # (docs/protocol.md#resume-across-a-failover). "retention": the default.
    reason: str = "retention"
    epoch: int | None = None
    lost_epoch: int | None = None
    lost_from_seq: int = 0
    lost_to_seq: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    """The store's acknowledgement of a published event.

    ``duplicate`` is true when an event with the same ``id`` (from this principal, to this
    channel) had been stored already within the dedupe window; ``seq`` is then the original
    one. This also happens when the SDK resent an unacked event after a reconnect and the
    first attempt had been stored: the event is stored once either way.
    """

    request_id: str
    seq: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of ``history``: events in seq order and where the next page starts."""

    events: list[Event]
    next_since_seq: int
    more: bool


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A service command delivered to a handler registered with this client.

    ``from_`` is the caller's principal. ``caller_request_id`` is the caller's own ``id``
    (for logs and tracing). ``delivery_id`` is the ``dlv_...`` id the SDK answers to.
    ``timeout_ms`` is how long the caller's gateway waits for the answer.
    """

    room: str
    channel: str
    command: str
    parameters: dict[str, Any]
    from_: str
    caller_request_id: str
    delivery_id: str
    timeout_ms: int
    timestamp: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def trace_context(self) -> dict[str, str] | None:
        """W3C ``traceparent``/``tracestate`` of the call (its gateway's span), or None."""
        return _trace_of(self.raw)

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> CommandRequest:
        """Build a request from a gateway ``command`` frame."""
        payload = _dict(message.get("payload"))
        return cls(
            room=_str(message.get("room")),
            channel=_str(message.get("channel")),
            command=_str(payload.get("command")),
            parameters=_dict(payload.get("parameters")),
            from_=_str(message.get("from")),
            caller_request_id=_str(payload.get("request_id")),
            delivery_id=_str(message.get("id")),
            timeout_ms=_int(payload.get("timeout_ms")),
            timestamp=_str(message.get("timestamp")),
            raw=message,
        )


@dataclass(frozen=True, slots=True)
class Welcome:
    """The first message of a connection: the gateway's node and the connection's limits."""

    session_id: str
    node: str
    protocol: str
    limits: dict[str, int]

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Welcome:
        """Build from a ``welcome`` frame."""
        payload = _dict(message.get("payload"))
        limits = {
            k: v
            for k, v in _dict(payload.get("limits")).items()
            if isinstance(v, int) and not isinstance(v, bool)
        }
        return cls(
            session_id=_str(payload.get("session_id")),
            node=_str(payload.get("node")),
            protocol=_str(payload.get("protocol")),
            limits=limits,
        )


def _epoch(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
