"""Presence rules, without I/O: parameters, the member view of a channel, frame coalescing.

Terms (docs: the issue 16 wire spec). An **entry** (:class:`Presence`) is one session in one
channel. A **member** is a principal: the union of its entries in the channel; its state is
``online`` if any of its sessions is online, else ``idle``; its metadata is that of its most
recently updated session; its ``joined_at`` its earliest session's.

:class:`ChannelView` keeps one channel's members as the gateway's mirror sees them and turns
each entry change into the member change it causes (``join``, ``update``, ``leave`` or
nothing). It hides the entries of gateways declared dead (:meth:`ChannelView.set_dead`) at
once, before the store has removed them. Occupancy is kept in counters (O(1)); pages come
from sorted lists of principals (O(log n + limit) per page, no sort per page).

:class:`Coalescer` keeps a channel's member changes for one window, the last change of each
principal winning, and renders the ``presence`` frame (or its overflow form).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from bisect import bisect_right, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from arqonbus_server.shared.errors import INVALID_PARAMETERS, ArqonError
from arqonbus_server.shared.jsonbytes import dumps_kept
from arqonbus_server.shared.subjects import is_valid_name

ONLINE = "online"
IDLE = "idle"
STATES = (ONLINE, IDLE)
METADATA_MAX_BYTES = 1024
METADATA_MAX_KEYS = 32
METADATA_KEY_MAX = 64
PAGE_DEFAULT = 100
PAGE_MAX = 1000
EMPTY_METADATA = b"{}"

JOIN, UPDATE, LEAVE = "join", "update", "leave"


# --- parameters ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetPresence:
    """set_presence's parameters: None leaves that part as it is."""

    state: str | None
    metadata: bytes | None


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """The presence command's parameters."""

    limit: int = PAGE_DEFAULT
    after: str | None = None  # the last principal of the previous page
    state: str | None = None  # a filter: only members in this state


def _invalid(detail: str) -> ArqonError:
    return ArqonError(INVALID_PARAMETERS, detail)


def metadata_param(value: object) -> bytes:
    """The metadata object encoded (orjson), or ``invalid_parameters`` naming the limit."""
    if not isinstance(value, dict):
        raise _invalid("parameter 'metadata' must be a JSON object")
    if len(value) > METADATA_MAX_KEYS:
        raise _invalid(f"parameter 'metadata' may have at most {METADATA_MAX_KEYS} keys")
    for key in value:
        if not isinstance(key, str) or not 1 <= len(key) <= METADATA_KEY_MAX:
            raise _invalid(
                f"parameter 'metadata': keys must be 1-{METADATA_KEY_MAX} characters long"
            )
    try:
        encoded = dumps_kept(value)  # kept as long as the session is present
    except orjson.JSONEncodeError:
        raise _invalid("parameter 'metadata' must hold only JSON values") from None
    if len(encoded) > METADATA_MAX_BYTES:
        raise _invalid(
            f"parameter 'metadata' must be at most {METADATA_MAX_BYTES} bytes as JSON "
            f"(it is {len(encoded)})"
        )
    return encoded


def state_param(value: object, name: str = "state") -> str:
    if value not in STATES:
        raise _invalid(f"parameter {name!r} must be 'online' or 'idle'")
    return str(value)


def set_presence_params(parameters: Mapping[str, Any]) -> SetPresence:
    """set_presence's ``state`` and/or ``metadata`` (at least one)."""
    state = parameters.get("state")
    metadata = parameters.get("metadata")
    if state is None and metadata is None:
        raise _invalid("set_presence needs parameter 'state' ('online' or 'idle') or 'metadata'")
    return SetPresence(
        None if state is None else state_param(state),
        None if metadata is None else metadata_param(metadata),
    )


def query_params(parameters: Mapping[str, Any]) -> PresenceQuery:
    """The presence command's ``limit``, ``cursor`` and ``state``."""
    limit = parameters.get("limit", PAGE_DEFAULT)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= PAGE_MAX:
        raise _invalid(f"parameter 'limit' must be an integer between 1 and {PAGE_MAX}")
    cursor = parameters.get("cursor")
    after = None if cursor is None else decode_cursor(cursor)
    state = parameters.get("state")
    return PresenceQuery(limit, after, None if state is None else state_param(state))


def encode_cursor(principal: str) -> str:
    """The cursor after ``principal``: its name in base64url, without padding."""
    return base64.urlsafe_b64encode(principal.encode()).rstrip(b"=").decode()


