"""The Broker's guarantees (mesh/ports.py), checked against every implementation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from arqonbus_server.mesh.ports import (
    Broker,
    ChannelWindow,
    LiveEvent,
    NoResponders,
    PublishResult,
    RequestTimeout,
    ServiceRequest,
    StoreQuotaExceeded,
    StreamStats,
)
from arqonbus_server.shared.subjects import ChannelRef
from tests.contract.conftest import Mesh
from tests.timeouts import SEC

WAIT_S = 10.0


def tenant() -> str:
    return "c" + uuid.uuid4().hex[:12]


def key() -> str:
    return uuid.uuid4().hex


async def stored(broker: Broker, ref: ChannelRef) -> list[tuple[int, bytes]]:
    return [(e.seq, e.body) async for e in broker.replay(ref, 1, None)]


class Received:
    """Live events of one subscription, awaited by predicate (no sleeps)."""

    def __init__(self) -> None:
        self.events: list[LiveEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, ref: ChannelRef, event: LiveEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(self, done: Callable[[list[LiveEvent]], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not done(self.events):
                self._changed.clear()
                await self._changed.wait()


async def live_in_place(broker: Broker, ref: ChannelRef, received: Received) -> None:
    """Publish probes until one arrives: the subscription's interest reached the cluster."""
    for _ in range(20):
        seq = (await broker.publish(ref, b"probe", key())).seq
        try:
            async with asyncio.timeout(0.5 * SEC):
                await received.until(lambda events, seq=seq: any(e.seq == seq for e in events))
            return
        except TimeoutError:
            continue
    raise AssertionError("no probe arrived on the live subscription")


async def test_publish_returns_once_stored_with_seq_strictly_increasing_per_tenant(
    mesh: Mesh,
) -> None:
    writer, reader = await mesh.broker(), await mesh.broker()
    t = tenant()
    a, b = ChannelRef(t, "r", "a"), ChannelRef(t, "r", "b")
    seqs = []
    for i in range(6):
        ref = a if i % 2 else b
        result = await writer.publish(ref, f"e{i}".encode(), key())
        assert not result.duplicate
        seqs.append(result.seq)
        # Stored before the ack: another connection's window already shows it.
        assert (await reader.window(ref)).last_seq == result.seq
    assert seqs == sorted(set(seqs))
    assert await stored(reader, a) == [(s, f"e{i}".encode()) for i, s in enumerate(seqs) if i % 2]


async def test_the_same_dedupe_key_stores_once_and_returns_the_first_seq(mesh: Mesh) -> None:
    first, second = await mesh.broker(), await mesh.broker()
    ref = ChannelRef(tenant(), "r", "c")
    dedupe = key()
    original = await first.publish(ref, b"once", dedupe)
    again = await second.publish(ref, b"once", dedupe)
    other = await first.publish(ref, b"other", key())
    assert (again.seq, again.duplicate) == (original.seq, True)
    assert not original.duplicate and other.seq > original.seq
    assert await stored(first, ref) == [(original.seq, b"once"), (other.seq, b"other")]


