"""Atomic batch publishes (mesh/batch.py) against the real 3-node cluster (R3, file storage)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.api import RawStreamMsg, StorageType, StreamConfig

from arqonbus_server.mesh import batch
from arqonbus_server.mesh.batch import (
    AtomicPublishDisabled,
    BatchDuplicate,
    BatchItemResult,
    BatchPublisher,
    BatchPublisherClosed,
    BatchTooLarge,
    BatchTooManyInflight,
    NoStream,
)
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.mesh.nats_client import FastHeaderClient
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration

Msgs = list[tuple[str, bytes, dict[str, str]]]
MakeStream = Callable[..., Awaitable[str]]
JS_TIMEOUT = 10 * SEC  # nats-py's JetStream API calls (its default: 5 s, a publish 2 s)


@pytest.fixture
async def nc(nats_cluster: LocalCluster) -> AsyncIterator[Client]:
    """The gateway's client (the batch publisher writes encoded commands through it)."""
    client = FastHeaderClient()
    await client.connect(nats_cluster.urls)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def publisher(nc: FastHeaderClient) -> AsyncIterator[BatchPublisher]:
    pub = BatchPublisher(nc, timeout=10 * SEC)
    await pub.start()
    try:
        yield pub
    finally:
        await pub.close()


@pytest.fixture
async def make_stream(nc: Client) -> AsyncIterator[MakeStream]:
    """A fresh R3 file stream on ``<name>.>``, atomic unless told; deleted after the test."""
    made: list[str] = []

    async def make(atomic: bool = True) -> str:
        name = "bp" + uuid.uuid4().hex[:12]
        config = StreamConfig(
            name=name,
            subjects=[f"{name}.>"],
            num_replicas=3,
            storage=StorageType.FILE,
            duplicate_window=120,
            allow_msg_ttl=True,
            allow_atomic=atomic or None,
        )
        info = await nc.jsm(timeout=JS_TIMEOUT).add_stream(config)
        made.append(name)
        assert bool(info.config.allow_atomic) is atomic  # nats-py sends the field
        # The create's answer can come before this connection's server knows the stream's
        # interest in its subjects (it spreads over the routes): a publish then finds no
        # responder, and one without a reply is dropped. Wait until the stream answers a
        # publish that it refuses without storing (an expected last seq it does not have).
        await eventually(lambda: _answers(nc, f"{name}.probe"), 10 * SEC, f"stream {name} answers")
        return name

    yield make
    for name in made:
        await nc.jsm(timeout=JS_TIMEOUT).delete_stream(name)


async def _answers(nc: Client, subject: str) -> bool:
    try:
        reply = await nc.request(
            subject, b"", timeout=1, headers={"Nats-Expected-Last-Sequence": "999999999"}
        )
    except (NoRespondersError, TimeoutError):
        return False
    assert b"wrong last sequence" in reply.data, reply.data  # refused, not stored
    return True


async def _last_seq(nc: Client, stream: str) -> int:
    info = await nc.jsm(timeout=JS_TIMEOUT).stream_info(stream)
    return info.state.last_seq


async def _stored(nc: Client, stream: str, seq: int) -> RawStreamMsg:
    return await nc.jsm(timeout=JS_TIMEOUT).get_msg(stream, seq)


def _msgs(stream: str, count: int, tag: str = "m") -> Msgs:
    return [
        (f"{stream}.s{i % 3}", f"{tag}{i}".encode(), {"Nats-Msg-Id": f"{tag}-{i}"})
        for i in range(1, count + 1)
    ]


async def test_a_batch_stores_all_its_messages_in_contiguous_sequences(
    nc: Client, publisher: BatchPublisher, make_stream: MakeStream
) -> None:
    stream = await make_stream()
    await nc.jetstream(timeout=JS_TIMEOUT).publish(
        f"{stream}.before", b"before"
    )  # the batch starts at seq 2
    msgs: Msgs = [
        (
            f"{stream}.s{i % 3}",
            f"body{i}".encode(),
            {"Nats-Msg-Id": f"id-{i}", "Nats-TTL": "1h", "X-Trace": f"t{i}"},
        )
        for i in range(1, 11)
    ]

    results = await publisher.publish_batch(msgs)

    assert results == [BatchItemResult(seq) for seq in range(2, 12)]
    assert await _last_seq(nc, stream) == 11
    for i, ((subject, body, headers), result) in enumerate(zip(msgs, results, strict=True), 1):
        stored = await _stored(nc, stream, result.seq)
        assert (stored.subject, stored.data) == (subject, body)
        assert stored.headers is not None
        for key, value in headers.items():  # the message's own headers are kept
            assert stored.headers.get(key) == value, (key, stored.headers)
        # ... and the batch's, which say where each message sat in its batch
        assert stored.headers.get("Nats-Batch-Sequence") == str(i)
        assert ("Nats-Batch-Commit" in stored.headers) is (i == len(msgs))
    assert publisher.in_flight == 0


