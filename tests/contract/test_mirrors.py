"""Broker.wait_mirrored (mesh/ports.py), checked against every implementation: an ack of a
placed tenant with ``acks: mirrored`` waits until one of its mirrors holds the event."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from arqonbus_server.mesh.ports import BrokerUnavailable
from arqonbus_server.shared.subjects import ChannelRef
from tests.contract.conftest import Mesh
from tests.timeouts import SEC

WAIT_S = 10.0


def tenant() -> str:
    return "m" + uuid.uuid4().hex[:12]


async def test_a_wait_returns_once_a_mirror_holds_the_seq(mesh: Mesh) -> None:
    broker = await mesh.broker()
    ref = ChannelRef(tenant(), "r", "c")
    seqs = [(await broker.publish(ref, b"{}", uuid.uuid4().hex)).seq for _ in range(3)]
    mirror = await mesh.add_mirror(ref.tenant)
    # Many waits of one tenant at once (one poller answers them all), the newest seq too.
    await asyncio.wait_for(
        asyncio.gather(
            *(broker.wait_mirrored(ref.tenant, [mirror], seq, WAIT_S * SEC) for seq in seqs)
        ),
        2 * WAIT_S * SEC,
    )
    later = await broker.publish(ref, b"{}", uuid.uuid4().hex)
    await broker.wait_mirrored(ref.tenant, ["no-such-mirror", mirror], later.seq, WAIT_S * SEC)


async def test_a_seq_no_mirror_holds_fails_retryably_at_the_timeout(mesh: Mesh) -> None:
    broker = await mesh.broker()
    ref = ChannelRef(tenant(), "r", "c")
    stored = await broker.publish(ref, b"{}", uuid.uuid4().hex)
    mirror = await mesh.add_mirror(ref.tenant)
    with pytest.raises(BrokerUnavailable):
        await broker.wait_mirrored(ref.tenant, [mirror], stored.seq + 1, 0.3 * SEC)
    with pytest.raises(BrokerUnavailable):  # no mirror at all
        await broker.wait_mirrored(ref.tenant, ["no-such-mirror"], stored.seq, 0.3 * SEC)
