"""Steady SDK load for the chaos scenarios, and the ledger that checks it.

Publishers and subscribers are real SDK clients (``arqonbus.Client``) spread over every
gateway. Each publisher writes one channel at a steady rate with a small window of
publishes in flight (every fourth one an ``events`` frame of five: ``publish_many``); each
subscriber reads one channel from its first event
(``since_seq=0``). The ledger records what was sent, what was acked (id -> seq) and what
each subscriber's application saw, then checks the promise: every acked event reaches
every subscriber exactly once, in seq order.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from arqonbus import ArqonBusError, Client, Event, Gap, Subscription

_PAD = "x" * 96  # brings an event to about 200 B on the wire, like the benchmarks


@dataclass(frozen=True, slots=True)
class ChannelRef:
    tenant: str
    room: str
    channel: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.room}/{self.channel}"


@dataclass
class PublisherLog:
    """What one publisher sent and what came back."""

    ref: ChannelRef
    prefix: str
    sent: int = 0
    sent_times: dict[str, float] = field(default_factory=dict)  # id -> time.time() of the send
    acked: dict[str, int] = field(default_factory=dict)  # id -> seq
    ack_times: dict[str, float] = field(default_factory=dict)  # id -> time.time() of the ack
    failed: dict[str, str] = field(default_factory=dict)  # id -> error code (outcome unknown)
    acked_late: int = 0  # acks that took longer than LATE_S


@dataclass
class SubscriberLog:
    """What one subscriber's application saw, in the order it saw it."""

    ref: ChannelRef
    name: str
    seqs: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.time()
    latency_ms: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # the publisher's clock at send
    gaps: list[Gap] = field(default_factory=list)
    epochs: list[int | None] = field(default_factory=list)  # multi-region tenants only
    error: str | None = None

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else 0


LATE_S = 1.0