async def test_a_batch_with_an_already_stored_msg_id_stores_nothing(
    nc: Client, publisher: BatchPublisher, make_stream: MakeStream
) -> None:
    stream = await make_stream()
    first = await nc.jetstream(timeout=JS_TIMEOUT).publish(
        f"{stream}.a", b"old", headers={"Nats-Msg-Id": "m-2"}
    )
    msgs = _msgs(stream, 3)  # m-1, m-2 (stored already), m-3

    with pytest.raises(BatchDuplicate) as raised:
        await publisher.publish_batch(msgs)

    assert raised.value.code == batch.ERR_DUPLICATE
    assert await _last_seq(nc, stream) == first.seq  # nothing of the batch
    # The fallback: one by one (a one-message batch is a plain publish), the duplicate is told.
    singles = [(await publisher.publish_batch([msg]))[0] for msg in msgs]
    assert singles == [
        BatchItemResult(first.seq + 1),
        BatchItemResult(first.seq, duplicate=True),
        BatchItemResult(first.seq + 2),
    ]


async def test_a_msg_id_twice_in_one_batch_is_a_duplicate(
    nc: Client, publisher: BatchPublisher, make_stream: MakeStream
) -> None:
    stream = await make_stream()
    msgs = _msgs(stream, 2)
    msgs.append((f"{stream}.a", b"again", {"Nats-Msg-Id": "m-1"}))

    with pytest.raises(BatchDuplicate):
        await publisher.publish_batch(msgs)
    assert await _last_seq(nc, stream) == 0


async def test_a_stream_without_allow_atomic_refuses_a_batch(
    nc: Client, publisher: BatchPublisher, make_stream: MakeStream
) -> None:
    stream = await make_stream(atomic=False)

    with pytest.raises(AtomicPublishDisabled) as raised:
        await publisher.publish_batch(_msgs(stream, 2))

    assert raised.value.code == batch.ERR_ATOMIC_DISABLED
    assert "atomic publish is disabled" in str(raised.value)
    assert await _last_seq(nc, stream) == 0
    # One message is a plain publish, which needs no allow_atomic (documented in mesh/batch.py).
    assert await publisher.publish_batch(_msgs(stream, 1)) == [BatchItemResult(1)]


async def test_more_than_1000_messages_are_refused_before_sending(
    nc: Client, publisher: BatchPublisher, make_stream: MakeStream
) -> None:
    stream = await make_stream()
    sent: list[Msg] = []

    async def count(msg: Msg) -> None:
        sent.append(msg)

    watch = await nc.subscribe(f"{stream}.>", cb=count)
    with pytest.raises(BatchTooLarge) as raised:
        await publisher.publish_batch(_msgs(stream, 1001))
    assert raised.value.code == batch.ERR_TOO_LARGE
    assert "not sent" in str(raised.value)
    await nc.flush()
    await watch.unsubscribe()
    assert sent == []
    assert publisher.in_flight == 0
    assert await _last_seq(nc, stream) == 0

    assert len(await publisher.publish_batch(_msgs(stream, 1000))) == 1000  # the limit itself


