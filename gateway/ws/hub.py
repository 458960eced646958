"""Node-local fan-out: one NATS subscription per channel, many sockets.

Each (socket, channel) pair is a :class:`Member` with a ``cursor``: the last
seq it was sent. A live event is sent to a member only when it continues the
member's sequence (``prev_seq <= cursor``); otherwise the member replays the
hole from the store first. So every member sees each stored event once, in
order, whatever core NATS drops, and whenever it joined.

A channel's live events that arrive in one event-loop turn are written at the turn's
end, with the sockets' other frames: a member that is live at the first one's
``prev_seq`` gets them all in one write, decided once per member rather than once per
event (11-18 % less of the gateway's CPU per delivery under a saturated fan-out in
interleaved runs, docs/performance.md); any other member takes them one by one with the
checks above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from arqonbus_server.gateway.http.metrics import NO_METRICS, NoMetrics
from arqonbus_server.gateway.tracing import Tracing, now_ns
from arqonbus_server.gateway.ws.transport import Socket, encode_text_frame
from arqonbus_server.mesh.broker import (
    Broker,
    BrokerUnavailable,
    ChannelWindow,
    LiveEvent,
    LiveSubscription,
)
from arqonbus_server.shared.core.resume import EpochLoss, resume_point
from arqonbus_server.shared.envelope import (
    DELIVERY_BATCH_BYTES,
    delivery_batches,
    encode_gap,
    encode_run,
    with_seq,
    with_seq_epoch,
)
from arqonbus_server.shared.errors import CloseCode
from arqonbus_server.shared.regions import Placement
from arqonbus_server.shared.subjects import ChannelRef

log = logging.getLogger("arqonbus.gateway.hub")

_MAX_CATCHUP_ROUNDS = 50
# Catch-ups started by one placement change (a failover moves every member of the tenant on
# this node): at most this many read the store at once; the others wait their turn.
EPOCH_CATCHUP_CONCURRENCY = 16


@dataclass(eq=False, slots=True)
class Member:
    socket: Socket
    ref: ChannelRef
    cursor: int = 0
    syncing: bool = True
    overflowed: bool = False
    pending: deque[LiveEvent] = field(default_factory=deque)
    pending_bytes: int = 0
    gap_reported: bool = False
    task: asyncio.Task[None] | None = None
    replayed: int = 0  # events sent by the replay in progress (for its span)
    epoch: int | None = None  # a placed tenant's epoch its cursor belongs to
    batch: bool = False  # takes runs of events in ``events`` messages (join_channel ``batch``)


@dataclass(slots=True)
class _Channel:
    members: dict[int, Member] = field(default_factory=dict)
    subscription: LiveSubscription | None = None
    subscribing: asyncio.Event | None = None  # set when the attempt in progress ends
    joining: int = 0
    # Joins share window reads: the next read (not started yet) and the task doing them.
    window_next: asyncio.Future[ChannelWindow] | None = None
    window_task: asyncio.Task[None] | None = None
    # Live events of this event-loop turn not written yet (Hub._flush_bursts), each one
    # continuing the one before it; the sampled ones' keys with when they came.
    burst: list[LiveEvent] = field(default_factory=list)
    burst_samples: list[tuple[str, float]] | None = None
    queued: bool = False  # in Hub._bursts


@dataclass(frozen=True, slots=True)
class JoinResult:
    last_seq: int
    gap: bool
    first_available_seq: int
    epoch: int | None = None  # a placed tenant's current epoch
    loss: EpochLoss | None = None  # old-epoch seqs the failover did not carry over
    after_seq: int = 0  # with ``loss``: where the replay resumes (the fork)

    def as_result(self) -> dict[str, Any]:
        result: dict[str, Any] = {"last_seq": self.last_seq}
        if self.epoch is not None:
            result["epoch"] = self.epoch
        if self.loss is not None:
            result["gap"] = True
            result["after_seq"] = self.after_seq
            result["first_available_seq"] = self.after_seq + 1
            result.update(self.loss.gap_fields())  # and "epoch": the new one, above
        elif self.gap:
            result["gap"] = True
            result["first_available_seq"] = self.first_available_seq
        return result


def _delivered_forms(events: list[LiveEvent]) -> list[bytes]:
    """The delivered forms of live events of a tenant with no placement (no epoch)."""
    return [with_seq(event.body, event.seq) for event in events]


def _batched(ref: ChannelRef, delivered: list[bytes]) -> tuple[bytes, int]:
    """Delivered events as ``events`` messages (docs/protocol.md#batched-delivery): the
    WebSocket frames, joined, and how many there are."""
    runs = delivery_batches(delivered)
    frames = [encode_text_frame(encode_run(ref.room, ref.channel, run)) for run in runs]
    return (frames[0] if len(frames) == 1 else b"".join(frames)), len(frames)


def _retrieve(future: asyncio.Future[ChannelWindow]) -> None:
    """Mark a shared read's outcome as seen: its joins may all have gone by then."""
    if not future.cancelled():
        future.exception()


class Hub:
    def __init__(
        self,
        broker: Broker,
        pending_limit: int,
        pending_bytes_limit: int,
        tracing: Tracing | None = None,
        metrics: NoMetrics = NO_METRICS,
        epoch_catchup_concurrency: int = EPOCH_CATCHUP_CONCURRENCY,
    ) -> None:
        self._broker = broker
        self._epoch_gate = asyncio.Semaphore(epoch_catchup_concurrency)
        self._metrics = metrics  # gateway/http/metrics.py (NO_METRICS: off)
        self._phases = metrics.phases  # sampled phase timings (gateway/http/phases.py)
        self._tracing = tracing  # None: tracing off, no span made (gateway/tracing.py)
        self._pending_limit = pending_limit
        self._pending_bytes_limit = pending_bytes_limit
        self._channels: dict[ChannelRef, _Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()  # subscriptions being closed
        self._bursts: list[_Channel] = []  # channels with live events to write this turn
        self._idle = asyncio.Event()  # no channel and nothing being closed
        self._idle.set()
        # Placed tenants (gateway/state/placement.py); None: one region, no epochs.
        self.placement_for: Callable[[str], Placement | None] | None = None
        broker.on_reconnect(self.resync_all)

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def subscription_count(self) -> int:
        return sum(1 for ch in self._channels.values() if ch.subscription is not None)

    def member_count(self) -> int:
        """(socket, channel) members on this node."""
        return sum(len(ch.members) for ch in self._channels.values())

    def busiest_channels(self, tenant: str, limit: int) -> list[tuple[ChannelRef, int]]:
        """The tenant's channels with the most members on this node (the widest fan-out),
        most first, at most ``limit`` of them (the dashboard's list)."""
        counts = [
            (ref, len(ch.members)) for ref, ch in self._channels.items() if ref.tenant == tenant
        ]
        counts.sort(key=lambda item: (-item[1], item[0].room, item[0].channel))
        return counts[:limit]

    # -- membership -------------------------------------------------------------

    async def join(
        self,
        socket: Socket,
        ref: ChannelRef,
        since_seq: int | None,
        since_epoch: int | None = None,
        batch: bool = False,
    ) -> tuple[Member, JoinResult]:
        """Register a member (buffering live events), then read the channel's window.

        With ``batch`` the member takes runs of events in ``events`` messages: the live
        events written together, and the replay's.

        The caller sends the join reply, then calls :meth:`start` to replay and go live.
        A client in an epoch this gateway has not seen yet (its placement record is on the
        way) is refused retryably (BrokerUnavailable): served now, it would get another
        epoch's history under an older label.
        """
        self._check_epoch_known(ref.tenant, since_epoch)
        self.leave(socket, ref)
        channel = self._channels.setdefault(ref, _Channel())
        self._idle.clear()
        channel.joining += 1  # keeps the channel (and its subscription) while we wait
        try:
            await self._subscribed(ref, channel)
            member = Member(socket, ref, batch=batch)
            channel.members[id(socket)] = member
            window = await self._shared_window(ref, channel)
        except BaseException:
            channel.members.pop(id(socket), None)
            raise
        finally:
            channel.joining -= 1
            self._drop_if_idle(ref, channel)
        point = resume_point(self._placement(ref.tenant), since_epoch, since_seq)
        since_seq, member.epoch = point.since_seq, point.epoch
        member.cursor = window.last_seq if since_seq is None else min(since_seq, window.last_seq)
        # Conservative: if retention removed anything after since_seq, say so, even if
        # the removed events may have belonged to other channels of the tenant.
        gap = since_seq is not None and since_seq + 1 < window.first_stream_seq
        member.gap_reported = gap
        first = window.first_stream_seq if gap else 0
        return member, JoinResult(
            window.last_seq, gap, first, point.epoch, point.loss, member.cursor
        )

    async def _subscribed(self, ref: ChannelRef, channel: _Channel) -> None:
        """Make the channel's live subscription unless it has one; joins that arrive while
        one join makes it wait for that attempt, all woken at once when it ends (a lock
        would hand the channel to them one per event-loop turn: a reconnect storm's
        hundreds of joins of one channel queued behind each other). If the attempt failed,
        the next of them tries again; each join makes at most one attempt of its own."""
        while channel.subscription is None:
            attempt = channel.subscribing
            if attempt is not None:
                await attempt.wait()
                continue
            attempt = channel.subscribing = asyncio.Event()
            try:
                channel.subscription = await self._broker.subscribe_live(ref, self._on_live)
            finally:
                channel.subscribing = None
                attempt.set()

    def _placement(self, tenant: str) -> Placement | None:
        return self.placement_for(tenant) if self.placement_for is not None else None

    def current_epoch(self, tenant: str) -> int | None:
        """A placed tenant's epoch as this gateway knows it now; None when not placed."""
        placement = self._placement(tenant)
        return None if placement is None else placement.epoch

    def _check_epoch_known(self, tenant: str, since_epoch: int | None) -> None:
        placement = self._placement(tenant)
        if placement is not None and since_epoch is not None and since_epoch > placement.epoch:
            raise BrokerUnavailable(
                f"this gateway has not seen epoch {since_epoch} of tenant {tenant} yet: join again"
            )

    def _delivered(self, member: Member, body: bytes, seq: int) -> bytes:
        """The frame of a stored event: with ``epoch`` for a placed tenant's member."""
        if member.epoch is None:
            return with_seq(body, seq)
        return with_seq_epoch(body, seq, member.epoch)

    def placement_changed(self, tenant: str) -> None:
        """A tenant's placement changed: its members here move to the new epoch and catch up.

        A member that was sent old-epoch seqs past the fork is told they were not carried
        over (a gap with ``reason: "epoch"``) and resumes from the fork. Every moved member
        then re-reads the channel from the store at once, not at the channel's next event:
        live events of an epoch the gateway did not know yet were not delivered (see
        :meth:`_on_live`). At most ``epoch_catchup_concurrency`` of these catch-ups read the
        store at a time, and the members of one channel share its window reads.
        """
        placement = self._placement(tenant)
        for ref, channel in list(self._channels.items()):
            if ref.tenant != tenant:
                continue
            for member in list(channel.members.values()):
                if self._move_epoch(member, placement):
                    self._restart_catch_up(member)

    def _move_epoch(self, member: Member, placement: Placement | None) -> bool:
        """Move the member to the placement's epoch; True if it changed."""
        epoch = None if placement is None else placement.epoch
        if member.epoch == epoch or (
            member.epoch is not None and epoch is not None and member.epoch > epoch
        ):
            return False  # the same epoch, or an older record: nothing to move back to
        if placement is not None and member.epoch is not None:
            point = resume_point(placement, member.epoch, member.cursor)
            if point.loss is not None and point.since_seq is not None:
                self._send_epoch_gap(member, point.since_seq, point.loss, placement.epoch)
        member.epoch = epoch
        return True

    def _send_epoch_gap(self, member: Member, fork: int, loss: EpochLoss, epoch: int) -> None:
        member.cursor = fork
        ref = member.ref
        fields = {**loss.gap_fields(), "epoch": epoch}
        gap = encode_gap(ref.room, ref.channel, fork, fork + 1, fields)
        member.socket.send(gap)
        self._metrics.frame_sent(gap)

    def _restart_catch_up(self, member: Member) -> None:
        """After an epoch change: drop what the member holds from before it and re-read the
        channel from the store (``overflowed``: the window after the change, then replay)."""
        member.pending.clear()
        member.pending_bytes = 0
        member.overflowed = True
        member.syncing = True
        if member.task is None:
            return  # joined, not started yet: its start() replays and sees ``overflowed``
        member.task.cancel()
        member.task = asyncio.create_task(self._gated_catch_up(member))

    async def _gated_catch_up(self, member: Member) -> None:
        async with self._epoch_gate:
            await self._catch_up(member, member.cursor, check_retention=False)

    async def _shared_window(self, ref: ChannelRef, channel: _Channel) -> ChannelWindow:
        """The channel's window, read once for every join waiting when the read starts.

        A reconnect storm brings thousands of joins of one channel at once; each would cost
        two JetStream requests. Sharing is safe because a read that starts after a member
        registered sees every event the member's live buffer missed.
        """
        if channel.window_next is None:
            channel.window_next = asyncio.get_running_loop().create_future()
            channel.window_next.add_done_callback(_retrieve)
            if channel.window_task is None:
                channel.window_task = asyncio.create_task(self._read_windows(ref, channel))
        return await asyncio.shield(channel.window_next)

    async def _read_windows(self, ref: ChannelRef, channel: _Channel) -> None:
        """Serve window reads one after another while joins keep asking for them."""
        future: asyncio.Future[ChannelWindow] | None = None
        try:
            while channel.window_next is not None:
                future, channel.window_next = channel.window_next, None
                try:
                    future.set_result(await self._broker.window(ref))
                except Exception as exc:
                    future.set_exception(exc)
        finally:
            # Cancelled (the hub closing): nobody may wait forever for a read in flight.
            channel.window_task = None
            for pending in (future, channel.window_next):
                if pending is not None and not pending.done():
                    pending.cancel()
            channel.window_next = None

    def start(self, member: Member, upto: int, check_retention: bool = False) -> None:
        """Replay (cursor, upto] to the member, then flush what arrived live meanwhile.

        With ``check_retention`` the member is first told (a ``gap`` message) if the
        store no longer holds everything after its cursor.
        """
        member.task = asyncio.create_task(self._catch_up(member, upto, check_retention))

    def leave(self, socket: Socket, ref: ChannelRef) -> bool:
        channel = self._channels.get(ref)
        if channel is None:
            return False
        member = channel.members.pop(id(socket), None)
        if member is None:  # never drop a channel the caller was not in
            return False
        if member.task is not None:
            member.task.cancel()
        self._drop_if_idle(ref, channel)
        return True

    def _drop_if_idle(self, ref: ChannelRef, channel: _Channel) -> None:
        if not channel.members and not channel.joining:
            self._drop_channel(ref, channel)

    def leave_all(self, socket: Socket, refs: list[ChannelRef]) -> None:
        for ref in refs:
            self.leave(socket, ref)

    def _drop_channel(self, ref: ChannelRef, channel: _Channel) -> None:
        if self._channels.get(ref) is channel:
            del self._channels[ref]
        if channel.window_task is not None:  # nobody waits for its reads any more
            channel.window_task.cancel()
        if channel.subscription is not None:
            sub, channel.subscription = channel.subscription, None
            task = asyncio.create_task(sub.close())
            self._closing.add(task)
            task.add_done_callback(self._subscription_closed)
        self._note_idle()

    def _subscription_closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        self._note_idle()

    def _note_idle(self) -> None:
        if not self._channels and not self._closing:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no channel is joined and every NATS subscription is closed."""
        await self._idle.wait()

    # -- live path (hot) ------------------------------------------------------------

    def _on_live(self, ref: ChannelRef, event: LiveEvent) -> None:
        channel = self._channels.get(ref)
        if channel is None:
            return
        epoch: int | None = None
        if self.placement_for is not None:  # a gateway with a region (one region: never)
            placement = self.placement_for(ref.tenant)
            if placement is not None:
                epoch = placement.epoch_of(event.seq, event.stream)
                if epoch is None:
                    return  # an epoch not known here yet: read from the store once it is
        if epoch is None and self._tracing is None:
            self._add_to_burst(channel, event)
            return
        received_at = time.monotonic()
        if self._tracing is not None:
            self._on_live_traced(ref, event, channel, self._tracing, epoch)
        else:
            self._fan_out(channel, event, epoch)
        if self._phases is not None and self._phases.open and event.dedupe_key:
            # A sampled event (gateway/http/phases.py), told once its frames are queued.
            self._phases.live(event.dedupe_key, received_at)

    def _on_live_traced(
        self,
        ref: ChannelRef,
        event: LiveEvent,
        channel: _Channel,
        tracing: Tracing,
        epoch: int | None,
    ) -> None:
        span = tracing.start_process(ref, event.seq, event.body, event.headers)
        start = now_ns()
        sent = self._fan_out(channel, event, epoch)
        tracing.record_fanout(span, ref, start, sent)

    def _fan_out(self, channel: _Channel, event: LiveEvent, epoch: int | None = None) -> int:
        """Send a live event to every member it continues; returns how many sockets got it.

        A placed tenant's event of ``epoch`` goes only to members in that epoch: a member
        in another one is moving (placement_changed), and its catch-up reads the store."""
        sent = 0
        frame: bytes | None = None
        for member in channel.members.values():
            if member.epoch != epoch or not self._continues(member, event):
                continue
            if frame is None:  # every member here is in ``epoch``: one frame for all
                frame = encode_text_frame(self._delivered(member, event.body, event.seq))
            # Refused: the socket is closing (4001 or gone), nothing was delivered.
            sent += member.socket.write_frame(frame)
            member.cursor = event.seq
        if sent:
            self._metrics.delivered(sent, event.body)
        return sent

    def _continues(self, member: Member, event: LiveEvent) -> bool:
        """True when ``event`` is the member's next one, to write now. Otherwise it is one
        the member has, or it is held while the member replays: from here when the event
        shows a hole before it (``prev_seq`` past the member's cursor)."""
        if member.syncing:
            self._buffer(member, event)
            return False
        if event.seq <= member.cursor:
            return False
        if event.prev_seq > member.cursor:
            member.syncing = True
            self._buffer(member, event)
            self.start(member, event.prev_seq, check_retention=True)
            return False
        return True

    # A channel's live events that arrive in one event-loop turn (a burst read from NATS)
    # are written together at the turn's end: each member that is live and at the burst's
    # start gets all of them in one write, decided once per member instead of once per
    # event; any other member takes them one by one, as _fan_out decides.

    def _add_to_burst(self, channel: _Channel, event: LiveEvent) -> None:
        burst = channel.burst
        if burst and event.prev_seq != burst[-1].seq:
            self._flush_burst(channel)  # the chain breaks: what came before goes first
        if not channel.queued:
            if not channel.members:
                return  # nobody here to send it to (a member that joins reads the store)
            channel.queued = True
            if not self._bursts:  # written with this turn's other frames, in one callback
                next(iter(channel.members.values())).socket.before_flush(self._flush_bursts)
            self._bursts.append(channel)
        channel.burst.append(event)
        phases = self._phases
        if phases is not None and phases.open and event.dedupe_key:
            if channel.burst_samples is None:
                channel.burst_samples = []
            channel.burst_samples.append((event.dedupe_key, time.monotonic()))

    def _flush_bursts(self) -> None:
        channels, self._bursts = self._bursts, []
        for channel in channels:
            channel.queued = False
            try:
                self._flush_burst(channel)
            except Exception:  # the other channels' bursts still go out
                log.exception("writing live events failed")

    def _flush_burst(self, channel: _Channel) -> None:
        events = channel.burst
        if not events:
            return
        channel.burst = []
        delivered: list[bytes] = []  # each event's delivered form, made on first need
        frames: list[bytes] = []  # each event's frame, made on first need
        joined = b""  # the whole burst as one frame per event
        batched = b""  # the whole burst as events messages, and how many
        batched_count = 0
        start, end = events[0].prev_seq, events[-1].seq
        whole = 0  # members that got the whole burst in one write
        counts = [0] * len(events)  # members that got each event in a write of its own
        for member in channel.members.values():
            if member.cursor == start and not member.syncing and member.epoch is None:
                if member.batch and len(events) > 1:
                    if not batched:
                        delivered = delivered or _delivered_forms(events)
                        batched, batched_count = _batched(member.ref, delivered)
                    whole_write, count = batched, batched_count
                else:
                    if not joined:
                        delivered = delivered or _delivered_forms(events)
                        frames = frames or [encode_text_frame(d) for d in delivered]
                        joined = frames[0] if len(frames) == 1 else b"".join(frames)
                    whole_write, count = joined, len(events)
                socket = member.socket
                if len(events) == 1 or socket.fits(len(whole_write)):
                    # Refused: the socket is closing (4001 or gone), nothing was delivered.
                    whole += socket.write_frame(whole_write, count)
                else:  # near its bound: one event at a time, so the 4001 close comes on time
                    frames = frames or [encode_text_frame(d) for d in delivered]
                    for i, frame in enumerate(frames):
                        if not socket.write_frame(frame):
                            break
                        counts[i] += 1
                member.cursor = end
                continue
            if member.epoch is not None:
                continue  # moving to an epoch: its catch-up reads the store
            for i, event in enumerate(events):
                if self._continues(member, event):
                    delivered = delivered or _delivered_forms(events)
                    frames = frames or [encode_text_frame(d) for d in delivered]
                    counts[i] += member.socket.write_frame(frames[i])
                    member.cursor = event.seq
        for event, count in zip(events, counts, strict=True):
            if whole + count:
                self._metrics.delivered(whole + count, event.body)
        samples, channel.burst_samples = channel.burst_samples, None
        if samples is not None and self._phases is not None:
            for key, received_at in samples:  # after the writes: see PhaseSampler.live
                self._phases.live(key, received_at)

    def _buffer(self, member: Member, event: LiveEvent) -> None:
        """Hold a live event while the member replays; bounded in count and bytes.

        On overflow the buffer is dropped and the member re-reads from the store
        instead: nothing is lost, memory stays bounded.
        """
        size = len(event.body)
        if (
            len(member.pending) >= self._pending_limit
            or member.pending_bytes + size > self._pending_bytes_limit
        ):
            member.pending.clear()
            member.pending_bytes = 0
            member.overflowed = True
        member.pending.append(event)
        member.pending_bytes += size

    # -- catch-up -----------------------------------------------------------------------

    async def _catch_up(self, member: Member, upto: int, check_retention: bool) -> None:
        try:
            if check_retention:
                window = await self._member_window(member)
                self._report_gap(member, upto, window.first_stream_seq)
            await self._replay_then_verify(member, upto)
            for _ in range(_MAX_CATCHUP_ROUNDS):
                if not await self._flush_pending(member):
                    member.syncing = False
                    return
            log.warning("member of %s could not catch up; closing for resume", member.ref)
            member.socket.close_soon(CloseCode.SLOW_CONSUMER, "could not catch up: resume")
        except BrokerUnavailable as exc:
            log.warning("replay for %s failed: %s; closing for resume", member.ref, exc)
            self._metrics.jetstream_error("replay")
            member.socket.close_soon(CloseCode.BACKEND_UNAVAILABLE, "store unavailable: resume")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("catch-up for %s failed", member.ref)
            member.socket.close_soon(CloseCode.BACKEND_UNAVAILABLE, "internal error: resume")

    async def _replay(self, member: Member, upto: int) -> None:
        if upto <= member.cursor:
            return
        start = now_ns()
        member.replayed = 0
        try:
            await self._replay_range(member, upto)
        finally:
            if self._tracing is not None:
                self._tracing.record_replay("replay", member.ref, start, member.replayed)
            self._metrics.replayed("catch_up", member.replayed, (now_ns() - start) / 1e9)
            member.replayed = 0

    async def _replay_range(self, member: Member, upto: int) -> None:
        # Closed here, not left to the generator's finalizer: a replay through a pull
        # consumer holds one of the gateway's few slots and a consumer until it is closed.
        replay = self._broker.replay(member.ref, member.cursor + 1, upto)
        run: list[bytes] = []  # a batch member's events not sent yet, up to ``last``
        run_bytes = 0
        last = member.cursor
        async with contextlib.aclosing(replay) as stored_events:
            async for stored in stored_events:
                if stored.seq <= last:
                    continue
                delivered = self._delivered(member, stored.body, stored.seq)
                if not member.batch:
                    if not await member.socket.send_paced(delivered):
                        return
                    member.cursor = last = stored.seq
                    member.replayed += 1
                    continue
                if run and run_bytes + len(delivered) > DELIVERY_BATCH_BYTES:
                    if not await self._send_run(member, run, last):
                        return
                    run, run_bytes = [], 0
                run.append(delivered)
                run_bytes += len(delivered)
                last = stored.seq
        if run and not await self._send_run(member, run, last):
            return
        if member.cursor < upto:
            # ``upto`` is a seq the channel holds; a replay that ends short of it is
            # either retention (tell the member) or a lagging replica (make it resume).
            window = await self._broker.window(member.ref)
            if member.cursor + 1 < window.first_stream_seq:
                self._send_gap(member, member.cursor, window.first_stream_seq)
            else:
                raise BrokerUnavailable(f"replay stopped at {member.cursor}, before {upto}")
        member.cursor = max(member.cursor, upto)

    async def _send_run(self, member: Member, run: list[bytes], last: int) -> bool:
        """Send a run of replayed events (one message); False if the socket is gone."""
        message = encode_run(member.ref.room, member.ref.channel, run)
        if not await member.socket.send_paced(message):
            return False
        member.cursor = last
        member.replayed += len(run)
        return True

    async def _flush_pending(self, member: Member) -> bool:
        """Send buffered live events in order. True if another replay round is needed."""
        if member.overflowed:
            member.overflowed = False
            window = await self._member_window(member)
            self._report_gap(member, window.last_seq, window.first_stream_seq)
            await self._replay(member, window.last_seq)
            return True
        while member.pending:
            event = member.pending.popleft()
            member.pending_bytes -= len(event.body)
            if event.seq <= member.cursor:
                continue
            if event.prev_seq > member.cursor:
                await self._replay(member, event.prev_seq)
            # A batch member takes what follows it without a hole in ``events`` messages.
            held = self._held_run(member, event) if member.batch else [event]
            delivered = [self._delivered(member, e.body, e.seq) for e in held]
            runs = delivery_batches(delivered)  # one run for a single event
            taken = 0
            for run in runs:
                message = encode_run(member.ref.room, member.ref.channel, run)
                if not await member.socket.send_paced(message):
                    return False
                for sent in held[taken : taken + len(run)]:  # held while it caught up
                    self._metrics.delivered(1, sent.body)
                taken += len(run)
                member.cursor = held[taken - 1].seq
            if member.overflowed:
                return True
        return False

    @staticmethod
    def _held_run(member: Member, first: LiveEvent) -> list[LiveEvent]:
        """``first`` and the held events that continue it without a hole, taken off the
        member's buffer (a copy of one it has is dropped; a hole is read from the store
        before the events after it)."""
        run = [first]
        pending = member.pending
        while pending and pending[0].prev_seq <= run[-1].seq:
            event = pending.popleft()
            member.pending_bytes -= len(event.body)
            if event.seq > run[-1].seq:
                run.append(event)
        return run

    async def _member_window(self, member: Member) -> ChannelWindow:
        """The window of the member's channel, a read shared with its other members: many
        members re-read at once after a failover, or after a burst overflowed them."""
        channel = self._channels.get(member.ref)
        if channel is None or channel.members.get(id(member.socket)) is not member:
            return await self._broker.window(member.ref)
        return await self._shared_window(member.ref, channel)

    async def _replay_then_verify(self, member: Member, upto: int) -> None:
        """Replay, then re-check retention: the replica that served the replay may have
        expired events that the leader still counted when the gap check was made. The
        check's read is shared with the channel's other members (a read that starts after
        this replay ended): after a failover thousands of members replay at once."""
        before = member.cursor
        await self._replay(member, upto)
        if upto > before and not member.gap_reported:
            window = await self._member_window(member)
            if before + 1 < window.first_stream_seq:
                self._send_gap(member, before, window.first_stream_seq)

    def _report_gap(self, member: Member, upto: int, first_stream_seq: int) -> None:
        if member.cursor < upto and member.cursor + 1 < first_stream_seq:
            self._send_gap(member, member.cursor, first_stream_seq)

    def _send_gap(self, member: Member, after_seq: int, first_available_seq: int) -> None:
        member.gap_reported = True
        ref = member.ref
        gap = encode_gap(ref.room, ref.channel, after_seq, first_available_seq)
        member.socket.send(gap)
        self._metrics.frame_sent(gap)

    async def resync_all(self) -> None:
        """After a NATS reconnect: every live member replays what it may have missed."""
        for ref, channel in list(self._channels.items()):
            try:
                window = await self._broker.window(ref)
            except BrokerUnavailable:
                continue
            for member in list(channel.members.values()):
                if not member.syncing and window.last_seq > member.cursor:
                    member.syncing = True
                    self.start(member, window.last_seq, check_retention=True)

    async def close(self) -> None:
        for ref, channel in list(self._channels.items()):
            for member in channel.members.values():
                if member.task is not None:
                    member.task.cancel()
            self._drop_channel(ref, channel)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._closing, return_exceptions=True)