async def test_publish_many_stores_in_order_each_once_with_its_own_result(mesh: Mesh) -> None:
    publisher, subscriber = await mesh.broker(), await mesh.broker()
    ref = ChannelRef(tenant(), "r", "c")
    received = Received()
    subscription = await subscriber.subscribe_live(ref, received)
    await live_in_place(publisher, ref, received)
    earlier = await publisher.publish(ref, b"earlier", "resent")
    n = 1200  # more than one atomic batch of the real store's lane (1,000)
    keys = [key() for _ in range(n)]
    keys[3] = "resent"  # stored before: its first seq, nothing stored again
    items = [
        (b'{"n":%d}' % i, k, {"traceparent": f"t{i}"} if i == 5 else None)
        for i, k in enumerate(keys)
    ]
    async with asyncio.timeout(30 * SEC):
        results = await publisher.publish_many(ref, items)
    assert len(results) == n
    assert (results[3].seq, results[3].duplicate) == (earlier.seq, True)
    fresh = [r for i, r in enumerate(results) if i != 3]
    assert not any(r.duplicate for r in fresh)
    seqs = [r.seq for r in fresh]
    assert seqs == sorted(set(seqs)) and seqs[0] > earlier.seq  # in the list's order
    expected = [(r.seq, items[i][0]) for i, r in enumerate(results) if i != 3]
    assert (await stored(subscriber, ref))[-(n - 1) :] == expected
    # Each event reached live subscribers once, in order, with its own headers.
    await received.until(lambda events: events[-1].seq == seqs[-1])
    await subscription.close()
    live = [e for e in received.events if e.seq >= seqs[0]]
    assert [e.seq for e in live] == seqs
    assert (live[4].headers or {}).get("traceparent") == "t5"  # index 5 (index 3 left out)
    # The same list again (a client's resend): every event a duplicate with its seq.
    async with asyncio.timeout(30 * SEC):
        again = await subscriber.publish_many(ref, items)
    assert [(r.seq, r.duplicate) for r in again] == [(r.seq, True) for r in results]
    assert len(await stored(subscriber, ref)) == n + 1  # probe, earlier and the n - 1


class CalledBack:
    """Outcomes handed to publish_then's ``done``, by call; each must come once, later."""

    def __init__(self) -> None:
        self.outcomes: dict[int, list[object]] = {}
        self.calling = False  # inside a publish_then call
        self.within_call = 0
        self._changed = asyncio.Event()

    def publish(self, broker: Broker, ref: ChannelRef, n: int, *args: object) -> None:
        self.calling = True
        try:
            broker.publish_then(ref, *args, done=lambda outcome: self._done(n, outcome))  # type: ignore[misc]
        finally:
            self.calling = False

    def _done(self, n: int, outcome: object) -> None:
        self.within_call += self.calling
        self.outcomes.setdefault(n, []).append(outcome)
        self._changed.set()

    async def until(self, count: int) -> list[object]:
        """The outcomes of calls 0 .. count - 1, once each has come."""
        async with asyncio.timeout(WAIT_S * SEC):
            while len(self.outcomes) < count:
                self._changed.clear()
                await self._changed.wait()
        assert self.within_call == 0, "done was called from within publish_then"
        assert all(len(self.outcomes[n]) == 1 for n in range(count)), "done called twice"
        return [self.outcomes[n][0] for n in range(count)]


async def test_publish_then_calls_back_once_later_with_what_publish_returns(mesh: Mesh) -> None:
    publisher, reader = await mesh.broker(), await mesh.broker()
    ref = ChannelRef(tenant(), "r", "c")
    # The tenant's first event (no stream known yet) and then many in a row, as a busy
    # connection sends them: each called back once, with its seq, stored in call order.
    first = CalledBack()
    first.publish(publisher, ref, 0, b"first", key(), None, None)
    (result,) = await first.until(1)
    assert isinstance(result, PublishResult) and not result.duplicate
    called = CalledBack()
    n = 300
    keys = [key() for _ in range(n)]
    batched = publisher.batch_stats.events if mesh.kind == "jetstream" else 0  # type: ignore[attr-defined]
    for i, k in enumerate(keys):
        called.publish(publisher, ref, i, b'{"n":%d}' % i, k, {"traceparent": f"t{i}"}, None)
    results = await called.until(n)
    assert all(isinstance(r, PublishResult) and not r.duplicate for r in results)
    seqs = [r.seq for r in results]  # type: ignore[attr-defined]
    assert seqs == sorted(set(seqs)) and seqs[0] > result.seq
    expected = [(result.seq, b"first")] + [(s, b'{"n":%d}' % i) for i, s in enumerate(seqs)]
    assert await stored(reader, ref) == expected
    if mesh.kind == "jetstream":  # they went through the stream's lane, in atomic batches
        assert publisher.batch_stats.events - batched == n  # type: ignore[attr-defined]
    # The same keys again (a client's resend after a reconnect): duplicates with the first
    # seqs, nothing stored again.
    again = CalledBack()
    for i, k in enumerate(keys):
        again.publish(reader, ref, i, b"resent", k, None, None)
    assert [(r.seq, r.duplicate) for r in await again.until(n)] == [  # type: ignore[attr-defined]
        (s, True) for s in seqs
    ]
    assert len(await stored(reader, ref)) == n + 1


