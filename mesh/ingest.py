"""Natural batching of a gateway's publishes into JetStream atomic batches (mesh/batch.py).

Every publish to a tenant's stream goes through one :class:`IngestBatcher` lane per stream:

* while fewer than ``max_in_flight`` batches of the stream are waiting for their ack, a
  publish is sent at once (alone, when it is alone: a batch of one is a plain publish, so
  a quiet stream pays no added latency);
* otherwise it waits in the lane, and when a batch's ack comes back everything waiting
  (up to ``max_batch``) goes out as the next batch. The busier the stream, the larger the
  batches: fewer replies, Raft entries and fsyncs per event. While a full batch waits, up
  to ``max_in_flight_full`` batches go out at once.

The guarantees are the single publish's: an event is acknowledged only after the quorum
stored it (the batch's commit ack, whose sequences are contiguous, gives every event its
``seq``), its ``Nats-Msg-Id`` dedupes it, and nothing of a refused batch is stored. When the
server refuses a batch for a reason a single publish would not have (a ``Nats-Msg-Id``
already stored: resends after a reconnect; a stream without ``allow_atomic``; too many
batches open; a leader change; per-message TTLs off; no stream leader), every event of it
is handed back to the caller to publish alone (:data:`ALONE`), which reports duplicates
with their original ``seq`` and retries what needs retrying. A batch without an ack in time
fails each of its publishes with TimeoutError, as a single publish's timeout does (the
client resends with the same id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from arqonbus_server.mesh.batch import (
    AtomicPublishDisabled,
    BatchError,
    BatchItemResult,
    BatchPublisher,
    BatchPublisherClosed,
    BatchTooLarge,
    Headers,
)

log = logging.getLogger("arqonbus.mesh.ingest")

# Batches of one stream in flight from one gateway (the server allows 50 open per stream,
# all gateways together). One: what arrives while a batch is out goes in the next, so a
# busy stream's batches are as large as they can be, and each batch costs the store a Raft
# entry, fsyncs and an ack. Measured against 4 (docs/performance.md, "Lane depth"): one
# publishing connection stored 20-25 % more events per second, with a third less NATS CPU
# per event, and the latency under load was no worse.
MAX_IN_FLIGHT: Final = 1
# ... and up to 4 while a full batch waits behind them: under a steady ingest the store then
# takes the next batches while the last one's replicas fsync. Measured with events frames
# (docs/performance.md, "Events frames" and "Four full batches in flight"): a second one
# gave about 12 % more events per second than one, with the same NATS CPU per event; four
# gave 16-18 % more than two (medians of 4 interleaved rounds), with less NATS CPU per
# event. Below a full batch nothing changes. The server allows 50 open batches per stream
# (all gateways together); past that a batch is refused and its events published alone.
MAX_IN_FLIGHT_FULL: Final = 4
# The server's default limit (jetstream limits: batch max_msgs; against a lower one the lane
# halves its batches until they fit, IngestBatcher._below). Under a steady ingest the
# batches are full: with one in flight, its size bounds the rate. Measured against 500 with
# events frames (docs/performance.md, "Events frames"): about 10 % more events per second.
MAX_BATCH: Final = 1000
# A lowered batch size is tried doubled (up to the configured one) after this long without a
# refusal: an operator may raise the server's limit again. Where it still holds, that costs
# one refused batch (its events published alone) per interval.
RETRY_LARGER_S: Final = 300.0


class _Alone:
    """Publish this event alone (its batch was refused for a batch-only reason)."""

    def __repr__(self) -> str:
        return "ALONE"


ALONE: Final = _Alone()

Outcome = BatchItemResult | _Alone


@dataclass(slots=True)
class _Waiting:
    """One publish: its caller awaits ``future``, or is called back with ``done``."""

    subject: str
    body: bytes
    headers: Headers
    future: asyncio.Future[Outcome] | None
    done: Callable[[Outcome | BaseException], None] | None = None

    def wanted(self) -> bool:
        """False once an awaiting caller gave up (a callback is always wanted)."""
        return self.future is None or not self.future.done()

    def settle(self, outcome: Outcome | BaseException) -> None:
        if self.done is not None:
            try:
                self.done(outcome)
            except Exception:  # one caller's bug must not keep the others' outcomes
                log.exception("a publish's callback failed")
        elif self.future is not None and not self.future.done():
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)


@dataclass(slots=True)
class _Group:
    """The events of one publish_many call: whole into one batch, one future for all."""

    subject: str
    items: Sequence[tuple[bytes, Headers]]
    future: asyncio.Future[list[Outcome]]

    def wanted(self) -> bool:
        return not self.future.done()

    def settle(self, outcome: list[Outcome] | BaseException) -> None:
        if not self.future.done():
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)


@dataclass(slots=True)
class _Lane:
    # A publish, or a group of one publish_many call that goes whole into one batch.
    waiting: deque[_Waiting | _Group] = field(default_factory=deque)
    queued: int = 0  # events in ``waiting``
    in_flight: int = 0


@dataclass(slots=True)
class IngestStats:
    """What the lanes did (the gateway's metrics and the bench read it)."""

    batches: int = 0  # stored (their commit acked)
    events: int = 0  # stored through those batches
    alone: int = 0  # events handed back to be published alone
    refusals: dict[str, int] = field(default_factory=dict)  # by reason (refusal_reason)


class IngestBatcher:
    """Coalesces concurrent publishes to one stream into atomic batches (module docstring)."""

    def __init__(
        self,
        publisher: BatchPublisher,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_batch: int = MAX_BATCH,
        stats: IngestStats | None = None,
        max_in_flight_full: int = MAX_IN_FLIGHT_FULL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= max_in_flight <= max_in_flight_full or not 1 <= max_batch <= 1000:
            raise ValueError("1 <= max_in_flight <= max_in_flight_full and 1 <= max_batch <= 1000")
        self._publisher = publisher
        self._max_in_flight = max_in_flight
        self._max_in_flight_full = max_in_flight_full
        self._max_batch = max_batch
        self._configured_batch = max_batch
        self._lowered_at: float | None = None  # when a refusal (or a retry) last set the size
        self._clock = clock
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = stats if stats is not None else IngestStats()  # the caller's outlives this
        # Called with the stream's name when a batch was refused because the stream has no
        # allow_atomic (an older stream): the broker turns it on.
        self.on_atomic_disabled: Callable[[str], None] | None = None

    async def publish(self, stream: str, subject: str, body: bytes, headers: Headers) -> Outcome:
        """Store one event through ``stream``'s lane: its result (seq, duplicate), or
        :data:`ALONE` (publish it alone). Raises TimeoutError when its batch had no ack in
        time, and the connection's errors."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._enqueue(stream, _Waiting(subject, body, headers, future))
        return await future

    def publish_then(
        self,
        stream: str,
        subject: str,
        body: bytes,
        headers: Headers,
        done: Callable[[Outcome | BaseException], None],
    ) -> None:
        """:meth:`publish` without a task or a future: ``done`` is called with what it would
        return or raise, once, always later (never from within this call), straight from
        the batch's ack. A later publish in the lane is stored after this one, except when
        this one's batch is refused and it is published alone (:data:`ALONE`): batches sent
        behind it may be stored first (docs/protocol.md: acks, and the store's order, follow
        send order only for a client that waits for each ack)."""
        self._enqueue(stream, _Waiting(subject, body, headers, None, done))

    def _enqueue(self, stream: str, waiting: _Waiting) -> None:
        lane = self._lanes.get(stream)
        if lane is None:
            lane = self._lanes[stream] = _Lane()
        lane.waiting.append(waiting)
        lane.queued += 1
        self._pump(stream, lane)

    @property
    def max_batch(self) -> int:
        self._retry_larger()
        return self._max_batch

    def _retry_larger(self) -> None:
        """Double a size lowered by a refusal once it has held RETRY_LARGER_S."""
        if self._lowered_at is None or self._clock() - self._lowered_at < RETRY_LARGER_S:
            return
        self._max_batch = min(self._configured_batch, self._max_batch * 2)
        at_configured = self._max_batch == self._configured_batch
        self._lowered_at = None if at_configured else self._clock()
        log.info("trying atomic batches of up to %d events again", self._max_batch)

    async def publish_group(
        self, stream: str, subject: str, items: Sequence[tuple[bytes, Headers]]
    ) -> list[Outcome]:
        """Store up to ``max_batch`` events of one subject through ``stream``'s lane, in one
        batch together (with others' publishes when they fit): their outcomes, in order.

        The group is never split across batches, so it is stored whole, in order, or,
        refused for the batch's sake, not at all (each :data:`ALONE`): a caller that
        publishes those alone before its next group keeps its events in order."""
        if not 1 <= len(items) <= self._max_batch:
            raise ValueError(f"a group holds 1-{self._max_batch} events, not {len(items)}")
        lane = self._lanes.get(stream)
        if lane is None:
            lane = self._lanes[stream] = _Lane()
        group = _Group(subject, items, asyncio.get_running_loop().create_future())
        lane.waiting.append(group)
        lane.queued += len(items)
        self._pump(stream, lane)
        return await group.future

    async def close(self) -> None:
        """Fail what waits in the lanes and stop the batches in flight."""
        for lane in self._lanes.values():
            lane.queued = 0
            while lane.waiting:
                _fail([lane.waiting.popleft()], BatchPublisherClosed("the gateway is closing"))
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _may_send(self, lane: _Lane) -> bool:
        return lane.in_flight < self._max_in_flight or (
            lane.in_flight < self._max_in_flight_full and lane.queued >= self._max_batch
        )

    def _pump(self, stream: str, lane: _Lane) -> None:
        self._retry_larger()
        while lane.waiting and self._may_send(lane):
            batch: list[_Waiting | _Group] = []
            size = 0
            while lane.waiting and size < self._max_batch:
                entry = lane.waiting[0]
                if isinstance(entry, _Group):  # whole, in a batch of its own size
                    if size and size + len(entry.items) > self._max_batch:
                        break
                    lane.waiting.popleft()
                    lane.queued -= len(entry.items)
                    if entry.wanted():  # a caller that gave up is not sent
                        batch.append(entry)
                        size += len(entry.items)
                    continue
                lane.waiting.popleft()
                lane.queued -= 1
                if entry.wanted():
                    batch.append(entry)
                    size += 1
            if not batch:
                break
            lane.in_flight += 1
            task = asyncio.create_task(self._send(stream, lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not lane.waiting and not lane.in_flight:
            self._lanes.pop(stream, None)  # a quiet stream keeps nothing

    async def _send(self, stream: str, lane: _Lane, batch: list[_Waiting | _Group]) -> None:
        messages: list[tuple[str, bytes, Headers]] = []
        for entry in batch:
            if isinstance(entry, _Group):
                subject = entry.subject
                messages += [(subject, body, headers) for body, headers in entry.items]
            else:
                messages.append((entry.subject, entry.body, entry.headers))
        try:
            results = await self._publisher.publish_batch(messages)
        except BatchPublisherClosed as exc:
            _fail(batch, exc)
        except BatchError as exc:  # refused for the batch: each event alone
            reason = refusal_reason(exc)
            self.stats.refusals[reason] = self.stats.refusals.get(reason, 0) + 1
            self.stats.alone += len(messages)
            if isinstance(exc, AtomicPublishDisabled) and self.on_atomic_disabled is not None:
                self.on_atomic_disabled(stream)
            if isinstance(exc, BatchTooLarge):
                self._below(len(messages))
            log.debug("batch of %d to %s refused (%s): published alone", len(messages), stream, exc)
            for entry in batch:
                if isinstance(entry, _Group):
                    entry.settle([ALONE] * len(entry.items))
                else:
                    entry.settle(ALONE)
        except asyncio.CancelledError:
            _fail(batch, BatchPublisherClosed("the gateway is closing"))
            raise
        except Exception as exc:  # a timeout, the connection: as a single publish's
            _fail(batch, exc)
        else:
            self.stats.batches += 1
            self.stats.events += len(messages)
            at = 0
            for entry in batch:
                if isinstance(entry, _Group):
                    n = len(entry.items)
                    entry.settle([*results[at : at + n]])
                    at += n
                else:
                    entry.settle(results[at])
                    at += 1
        finally:
            lane.in_flight -= 1  # a lane with a batch out is never dropped (_pump)
            self._pump(stream, lane)

    def _below(self, refused: int) -> None:
        """The server refused a batch of ``refused`` events as too large: an operator set
        its limit (jetstream ``limits { batch { max_msgs } }``) below ours. Later batches
        hold at most half as many, again at each refusal, down to one event: a few
        refused batches (their events published alone) find a size the server takes.
        After RETRY_LARGER_S without a refusal the size is doubled again (_retry_larger)."""
        lowered = max(1, min(self._max_batch, refused // 2))
        self._lowered_at = self._clock()
        if lowered < self._max_batch:
            log.warning(
                "the NATS server refused an atomic batch of %d events as too large (its "
                "jetstream limits, batch max_msgs, are lower): batches of at most %d from now on",
                refused,
                lowered,
            )
            self._max_batch = lowered


def refusal_reason(exc: BatchError) -> str:
    """A refusal's reason as a metric label: the error's class in snake case, without its
    ``batch_`` prefix (``BatchDuplicate`` -> ``duplicate``, ``AtomicPublishDisabled`` ->
    ``atomic_publish_disabled``)."""
    words = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    return words.removeprefix("batch_") or words


def _fail(batch: Iterable[_Waiting | _Group], exc: BaseException) -> None:
    for entry in batch:
        entry.settle(exc)
