"""This gateway's presence: its sessions' entries, its mirrors of channels, its lease.

The rules live in :mod:`shared.presence`; this shell moves them to and from the
:class:`mesh.ports.PresenceStore` (guarantees stated there).

* **Entries.** Each local session present in a channel has one entry in the store (its state
  and metadata). ``set_presence`` and idle changes re-put every entry of the session.
* **Mirrors.** For each channel with local watchers (``enter`` with a sink), or queried in
  the last ``mirror_linger_s``, one :class:`shared.presence.ChannelView` fed by
  ``store.watch``. Pages and occupancy are read from it (O(1) occupancy, O(log n + limit)
  pages). A first query waits for the watch's snapshot (at most ``call_timeout_s``). If a
  watch fails it is re-established with a fresh snapshot, and watchers get an overflow frame
  (re-read the list).
* **Frames.** Member changes of a channel are coalesced for ``batch_ms`` (last change of each
  principal wins; more than ``max_changes``: the overflow form), encoded once, and the same
  bytes go to every local sink of the channel.
* **Leases.** Every ``lease_interval_s`` the gateway renews its lease and reads every lease.
  A gateway whose lease position has not changed for ``lease_timeout_s`` of this gateway's
  monotonic time (also one seen only in entries, without a lease) is dead: its entries are
  hidden in every mirror at once and ``remove_gateway`` removes them from the store (any
  gateway may do it; doing it twice is harmless). A gateway that could not read the leases
  for a while starts its observations afresh, so an outage of the store kills no one.
* **Self-repair.** If this gateway's lease was removed or renewed by another since its own
  last renewal (each renewal is conditional on it, decided by the store's leader: the lease
  read may come from a replica that lags), or two successful renewals are
  ``lease_timeout_s / 2`` or more apart (others may have reaped it), it re-puts every local
  entry each round for ``lease_timeout_s + call_timeout_s`` (past any reap in flight).
* **Idle.** A session silent for ``idle_s`` (0: never) is shown ``idle`` until its next frame
  (``activity``: O(1)); the sweep runs each round, O(local sessions).

Expiry bound for a killed (SIGKILL) gateway: its last renewal is seen by the others within
one interval, declared dead ``lease_timeout_s`` later, checked once per interval: members are
hidden (and ``leave`` frames sent one ``batch_ms`` later) within ``lease_timeout_s +
2 * lease_interval_s`` (12 s with the defaults), and removed from the store by one
``remove_gateway`` call after that (bounded by ``call_timeout_s``): under 15 s in total.

Every store call has a timeout (``call_timeout_s``) and every failure of a background round
is logged and retried next round. Memory: per local session and channel one small record
(~150 bytes); per mirrored member see :class:`shared.presence.ChannelView` (~0.5 KB).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import orjson

from arqonbus_server.mesh.ports import (
    BrokerUnavailable,
    PresenceChange,
    PresenceEntry,
    PresenceStore,
    PresenceWatch,
    RevisionMismatch,
)
from arqonbus_server.shared.envelope import encode_presence
from arqonbus_server.shared.presence import (
    EMPTY_METADATA,
    IDLE,
    ONLINE,
    ChannelView,
    Coalescer,
    Liveness,
    MemberChange,
    Presence,
    PresenceQuery,
    overflow_payload,
)
from arqonbus_server.shared.subjects import ChannelRef

log = logging.getLogger("arqonbus.gateway.presence")
T = TypeVar("T")
Sink = Callable[[bytes], None]
RETRY_MAX_S = 5.0  # a failed watch is re-established after at most this long
UNREMOVED_MAX = 100_000  # removals kept for retry at most (beyond: left to a restart's cleanup)
REPUT_CONCURRENCY = 64  # entries put at once when a whole gateway re-puts
START_GRACE_S = 30.0  # a store not answering at start is logged at INFO this long, then WARNING


@dataclass(frozen=True)
class PresenceSettings:
    """Presence tuning (the ARQONBUS_PRESENCE_* settings)."""

    batch_ms: int = 100  # frames: one per channel and watcher per window
    max_changes: int = 100  # more principals changed in a window: the overflow form
    idle_s: float = 300  # silent sessions shown idle after this; 0: never
    lease_interval_s: float = 2.0  # renew and look at the others' leases this often
    lease_timeout_s: float = 8.0  # a lease not renewed this long: the gateway is dead
    mirror_linger_s: float = 60.0  # keep an unwatched channel's mirror this long after a query
    call_timeout_s: float = 5.0  # every store call


@dataclass(slots=True)
class _Session:
    principal: str
    state: str = ONLINE  # as the client set it
    metadata: bytes = EMPTY_METADATA
    auto_idle: bool = False  # silent for idle_s
    last_active: float = 0.0
    channels: dict[ChannelRef, float] = field(default_factory=dict)  # -> joined_at

    @property
    def shown(self) -> str:
        return IDLE if self.auto_idle or self.state == IDLE else ONLINE


class _Mirror:
    def __init__(self, ref: ChannelRef, max_changes: int, used_at: float) -> None:
        self.ref = ref
        self.view = ChannelView()
        self.coalescer = Coalescer(max_changes)
        self.sinks: dict[str, Sink] = {}
        self.ready = asyncio.Event()
        self.used_at = used_at
        self.task: asyncio.Task[None] | None = None
        self.flush: asyncio.TimerHandle | None = None


def _pure(entry: PresenceEntry) -> Presence:
    return Presence(
        entry.principal,
        entry.session,
        entry.gateway,
        entry.joined_at,
        entry.state,
        entry.metadata,
        entry.updated_at,
    )


class PresenceService:
    """Presence for one gateway (see the module docstring). Not thread-safe: one loop."""

    def __init__(
        self,
        store: PresenceStore,
        gateway: str,
        settings: PresenceSettings,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.gateway = gateway
        self._settings = settings
        self._clock = clock
        self._mono = monotonic
        self._sessions: dict[str, _Session] = {}
        self._mirrors: dict[ChannelRef, _Mirror] = {}
        self._liveness = Liveness(
            gateway, settings.lease_timeout_s, gap_s=2 * settings.lease_interval_s
        )
        self._dead: frozenset[str] = frozenset()
        self._reaping: dict[str, float] = {}  # gw -> when remove_gateway was last asked
        self._renewed_at: float | None = None
        self._renewed_position: int | None = None  # what leases() should show for us
        self._repair_until = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._started_clean = False
        self._start_tried_at: float | None = None  # the first clean-start attempt
        self._stopping = False
        # Removals the store did not take (ref, principal, session): retried every round,
        # through one bound on removals in flight (a mass disconnect must not queue
        # thousands of KV deletes at once), never two attempts at one entry.
        self._unremoved: set[tuple[ChannelRef, str, str]] = set()
        self._removing: set[tuple[ChannelRef, str, str]] = set()
        self._removal_limit = asyncio.Semaphore(REPUT_CONCURRENCY)
        self._removal_failures = 0  # since the last round's warning
        self._removal_error = ""
        # Entries the store did not take at enter (ref, session): put every round until stored.
        self._unstored: set[tuple[ChannelRef, str]] = set()
        self._closed = False

    # -- life cycle --

    async def start(self) -> None:
        """Start the lease / reaper / idle loop, after a first clean start if the store
        answers within the call timeout (else the loop's rounds retry it). Never raises:
        a gateway serves without presence rather than not at all."""
        if self._loop_task is None:
            self._stopping = False
            try:
                await self._clean_start()
            except Exception as exc:
                self._log_not_started(exc)
            self._loop_task = asyncio.create_task(self._run(), name="presence")

    def _log_not_started(self, exc: Exception) -> None:
        """A store that is still forming when the gateway starts (a cluster starting with
        it, JetStream electing its leaders) is normal for START_GRACE_S: logged at INFO;
        after that, each failed round is a WARNING."""
        now = self._mono()
        if self._start_tried_at is None:
            self._start_tried_at = now
        waited = now - self._start_tried_at
        level = logging.INFO if waited < START_GRACE_S else logging.WARNING
        log.log(
            level, "presence not started yet after %.0f s (the next round retries): %s", waited, exc
        )

    async def _clean_start(self) -> None:
        """Remove what an earlier process of this node id left (a gateway SIGKILLed and
        restarted under the same id renews the same lease, so nobody else would reap its
        old sessions), then take the lease."""
        if not self._started_clean:
            removed = await self._call(self._store.remove_gateway(self.gateway))
            if removed:
                log.info("presence: removed %d entries of this node's previous run", removed)
            self._started_clean = True
        self._renewed_position = await self._call(self._store.renew_lease(self.gateway))
        self._renewed_at = self._mono()

    async def close(self) -> None:
        """Stop, then remove this gateway's entries and lease (a drain; best effort)."""
        self._closed = True
        await self.stop()
        try:
            await self._call(self._store.remove_gateway(self.gateway))
        except Exception as exc:  # they expire with the lease anyway
            log.warning("presence entries not removed on close (they expire): %s", exc)

    async def stop(self) -> None:
        """Stop every loop and watch without touching the store (what a kill leaves)."""
        # The loops also look at this flag: a cancellation that a store call's timeout
        # turned into an error they handle must not keep them going.
        self._stopping = True
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        tasks += [m.task for m in self._mirrors.values() if m.task is not None]
        for mirror in self._mirrors.values():
            if mirror.flush is not None:
                mirror.flush.cancel()
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=self._settings.call_timeout_s)
            for task in stuck:
                log.warning("presence task %s did not stop in time", task.get_name())
        self._mirrors.clear()
        self._loop_task = None

    # -- sessions --

    async def enter(self, ref: ChannelRef, session: str, principal: str, sink: Sink | None) -> None:
        """Put the session's entry in ``ref`` (its current state and metadata); ``sink``
        receives ``ref``'s presence frames from now on (None: none).

        The session is present from now on: if the store does not take the entry (a NATS
        node lost, a leader election), every lease round puts it again until it lands, so it
        appears once the store answers."""
        record = self._session(session, principal)
        new = ref not in record.channels
        record.channels.setdefault(ref, self._clock())
        self._unremoved.discard((ref, principal, session))  # a failed leave, then a rejoin
        if sink is not None:
            self._mirror(ref).sinks[session] = sink
        try:
            await self._put(ref, session, record)
        except BrokerUnavailable as exc:
            log.warning("presence entry of %s in %s not stored yet: %s", session, ref, exc)
            self._unstored.add((ref, session))  # every lease round tries it until it lands
        except BaseException:
            if new:  # not present: nothing must put it later
                record.channels.pop(ref, None)
                self._unwatch(ref, session)
            raise

    def watch(self, ref: ChannelRef, session: str, sink: Sink) -> None:
        """``sink`` receives ``ref``'s presence frames from now on, without entering presence
        (join_channel with presence_events only). :meth:`leave` or :meth:`forget` ends it."""
        self._mirror(ref).sinks[session] = sink

    async def leave(self, ref: ChannelRef, session: str) -> None:
        """Remove the session's entry in ``ref`` and its sink. If the store does not take
        the removal, every lease round tries it again until it does (a live gateway's stale
        entry would otherwise never expire)."""
        self._unwatch(ref, session)
        record = self._sessions.get(session)
        if record is None or record.channels.pop(ref, None) is None:
            return
        await self._remove((ref, record.principal, session))

    async def _remove(self, entry: tuple[ChannelRef, str, str]) -> bool:
        """Remove one of this gateway's entries; on failure keep it for the next round
        (each round logs one warning for the removals that failed since the last)."""
        if entry in self._removing:  # another attempt is on it
            return False
        ref, principal, session = entry
        self._removing.add(entry)
        try:
            async with self._removal_limit:
                await self._call(self._store.remove(ref, principal, self.gateway, session))
        except Exception as exc:
            if len(self._unremoved) < UNREMOVED_MAX:
                self._unremoved.add(entry)
            self._removal_failures += 1
            self._removal_error = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            self._removing.discard(entry)
        self._unremoved.discard(entry)
        return True

    async def _store_unstored(self) -> None:
        """Put again the entries the store refused at enter (while their session is still
        in the channel), until each lands."""
        if not self._unstored:
            return
        limit = asyncio.Semaphore(REPUT_CONCURRENCY)
        failed: list[str] = []

        async def one(ref: ChannelRef, session: str) -> None:
            record = self._sessions.get(session)
            if record is None or ref not in record.channels:
                self._unstored.discard((ref, session))  # left meanwhile: nothing to store
                return
            async with limit:
                try:
                    await self._put(ref, session, record)
                except Exception as exc:
                    failed.append(f"{type(exc).__name__}: {exc}")
                    return
            self._unstored.discard((ref, session))

        await asyncio.gather(*(one(ref, session) for ref, session in list(self._unstored)))
        if failed:
            log.warning(
                "presence: %d entries not stored yet (retried every round): %s",
                len(failed),
                failed[-1],
            )

    async def _remove_unremoved(self) -> None:
        """Retry the removals the store did not take (not those in flight)."""
        if self._removal_failures:
            log.warning(
                "presence: %d entry removals failed since the last round, %d pending "
                "(retried every round): %s",
                self._removal_failures,
                len(self._unremoved),
                self._removal_error,
            )
            self._removal_failures = 0
        await self._remove_all(list(self._unremoved - self._removing))

    async def _remove_all(self, entries: list[tuple[ChannelRef, str, str]]) -> None:
        await asyncio.gather(*(self._remove(entry) for entry in entries))

    def forget(self, session: str) -> None:
        """The connection ended: drop it and remove its entries in the background. Call it
        for every ended connection that used enter, watch or set_presence (else its record
        stays: about 150 bytes and one slot per channel)."""
        record = self._sessions.pop(session, None)
        for mirror in self._mirrors.values():
            mirror.sinks.pop(session, None)
        if record is not None and record.channels:
            # Queued first: whatever happens to this attempt (a timeout, a cancellation),
            # the lease rounds retry each removal until the store takes it.
            entries = [(ref, record.principal, session) for ref in record.channels]
            self._unremoved.update(entries)
            self._spawn(self._remove_all(entries))  # this session's entries only

    async def set_presence(
        self, session: str, principal: str, state: str | None, metadata: bytes | None
    ) -> dict[str, Any]:
        """Set the session's state and/or metadata in every channel it is present in (and
        later joins); the set_presence result. Raises BrokerUnavailable."""
        record = self._session(session, principal)
        if state is not None:
            record.state = state
        if metadata is not None:
            record.metadata = metadata
        self.activity(session)
        await self._put_all(session, record, strict=True)
        return {
            "state": record.state,
            "metadata": orjson.loads(record.metadata),
            "channels": len(record.channels),
        }

    def activity(self, session: str) -> None:
        """A frame came from the session (O(1)): it is not idle any more."""
        record = self._sessions.get(session)
        if record is None:
            return
        record.last_active = self._mono()
        if record.auto_idle:
            record.auto_idle = False
            if record.state == ONLINE:
                self._spawn(self._put_all(session, record))

    # -- reading --

    async def page(self, ref: ChannelRef, query: PresenceQuery) -> dict[str, Any]:
        """The presence result: a page of members, the cursor, position and occupancy."""
        view = await self._ready_view(ref)
        members, cursor = view.page(query.limit, query.after, query.state)
        return {
            "members": members,
            "next_cursor": cursor,
            "position": view.position,
            "occupancy": view.occupancy(),
        }

    async def occupancy(self, ref: ChannelRef) -> dict[str, int]:
        """The occupancy result (members, connections, online, idle, position)."""
        view = await self._ready_view(ref)
        return {**view.occupancy(), "position": view.position}

    async def remove_room(self, tenant: str, room: str) -> int:
        """Remove every entry of the room (every gateway's) and forget this gateway's
        sessions in it; how many entries the store removed. Raises BrokerUnavailable."""
        for record in self._sessions.values():
            for ref in [r for r in record.channels if (r.tenant, r.room) == (tenant, room)]:
                del record.channels[ref]
        for ref, mirror in self._mirrors.items():
            if (ref.tenant, ref.room) == (tenant, room):
                mirror.sinks.clear()
        return await self._call(self._store.remove_room(tenant, room))

    # -- store calls --

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._settings.call_timeout_s):
                return await call
        except TimeoutError:
            raise BrokerUnavailable(
                f"the presence store did not answer within {self._settings.call_timeout_s:g} s; "
                "retry"
            ) from None

    def _entry(self, ref: ChannelRef, session: str, record: _Session) -> PresenceEntry:
        joined_at = record.channels.get(ref, self._clock())
        return PresenceEntry(
            principal=record.principal,
            session=session,
            gateway=self.gateway,
            joined_at=joined_at,
            state=record.shown,
            metadata=record.metadata,
            updated_at=self._clock(),
        )

    async def _put(self, ref: ChannelRef, session: str, record: _Session) -> None:
        try:
            await self._call(self._store.put(ref, self._entry(ref, session, record)))
        finally:
            if self._sessions.get(session) is not record or ref not in record.channels:
                # The session left while the put was in flight (a re-put racing a leave or
                # a closed connection): the put may land after the removal, so remove again.
                self._unremoved.add((ref, record.principal, session))

    async def _put_all(self, session: str, record: _Session, strict: bool = False) -> None:
        if strict:
            await asyncio.gather(*(self._put(ref, session, record) for ref in record.channels))
        else:
            puts = [partial(self._put, ref, session, record) for ref in record.channels]
            await self._gather(puts, f"entries of session {session}")

    async def _gather(self, calls: Sequence[Callable[[], Awaitable[Any]]], what: str) -> None:
        """Run ``calls`` (at most REPUT_CONCURRENCY at once, each with the timeout); log
        failures (the next round or the lease expiry repairs them). A call is made only when
        it runs, so a cancelled gather leaves no coroutine un-awaited."""
        limit = asyncio.Semaphore(REPUT_CONCURRENCY)

        async def one(call: Callable[[], Awaitable[Any]]) -> None:
            async with limit:
                await self._call(call())

        results = await asyncio.gather(*(one(c) for c in calls), return_exceptions=True)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            log.warning(
                "presence: %d of %d %s failed: %s", len(failed), len(calls), what, failed[0]
            )

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _session(self, session: str, principal: str) -> _Session:
        record = self._sessions.get(session)
        if record is None:
            record = self._sessions[session] = _Session(principal, last_active=self._mono())
        return record

    def _unwatch(self, ref: ChannelRef, session: str) -> None:
        mirror = self._mirrors.get(ref)
        if mirror is not None and mirror.sinks.pop(session, None) is not None:
            mirror.used_at = self._mono()

    # -- mirrors --

    def _mirror(self, ref: ChannelRef) -> _Mirror:
        mirror = self._mirrors.get(ref)
        if mirror is None:
            mirror = self._mirrors[ref] = _Mirror(ref, self._settings.max_changes, self._mono())
            mirror.task = asyncio.create_task(self._follow(mirror), name=f"presence {ref}")
        mirror.used_at = self._mono()
        return mirror

    async def following(self, ref: ChannelRef) -> None:
        """Return once this gateway's view of ``ref`` holds the store's snapshot: a sink
        added before gets every change after this point. Raises BrokerUnavailable."""
        await self._ready_view(ref)

    async def _ready_view(self, ref: ChannelRef) -> ChannelView:
        mirror = self._mirror(ref)
        if not mirror.ready.is_set():
            await self._call(mirror.ready.wait())
        return mirror.view

    async def _follow(self, mirror: _Mirror) -> None:
        """Keep the mirror's view up to date; re-establish the watch when it fails."""
        delay = 0.1
        while not (self._closed or self._stopping):
            watch: PresenceWatch | None = None
            try:
                watch = await self._call(self._store.watch(mirror.ref))
                await self._consume(mirror, watch)
                delay = 0.1
            except Exception as exc:
                log.warning(
                    "presence watch of %s failed, again in %.1f s: %s", mirror.ref, delay, exc
                )
            finally:
                if watch is not None:
                    await watch.stop()
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)

    async def _consume(self, mirror: _Mirror, watch: PresenceWatch) -> None:
        restarted = mirror.ready.is_set()
        mirror.ready.clear()
        mirror.view = ChannelView()
        mirror.view.set_dead(self._dead)
        async for change in watch:
            if change is None:
                mirror.ready.set()
                if restarted:
                    occupancy = mirror.view.occupancy()
                    payload = overflow_payload(mirror.view.position, occupancy)
                    self._send(
                        mirror, encode_presence(mirror.ref.room, mirror.ref.channel, payload)
                    )
                continue
            if change.entry is None and change.gateway == self.gateway:
                self._restore(mirror.ref, change.session)
            member_change = self._apply(mirror.view, change)
            if member_change is not None and mirror.ready.is_set():
                self._queue(mirror, member_change)

    def _restore(self, ref: ChannelRef, session: str) -> None:
        """Our entry was removed by another (a reap): put it again if the session is still
        in the channel (leave, forget and remove_room forget it before removing)."""
        record = self._sessions.get(session)
        if record is not None and ref in record.channels:
            put = partial(self._put, ref, session, record)
            self._spawn(self._gather([put], f"restore of session {session}"))

    @staticmethod
    def _apply(view: ChannelView, change: PresenceChange) -> MemberChange | None:
        entry = None if change.entry is None else _pure(change.entry)
        return view.apply(change.position, change.principal, change.gateway, change.session, entry)

    def _queue(self, mirror: _Mirror, change: MemberChange) -> None:
        if not mirror.sinks:
            return
        mirror.coalescer.add(change)
        if mirror.flush is None:
            delay = self._settings.batch_ms / 1000
            mirror.flush = asyncio.get_running_loop().call_later(delay, self._flush, mirror)

    def _flush(self, mirror: _Mirror) -> None:
        mirror.flush = None
        occupancy = mirror.view.occupancy()
        payload = mirror.coalescer.payload(occupancy)
        if payload is not None:
            self._send(mirror, encode_presence(mirror.ref.room, mirror.ref.channel, payload))

    def _send(self, mirror: _Mirror, data: bytes) -> None:
        for session, sink in list(mirror.sinks.items()):
            try:
                sink(data)
            except Exception:
                log.exception("presence frame not delivered to session %s", session)

    # -- the lease round --

    async def _run(self) -> None:
        interval = self._settings.lease_interval_s
        while not self._stopping:
            started = self._mono()
            try:
                await self._round()
            except Exception:  # a bug: log it, keep the gateway's presence alive
                log.exception("presence round failed")
            await asyncio.sleep(max(0.0, interval - (self._mono() - started)))

    async def _round(self) -> None:
        if not self._started_clean:
            try:
                await self._clean_start()
            except Exception as exc:
                self._log_not_started(exc)
                return
        await self._read_leases()
        await self._renew()
        self._sweep_idle()
        self._drop_unused_mirrors()
        await self._remove_unremoved()
        await self._store_unstored()
        if self._mono() < self._repair_until:
            await self._reput_everything()

    async def _renew(self) -> None:
        started = self._mono()
        try:
            try:
                after = self._renewed_position
                position = await self._call(self._store.renew_lease(self.gateway, after))
            except RevisionMismatch:  # decided by the store's leader, never by a stale copy
                self._repair(
                    "its lease was removed or renewed by another since this gateway's last "
                    "renewal, or a renewal's answer was lost"
                )
                position = await self._call(self._store.renew_lease(self.gateway))
        except Exception as exc:
            if self._renewed_at is None:  # the first lease is part of the start
                self._log_not_started(exc)
            else:
                log.warning("presence lease not renewed (retrying next round): %s", exc)
            return
        self._renewed_position = position
        previous, self._renewed_at = self._renewed_at, started
        if previous is not None and self._mono() - previous >= self._settings.lease_timeout_s / 2:
            self._repair("renewals were late")

    def _repair(self, why: str) -> None:
        log.warning("presence: re-putting this gateway's entries (%s)", why)
        settings = self._settings
        self._repair_until = self._mono() + settings.lease_timeout_s + settings.call_timeout_s

    async def _read_leases(self) -> None:
        try:
            leases = await self._call(self._store.leases())
        except Exception as exc:
            log.warning("presence leases not read (retrying next round): %s", exc)
            return
        in_entries: set[str] = set()
        for mirror in self._mirrors.values():
            in_entries |= mirror.view.gateways()
        now = self._mono()
        self._declare_dead(self._liveness.observe(leases, in_entries, now), now)

    def _declare_dead(self, dead: frozenset[str], now: float) -> None:
        if dead != self._dead:
            if dead - self._dead:
                log.warning(
                    "presence: gateways %s stopped renewing; removing their entries",
                    sorted(dead - self._dead),
                )
            self._dead = dead
            for mirror in self._mirrors.values():
                for change in mirror.view.set_dead(dead):
                    if mirror.ready.is_set():
                        self._queue(mirror, change)
        for gateway in [g for g in self._reaping if g not in dead]:
            del self._reaping[gateway]
        for gateway in dead:  # again each timeout while it lingers (a removal failed)
            asked = self._reaping.get(gateway)
            if asked is None or now - asked >= self._settings.lease_timeout_s:
                self._reaping[gateway] = now
                self._spawn(self._reap(gateway))

    async def _reap(self, gateway: str) -> None:
        try:
            removed = await self._call(self._store.remove_gateway(gateway))
        except Exception as exc:
            log.warning(
                "presence entries of dead gateway %s not removed (retrying): %s", gateway, exc
            )
            self._reaping.pop(gateway, None)
            return
        log.info("presence: removed %d entries of dead gateway %s", removed, gateway)

    def _sweep_idle(self) -> None:
        idle_s = self._settings.idle_s
        if idle_s <= 0:
            return
        now = self._mono()
        for session, record in self._sessions.items():
            if not record.auto_idle and now - record.last_active >= idle_s:
                record.auto_idle = True
                if record.state == ONLINE and record.channels:
                    self._spawn(self._put_all(session, record))

    def _drop_unused_mirrors(self) -> None:
        now = self._mono()
        linger = self._settings.mirror_linger_s
        for ref, mirror in list(self._mirrors.items()):
            if not mirror.sinks and now - mirror.used_at >= linger:
                del self._mirrors[ref]
                if mirror.task is not None:
                    mirror.task.cancel()
                    self._tasks.add(mirror.task)  # awaited by stop() if still running
                    mirror.task.add_done_callback(self._tasks.discard)
                if mirror.flush is not None:
                    mirror.flush.cancel()

    async def _reput_everything(self) -> None:
        puts = [
            partial(self._put, ref, session, record)
            for session, record in self._sessions.items()
            for ref in record.channels
        ]
        await self._gather(puts, "re-puts of this gateway's entries")
