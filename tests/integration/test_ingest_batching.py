"""Publishes coalesced into atomic batches (mesh/ingest.py) through the real broker on the
real 3-node cluster: each event acked with its own seq, stored once, readable in order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.js.api import StreamConfig

from arqonbus_server.mesh.jetstream import JetStreamBroker
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.mesh.streams import StreamPolicy, tenant_stream_config
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme
from tests.conftest import new_cluster
from tests.timeouts import SEC

SCHEME = SubjectScheme("arq")


@pytest.fixture
async def broker(nats_cluster: LocalCluster) -> AsyncIterator[JetStreamBroker]:
    opened = JetStreamBroker(nats_cluster.urls, SCHEME, StreamPolicy(), name="ingest-test")
    await opened.connect()
    try:
        yield opened
    finally:
        await opened.close()


async def stored(broker: JetStreamBroker, ref: ChannelRef) -> list[tuple[int, bytes]]:
    return [(e.seq, e.body) async for e in broker.replay(ref, 1, None)]


async def test_concurrent_publishes_are_batched_each_acked_with_its_own_seq(
    broker: JetStreamBroker, tenant: str
) -> None:
    ref = ChannelRef(tenant, "r", "c")
    await broker.ensure_stream(tenant)
    n = 600
    bodies = [b'{"n":%d}' % i for i in range(n)]
    async with asyncio.timeout(30 * SEC):
        results = await asyncio.gather(
            *(broker.publish(ref, body, f"id-{i}") for i, body in enumerate(bodies))
        )
    seqs = [r.seq for r in results]
    assert sorted(seqs) == list(range(1, n + 1)) and not any(r.duplicate for r in results)
    stats = broker.batch_stats
    assert stats.events == n and stats.batches < n / 5, stats
    # The store holds each event once, at the seq its ack named.
    by_seq = dict(await stored(broker, ref))
    assert [by_seq[s] for s in seqs] == bodies


async def test_a_resent_id_inside_a_batch_is_still_a_duplicate_with_its_first_seq(
    broker: JetStreamBroker, tenant: str
) -> None:
    ref = ChannelRef(tenant, "r", "c")
    first = await broker.publish(ref, b"{}", "resent")
    async with asyncio.timeout(30 * SEC):
        results = await asyncio.gather(
            *(broker.publish(ref, b"{}", "resent" if i == 50 else f"new-{i}") for i in range(200))
        )
    assert results[50].duplicate and results[50].seq == first.seq
    fresh = [r for i, r in enumerate(results) if i != 50]
    assert not any(r.duplicate for r in fresh)
    assert len({r.seq for r in fresh}) == 199 and first.seq not in {r.seq for r in fresh}
    assert len(await stored(broker, ref)) == 200  # the resend stored nothing
    assert broker.batch_stats.refusals.get("duplicate", 0) >= 1, broker.batch_stats


async def test_a_stream_made_without_atomic_batches_gets_them_and_loses_nothing(
    broker: JetStreamBroker, tenant: str, nats_cluster: LocalCluster
) -> None:
    # A stream created by an earlier version: no allow_atomic.
    config: StreamConfig = tenant_stream_config(SCHEME, tenant, StreamPolicy(), 3)
    config.allow_atomic = False
    jsm = broker.nats_connection().jsm()
    await jsm.add_stream(config)
    ref = ChannelRef(tenant, "r", "c")
    async with asyncio.timeout(30 * SEC):
        results = await asyncio.gather(
            *(broker.publish(ref, b"{}", uuid.uuid4().hex) for _ in range(300))
        )
    assert sorted(r.seq for r in results) == list(range(1, 301))
    info = await jsm.stream_info(SCHEME.stream_name(tenant))
    assert info.config.allow_atomic is True  # turned on when the gateway first used it


async def test_a_server_batch_limit_below_ours_loses_nothing_and_the_lane_fits_under_it(
    tmp_path_factory: pytest.TempPathFactory, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An operator's jetstream limits allow 10 messages per atomic batch (the default: 1,000).
    cluster = new_cluster(
        tmp_path_factory.mktemp("nats-small-batches"),
        nodes=3,
        jetstream_config="limits { batch { max_msgs: 10 } }",
    )
    await cluster.start(timeout=60 * SEC)
    broker = JetStreamBroker(cluster.urls, SCHEME, StreamPolicy(), name="small-batches")
    try:
        await broker.connect()
        ref = ChannelRef(tenant, "r", "c")
        await broker.ensure_stream(tenant)
        n = 300
        bodies = [b'{"n":%d}' % i for i in range(n)]
        async with asyncio.timeout(60 * SEC):
            # An events frame of 300 (groups of the lane's size), then rounds of 300 single
            # publishes at once: the first ones find the size, the last ones are batched.
            many = await broker.publish_many(
                ref, [(b, f"m-{i}", None) for i, b in enumerate(bodies)]
            )
            rounds = [
                await asyncio.gather(
                    *(broker.publish(ref, b, f"s{r}-{i}") for i, b in enumerate(bodies))
                )
                for r in range(3)
            ]
        results = many + [result for round_ in rounds for result in round_]
        seqs = [r.seq for r in results]
        assert sorted(seqs) == list(range(1, 4 * n + 1)) and not any(r.duplicate for r in results)
        assert [r.seq for r in many] == list(range(1, n + 1))  # the frame in its order
        by_seq = dict(await stored(broker, ref))
        assert [by_seq[s] for s in seqs] == bodies * 4
        # A few refusals took the lane below the server's limit; then it batched again.
        stats = broker.batch_stats
        assert broker._ingest is not None and broker._ingest.max_batch <= 10
        # At least one refusal: the server limit took effect (without jetstream_config in
        # the nodes' config there is none). The lowering itself is shown by max_batch above
        # and the batching below: without it the lane stays at 1,000 and stores 3 of the
        # 1,200 events in batches (checked by disabling IngestBatcher._below).
        assert 1 <= stats.refusals.get("too_large", 0) <= 10, stats
        assert stats.events >= n and stats.batches < stats.events / 4, stats
        assert "batches of at most" in caplog.text
    finally:
        await broker.close()
        await cluster.stop()