def decode_cursor(text: object) -> str:
    """The principal a cursor from :func:`encode_cursor` names, else ``invalid_parameters``."""
    bad = _invalid("parameter 'cursor' is not a cursor from a previous presence page")
    if not isinstance(text, str) or not 1 <= len(text) <= 128:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        principal = raw.decode()
    except (binascii.Error, ValueError):
        raise bad from None
    if not is_valid_name(principal) or encode_cursor(principal) != text:
        raise bad
    return principal


# --- the member view ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Presence:
    """One session's entry in one channel (the pure twin of mesh.ports.PresenceEntry)."""

    principal: str
    session: str
    gateway: str
    joined_at: float
    state: str
    metadata: bytes
    updated_at: float


@dataclass(frozen=True, slots=True)
class MemberChange:
    """What an entry change did to a member. ``state``/``metadata``: None for a leave."""

    action: str  # join, update or leave
    principal: str
    position: int
    state: str | None = None
    metadata: bytes | None = None
    connections: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The change as it appears in a presence frame's ``changes``."""
        if self.action == LEAVE:
            return {"action": LEAVE, "principal": self.principal, "position": self.position}
        return {
            "action": self.action,
            "principal": self.principal,
            "state": self.state,
            "metadata": orjson.loads(self.metadata or EMPTY_METADATA),
            "connections": self.connections,
            "position": self.position,
        }


_Key = tuple[str, str]  # (gateway, session)
_Summary = tuple[str, bytes, int]  # (state, metadata, connections)


class _Member:
    """One principal's visible sessions and their aggregate (recomputed per change: O(its
    sessions), usually one or two)."""

    __slots__ = ("joined_at", "metadata", "sessions", "state")

    def __init__(self) -> None:
        self.sessions: dict[_Key, Presence] = {}
        self.state = ONLINE
        self.metadata = EMPTY_METADATA
        self.joined_at = 0.0

    def aggregate(self) -> None:
        entries = self.sessions.values()
        self.state = ONLINE if any(e.state == ONLINE for e in entries) else IDLE
        latest = max(entries, key=lambda e: (e.updated_at, e.gateway, e.session))
        self.metadata = latest.metadata
        self.joined_at = min(e.joined_at for e in entries)

    def summary(self) -> _Summary:
        return (self.state, self.metadata, len(self.sessions))