@dataclass
class Totals:
    """The per-scenario figures of the report."""

    sent: int = 0
    acked: int = 0
    failed: int = 0
    acked_late: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    unacked_delivered: int = 0  # delivered although its publish failed: allowed (outcome unknown)
    phantom: int = 0  # delivered but never sent: never allowed
    gaps: int = 0
    stored_duplicates: int = 0
    subscriber_errors: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # a few concrete violations

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.out_of_order == 0
            and self.phantom == 0
            and self.gaps == 0
            and self.stored_duplicates == 0
            and not self.subscriber_errors
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1); NaN when there are no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Workload:
    """Publishers and subscribers on ``channels``, spread over ``urls`` (gateway URLs)."""

    def __init__(
        self,
        urls: Sequence[str],
        channels: Sequence[ChannelRef],
        *,
        rate: float = 40.0,
        window: int = 4,
        subscribers_per_channel: int = 2,
        publish_timeout: float = 30.0,
        max_backoff: float = 0.5,
        publisher_urls: Sequence[Sequence[str]] = (),
        subscriber_urls: Sequence[Sequence[str]] = (),
        batch_every: int = 4,
        batch_size: int = 5,
    ) -> None:
        self.urls = list(urls)
        # Every batch_every-th send is an events frame of batch_size events (publish_many);
        # 0: single events only.
        self.batch_every = batch_every
        self.batch_size = batch_size
        # Where each kind of client connects: URL lists taken in turn (none: ``urls`` rotated).
        self._url_lists = {
            "pub": [list(u) for u in publisher_urls],
            "sub": [list(u) for u in subscriber_urls],
        }
        self._taken = Counter[str]()
        self.channels = list(channels)
        self.rate = rate
        self.window = window
        self.subscribers_per_channel = subscribers_per_channel
        self.publish_timeout = publish_timeout
        self.max_backoff = max_backoff
        self.publishers: list[PublisherLog] = []
        self.subscribers: list[SubscriberLog] = []
        self.clients: dict[str, Client] = {}  # name -> client
        self._subscriptions: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._rotation = 0
        self.changed = asyncio.Condition()  # notified on every ack, failure and delivery

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (event-driven) until ``predicate()`` holds; False on timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(predicate)
        return predicate()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _urls_for(self, kind: str) -> list[str]:
        lists = self._url_lists[kind]
        if not lists:
            return self._urls_rotated()
        self._taken[kind] += 1
        return lists[(self._taken[kind] - 1) % len(lists)]

    def _urls_rotated(self) -> list[str]:
        k = self._rotation % len(self.urls)
        self._rotation += 1
        return self.urls[k:] + self.urls[:k]

    async def _client(self, name: str, ref: ChannelRef, kind: str) -> Client:
        client = Client(
            self._urls_for(kind),
            f"dev:{ref.tenant}:{name}",
            max_backoff=self.max_backoff,
            request_timeout=self.publish_timeout,
            connect_timeout=30,
        )
        await client.connect()
        self.clients[name] = client
        return client

    async def start(self) -> None:
        """Connect everyone, subscribe, then start publishing."""
        for c, ref in enumerate(self.channels):
            for s in range(self.subscribers_per_channel):
                name = f"sub{c}-{s}"
                client = await self._client(name, ref, "sub")
                sub_log = SubscriberLog(ref, name)
                subscription = await client.subscribe(ref.room, ref.channel, since_seq=0).start(
                    timeout=30
                )
                self._subscriptions.append(subscription)
                self.subscribers.append(sub_log)
                self._tasks.append(asyncio.create_task(self._consume(subscription, sub_log)))
        for c, ref in enumerate(self.channels):
            name = f"pub{c}"
            client = await self._client(name, ref, "pub")
            pub_log = PublisherLog(ref, name)
            self.publishers.append(pub_log)
            self._tasks.append(asyncio.create_task(self._publish_loop(client, pub_log)))

    async def _publish_loop(self, client: Client, log: PublisherLog) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.window)
        inflight: set[asyncio.Task[None]] = set()
        interval = 1.0 / self.rate
        next_at = loop.time() + random.uniform(0, interval)
        n = sends = 0
        max_count = int(self.rate * 3600)  # a bound far above any scenario's length
        while not self._stop.is_set() and n < max_count:
            await slots.acquire()
            if self._stop.is_set():
                slots.release()
                break
            sends += 1
            if self.batch_every and sends % self.batch_every == 0:
                ids = [f"{log.prefix}-{n + i}" for i in range(self.batch_size)]
                n += self.batch_size
                log.sent += self.batch_size
                task = asyncio.create_task(self._publish_batch(client, log, ids, slots))
            else:
                event_id = f"{log.prefix}-{n}"
                n += 1
                log.sent += 1
                task = asyncio.create_task(self._publish_one(client, log, event_id, slots))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            # Pacing a load generator, not synchronizing a test: the offered rate is the point.
            next_at = max(next_at + interval, loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), next_at - loop.time())
        if inflight:
            await asyncio.gather(*inflight)

    async def _publish_one(
        self, client: Client, log: PublisherLog, event_id: str, slots: asyncio.Semaphore
    ) -> None:
        started = time.time()
        log.sent_times[event_id] = started
        try:
            ack = await client.publish(
                log.ref.room,
                log.ref.channel,
                {"t": started, "pad": _PAD},
                id=event_id,
                timeout=self.publish_timeout,
            )
        except ArqonBusError as exc:
            log.failed[event_id] = getattr(exc, "code", type(exc).__name__) or type(exc).__name__
        else:
            now = time.time()
            log.acked[event_id] = ack.seq
            log.ack_times[event_id] = now
            if now - started > LATE_S:
                log.acked_late += 1
        finally:
            slots.release()
            await self._notify()

    async def _publish_batch(
        self, client: Client, log: PublisherLog, ids: list[str], slots: asyncio.Semaphore
    ) -> None:
        """One events frame: each of its events is in the ledger like a single one."""
        started = time.time()
        for event_id in ids:
            log.sent_times[event_id] = started
        try:
            acks = await client.publish_many(
                log.ref.room,
                log.ref.channel,
                [{"t": started, "pad": _PAD} for _ in ids],
                ids,
                timeout=self.publish_timeout,
            )
        except ArqonBusError as exc:
            code = getattr(exc, "code", type(exc).__name__) or type(exc).__name__
            for event_id in ids:
                log.failed[event_id] = code
        else:
            now = time.time()
            for ack in acks:
                log.acked[ack.request_id] = ack.seq
                log.ack_times[ack.request_id] = now
            if now - started > LATE_S:
                log.acked_late += len(acks)
        finally:
            slots.release()
            await self._notify()

    def client_urls(self) -> dict[str, str | None]:
        """Which gateway each client is on right now."""
        return {name: client.url for name, client in self.clients.items()}

    async def stop_publishing(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks[len(self.subscribers) :])

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait until every subscriber saw its channel's newest acked seq (or the timeout)."""
        newest = {p.ref: max(p.acked.values(), default=0) for p in self.publishers}
        await self.wait_until(
            lambda: all(s.last_seq >= newest[s.ref] or s.error for s in self.subscribers), timeout
        )

    def delivered_after(self, t: float) -> Callable[[], bool]:
        """A predicate: every subscriber got an event published at or after ``t``."""
        return lambda: all(s.arrived and s.sent_at and s.sent_at[-1] >= t for s in self.subscribers)

    def progressed_after(self, t: float, names: set[str]) -> Callable[[], bool]:
        """A predicate: each named client made progress (a delivery, or an ack) after ``t``."""

        def check() -> bool:
            for sub in self.subscribers:
                if sub.name in names and not (sub.sent_at and sub.sent_at[-1] >= t):
                    return False
            for pub in self.publishers:
                if pub.prefix in names and not any(a >= t for a in pub.ack_times.values()):
                    return False
            return True

        return check

    async def close(self) -> None:
        self._stop.set()
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            *(client.close() for client in self.clients.values()), return_exceptions=True
        )

    # -- checking ------------------------------------------------------------------------

    def check(self, stored: dict[ChannelRef, list[tuple[int, str]]] | None = None) -> Totals:
        totals = Totals()
        by_ref = {p.ref: p for p in self.publishers}
        for pub in self.publishers:
            totals.sent += pub.sent
            totals.acked += len(pub.acked)
            totals.failed += len(pub.failed)
            totals.acked_late += pub.acked_late
        for sub in self.subscribers:
            pub = by_ref[sub.ref]
            if sub.error:
                totals.subscriber_errors.append(f"{sub.name}: {sub.error}")
            totals.gaps += len(sub.gaps)
            counts = Counter(sub.ids)
            dupes = [i for i, n in counts.items() if n > 1]
            totals.duplicated += sum(counts[i] - 1 for i in dupes)
            totals.delivered += len(counts)
            totals.out_of_order += sum(
                1 for a, b in zip(sub.seqs, sub.seqs[1:], strict=False) if b <= a
            )
            seen = set(counts)
            lost = [i for i in pub.acked if i not in seen]
            totals.lost += len(lost)
            unacked = [i for i in seen if i not in pub.acked]
            totals.unacked_delivered += sum(1 for i in unacked if i in pub.failed)
            # Not acked and not failed: sent and still in flight when the run stopped, which
            # is fine; anything this publisher never sent is a phantom.
            totals.phantom += sum(1 for i in unacked if not _was_sent(i, pub))
            first_seq = dict(zip(reversed(sub.ids), reversed(sub.seqs), strict=True))
            wrong_seq = [i for i in seen & pub.acked.keys() if first_seq[i] != pub.acked[i]]
            totals.out_of_order += len(wrong_seq)
            for label, items in (("lost", lost), ("duplicated", dupes), ("wrong seq", wrong_seq)):
                if items and len(totals.examples) < 10:
                    totals.examples.append(f"{sub.name} on {sub.ref}: {label} {sorted(items)[:5]}")
            if dupes and len(totals.examples) < 10:
                totals.examples.append(f"{sub.name}: {_where_seen(sub, sorted(dupes)[:3], pub)}")
        for ref, events in (stored or {}).items():
            ids = Counter(i for _, i in events)
            totals.stored_duplicates += sum(n - 1 for n in ids.values() if n > 1)
            missing = [i for i in by_ref[ref].acked if i not in ids]
            if missing:
                totals.lost += len(missing)
                totals.examples.append(f"store of {ref}: acked but not stored {missing[:5]}")
        return totals

    def resume_times(self, fault_at: float, affected: set[str] | None = None) -> list[float]:
        """Per client: from ``fault_at`` to its first progress with an event acked after it.

        A subscriber resumes when its application gets an event acked after the fault; a
        publisher when it gets an ack after the fault. ``affected`` limits it to those clients.
        """
        out: list[float] = []
        for sub in self.subscribers:
            if affected is not None and sub.name not in affected:
                continue
            pub = next(p for p in self.publishers if p.ref == sub.ref)
            for event_id, arrived in zip(sub.ids, sub.arrived, strict=False):
                acked_at = pub.ack_times.get(event_id)
                if arrived >= fault_at and acked_at is not None and acked_at >= fault_at:
                    out.append(arrived - fault_at)
                    break
        for pub in self.publishers:
            if affected is not None and pub.prefix not in affected:
                continue
            after = [t for t in pub.ack_times.values() if t >= fault_at]
            if after:
                out.append(min(after) - fault_at)
        return out

    async def _consume(self, subscription: Subscription, log: SubscriberLog) -> None:
        try:
            async for item in subscription:
                if isinstance(item, Gap):
                    log.gaps.append(item)
                else:
                    _record(log, item)
                await self._notify()
        except ArqonBusError as exc:
            log.error = f"{type(exc).__name__}: {exc}"
            await self._notify()

    def latencies_between(self, start: float, end: float) -> list[float]:
        """Publish->deliver latencies (ms) of events delivered in [start, end)."""
        out: list[float] = []
        for sub in self.subscribers:
            for arrived, ms in zip(sub.arrived, sub.latency_ms, strict=False):
                if start <= arrived < end:
                    out.append(ms)
        return out


