"""The gateway's natural batching of publishes (mesh/ingest.py) against a scripted publisher;
tests/integration/test_ingest_batching.py runs it on the real cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from arqonbus_server.mesh.batch import (
    AtomicPublishDisabled,
    BatchDuplicate,
    BatchItemResult,
    BatchPublisherClosed,
    BatchTooLarge,
)
from arqonbus_server.mesh.ingest import ALONE, RETRY_LARGER_S, IngestBatcher
from tests.timeouts import SEC, eventually

Msgs = Sequence[tuple[str, bytes, dict[str, str]]]


class Scripted:
    """A BatchPublisher whose batches stay open until the test answers them."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.answers: list[asyncio.Future[Any]] = []
        self.seq = 0

    async def publish_batch(self, msgs: Msgs) -> list[BatchItemResult]:
        self.batches.append([body for _, body, _ in msgs])
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.answers.append(answer)
        outcome = await answer
        if isinstance(outcome, BaseException):
            raise outcome
        first = self.seq + 1
        self.seq += len(msgs)
        return [BatchItemResult(first + i) for i in range(len(msgs))]

    def answer(self, i: int, outcome: Any = None) -> None:
        self.answers[i].set_result(outcome)


def start(batcher: IngestBatcher, bodies: list[bytes]) -> list[asyncio.Task[Any]]:
    return [
        asyncio.ensure_future(batcher.publish("S", "arq.ev.t.r.c", body, {"Nats-Msg-Id": "x"}))
        for body in bodies
    ]


async def batches_sent(pub: Scripted, n: int) -> None:
    async def sent() -> bool:
        return len(pub.batches) >= n

    await eventually(sent, 3 * SEC, f"{n} batches sent")


async def test_a_quiet_stream_sends_at_once_and_a_busy_one_coalesces_what_waits() -> None:
    pub = Scripted()
    batcher = IngestBatcher(pub, max_in_flight=2, max_batch=3, max_in_flight_full=2)  # type: ignore[arg-type]
    tasks = start(batcher, [b"%d" % i for i in range(7)])
    await batches_sent(pub, 2)
    # Two single sends fill the lane; the other five wait for an ack.
    assert pub.batches == [[b"0"], [b"1"]]
    pub.answer(0)
    await batches_sent(pub, 3)
    assert pub.batches[2] == [b"2", b"3", b"4"]  # up to max_batch at once
    pub.answer(1)
    await batches_sent(pub, 4)
    assert pub.batches[3] == [b"5", b"6"]
    pub.answer(2)
    pub.answer(3)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 3 * SEC)
    assert [r.seq for r in results] == [1, 2, 3, 4, 5, 6, 7]  # each event its own seq
    assert (batcher.stats.batches, batcher.stats.events) == (4, 7)


async def test_a_batch_refused_for_the_batch_hands_each_event_back_to_publish_alone() -> None:
    pub = Scripted()
    batcher = IngestBatcher(pub, max_in_flight=1)  # type: ignore[arg-type]
    disabled: list[str] = []
    batcher.on_atomic_disabled = disabled.append
    tasks = start(batcher, [b"a", b"b", b"c"])
    await batches_sent(pub, 1)
    pub.answer(0, BatchDuplicate(10201, "atomic publish batch contains duplicate message id"))
    await batches_sent(pub, 2)
    assert await asyncio.wait_for(tasks[0], 3 * SEC) is ALONE
    pub.answer(1, AtomicPublishDisabled(10174, "atomic publish is disabled"))
    assert await asyncio.wait_for(asyncio.gather(*tasks[1:]), 3 * SEC) == [ALONE, ALONE]
    assert disabled == ["S"]
    assert batcher.stats.alone == 3
    assert batcher.stats.refusals == {"duplicate": 1, "atomic_publish_disabled": 1}


async def test_a_timeout_fails_every_event_of_the_batch_and_the_lane_goes_on() -> None:
    pub = Scripted()
    batcher = IngestBatcher(pub, max_in_flight=1)  # type: ignore[arg-type]
    tasks = start(batcher, [b"a", b"b", b"c"])
    await batches_sent(pub, 1)
    pub.answer(0, TimeoutError())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tasks[0], 3 * SEC)
    await batches_sent(pub, 2)
    pub.answer(1)
    assert [r.seq for r in await asyncio.gather(*tasks[1:])] == [1, 2]