async def test_the_server_refuses_a_batch_over_its_limit(
    nc: Client, publisher: BatchPublisher, make_stream: MakeStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = await make_stream()
    monkeypatch.setattr(batch, "MAX_BATCH_MESSAGES", 1001)  # let it through to the server

    with pytest.raises(BatchTooLarge) as raised:
        await publisher.publish_batch(_msgs(stream, 1001))

    assert raised.value.code == batch.ERR_TOO_LARGE
    assert "not sent" not in str(raised.value)  # the server's answer
    assert await _last_seq(nc, stream) == 0


async def test_concurrent_batches_get_disjoint_sequence_ranges(
    nc: Client, publisher: BatchPublisher, make_stream: MakeStream
) -> None:
    stream = await make_stream()
    batches = [_msgs(stream, 25, tag=f"b{b}.") for b in range(20)]

    results = await asyncio.gather(*(publisher.publish_batch(msgs) for msgs in batches))

    ranges = sorted([r.seq for r in rs] for rs in results)
    for seqs in ranges:
        assert seqs == list(range(seqs[0], seqs[0] + 25))  # contiguous within a batch
    assert sorted(seq for seqs in ranges for seq in seqs) == list(range(1, 501))  # disjoint
    for msgs, rs in zip(batches, results, strict=True):
        for (_, body, _), result in zip(msgs, rs, strict=True):
            assert (await _stored(nc, stream, result.seq)).data == body
    assert publisher.in_flight == 0


async def test_too_many_open_batches_on_a_stream_are_told_as_such(
    nc: Client, publisher: BatchPublisher, make_stream: MakeStream
) -> None:
    stream = await make_stream()
    # 50 batches opened and never committed (the server abandons them after 10 s).
    for n in range(batch.MAX_INFLIGHT_PER_STREAM):
        headers = {batch.BATCH_ID: f"open-{n}", batch.BATCH_SEQUENCE: "1"}
        await nc.publish(f"{stream}.open", b"x", headers=headers)

    with pytest.raises(BatchTooManyInflight) as raised:
        await publisher.publish_batch(_msgs(stream, 3))

    # The first message's reply says why (the commit's only says "incomplete").
    assert raised.value.code == batch.ERR_TOO_MANY_INFLIGHT
    assert raised.value.retryable
    assert await _last_seq(nc, stream) == 0


@pytest.mark.parametrize("count", [1, 3])
async def test_a_subject_without_a_stream_is_no_stream(
    publisher: BatchPublisher, count: int
) -> None:
    nowhere = "nostream" + uuid.uuid4().hex[:12]
    with pytest.raises(NoStream):
        await publisher.publish_batch(_msgs(nowhere, count))
    assert publisher.in_flight == 0


async def test_a_batch_without_an_ack_times_out(nc: FastHeaderClient) -> None:
    # A plain subscriber takes the messages and never answers: no 503, no ack.
    silent = "silent" + uuid.uuid4().hex[:12]
    sink = await nc.subscribe(f"{silent}.>")
    pub = BatchPublisher(nc, timeout=0.3 * SEC)
    await pub.start()
    try:
        async with asyncio.timeout(5 * SEC):
            with pytest.raises(TimeoutError):
                await pub.publish_batch(_msgs(silent, 3))
        assert pub.in_flight == 0
        await nc.flush()
        assert sink.pending_msgs == 3  # all three were sent
    finally:
        await pub.close()
        await sink.unsubscribe()


async def test_close_fails_the_batches_in_flight(nc: FastHeaderClient) -> None:
    silent = "silent" + uuid.uuid4().hex[:12]
    committed = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        if msg.headers and batch.BATCH_COMMIT in msg.headers:
            committed.set()

    sink = await nc.subscribe(f"{silent}.>", cb=on_msg)
    pub = BatchPublisher(nc, timeout=60 * SEC)
    await pub.start()
    try:
        pending = asyncio.create_task(pub.publish_batch(_msgs(silent, 3)))
        await asyncio.wait_for(committed.wait(), 5 * SEC)
        assert pub.in_flight == 1
        await pub.close()
        with pytest.raises(BatchPublisherClosed):
            await asyncio.wait_for(pending, 5 * SEC)
        with pytest.raises(BatchPublisherClosed):
            await pub.publish_batch(_msgs(silent, 2))
    finally:
        await pub.close()
        await sink.unsubscribe()


async def test_what_would_leave_a_batch_half_sent_is_refused_up_front(
    publisher: BatchPublisher, nc: Client
) -> None:
    assert await publisher.publish_batch([]) == []
    with pytest.raises(ValueError, match="Nats-Batch-Id"):
        await publisher.publish_batch([("x.a", b"1", {}), ("x.b", b"2", {"Nats-Batch-Id": "mine"})])
    # A body nats-py lets through, over max_payload with the headers: the server would close
    # the connection in the middle of the batch.
    with_headers = b"x" * (nc.max_payload - 50)
    with pytest.raises(ValueError, match="max_payload"):
        await publisher.publish_batch([("x.a", b"1", {}), ("x.b", with_headers, {})])
    for subject in ("", "x y", "x.a\r\nPUB x.b 1"):  # nats-py's refusals, for one or more
        with pytest.raises(nats.errors.BadSubjectError):
            await publisher.publish_batch([(subject, b"1", {})])
        with pytest.raises(nats.errors.BadSubjectError):
            await publisher.publish_batch([("x.a", b"1", {}), (subject, b"2", {})])
    assert publisher.in_flight == 0