async def test_publish_then_hands_failures_to_done(mesh: Mesh) -> None:
    quota = 2000
    broker = await mesh.broker(max_bytes_for=lambda _: quota)
    ref = ChannelRef(tenant(), "r", "c")
    await broker.publish(ref, b"x" * 400, key())  # the stream exists: the lane's path
    called = CalledBack()
    for i in range(20):
        called.publish(broker, ref, i, b"x" * 400, key(), None, None)
    called.publish(broker, ref, 20, b"x", key(), None, 0)  # a TTL below 1 s
    outcomes = await called.until(21)
    acked = [o for o in outcomes[:20] if isinstance(o, PublishResult)]
    refused = [o for o in outcomes[:20] if isinstance(o, StoreQuotaExceeded)]
    assert len(acked) < quota // 400 and len(acked) + len(refused) == 20
    assert isinstance(outcomes[20], ValueError)
    assert len(await stored(broker, ref)) == 1 + len(acked)  # refusing stored nothing


async def test_window_of_an_unknown_tenant_is_empty_and_then_tracks_the_channel(
    mesh: Mesh,
) -> None:
    broker = await mesh.broker()
    t = tenant()
    ref, other = ChannelRef(t, "r", "c"), ChannelRef(t, "r", "d")
    assert await broker.window(ref) == ChannelWindow(0, 0)
    first = await broker.publish(ref, b"1", key())
    await broker.publish(other, b"2", key())
    assert await broker.window(ref) == ChannelWindow(first.seq, first.seq)
    assert (await broker.window(other)).last_seq == first.seq + 1


async def test_stream_stats_count_the_tenants_stored_events_and_only_its_own(
    mesh: Mesh,
) -> None:
    writer, reader = await mesh.broker(), await mesh.broker()
    t, other = tenant(), tenant()
    assert await reader.stream_stats(t) == StreamStats(0, 0, 0, 0)
    bodies = [b"x" * 100, b"y" * 200, b"z" * 300]
    seqs = [(await writer.publish(ChannelRef(t, "r", f"c{i}"), body, key())).seq
            for i, body in enumerate(bodies)]  # fmt: skip
    await writer.publish(ChannelRef(other, "r", "c"), b"o" * 5000, key())
    stats = await reader.stream_stats(t)  # another connection: acknowledged means counted
    assert (stats.messages, stats.first_seq, stats.last_seq) == (3, seqs[0], seqs[-1])
    # The store counts each event's bytes, bodies included (JetStream adds subject, headers).
    assert sum(map(len, bodies)) <= stats.bytes < 5000


async def test_replay_is_exact_inclusive_in_order_and_bounded_by_limit(mesh: Mesh) -> None:
    broker = await mesh.broker()
    t = tenant()
    ref, noise = ChannelRef(t, "r", "c"), ChannelRef(t, "r", "noise")
    seqs = []
    for i in range(8):
        seqs.append((await broker.publish(ref, f"{i}".encode(), key())).seq)
        await broker.publish(noise, b"x", key())
    window = [(e.seq, e.body) async for e in broker.replay(ref, seqs[2], seqs[5])]
    assert window == [(s, f"{i}".encode()) for i, s in enumerate(seqs) if 2 <= i <= 5]
    limited = [e.seq async for e in broker.replay(ref, seqs[1], None, limit=3)]
    assert limited == seqs[1:4]
    assert [e.seq async for e in broker.replay(ref, seqs[7] + 1, None)] == []