class ChannelView:
    """The members of one channel, from its entry changes; see the module docstring.

    Memory: per entry one :class:`Presence` (about 200 bytes plus metadata) and one index
    slot; per member one :class:`_Member` and one slot in two sorted lists of principals:
    roughly 0.5 KB per member with one session and small metadata, so 10k members ~5 MB.
    """

    def __init__(self) -> None:
        self.position = 0  # the highest store position applied
        self._members: dict[str, _Member] = {}
        self._hidden: dict[tuple[str, str, str], Presence] = {}  # dead gateways' entries
        self._by_gateway: dict[str, set[tuple[str, str]]] = {}  # gw -> {(principal, session)}
        self._dead: frozenset[str] = frozenset()
        self._sorted: dict[str | None, list[str]] = {None: [], ONLINE: [], IDLE: []}
        self._connections = 0

    # -- reading --

    def __len__(self) -> int:
        return len(self._members)

    def occupancy(self) -> dict[str, int]:
        """Members, visible sessions, and members online / idle: O(1)."""
        return {
            "members": len(self._members),
            "connections": self._connections,
            "online": len(self._sorted[ONLINE]),
            "idle": len(self._sorted[IDLE]),
        }

    def gateways(self) -> frozenset[str]:
        """Every gateway with an entry here, hidden ones included."""
        return frozenset(self._by_gateway)

    def member(self, principal: str) -> dict[str, Any] | None:
        """One member as the presence command shows it, or None."""
        member = self._members.get(principal)
        return None if member is None else _member_dict(principal, member)

    def page(
        self, limit: int, after: str | None = None, state: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` members after principal ``after`` (sorted by principal), only
        those in ``state`` if given; and the cursor of the next page (None: the last)."""
        names = self._sorted[state]
        start = 0 if after is None else bisect_right(names, after)
        chosen = names[start : start + limit]
        members = [_member_dict(p, self._members[p]) for p in chosen]
        more = start + limit < len(names)
        return members, encode_cursor(chosen[-1]) if more and chosen else None

    # -- changing --

    def apply(
        self, position: int, principal: str, gateway: str, session: str, entry: Presence | None
    ) -> MemberChange | None:
        """Apply one store change (``entry`` None: removed); the member change it causes.

        A change of a dead gateway's entry is kept hidden; its removal repeats the member's
        current summary at the store's position (a leave if it has no session left), so a
        client that ignored the earlier change made by :meth:`set_dead` (not above its
        position) still converges.
        """
        self.position = max(self.position, position)
        if gateway in self._dead:
            return self._apply_hidden(position, principal, gateway, session, entry)
        before = self._summary(principal)
        if entry is None:
            self._drop(principal, (gateway, session))
        else:
            self._put(entry)
        return self._change(principal, before, position)

    def set_dead(self, gateways: Iterable[str]) -> list[MemberChange]:
        """Hide the entries of ``gateways`` (and show again those of gateways no longer in
        it); the member changes, at the view's position. Cost: O(entries of the gateways
        whose status changed)."""
        dead = frozenset(gateways)
        touched: dict[str, _Summary | None] = {}
        for gateway in dead - self._dead:
            for principal, session in self._by_gateway.get(gateway, ()):
                touched.setdefault(principal, self._summary(principal))
                entry = self._members[principal].sessions[(gateway, session)]
                self._drop(principal, (gateway, session), index=False)
                self._hidden[(principal, gateway, session)] = entry
        revived = self._dead - dead
        self._dead = dead
        for gateway in revived:
            for principal, session in self._by_gateway.get(gateway, ()):
                touched.setdefault(principal, self._summary(principal))
                self._put(self._hidden.pop((principal, gateway, session)), index=False)
        changes = [self._change(p, before, self.position) for p, before in touched.items()]
        return [c for c in changes if c is not None]

    def _apply_hidden(
        self, position: int, principal: str, gateway: str, session: str, entry: Presence | None
    ) -> MemberChange | None:
        key = (principal, gateway, session)
        if entry is not None:
            self._hidden[key] = entry
            self._by_gateway.setdefault(gateway, set()).add((principal, session))
            return None
        if self._hidden.pop(key, None) is None:
            return None
        self._unindex(gateway, principal, session)
        member = self._members.get(principal)
        if member is None:
            return MemberChange(LEAVE, principal, position)
        return MemberChange(UPDATE, principal, position, *member.summary())

    def _summary(self, principal: str) -> _Summary | None:
        member = self._members.get(principal)
        return None if member is None else member.summary()

    def _put(self, entry: Presence, index: bool = True) -> None:
        member = self._members.get(entry.principal)
        if member is None:
            member = self._members[entry.principal] = _Member()
            insort(self._sorted[None], entry.principal)
            old_state = None
        else:
            old_state = member.state
        key = (entry.gateway, entry.session)
        self._connections += key not in member.sessions
        member.sessions[key] = entry
        member.aggregate()
        self._restate(entry.principal, old_state, member.state)
        if index:
            self._by_gateway.setdefault(entry.gateway, set()).add((entry.principal, entry.session))

    def _drop(self, principal: str, key: _Key, index: bool = True) -> None:
        member = self._members.get(principal)
        if member is None or member.sessions.pop(key, None) is None:
            return
        self._connections -= 1
        if index:
            self._unindex(key[0], principal, key[1])
        old_state = member.state
        if not member.sessions:
            del self._members[principal]
            _remove_sorted(self._sorted[None], principal)
            self._restate(principal, old_state, None)
            return
        member.aggregate()
        self._restate(principal, old_state, member.state)

    def _unindex(self, gateway: str, principal: str, session: str) -> None:
        keys = self._by_gateway.get(gateway)
        if keys is not None:
            keys.discard((principal, session))
            if not keys:
                del self._by_gateway[gateway]

    def _restate(self, principal: str, old: str | None, new: str | None) -> None:
        if old == new:
            return
        if old is not None:
            _remove_sorted(self._sorted[old], principal)
        if new is not None:
            insort(self._sorted[new], principal)

    def _change(
        self, principal: str, before: _Summary | None, position: int
    ) -> MemberChange | None:
        after = self._summary(principal)
        if after is None:
            return None if before is None else MemberChange(LEAVE, principal, position)
        if after == before:
            return None
        action = JOIN if before is None else UPDATE
        return MemberChange(action, principal, position, *after)


def _remove_sorted(names: list[str], principal: str) -> None:
    index = bisect_right(names, principal) - 1
    if index >= 0 and names[index] == principal:
        del names[index]


def _member_dict(principal: str, member: _Member) -> dict[str, Any]:
    connections = [
        {"session": e.session, "gateway": e.gateway, "state": e.state, "joined_at": e.joined_at}
        for e in sorted(member.sessions.values(), key=lambda e: (e.gateway, e.session))
    ]
    return {
        "principal": principal,
        "state": member.state,
        "metadata": orjson.loads(member.metadata),
        "joined_at": member.joined_at,
        "connections": connections,
    }


# --- frames -------------------------------------------------------------------------------


class Coalescer:
    """One channel's member changes in one window: the last change of each principal wins.

    A principal that joined and left within one window still shows its leave (a client may
    have learned of it from a page); one that joined and changed shows as a join with its
    last state. A client treats a join of a member it knows as an update, and an update of
    one it does not know as a join (the order of pages and frames allows both). Memory: one change per principal changed in the window.
    """

    def __init__(self, max_changes: int) -> None:
        self.max_changes = max_changes
        self._changes: dict[str, MemberChange] = {}

    def __len__(self) -> int:
        return len(self._changes)

    def add(self, change: MemberChange) -> None:
        previous = self._changes.pop(change.principal, None)  # keep the order of the last changes
        if previous is not None and previous.action == JOIN and change.action == UPDATE:
            # a member that joined in this window is news to the watchers: still a join
            change = dataclasses.replace(change, action=JOIN)
        self._changes[change.principal] = change

    def payload(self, occupancy: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        """The window's ``presence`` frame payload (None if nothing changed), and start a
        new window (shared/envelope.py ``encode_presence`` makes the frame).

        More than ``max_changes`` principals: ``changes`` is empty, ``overflow`` true and
        ``occupancy`` (required then) says the totals.
        """
        if not self._changes:
            return None
        changes, self._changes = list(self._changes.values()), {}
        position = max(c.position for c in changes)
        if len(changes) > self.max_changes:
            return overflow_payload(position, occupancy or {})
        return {"position": position, "changes": [c.as_dict() for c in changes]}


def overflow_payload(position: int, occupancy: Mapping[str, int]) -> dict[str, Any]:
    """The overflow payload: a watcher that keeps a member list re-reads it (also sent after
    this gateway re-established its view of the channel)."""
    return {"position": position, "changes": [], "overflow": True, "occupancy": dict(occupancy)}


# --- liveness -----------------------------------------------------------------------------


class Liveness:
    """Which gateways stopped renewing their lease, from lease positions read over time.

    No shared clock: for each gateway it keeps the last position seen and the local
    (monotonic) time it last changed. A gateway whose position has not changed for
    ``timeout_s`` is dead; so is one seen only in entries (no lease) for that long. ``own``
    is never dead. If readings stop for more than ``gap_s`` (this gateway could not read),
    the next reading starts every live gateway's count afresh: an outage of the store is no
    gateway's death. The dead stay dead until their position changes or they vanish.
    Memory: one small tuple per gateway seen.
    """

    def __init__(self, own: str, timeout_s: float, gap_s: float) -> None:
        self.own = own
        self.timeout_s = timeout_s
        self.gap_s = gap_s
        self.dead: frozenset[str] = frozenset()
        self._seen: dict[str, tuple[int | None, float]] = {}  # -> (position, since)
        self._read_at: float | None = None

    def observe(
        self, leases: Mapping[str, int], in_entries: Iterable[str], now: float
    ) -> frozenset[str]:
        """Record one reading of every lease (and the gateways seen in entries); the dead."""
        if self._read_at is None or now - self._read_at > self.gap_s:
            self._seen = {g: (p, t if g in self.dead else now) for g, (p, t) in self._seen.items()}
        self._read_at = now
        for gateway, position in leases.items():
            seen = self._seen.get(gateway)
            if seen is None or seen[0] != position:
                self._seen[gateway] = (position, now)
        present = set(in_entries)
        for gateway in present - leases.keys():
            self._seen.setdefault(gateway, (None, now))
        for gateway in [g for g in self._seen if g not in leases and g not in present]:
            del self._seen[gateway]
        self.dead = frozenset(
            g
            for g, (_, since) in self._seen.items()
            if g != self.own and now - since >= self.timeout_s
        )
        return self.dead