async def test_a_caller_that_gave_up_is_not_sent_and_close_fails_what_waits() -> None:
    pub = Scripted()
    batcher = IngestBatcher(pub, max_in_flight=1)  # type: ignore[arg-type]
    tasks = start(batcher, [b"a", b"gone", b"c"])
    await batches_sent(pub, 1)
    tasks[1].cancel()
    pub.answer(0)
    await batches_sent(pub, 2)
    assert pub.batches[1] == [b"c"]
    await batcher.close()  # c's batch is still open
    with pytest.raises(BatchPublisherClosed):
        await asyncio.wait_for(tasks[2], 3 * SEC)
    assert (await tasks[0]).seq == 1


async def test_a_second_batch_goes_out_only_while_a_full_one_waits() -> None:
    pub = Scripted()
    batcher = IngestBatcher(pub, max_in_flight=1, max_batch=3, max_in_flight_full=2)  # type: ignore[arg-type]
    few = start(batcher, [b"a", b"b", b"c"])
    await batches_sent(pub, 1)
    assert pub.batches == [[b"a"]]  # b and c are no full batch: they wait for the ack
    more = start(batcher, [b"d", b"e", b"f", b"g"])
    await batches_sent(pub, 2)
    assert pub.batches[1] == [b"b", b"c", b"d"]  # a full batch waited: a second one went
    assert len(pub.batches) == 2  # e, f, g are full too, but two are out (the limit)
    pub.answer(0)
    await batches_sent(pub, 3)
    assert pub.batches[2] == [b"e", b"f", b"g"]
    pub.answer(1)
    pub.answer(2)
    results = await asyncio.wait_for(asyncio.gather(*few, *more), 3 * SEC)
    assert [r.seq for r in results] == list(range(1, 8))


async def test_by_default_up_to_four_full_batches_are_out_at_once() -> None:
    pub = Scripted()
    batcher = IngestBatcher(pub, max_in_flight=1, max_batch=3)  # type: ignore[arg-type]
    first = start(batcher, [b"a"])
    await batches_sent(pub, 1)
    full = start(batcher, [b"%d" % i for i in range(15)])  # five full batches wait
    await batches_sent(pub, 4)
    assert [len(batch) for batch in pub.batches] == [1, 3, 3, 3]  # four out: the limit
    pub.answer(0)
    await batches_sent(pub, 5)
    assert len(pub.batches[4]) == 3
    for index in range(1, 5):
        pub.answer(index)
    await batches_sent(pub, 6)
    pub.answer(5)
    results = await asyncio.wait_for(asyncio.gather(*first, *full), 3 * SEC)
    assert [r.seq for r in results] == list(range(1, 17))


async def test_a_group_goes_whole_into_one_batch_and_is_refused_whole() -> None:
    pub = Scripted()
    batcher = IngestBatcher(pub, max_in_flight=1, max_batch=4)  # type: ignore[arg-type]
    first = start(batcher, [b"a", b"b"])
    await batches_sent(pub, 1)
    group = asyncio.ensure_future(
        batcher.publish_group("S", "arq.ev.t.r.c", [(b"g%d" % i, {}) for i in range(3)])
    )
    pub.answer(0)
    await batches_sent(pub, 2)
    # b fits with the group's three (4); a group is never split over two batches.
    assert pub.batches[1] == [b"b", b"g0", b"g1", b"g2"]
    pub.answer(1, BatchDuplicate(10201, "atomic publish batch contains duplicate message id"))
    assert await asyncio.wait_for(group, 3 * SEC) == [ALONE, ALONE, ALONE]
    late = asyncio.ensure_future(
        batcher.publish_group("S", "arq.ev.t.r.c", [(b"h%d" % i, {}) for i in range(4)])
    )
    tail = start(batcher, [b"z"])
    await batches_sent(pub, 3)
    assert pub.batches[2] == [b"h0", b"h1", b"h2", b"h3"]
    pub.answer(2)
    await batches_sent(pub, 4)
    assert pub.batches[3] == [b"z"]
    pub.answer(3)
    assert [r.seq for r in await asyncio.wait_for(late, 3 * SEC)] == [2, 3, 4, 5]
    assert (await asyncio.wait_for(tail[0], 3 * SEC)).seq == 6
    assert (await first[0]).seq == 1 and await first[1] is ALONE  # b shared the refusal
    with pytest.raises(ValueError, match="1-4 events"):
        await batcher.publish_group("S", "arq.ev.t.r.c", [(b"x", {})] * 5)