async def test_a_replay_longer_than_a_store_batch_is_exact_and_can_stop_anywhere(
    mesh: Mesh,
) -> None:
    """Thousands of events: more than one batched read of the store (1,000 at a time, the
    next asked while the last is handed over), bounded by an end, a limit, or the reader."""
    broker = await mesh.broker()
    t = tenant()
    ref, noise = ChannelRef(t, "r", "c"), ChannelRef(t, "r", "noise")
    seqs: list[int] = []
    for start in range(0, 2600, 200):  # concurrent publishes, stored in some order
        acks = await asyncio.gather(
            *(
                broker.publish(ref if i % 13 else noise, b"%d" % i, key())
                for i in range(start, start + 200)
            )
        )
        seqs += [a.seq for i, a in zip(range(start, start + 200), acks, strict=True) if i % 13]
    seqs.sort()
    middle = [e.seq async for e in broker.replay(ref, seqs[40], seqs[2300])]
    assert middle == seqs[40:2301]
    assert [e.seq async for e in broker.replay(ref, seqs[7], None, limit=2100)] == seqs[7:2107]
    taken = []
    async for event in broker.replay(ref, 1, None):
        taken.append(event.seq)
        if len(taken) == 1200:
            break  # the reader stops mid-batch, with the next batch asked for
    assert taken == seqs[:1200]
    assert [e.seq async for e in broker.replay(ref, seqs[-3], None)] == seqs[-3:]


async def test_live_delivery_is_in_store_order_with_the_channels_previous_seq(
    mesh: Mesh,
) -> None:
    publisher, subscriber = await mesh.broker(), await mesh.broker()
    t = tenant()
    ref, noise = ChannelRef(t, "r", "c"), ChannelRef(t, "r", "noise")
    received = Received()
    subscription = await subscriber.subscribe_live(ref, received)
    await live_in_place(publisher, ref, received)
    mine, keys = [], [key() for _ in range(10)]
    for i in range(10):
        mine.append((await publisher.publish(ref, f"{i}".encode(), keys[i])).seq)
        await publisher.publish(noise, b"x", key())  # other channels' seqs sit between
    await received.until(lambda events: events[-1].seq == mine[-1])
    await subscription.close()
    chain = [e for e in received.events if e.seq >= mine[0]]
    assert [e.seq for e in chain] == sorted({e.seq for e in chain})  # store order, once each
    store = [seq for seq, _ in await stored(publisher, ref)]
    for event in chain:  # prev_seq: the channel's previous stored event, whatever arrived
        assert event.prev_seq == store[store.index(event.seq) - 1]
    assert [e.body for e in chain] == [
        f"{i}".encode() for i in range(10) if mine[i] in {e.seq for e in chain}
    ]
    # Each live copy names the dedupe key it was published with (gateway/http/phases.py).
    assert [e.dedupe_key for e in chain] == [
        keys[i] for i in range(10) if mine[i] in {e.seq for e in chain}
    ]


async def test_tenants_are_isolated(mesh: Mesh) -> None:
    broker = await mesh.broker()
    t1, t2 = tenant(), tenant()
    ref1, ref2 = ChannelRef(t1, "r", "c"), ChannelRef(t2, "r", "c")
    received = Received()
    await broker.subscribe_live(ref2, received)
    await live_in_place(broker, ref2, received)  # seq 1 of t2
    before = len(received.events)
    for _ in range(3):
        await broker.publish(ref1, b"t1 only", key())
    own = await broker.publish(ref2, b"t2", key())
    await received.until(lambda events: events[-1].seq == own.seq)
    # t2's seqs do not count t1's events, and nothing of t1 reached t2's subscription.
    assert own.seq == 2
    assert [e.body for e in received.events[before:]] == [b"t2"]
    assert await stored(broker, ref2) == [(1, b"probe"), (2, b"t2")]