def _where_seen(sub: SubscriberLog, ids: list[str], pub: PublisherLog) -> str:
    """Each id's deliveries as (seq, epoch) and its ack's seq: the evidence of a duplicate."""
    parts = []
    for event_id in ids:
        seen = [
            (seq, epoch)
            for i, seq, epoch in zip(
                sub.ids, sub.seqs, sub.epochs or [None] * len(sub.ids), strict=False
            )
            if i == event_id
        ]
        parts.append(
            f"{event_id} delivered at (seq, epoch) {seen}, acked seq {pub.acked.get(event_id)}"
        )
    return "; ".join(parts)


def _was_sent(event_id: str, pub: PublisherLog) -> bool:
    prefix, _, n = event_id.rpartition("-")
    return prefix == pub.prefix and n.isdigit() and int(n) < pub.sent


def _record(log: SubscriberLog, event: Event) -> None:
    now = time.time()
    log.seqs.append(event.seq)
    log.ids.append(event.id)
    log.epochs.append(event.epoch)
    log.arrived.append(now)
    sent = event.payload.get("t")
    sent_at = float(sent) if isinstance(sent, int | float) else 0.0
    log.sent_at.append(sent_at)
    log.latency_ms.append((now - sent_at) * 1000)


async def read_store(
    urls: Sequence[str], channels: Sequence[ChannelRef]
) -> dict[ChannelRef, list[tuple[int, str]]]:
    """Everything stored on each channel, read back by a fresh SDK client from seq 0."""
    out: dict[ChannelRef, list[tuple[int, str]]] = {}
    for ref in channels:
        async with Client(list(urls), f"dev:{ref.tenant}:auditor", connect_timeout=30) as client:
            history = client.history(ref.room, ref.channel, since_seq=0, limit=None, timeout=60)
            out[ref] = [(event.seq, event.id) async for event in history]
    return out


def summarize(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "max": None}
    return {"n": len(values), "p50": statistics.median(values), "max": max(values)}
