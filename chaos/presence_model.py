"""Presence in the state machine (chaos/model.py): who is in each channel, on every gateway.

The promise (docs/protocol.md#presence, gateway/state/presence.py): once a gateway SIGKILLed
has been dead for the expiry bound, the ``presence`` list (all pages) that any live gateway
gives for a channel is exactly the channel's live members: no ghost entry of a killed
gateway, no live member missing, each principal once however many sessions (and gateways)
it has, in the state its sessions set; and ``occupancy`` agrees with the list.

The model: *sessions*, each one SDK client of a principal from a small pool, connected to
some gateway, present in some of :data:`PRESENCE_CHANNELS` (``join_channel`` with
``presence: true``), in the state its last ``set_presence`` gave (``online`` at first). A
channel's expected members follow from them (:func:`expected_members`): a principal with a
session present; ``online`` if any of those sessions is; one connection per session, on the
gateway that session's client is connected to now. A dropped connection (the SDK reconnects
and joins again), a gateway kill (its clients move; its entries must expire) and the
restart of that gateway on its port with the same node id change where a session's entry
lives, not the expected members.

Nothing announces that a dead gateway's entries expired, so :meth:`PresenceRules.
_presence_settle` polls every gateway's view (``tests.timeouts.eventually``) with a deadline:
the expiry bound after the last kill, plus slack for a loaded machine. The gateways run with
a short lease (:data:`PRESENCE_LEASE_S`) so that bound is seconds, not tens of seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from arqonbus import ArqonBusError, Client, Member, Occupancy, Subscription
from tests.timeouts import SEC, eventually

if TYPE_CHECKING:
    from chaos.model import Mesh

_T = TypeVar("_T")

PRESENCE_ROOM = "smp"
PRESENCE_CHANNELS = ("p0", "p1")
PRINCIPALS = ("alice", "bob", "carol")
MAX_PRESENCE_SESSIONS = 5
STATES = ("online", "idle")
PAGE_SIZE = 2  # small pages, so every listing walks the cursors
PRESENCE_LEASE_S = 0.5
"""``ARQONBUS_PRESENCE_LEASE_S`` of the machine's gateways (default 2 s): short, so a killed
gateway's members expire in about 3 s and a run spends its time on steps, not waits."""
EXPIRY_BOUND_S = 6 * PRESENCE_LEASE_S
"""A SIGKILLed gateway's members are hidden by the others within ``lease_timeout`` (4
leases) + 2 lease rounds (gateway/state/presence.py); the store removal follows."""
STORE_OUTAGE_S = 15.0
"""After a NATS node kill the presence bucket may have no leader for nats-server's Raft
election timeout (a random 4-9 s, plus up to 0.8 s of campaign; not configurable), then the
gateways' lease rounds retry what the store refused (each store call bounded by 5 s)."""
SLACK_S = 10.0 * SEC
"""Added to every presence deadline: SDK reconnects and joins, mirror snapshots and a
2-core machine shared with other runs. A ghost still listed after bound + slack fails."""
CALL_TIMEOUT = 20.0
SET_PRESENCE_ATTEMPTS = 4


class PresenceViolation(AssertionError):
    """A gateway's presence list or occupancy disagreed with the model past the bound."""


@dataclass
class PresenceSession:
    """One connection of ``principal``: the channels it is present in, the state it set."""

    name: str
    principal: str
    client: Client
    subs: dict[str, Subscription] = field(default_factory=dict)  # channel -> subscription
    state: str = "online"


@dataclass(frozen=True, slots=True)
class ExpectedMember:
    """What a channel's listing must show for one principal."""

    state: str
    connections: tuple[tuple[str, str], ...]  # sorted (gateway node id, session state)


def gateway_of(url: str | None) -> str:
    """The node id of the gateway at ``url``: the mesh names each ``gw-<port>``
    (tests.support.GatewayProcess); ``?`` while a client has no connection."""
    if url is None:
        return "?"
    return f"gw-{urlsplit(url).port}"