async def test_ensure_stream_is_idempotent_when_brokers_race(mesh: Mesh) -> None:
    first, second = await mesh.broker(), await mesh.broker()
    t = tenant()
    assert not first.stream_known(t) and not second.stream_known(t)
    results = await asyncio.gather(*(b.ensure_stream(t) for b in (first, second, first)))
    assert all(r != 0 for r in results)
    assert first.stream_known(t) and second.stream_known(t)
    assert await first.ensure_stream(t) == -1  # known: nothing asked
    seq = (await second.publish(ChannelRef(t, "r", "c"), b"x", key())).seq
    assert seq == 1


async def test_a_full_stream_refuses_new_events_and_keeps_the_stored_ones(mesh: Mesh) -> None:
    quota = 2000
    broker = await mesh.broker(max_bytes_for=lambda _: quota)
    ref = ChannelRef(tenant(), "r", "c")
    acked = []
    with pytest.raises(StoreQuotaExceeded):
        for _ in range(20):
            acked.append((await broker.publish(ref, b"x" * 400, key())).seq)
    assert 1 <= len(acked) <= quota // 400  # never more than the quota holds
    with pytest.raises(StoreQuotaExceeded):  # and it stays full: refusing stored nothing
        await broker.publish(ref, b"x" * 400, key())
    assert [seq for seq, _ in await stored(broker, ref)] == acked
    assert (await broker.window(ref)).last_seq == acked[-1]


async def test_apply_quota_reports_whether_the_stream_exists(mesh: Mesh) -> None:
    limits: dict[str, int] = {}
    broker = await mesh.broker(max_bytes_for=lambda t: limits.get(t, 0))
    ref = ChannelRef(tenant(), "r", "c")
    assert await broker.apply_quota(ref.tenant) is False
    await broker.publish(ref, b"x" * 400, key())
    limits[ref.tenant] = 1000
    assert await broker.apply_quota(ref.tenant) is True
    with pytest.raises(StoreQuotaExceeded):
        for _ in range(10):
            await broker.publish(ref, b"x" * 400, key())


async def test_a_service_request_reaches_exactly_one_handler(mesh: Mesh) -> None:
    first, second = await mesh.broker(), await mesh.broker()
    ref = ChannelRef(tenant(), "r", "c")
    seen: list[tuple[str, bytes]] = []
    tasks: set[asyncio.Task[None]] = set()

    def handler(name: str, broker: Broker) -> Callable[[ServiceRequest], None]:
        def on_request(request: ServiceRequest) -> None:
            seen.append((name, request.body))
            task = asyncio.create_task(broker.respond(request.reply, name.encode() + request.body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return on_request

    await first.serve(ref, "echo", handler("a", first))
    await second.serve(ref, "echo", handler("b", second))
    replies = [await first.request(ref, "echo", f"{i}".encode(), WAIT_S) for i in range(20)]
    assert sorted(body for _, body in seen) == sorted(f"{i}".encode() for i in range(20))
    assert [r[1:] for r in replies] == [f"{i}".encode() for i in range(20)]
    assert all(r[:1] in (b"a", b"b") for r in replies)


async def test_a_request_without_handlers_fails_at_once_and_an_unanswered_one_times_out(
    mesh: Mesh,
) -> None:
    broker = await mesh.broker()
    ref = ChannelRef(tenant(), "r", "c")
    with pytest.raises(NoResponders):
        await broker.request(ref, "nobody", b"", WAIT_S)
    silent = await broker.serve(ref, "silent", lambda request: None)
    with pytest.raises(RequestTimeout):
        await broker.request(ref, "silent", b"", 0.2)
    await silent.close()
    with pytest.raises(NoResponders):
        await broker.request(ref, "silent", b"", WAIT_S)
