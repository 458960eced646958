"""Long replays through a pull consumer (mesh/jetstream.py ``_replay_pulled``), on the real
3-node cluster: exactly the events direct gets read, and wherever the consumer cannot go on
(deleted, a message missing, the gateway's cap reached), direct gets read the rest.

The thresholds are lowered so a few hundred events make many pull requests (and the file stays
light: in `make test` it may run beside the timing checks of the short chaos scenarios).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import nats
import pytest

from arqonbus_server.mesh import jetstream
from arqonbus_server.mesh.jetstream import JetStreamBroker, _Pulled, ack_seqs
from arqonbus_server.shared.subjects import ChannelRef
from tests.contract.conftest import Mesh
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def small_pulls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jetstream, "_PULL_BATCH", 64)


async def long_replays(mesh: Mesh) -> JetStreamBroker:
    """A broker for which a replay of 100 stream seqs or more is long."""
    broker = await mesh.broker()
    assert isinstance(broker, JetStreamBroker)
    broker.pull_replay_min = 100
    broker.on_replay_consumer = outcomes.append
    return broker


outcomes: list[str] = []  # what the brokers told of their replays through a consumer


@pytest.fixture(autouse=True)
def no_outcomes_yet() -> None:
    outcomes.clear()


async def channel_with_noise(broker: JetStreamBroker, events: int) -> tuple[ChannelRef, list[int]]:
    """At least ``events`` events of one channel, stored concurrently among a sibling's."""
    t = "p" + uuid.uuid4().hex[:12]
    ref, noise = ChannelRef(t, "r", "c"), ChannelRef(t, "r", "noise")
    seqs: list[int] = []
    for start in range(0, events * 13 // 12 + 13, 200):
        acks = await asyncio.gather(
            *(
                broker.publish(ref if i % 13 else noise, b"%d" % i, uuid.uuid4().hex)
                for i in range(start, start + 200)
            )
        )
        seqs += [a.seq for i, a in zip(range(start, start + 200), acks, strict=True) if i % 13]
    seqs.sort()
    return ref, seqs


async def consumers_of(broker: JetStreamBroker, ref: ChannelRef) -> list[str]:
    nc = await nats.connect(broker._urls)
    try:
        infos = await nc.jsm().consumers_info(broker._primary_stream(ref.tenant))
        return [info.name for info in infos]
    finally:
        await nc.close()


# Why a pull consumer may stop short on a loaded machine, where direct gets then read the rest
# by design: the server's API or the store timing out, a leader elected anew. Anything else (a
# consumer seq skipped, a message without its ack subject, a refused request, no responders
# to the new consumer's requests after the retries) is ours.
_LOAD_REASONS = ("TimeoutError", "nothing came for a while", "409 Leadership Change")


async def test_a_long_replay_reads_through_a_pull_consumer_exactly(
    jetstream_mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="arqonbus.mesh.jetstream")
    broker = await long_replays(jetstream_mesh)
    ref, seqs = await channel_with_noise(broker, 500)
    before = broker.pulled_replays
    assert [e.seq async for e in broker.replay(ref, 1, None)] == seqs
    bodies = [e.body async for e in broker.replay(ref, seqs[10], seqs[10])]
    assert len(bodies) == 1  # one event: direct get
    middle = [e.seq async for e in broker.replay(ref, seqs[40], seqs[430])]
    assert middle == seqs[40:431]
    assert [e.seq async for e in broker.replay(ref, seqs[7], None, limit=300)] == seqs[7:307]
    taken = []
    async with contextlib.aclosing(broker.replay(ref, 1, None)) as events:
        async for event in events:
            taken.append(event.seq)
            if len(taken) == 250:
                break  # the reader stops with requests in flight
    assert taken == seqs[:250]
    assert broker.pulled_replays - before == 4  # all but the one-event replay
    # Every event came exactly (above) whatever the consumer did; it read whole replays, and
    # stopped short (direct gets reading the rest) only for a reason of the machine's load.
    reasons = [
        str(r.args[2])
        for r in caplog.records
        if r.name == "arqonbus.mesh.jetstream" and "through a pull consumer stopped" in r.msg
    ]
    assert outcomes.count("read") >= 2 and len(outcomes) == 4, (outcomes, reasons)
    assert len(reasons) == outcomes.count("cut_short"), (outcomes, reasons)
    assert all(r.startswith(_LOAD_REASONS) for r in reasons), reasons

    # Each replay's consumer is deleted once it is done (not left to idle out).
    async def none_left() -> bool:
        return await consumers_of(broker, ref) == []

    await eventually(none_left, 10 * SEC, "the replays' consumers deleted")


async def test_requests_bounded_in_bytes_still_read_every_event(
    jetstream_mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that end on their byte bound (409 Message Size Exceeds MaxBytes, or
    without a word when the bytes run out exactly) before their count."""
    monkeypatch.setattr(jetstream, "_PULL_BATCH_BYTES", 2500)  # a handful of events each
    broker = await long_replays(jetstream_mesh)
    ref, seqs = await channel_with_noise(broker, 300)
    before = broker.pulled_replays
    assert [e.seq async for e in broker.replay(ref, 1, None)] == seqs
    assert broker.pulled_replays - before == 1


async def test_a_consumer_deleted_mid_replay_leaves_the_rest_to_direct_gets(
    jetstream_mesh: Mesh,
) -> None:
    broker = await long_replays(jetstream_mesh)
    ref, seqs = await channel_with_noise(broker, 400)
    taken = []
    async for event in broker.replay(ref, 1, None):
        taken.append(event.seq)
        if len(taken) == 150:
            assert outcomes == []  # still reading through the consumer

            async def the_one() -> list[str] | None:
                # A listing may leave out a consumer whose server was slow to answer.
                names = await consumers_of(broker, ref)
                return names if len(names) == 1 else None

            names = await eventually(the_one, 10 * SEC, "the replay's consumer listed")
            nc = await nats.connect(broker._urls)
            try:
                await nc.jsm().delete_consumer(broker._primary_stream(ref.tenant), names[0])
            finally:
                await nc.close()
    assert taken == seqs
    assert outcomes == ["cut_short"]


async def test_a_message_missing_on_the_way_leaves_the_rest_to_direct_gets(
    jetstream_mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer seq skipped (this connection dropped a message, as a slow consumer
    would): the replay neither skips the event nor repeats one."""
    dropped: list[int] = []
    on_raw = _Pulled.on_raw

    def lossy(self: _Pulled, data: bytes, headers: bytes | None, reply: bytes) -> None:
        seqs = ack_seqs(reply)
        if seqs is not None and seqs[1] == 150 and not dropped:
            dropped.append(seqs[0])
            return
        on_raw(self, data, headers, reply)

    monkeypatch.setattr(_Pulled, "on_raw", lossy)
    broker = await long_replays(jetstream_mesh)
    ref, seqs = await channel_with_noise(broker, 300)
    got = [e.seq async for e in broker.replay(ref, 1, None)]
    assert got == seqs, (len(got), len(seqs), dropped, outcomes)
    assert (dropped, outcomes) == ([seqs[149]], ["cut_short"])


async def test_replays_over_the_cap_read_by_direct_get(
    jetstream_mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jetstream, "_PULL_REPLAYS_MAX", 1)
    broker = await long_replays(jetstream_mesh)
    ref, seqs = await channel_with_noise(broker, 200)
    before = broker.pulled_replays
    first, second = broker.replay(ref, 1, None), broker.replay(ref, 1, None)
    got_first = [await anext(first)]  # the first holds the one pull slot
    got_second = [e.seq async for e in second]
    got_first += [e async for e in first]
    assert [e.seq for e in got_first] == seqs and got_second == seqs
    assert broker.pulled_replays - before == 1


@pytest.mark.parametrize(
    ("reply", "seqs"),
    [
        (b"$JS.ACK.S.C.1.42.7.1700000000000000000.3", (42, 7)),
        (b"$JS.ACK._.abc123.S.C.1.42.7.1700000000000000000.3", (42, 7)),
        (b"$JS.ACK._.abc123.S.C.1.42.7.1700000000000000000.3.tok", (42, 7)),
        (b"", None),
        (b"_INBOX.x.y", None),
        (b"$JS.ACK.S.C.1.x.7.1.3", None),
        (b"$JS.NAK.S.C.1.42.7.1.3", None),
    ],
)
def test_ack_subjects(reply: bytes, seqs: tuple[int, int] | None) -> None:
    assert ack_seqs(reply) == seqs


def test_statuses_that_end_a_request_give_back_its_credit() -> None:
    pulled = _Pulled()
    pulled.credit = 128
    pulled.on_raw(b"a", b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n", b"$JS.ACK.S.C.1.5.1.1.0")
    pulled.on_raw(b"", b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 63\r\n\r\n", b"")
    pulled.on_raw(b"", b"NATS/1.0 409 Batch Completed\r\nNats-Pending-Messages: 0\r\n\r\n", b"")
    pulled.on_raw(b"", b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", b"")
    assert (pulled.credit, pulled.items, pulled.failed) == (64, [(5, 1, b"a")], "")
    pulled.on_raw(b"", b"NATS/1.0 409 Consumer Deleted\r\n\r\n", b"")
    assert pulled.failed == "409 Consumer Deleted"