def expected_members(
    sessions: Iterable[PresenceSession], channel: str, gateway: dict[str, str]
) -> dict[str, ExpectedMember]:
    """The members ``channel`` must list: one per principal with a session present in it,
    ``online`` if any of its sessions is, with one connection per session. ``gateway`` maps
    a session's name to the node id it is connected to."""
    by_principal: dict[str, list[tuple[str, str]]] = {}
    for s in sessions:
        if channel in s.subs:
            by_principal.setdefault(s.principal, []).append((gateway[s.name], s.state))
    return {
        principal: ExpectedMember(
            "online" if any(state == "online" for _, state in conns) else "idle",
            tuple(sorted(conns)),
        )
        for principal, conns in by_principal.items()
    }


def listing_mismatch(
    expected: dict[str, ExpectedMember], members: Sequence[Member], occupancy: Occupancy
) -> str | None:
    """None when a listing (all pages) and the occupancy read after it agree with the model
    and with each other; else what differs, in words."""
    principals = [m.principal for m in members]
    if principals != sorted(set(principals)):
        return f"members not sorted or listed twice: {principals}"
    got = {
        m.principal: ExpectedMember(
            m.state, tuple(sorted((c.gateway, c.state) for c in m.connections))
        )
        for m in members
    }
    problems = []
    for principal in sorted(got.keys() | expected.keys()):
        want, have = expected.get(principal), got.get(principal)
        if want != have:
            problems.append(f"{principal}: listed {have}, model {want}")
    counts = (
        len(members),
        sum(len(m.connections) for m in members),
        sum(m.state == "online" for m in members),
        sum(m.state == "idle" for m in members),
    )
    said = (occupancy.members, occupancy.connections, occupancy.online, occupancy.idle)
    if said != counts:
        problems.append(f"occupancy (members, connections, online, idle) {said}, listed {counts}")
    return "; ".join(problems) or None


def has_ghost(expected: dict[str, ExpectedMember], members: Sequence[Member]) -> bool:
    """Whether the listing holds more connections of some principal than the model."""
    for m in members:
        want = expected.get(m.principal)
        if len(m.connections) > (len(want.connections) if want else 0):
            return True
    return False