async def test_publish_then_calls_back_from_the_batch_and_one_failing_callback_spares_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pub = Scripted()
    batcher = IngestBatcher(pub, max_in_flight=1)  # type: ignore[arg-type]
    outcomes: dict[bytes, list[object]] = {}

    def done(body: bytes) -> Callable[[object], None]:
        def record(outcome: object) -> None:
            outcomes.setdefault(body, []).append(outcome)
            if body == b"bug":
                raise RuntimeError("a caller's bug")

        return record

    for body in (b"a", b"bug", b"c", b"d"):
        batcher.publish_then("S", "arq.ev.t.r.c", body, b"", done(body))
    assert outcomes == {}  # never from within the call
    await batches_sent(pub, 1)
    pub.answer(0)  # "a" alone; then the three that waited, in one batch
    await batches_sent(pub, 2)
    assert pub.batches[1] == [b"bug", b"c", b"d"]
    pub.answer(1, TimeoutError())

    async def all_called() -> bool:
        return len(outcomes) == 4

    await eventually(all_called, 3 * SEC, "every callback called")
    assert [o.seq for o in outcomes[b"a"]] == [1]  # type: ignore[attr-defined]
    assert all(len(outcomes[b]) == 1 for b in outcomes)  # once each
    assert all(isinstance(outcomes[b][0], TimeoutError) for b in (b"bug", b"c", b"d"))
    assert "a publish's callback failed" in caplog.text


async def test_a_server_limit_below_the_batch_size_halves_the_batches_until_they_fit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pub = Scripted()
    batcher = IngestBatcher(pub, max_in_flight=1, max_batch=40)  # type: ignore[arg-type]
    tasks = start(batcher, [b"%d" % i for i in range(41)])  # one alone, then 40 together
    await batches_sent(pub, 1)
    pub.answer(0)
    await batches_sent(pub, 2)
    assert len(pub.batches[1]) == 40
    pub.answer(1, BatchTooLarge(10199, "atomic publish batch is too large"))
    assert await asyncio.wait_for(asyncio.gather(*tasks[1:]), 3 * SEC) == [ALONE] * 40
    assert batcher.max_batch == 20
    assert "batches of at most 20 from now on" in caplog.text
    # A refused batch smaller than the size: below it (10), not up again for RETRY_LARGER_S.
    more = start(batcher, [b"x"] + [b"%d" % i for i in range(14)])
    await batches_sent(pub, 3)
    pub.answer(2)
    await batches_sent(pub, 4)
    assert len(pub.batches[3]) == 14
    pub.answer(3, BatchTooLarge(10199, "atomic publish batch is too large"))
    await asyncio.wait_for(asyncio.gather(*more), 3 * SEC)
    assert batcher.max_batch == 7
    assert batcher.stats.refusals == {"too_large": 2}
    # A group larger than the new size is refused before it is queued.
    with pytest.raises(ValueError):
        await batcher.publish_group("S", "arq.ev.t.r.c", [(b"g", b"")] * 8)


async def test_a_lowered_batch_size_is_tried_doubled_after_a_quiet_interval() -> None:
    """The server's limit may be raised again: after RETRY_LARGER_S without a refusal the
    lane doubles its size, up to the configured one; a refusal lowers it again."""
    now = [0.0]
    pub = Scripted()
    batcher = IngestBatcher(
        pub, max_in_flight=1, max_batch=40, max_in_flight_full=2, clock=lambda: now[0]
    )  # type: ignore[arg-type]

    async def one_full_batch(count: int, refuse: bool = False) -> int:
        """Send one event alone then ``count`` behind it, answer every batch (the first
        full one refused with ``refuse``); the size of the first full batch."""
        first = len(pub.batches)
        tasks = start(batcher, [b"x"] + [b"%d" % i for i in range(count)])
        await batches_sent(pub, first + 1)
        pub.answer(first)
        await batches_sent(pub, first + 2)
        size = len(pub.batches[first + 1])
        pub.answer(first + 1, BatchTooLarge(10199, "too large") if refuse else None)
        for _ in range(count):  # the rest, a batch at a time
            sent = len(pub.batches)

            async def moved(sent: int = sent) -> bool:
                return all(task.done() for task in tasks) or len(pub.batches) > sent

            await eventually(moved, 3 * SEC, "the next batch or the end")
            if all(task.done() for task in tasks):
                break
            pub.answer(sent)
        return size

    assert await one_full_batch(40, refuse=True) == 40
    assert batcher.max_batch == 20
    now[0] += RETRY_LARGER_S - 1
    assert batcher.max_batch == 20 and await one_full_batch(40) == 20  # not yet
    now[0] += 1
    assert await one_full_batch(40) == 40  # doubled, and back at the configured size
    assert batcher.max_batch == 40
    now[0] += 10 * RETRY_LARGER_S
    assert batcher.max_batch == 40  # never above it
    # Where the limit still holds, a retry is refused and the size goes down again.
    assert await one_full_batch(40, refuse=True) == 40
    assert batcher.max_batch == 20
    now[0] += RETRY_LARGER_S
    assert await one_full_batch(40, refuse=True) == 40
    assert batcher.max_batch == 20
    assert batcher.stats.refusals == {"too_large": 3}
