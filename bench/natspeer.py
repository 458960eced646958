"""The "no gateway" floor for the store workloads: nats-py straight into JetStream.

Ingest compares ArqonBus's acked publishes with nats-py ``publish_async`` into the same
kind of R3 stream; replay compares a gateway replay of N stored events to one WebSocket
client with a nats-py ordered consumer reading the same events.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import nats
import orjson
from nats.js.api import DeliverPolicy
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from arqonbus_server.mesh.streams import StreamPolicy, tenant_stream_config
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme

SCHEME = SubjectScheme()
ROOM, CHANNEL = "bench", "replay"


async def _connect(urls: str) -> nats.NATS:
    return await nats.connect(urls.split(","), max_reconnect_attempts=2)


async def _stream(nc: nats.NATS, tenant: str) -> None:
    await nc.jetstream().add_stream(tenant_stream_config(SCHEME, tenant, StreamPolicy(), 3))


def _stored(i: int) -> bytes:
    return orjson.dumps(
        {
            "version": "1.0",
            "id": f"e{i}",
            "type": "event",
            "room": ROOM,
            "channel": CHANNEL,
            "from": "loader",
            "timestamp": "2026-01-01T00:00:00.000Z",
            "payload": {"n": i, "pad": "x" * 100},
        }
    )


async def ingest_direct(urls: str, duration: float) -> dict[str, Any]:
    tenant = "n" + uuid.uuid4().hex[:10]
    nc = await _connect(urls)
    try:
        await _stream(nc, tenant)
        js = nc.jetstream(publish_async_max_pending=4000)
        subject = SCHEME.ingest(ChannelRef(tenant, ROOM, "c0"))
        acked = 0
        errors = 0

        def done(future: asyncio.Future[Any]) -> None:
            nonlocal acked, errors
            if future.exception() is None:
                acked += 1
            else:
                errors += 1

        started = time.monotonic()
        deadline = started + duration
        n = 0
        body = _stored(0)
        while time.monotonic() < deadline:
            future = await js.publish_async(subject, body, headers={"Nats-Msg-Id": f"m{n}"})
            future.add_done_callback(done)
            n += 1
        async with asyncio.timeout(60):
            await js.publish_async_completed()
        elapsed = time.monotonic() - started
        return {"acked_s": acked / elapsed, "acked": acked, "errors": [], "error_count": errors}
    finally:
        await nc.close()


async def preload(urls: str, tenant: str, count: int) -> int:
    """Store ``count`` events in one channel of a new tenant; return the last seq."""
    nc = await _connect(urls)
    try:
        await _stream(nc, tenant)
        js = nc.jetstream(publish_async_max_pending=4000)
        subject = SCHEME.ingest(ChannelRef(tenant, ROOM, CHANNEL))
        futures = [
            await js.publish_async(subject, _stored(i), headers={"Nats-Msg-Id": f"e{i}"})
            for i in range(count)
        ]
        async with asyncio.timeout(120):
            await js.publish_async_completed()
        last = max(f.result().seq for f in futures)
        await _replicas_caught_up(nc, futures[0].result().stream)
        return last
    finally:
        await nc.close()


async def _replicas_caught_up(nc: nats.NATS, stream: str, timeout: float = 60) -> None:
    """Until every replica of ``stream`` is current: an ack needs only 2 of 3 replicas, and a
    replay timed while the third still catches up would measure the preload's tail."""
    async with asyncio.timeout(timeout):
        while True:
            cluster = (await nc.jetstream().stream_info(stream)).cluster
            replicas = (cluster.replicas if cluster else None) or []
            if all(peer.current and not peer.lag for peer in replicas):
                return
            await asyncio.sleep(0.05)  # nothing announces it: the stream's info is polled


class _Replay(WSListener):  # type: ignore[misc]
    def __init__(self, last_seq: int) -> None:
        self.tail = b'"seq":%d}' % last_seq
        self.count = 0
        self.welcome = asyncio.Event()
        self.done = asyncio.Event()
        self.error = ""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.error = f"closed {frame.get_close_code()}"
            self.done.set()
            return
        data = frame.get_payload_as_bytes()
        if data.startswith(b'{"version":"1.0","id"'):
            self.count += 1
            if data.endswith(self.tail):
                self.done.set()
        elif b'"type":"welcome"' in data:
            self.welcome.set()
        elif b'"status":"error"' in data:
            self.error = data[:300].decode(errors="replace")
            self.done.set()


async def replay_via_gateway(url: str, tenant: str, last_seq: int) -> float:
    """Seconds from join_channel(since_seq=0) to the last stored event at the client."""
    listener = _Replay(last_seq)
    transport, _ = await ws_connect(
        lambda: listener, f"{url}?token=dev:{tenant}:reader", max_frame_size=16 << 20
    )
    try:
        async with asyncio.timeout(30):
            await listener.welcome.wait()
        join = {
            "id": "j",
            "type": "command",
            "room": ROOM,
            "channel": CHANNEL,
            "payload": {"command": "join_channel", "parameters": {"since_seq": 0}},
        }
        started = time.monotonic()
        transport.send(WSMsgType.TEXT, orjson.dumps(join))
        async with asyncio.timeout(120):
            await listener.done.wait()
        elapsed = time.monotonic() - started
        if listener.error:
            raise RuntimeError(f"replay failed: {listener.error}")
        return elapsed
    finally:
        transport.disconnect()


async def replay_direct(urls: str, tenant: str, last_seq: int) -> float:
    """Seconds for a nats-py ordered consumer to read the same events."""
    nc = await _connect(urls)
    try:
        js = nc.jetstream()
        started = time.monotonic()
        sub = await js.subscribe(
            SCHEME.ingest(ChannelRef(tenant, ROOM, CHANNEL)),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=1 << 30,
        )
        async with asyncio.timeout(120):
            while True:
                msg = await sub.next_msg(timeout=30)
                if msg.metadata.sequence.stream >= last_seq:
                    break
        elapsed = time.monotonic() - started
        await sub.unsubscribe()
        return elapsed
    finally:
        await nc.close()