class PresenceRules:
    """Rules and the settle check of presence, mixed into :class:`chaos.model.BusMachine`.

    Uses the machine's ``m`` (the mesh), ``_do`` (run a step on the mesh's loop), ``tenant``
    and ``node_down``.
    """

    m: Mesh
    tenant: str
    node_down: bool
    if TYPE_CHECKING:

        def _do(self, coro: Coroutine[Any, Any, _T], timeout: float = ...) -> _T: ...

    def _presence_init(self) -> None:
        self.presence_sessions: list[PresenceSession] = []
        self.presence_dirty = False
        self._presence_counter = 0
        self._checkers: dict[int, Client] = {}  # gateway index -> a client that asks only it
        self._kill_checked = -1.0  # the kill time the last settle covered

    def _presence_client(self, urls: list[str], principal: str) -> Client:
        return Client(
            urls,
            f"dev:{self.tenant}:{principal}",
            connect_timeout=CALL_TIMEOUT,
            request_timeout=CALL_TIMEOUT,
            max_backoff=0.5,
        )

    def _pick_session(self, pick: int) -> PresenceSession:
        return self.presence_sessions[pick % len(self.presence_sessions)]

    # -- rules

    @precondition(lambda self: len(self.presence_sessions) < MAX_PRESENCE_SESSIONS)
    @rule(
        principal=st.sampled_from(PRINCIPALS),
        channel=st.sampled_from(PRESENCE_CHANNELS),
        gateway=st.integers(0, 7),
    )
    def presence_connect(self, principal: str, channel: str, gateway: int) -> None:
        """A new connection of ``principal`` (maybe its second, on another gateway) enters
        ``channel``'s presence."""
        self.m.stats.count("presence_connect")
        self._do(self._presence_connect(principal, channel, gateway))

    async def _presence_connect(self, principal: str, channel: str, gateway: int) -> None:
        self.presence_dirty = True
        self._presence_counter += 1
        name = f"{principal}#{self._presence_counter}"
        session = PresenceSession(
            name, principal, self._presence_client(self.m.urls_from(gateway), principal)
        )
        self.presence_sessions.append(session)  # closed at teardown even if the join fails
        await session.client.connect()
        await self._presence_join(session, channel)
        self.m.stats.presence_sessions += 1

    async def _presence_join(self, session: PresenceSession, channel: str) -> None:
        sub = session.client.subscribe(PRESENCE_ROOM, channel, presence=True)
        await sub.start(timeout=CALL_TIMEOUT * 3)
        if not sub.in_presence:
            raise PresenceViolation(f"{session.name}: joined {channel} with presence, not entered")
        session.subs[channel] = sub

    @precondition(lambda self: bool(self.presence_sessions))
    @rule(pick=st.integers(0, 7), channel=st.sampled_from(PRESENCE_CHANNELS))
    def presence_join_or_leave(self, pick: int, channel: str) -> None:
        """A session present in ``channel`` leaves it (``leave_channel``); one that is not,
        joins it with presence."""
        self.m.stats.count("presence_join_or_leave")
        self._do(self._presence_toggle(self._pick_session(pick), channel))

    async def _presence_toggle(self, session: PresenceSession, channel: str) -> None:
        self.presence_dirty = True
        sub = session.subs.pop(channel, None)
        if sub is None:
            await self._presence_join(session, channel)
        else:
            await sub.close()

    @precondition(lambda self: bool(self.presence_sessions))
    @rule(pick=st.integers(0, 7), state=st.sampled_from(STATES))
    def presence_set_state(self, pick: int, state: str) -> None:
        """``set_presence``: the session's state in every channel it is present in."""
        self.m.stats.count("presence_set_state")
        self._do(self._presence_set_state(self._pick_session(pick), state))

    async def _presence_set_state(self, session: PresenceSession, state: str) -> None:
        self.presence_dirty = True
        for attempt in range(SET_PRESENCE_ATTEMPTS):
            try:
                result = await session.client.set_presence(state=state)
            except ArqonBusError as exc:  # e.g. its gateway was killed meanwhile: set again
                if attempt == SET_PRESENCE_ATTEMPTS - 1:
                    raise PresenceViolation(
                        f"{session.name}: set_presence failed {SET_PRESENCE_ATTEMPTS} times: "
                        f"{exc!r}"
                    ) from exc
                continue
            break
        session.state = state
        if result.get("state") != state:
            raise PresenceViolation(f"{session.name}: set_presence({state!r}) gave {result}")

    @precondition(lambda self: bool(self.presence_sessions))
    @rule(pick=st.integers(0, 7), abrupt=st.booleans())
    def presence_disconnect(self, pick: int, abrupt: bool) -> None:
        """The session's connection ends: closed by the client (it leaves for good), or
        reset (``abrupt``: the SDK reconnects and joins again, state kept)."""
        self.m.stats.count("presence_drop" if abrupt else "presence_close")
        self._do(self._presence_disconnect(self._pick_session(pick), abrupt))

    async def _presence_disconnect(self, session: PresenceSession, abrupt: bool) -> None:
        self.presence_dirty = True
        if abrupt:
            conn = session.client._conn
            if conn is not None:
                conn.transport.abort()  # a reset TCP connection
            return
        self.presence_sessions.remove(session)
        await session.client.close()

    @precondition(lambda self: self.presence_dirty and not self.node_down)
    @rule()
    def presence_settles(self) -> None:
        """Every live gateway lists exactly the model's members (after the expiry bound)."""
        self.m.stats.count("presence_settles")
        self._do(self._presence_settle())

    # -- the check

    async def _presence_settle(self) -> None:
        """Poll every gateway's ``presence`` (all pages) and ``occupancy`` of every presence
        channel until all agree with the model; fail past the deadline."""
        self.presence_dirty = False
        killed_at = self.m.last_gateway_kill
        now = time.monotonic()
        settles_at = max(killed_at + EXPIRY_BOUND_S, self.m.last_node_kill + STORE_OUTAGE_S)
        deadline = max(settles_at - now, 0.0) + SLACK_S
        last: list[str] = ["not read yet"]
        ghosts: list[bool] = [False]

        async def agreed() -> bool:
            problems = await self._presence_problems(ghosts)
            last[0] = "; ".join(problems)
            return not problems

        try:
            await eventually(agreed, deadline, "presence lists the model's members")
        except AssertionError:
            now = time.monotonic()
            since = (
                f"{now - killed_at:.1f} s after the last gateway kill, "
                f"{now - self.m.last_node_kill:.1f} s after the last node kill"
            )
            raise PresenceViolation(
                f"presence disagrees with the model {since} (bounds {EXPIRY_BOUND_S:g} s after "
                f"a gateway kill, {STORE_OUTAGE_S:g} s after a node kill, + slack "
                f"{SLACK_S:g} s): {last[0]}"
            ) from None
        self._note_settled(killed_at, ghosts[0])

    def _note_settled(self, killed_at: float, ghost_seen: bool) -> None:
        stats = self.m.stats
        stats.presence_checks += 1
        stats.presence_ghosts_seen += ghost_seen
        if killed_at > self._kill_checked:
            self._kill_checked = killed_at
            took = time.monotonic() - killed_at
            stats.presence_settled_after_kill_max_s = max(
                stats.presence_settled_after_kill_max_s, round(took, 2)
            )
        for channel in PRESENCE_CHANNELS:
            for member in expected_members(self.presence_sessions, channel, self._where()).values():
                stats.presence_members_checked += 1
                if len({gw for gw, _ in member.connections}) > 1:
                    stats.presence_multi_gateway_members += 1

    def _where(self) -> dict[str, str]:
        return {s.name: gateway_of(s.client.url) for s in self.presence_sessions}

    async def _presence_problems(self, ghosts: list[bool]) -> list[str]:
        where = self._where()
        ended = [
            f"{s.name}'s presence in {channel} ended: {sub._error!r}"
            for s in self.presence_sessions
            for channel, sub in s.subs.items()
            if sub.closed
        ]
        if ended:
            raise PresenceViolation("; ".join(ended))  # nothing the model does ends one
        if any(not s.client.connected for s in self.presence_sessions):
            return ["a session is reconnecting"]
        checkers = [await self._checker(g) for g in range(len(self.m.gateways))]
        reads = [(g, channel) for g in range(len(checkers)) for channel in PRESENCE_CHANNELS]
        views = await asyncio.gather(*(self._read_view(checkers[g], c) for g, c in reads))
        problems = []
        for (gateway, channel), (members, occupancy) in zip(reads, views, strict=True):
            expected = expected_members(self.presence_sessions, channel, where)
            ghosts[0] = ghosts[0] or has_ghost(expected, members)
            mismatch = listing_mismatch(expected, members, occupancy)
            if mismatch:
                problems.append(f"{gateway_of(self.m.urls[gateway])} {channel}: {mismatch}")
        return problems

    async def _checker(self, gateway: int) -> Client:
        """A client that asks gateway ``gateway`` only (connected once, then reconnects)."""
        client = self._checkers.get(gateway)
        if client is None:
            client = self._presence_client([self.m.urls[gateway]], "checker")
            await client.connect()
            self._checkers[gateway] = client
        return client

    @staticmethod
    async def _read_view(client: Client, channel: str) -> tuple[list[Member], Occupancy]:
        members = await client.presence(PRESENCE_ROOM, channel, page_size=PAGE_SIZE)
        return members, await client.occupancy(PRESENCE_ROOM, channel)

    def _presence_clients(self) -> list[Client]:
        return [s.client for s in self.presence_sessions] + list(self._checkers.values())

    def _describe_presence(self) -> dict[str, Any]:
        where = self._where()
        return {
            s.name: {"channels": sorted(s.subs), "state": s.state, "gateway": where[s.name]}
            for s in self.presence_sessions
        }
