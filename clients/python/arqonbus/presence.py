"""Presence as plain data, and the member list a subscription keeps (no I/O).

Wire format: docs/protocol.md#presence; design: docs/presence.md.

* :class:`Member` is a principal present in a channel (the union of its sessions there);
  :class:`Occupancy` the channel's counts; :class:`PresencePage` one page of the
  ``presence`` command.
* :class:`PresenceEvent` is one ``presence`` frame: the coalesced changes of one window
  (:class:`PresenceChange`), or ``overflow`` when the window held too many to list.
* :class:`MemberView` keeps a channel's member list by **snapshot + diff**: it reads
  ``presence`` pages, buffers the frames that arrive meanwhile, and applies a change only
  when its position is above the position it already has for that principal. A change at or
  below it is already reflected in the snapshot, so no member is counted twice or missed.
"""

from __future__ import annotations

import base64
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "Member",
    "MemberConnection",
    "MemberView",
    "Occupancy",
    "PresenceChange",
    "PresenceEvent",
    "PresencePage",
    "PresenceState",
    "cursor_after",
]

PresenceState = Literal["online", "idle"]
PRESENCE_STATES: frozenset[str] = frozenset({"online", "idle"})
MAX_BUFFERED_CHANGES = 100_000
"""Changes a :class:`MemberView` holds while a snapshot is read; more restart the snapshot."""


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else 0.0


def _state(value: Any) -> PresenceState:
    return "idle" if value == "idle" else "online"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def cursor_after(principal: str) -> str:
    """The ``cursor`` that starts a ``presence`` page after ``principal`` (base64url, no
    padding). Cursors are opaque: pass on ``next_cursor``; this is for tests and tools."""
    return base64.urlsafe_b64encode(principal.encode()).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Occupancy:
    """A channel's counts: members (principals), connections (sessions), and by state."""

    members: int = 0
    connections: int = 0
    online: int = 0
    idle: int = 0
    position: int | None = None  # the view's position, when the gateway gave it

    @classmethod
    def from_wire(cls, data: Any) -> Occupancy:
        """From an ``occupancy`` result or the ``occupancy`` object of a page or frame."""
        d = _dict(data)
        position = d.get("position")
        return cls(
            _int(d.get("members")),
            _int(d.get("connections")),
            _int(d.get("online")),
            _int(d.get("idle")),
            position if isinstance(position, int) and not isinstance(position, bool) else None,
        )


@dataclass(frozen=True, slots=True)
class MemberConnection:
    """One session of a member: on which gateway, since when, in which state."""

    session: str
    gateway: str
    state: PresenceState
    joined_at: float

    @classmethod
    def from_wire(cls, data: Any) -> MemberConnection:
        d = _dict(data)
        return cls(
            _str(d.get("session")),
            _str(d.get("gateway")),
            _state(d.get("state")),
            _float(d.get("joined_at")),
        )


@dataclass(frozen=True, slots=True)
class Member:
    """A principal present in a channel.

    ``state`` is ``online`` if any of its sessions is online, else ``idle``. ``connections``
    lists its sessions when the member comes from a ``presence`` page; a member updated by a
    ``presence`` frame keeps the list it had (or none) and ``connection_count`` is current.
    """

    principal: str
    state: PresenceState
    metadata: dict[str, Any]
    joined_at: float = 0.0
    connections: tuple[MemberConnection, ...] = ()
    connection_count: int = 0

    @classmethod
    def from_wire(cls, data: Any) -> Member:
        """From one entry of a ``presence`` page's ``members``."""
        d = _dict(data)
        raw = d.get("connections")
        connections = tuple(
            MemberConnection.from_wire(c) for c in (raw if isinstance(raw, list) else [])
        )
        return cls(
            _str(d.get("principal")),
            _state(d.get("state")),
            _dict(d.get("metadata")),
            _float(d.get("joined_at")),
            connections,
            len(connections),
        )


@dataclass(frozen=True, slots=True)
class PresencePage:
    """One page of the ``presence`` command: members sorted by principal.

    ``next_cursor`` is None on the last page. ``position`` is the position of the gateway's
    view the page was read from (the changes it already reflects).
    """

    members: list[Member]
    next_cursor: str | None
    position: int
    occupancy: Occupancy

    @classmethod
    def from_wire(cls, result: Mapping[str, Any]) -> PresencePage:
        raw = result.get("members")
        members = [Member.from_wire(m) for m in (raw if isinstance(raw, list) else [])]
        cursor = result.get("next_cursor")
        return cls(
            [m for m in members if m.principal],
            cursor if isinstance(cursor, str) and cursor else None,
            _int(result.get("position")),
            Occupancy.from_wire(result.get("occupancy")),
        )


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """One member's change: ``join`` (its first session entered), ``update`` (state,
    metadata or connection count changed) or ``leave`` (its last session left).

    For a ``leave``, ``state`` is ``None``, ``metadata`` empty and ``connections`` 0.
    """

    action: Literal["join", "update", "leave"]
    principal: str
    position: int
    state: PresenceState | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    connections: int = 0

    @classmethod
    def from_wire(cls, data: Any) -> PresenceChange | None:
        """One entry of a frame's ``changes``; None when it is malformed."""
        d = _dict(data)
        action, principal = d.get("action"), d.get("principal")
        if action not in ("join", "update", "leave") or not isinstance(principal, str):
            return None
        if action == "leave":
            return cls("leave", principal, _int(d.get("position")))
        return cls(
            action,
            principal,
            _int(d.get("position")),
            _state(d.get("state")),
            _dict(d.get("metadata")),
            _int(d.get("connections")),
        )


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """One ``presence`` frame of a subscription joined with ``presence_events``.

    ``changes`` hold at most one change per principal (the last of the window), in position
    order. With ``overflow`` the window held too many changes to list: ``changes`` is empty,
    ``occupancy`` holds the counts, and a member list must be read again (a subscription's
    :attr:`~arqonbus.Subscription.members` does it by itself).
    """

    room: str
    channel: str
    position: int
    changes: tuple[PresenceChange, ...]
    overflow: bool = False
    occupancy: Occupancy | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> PresenceEvent:
        """From a ``presence`` frame (its fields at the top level, or under ``payload``)."""
        body = message
        payload = message.get("payload")
        if isinstance(payload, dict) and ("changes" in payload or "overflow" in payload):
            body = payload
        raw_changes = body.get("changes")
        changes = [
            PresenceChange.from_wire(c)
            for c in (raw_changes if isinstance(raw_changes, list) else [])
        ]
        occupancy = body.get("occupancy")
        return cls(
            _str(message.get("room")),
            _str(message.get("channel")),
            _int(body.get("position")),
            tuple(c for c in changes if c is not None),
            body.get("overflow") is True,
            Occupancy.from_wire(occupancy) if isinstance(occupancy, dict) else None,
            message,
        )


class MemberView:
    """A channel's members, kept current by snapshot + diff (docs/presence.md).

    Use: :meth:`begin` a snapshot (returns its number), feed each page to :meth:`add_page`,
    then :meth:`finish`; feed every ``presence`` frame to :meth:`apply` meanwhile and after.
    Frames that arrive during a snapshot are buffered and applied by :meth:`finish` with the
    position rule. ``apply`` returns True when the list cannot be kept from the frame (an
    overflow, or too many buffered changes): begin a new snapshot.

    The position rule: a page read at position P reflects every change up to P for the
    principals it covers (pages are sorted; a page covers the principals after the previous
    page's last one, up to its own last one; the last page covers the rest). A change is
    applied only when its position is above the position known for its principal: its
    member's position, else the position of the page that covers it.
    """

    def __init__(self) -> None:
        self._members: dict[str, Member] = {}
        self._positions: dict[str, int] = {}  # per present principal: its last change
        self._bounds: list[str] = []  # each page's last principal ("" for the last page)
        self._page_positions: list[int] = []
        self._generation = 0
        self._loading: dict[str, Member] | None = None
        self._loading_positions: dict[str, int] = {}
        self._buffer: list[PresenceChange] = []
        self.synced = False
        self.position = 0

    @property
    def members(self) -> Mapping[str, Member]:
        """The present members by principal (read-only, live)."""
        return MappingProxyType(self._members)

    @property
    def loading(self) -> bool:
        return self._loading is not None

    def begin(self) -> int:
        """Start a snapshot; frames are buffered until :meth:`finish`. Returns its number."""
        self._generation += 1
        self._loading = {}
        self._loading_positions = {}
        self._bounds, self._page_positions = [], []
        self._buffer = []
        return self._generation

    def add_page(self, generation: int, page: PresencePage) -> bool:
        """Add one page of snapshot ``generation``; False if a newer snapshot replaced it."""
        if generation != self._generation or self._loading is None:
            return False
        for member in page.members:
            self._loading[member.principal] = member
            self._loading_positions[member.principal] = page.position
        if page.next_cursor is None:
            self._bounds.append("")  # the last page covers every principal after the others
        elif page.members:
            self._bounds.append(page.members[-1].principal)
        else:
            return True  # an empty page in the middle covers nobody
        self._page_positions.append(page.position)
        return True

    def finish(self, generation: int) -> bool:
        """End snapshot ``generation``: it becomes the list, then buffered changes apply."""
        if generation != self._generation or self._loading is None:
            return False
        # In place: views handed out by ``members`` stay live.
        self._members.clear()
        self._members.update(self._loading)
        self._positions = self._loading_positions
        self._loading, self._loading_positions = None, {}
        self.position = max(self._page_positions, default=0)
        buffered, self._buffer = self._buffer, []
        for change in buffered:
            self._apply_change(change)
        self.synced = True
        return True

    def apply(self, event: PresenceEvent) -> bool:
        """Apply a frame (or buffer it during a snapshot). True: read a new snapshot."""
        if event.overflow:
            return True
        if self._loading is not None:
            self._buffer.extend(event.changes)
            return len(self._buffer) > MAX_BUFFERED_CHANGES
        for change in event.changes:
            self._apply_change(change)
        return False

    def clear(self) -> None:
        """Forget the list (the subscription ended)."""
        self._generation += 1
        self._members.clear()
        self._positions, self._loading, self._buffer = {}, None, []
        self.synced = False

    def known_position(self, principal: str) -> int:
        """The position the list reflects for ``principal`` (see the class docstring)."""
        if principal in self._positions:
            return self._positions[principal]
        if not self._bounds:
            return 0
        # The first page whose last principal is >= this one; "" marks the open last page.
        closed = self._bounds[:-1] if self._bounds[-1] == "" else self._bounds
        index = bisect_left(closed, principal)
        return self._page_positions[min(index, len(self._page_positions) - 1)]

    def _apply_change(self, change: PresenceChange) -> None:
        if change.position <= self.known_position(change.principal):
            return  # the snapshot (or an earlier change) reflects it already
        self.position = max(self.position, change.position)
        if change.action == "leave":
            self._members.pop(change.principal, None)
            # Later changes of this principal have higher positions: no tombstone needed.
            self._positions.pop(change.principal, None)
            return
        old = self._members.get(change.principal)
        self._members[change.principal] = Member(
            change.principal,
            change.state or "online",
            change.metadata,
            old.joined_at if old is not None else 0.0,
            old.connections if old is not None else (),
            change.connections,
        )
        self._positions[change.principal] = change.position
