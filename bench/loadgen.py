"""Load generator processes for ``make bench``: picows clients speaking three protocols.

* ``arq``: the ArqonBus wire protocol (join_channel, events with acks).
* ``sio``: Engine.IO v4 / Socket.IO v5 over WebSocket, the peers' tiny app protocol
  (``join`` / ``joined`` / ``publish`` / ``event``, see bench/peers).
* ``natsws``: the NATS client protocol over nats-server's WebSocket listener.

Each process is driven by the orchestrator (bench/run.py) over stdin/stdout, one JSON
object per line:

* ``sub``: opens the subscriber connections, prints ``{"ready": n}``, then waits for one
  line ``{"expect": {channel: count}, "timeout": s}`` and prints its stats once every
  connection has received its channel's count (or the timeout passed).
* ``pub``: publishes at ``--rate`` messages/s for ``--duration`` s, round robin over the
  channels, each payload carrying ``ts`` (CLOCK_MONOTONIC ns, shared by all processes of
  the machine); prints its stats (sent and, for ``arq``, acked per channel).
* ``ingest``: many ``arq`` connections publishing with a window of unacked events (single
  ``event`` frames, or ``events`` frames of ``--batch`` events); prints acked events/s.

Latency is measured at the subscriber: now - ts, into a log-bucket histogram (1 % wide)
that the orchestrator merges across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import sys
import time
from collections import Counter
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

_LOG_BASE = math.log(1.01)
ROOM = "bench"


def bucket_of(ns: int) -> int:
    us = max(ns, 1000) / 1000.0
    return int(math.log(us) / _LOG_BASE)


def bucket_value_us(bucket: int) -> float:
    return math.exp((bucket + 0.5) * _LOG_BASE)


def percentile_us(hist: dict[int, int], q: float) -> float:
    total = sum(hist.values())
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return bucket_value_us(bucket)
    return bucket_value_us(max(hist))


def payload(ts: int, pad: int) -> dict[str, Any]:
    return {"ts": ts, "pad": "x" * pad}


def read_ts(data: bytes) -> int:
    at = data.find(b'"ts":')
    if at < 0:
        return 0
    end = data.find(b",", at)
    return int(data[at + 5 : end])


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- subscribers ----------------------------------------------------------------------


_ARQ_EVENTS = b'{"version":"1.0","type":"events"'


class Stats:
    """Deliveries of one process: count, first/last arrival, latency histogram."""

    def __init__(self) -> None:
        self.deliveries = 0
        self.first_ns = 0
        self.last_ns = 0
        self.hist: Counter[int] = Counter()
        self.ready = 0
        self.errors: list[str] = []

    def record(self, ts: int) -> None:
        now = time.monotonic_ns()
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        self.deliveries += 1
        if ts:
            self.hist[bucket_of(now - ts)] += 1


class SubListener(WSListener):  # type: ignore[misc]
    """One subscriber connection; the protocol's handshake, then counting deliveries."""

    def __init__(self, proto: str, channel: str, stats: Stats, on_ready: asyncio.Event) -> None:
        self.proto = proto
        self.channel = channel
        self.stats = stats
        self.on_ready = on_ready
        self.received = 0
        self.expected: int | None = None
        self.done = asyncio.Event()
        self.buffer = b""
        self.subscribed = False
        self.welcomed = False  # arq: the welcome came (and the join was sent)
        self.dropped = False  # the TCP connection ended without a close frame
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.proto == "natsws":
            transport.send(
                WSMsgType.TEXT,
                b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n'
                + f"SUB {ROOM}.{self.channel} 1\r\nPING\r\n".encode(),
            )

    def _ready(self) -> None:
        self.stats.ready += 1
        self.on_ready.set()

    def _delivered(self, ts: int) -> None:
        self.stats.record(ts)
        self.received += 1
        if self.expected is not None and self.received >= self.expected:
            self.done.set()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.stats.errors.append(f"closed {frame.get_close_code()}")
            transport.disconnect()
            self.done.set()
            return
        if frame.msg_type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return
        data = frame.get_payload_as_bytes()
        if self.proto == "arq":
            self._arq(transport, data)
        elif self.proto == "sio":
            self._sio(transport, data)
        else:
            self._nats(transport, data)

    def _arq(self, transport: WSTransport, data: bytes) -> None:
        if data.startswith(b'{"version":"1.0","id"'):
            self._delivered(read_ts(data))
        elif data.startswith(_ARQ_EVENTS):  # several events (the SDKs join with batch)
            at = data.find(b'"ts":')
            while at >= 0:
                end = data.find(b",", at)
                self._delivered(int(data[at + 5 : end]))
                at = data.find(b'"ts":', end)
        elif b'"type":"welcome"' in data:
            self.welcomed = True
            join = {
                "id": "join",
                "type": "command",
                "room": ROOM,
                "channel": self.channel,
                "payload": {"command": "join_channel", "parameters": {"batch": True}},
            }
            transport.send(WSMsgType.TEXT, orjson.dumps(join))
        elif b'"type":"command_response"' in data:
            if b'"status":"success"' in data:
                self._ready()
            else:
                self.stats.errors.append(data[:300].decode(errors="replace"))

    def _sio(self, transport: WSTransport, data: bytes) -> None:
        if data.startswith(b'42["event"'):
            self._delivered(read_ts(data))
        elif data == b"2":
            transport.send(WSMsgType.TEXT, b"3")
        elif data.startswith(b"0{"):
            transport.send(WSMsgType.TEXT, b"40")
        elif data.startswith(b"40"):
            transport.send(WSMsgType.TEXT, b"42" + orjson.dumps(["join", self.channel]))
        elif data.startswith(b'42["joined"'):
            self._ready()

    def _nats(self, transport: WSTransport, data: bytes) -> None:
        buf = self.buffer + data
        pos = 0
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            if buf.startswith(b"MSG ", pos):
                size = int(buf[buf.rfind(b" ", pos, line_end) + 1 : line_end])
                body_end = line_end + 2 + size
                if len(buf) < body_end + 2:
                    break
                self._delivered(read_ts(buf[line_end + 2 : body_end]))
                pos = body_end + 2
                continue
            line = buf[pos:line_end]
            if line == b"PING":
                transport.send(WSMsgType.TEXT, b"PONG\r\n")
            elif line == b"PONG" and not self.subscribed:
                self.subscribed = True
                self._ready()
            elif line.startswith(b"-ERR"):
                self.stats.errors.append(line.decode(errors="replace"))
            pos = line_end + 2
        self.buffer = buf[pos:]

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.done.is_set():  # no close frame came first (on_ws_frame sets done)
            self.dropped = True
        self.done.set()


async def open_connection(
    factory: Any, url: str, src_ip: str | None, headers: dict[str, str] | None = None
) -> tuple[WSTransport, Any]:
    kwargs: dict[str, Any] = {"websocket_handshake_timeout": 30, "max_frame_size": 16 * 1024 * 1024}
    if src_ip:
        kwargs["local_addr"] = (src_ip, 0)
    if headers:
        kwargs["extra_headers"] = headers
    return await ws_connect(factory, url, **kwargs)


_UPGRADES_PER_ADDRESS = 48  # in flight at once from one source address (see run_sub)
_CONNECT_ATTEMPTS = 5
_RETRY_BACKOFF_S = 0.05  # doubled after each attempt: at most 1.55 s in all


def proto_url(proto: str, url: str, name: str) -> str:
    if proto == "arq":
        return f"{url}?token=dev:{os.environ.get('BENCH_TENANT', 'bench')}:{name}"
    return url


async def run_sub(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    stats = Stats()
    urls = args.urls.split(",")
    channels = args.channels.split(",")
    src_ips = args.src_ips.split(",") if args.src_ips else [None]
    listeners: list[SubListener] = []
    ready = asyncio.Event()
    pending: list[asyncio.Task[Any]] = []
    # Upgrades in flight per source address, below the gateway's default cap of connections
    # one address may hold before their upgrade request arrives (64; more are dropped at
    # accept). One semaphore for all addresses let the slower of two gateways gather up to
    # 100 of one address's handshakes, and the gateway dropped the ones over its cap.
    sems = {ip: asyncio.Semaphore(_UPGRADES_PER_ADDRESS) for ip in src_ips}
    retried = 0

    async def connect(i: int) -> None:
        nonlocal retried
        channel = channels[i % len(channels)]
        url = proto_url(args.proto, urls[i % len(urls)], f"s{args.index}_{i}")
        src = src_ips[i % len(src_ips)]
        for attempt in range(_CONNECT_ATTEMPTS):
            listener = SubListener(args.proto, channel, stats, ready)
            async with sems[src]:
                _, got = await open_connection(lambda lst=listener: lst, url, src)
            if got is not None:
                listeners.append(listener)
                return
            # picows returns no listener when the server ended the TCP connection before
            # its upgrade answer (a drop at accept): a client reconnects, after a backoff.
            retried += 1
            await asyncio.sleep(_RETRY_BACKOFF_S * 2**attempt)
        raise ConnectionError(f"{url}: closed before the upgrade {_CONNECT_ATTEMPTS} times")

    for i in range(args.conns):
        pending.append(asyncio.create_task(connect(i)))
    await asyncio.gather(*pending)
    try:
        async with asyncio.timeout(60):
            while stats.ready < args.conns:
                ready.clear()
                await ready.wait()
    except TimeoutError:
        dropped = sum(1 for lst in listeners if lst.dropped)
        closed = sum(1 for lst in listeners if lst.done.is_set()) - dropped
        welcomed = sum(1 for lst in listeners if lst.welcomed)
        raise RuntimeError(
            f"{stats.ready} of {args.conns} subscribers joined within 60 s ({welcomed} got "
            f"their welcome, {closed} were closed with a close frame, {dropped} lost their "
            f"TCP connection without one; {retried} upgrades retried after the server "
            f"closed them before answering); first errors: {stats.errors[:5]}"
        ) from None
    emit({"ready": stats.ready, "retried": retried})
    command = orjson.loads(await read_line())
    expect: dict[str, int] = command["expect"]
    for listener in listeners:
        listener.expected = expect.get(listener.channel, 0)
        if listener.received >= listener.expected:
            listener.done.set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(command["timeout"]):
            await asyncio.gather(*(listener.done.wait() for listener in listeners))
    missing = sum(max(0, (lst.expected or 0) - lst.received) for lst in listeners)
    for listener in listeners:
        if listener.transport is not None:
            listener.transport.disconnect()
    return {
        "deliveries": stats.deliveries,
        "missing": missing,
        "first_ns": stats.first_ns,
        "last_ns": stats.last_ns,
        "hist": {str(k): v for k, v in stats.hist.items()},
        "errors": stats.errors[:5],
        "error_count": len(stats.errors),
    }


# -- publishers -----------------------------------------------------------------------


class PubListener(WSListener):  # type: ignore[misc]
    def __init__(self, proto: str, batch: int = 0) -> None:
        self.proto = proto
        self.batch = batch  # events per frame (arq events frames); 0: one event a frame
        self.ready = asyncio.Event()
        self.acked: Counter[str] = Counter()
        self.acks = 0
        self.errors: list[str] = []
        self.in_flight = 0
        self.slot = asyncio.Event()
        self.all_acked = asyncio.Event()

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.proto == "natsws":
            transport.send(
                WSMsgType.TEXT, b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n'
            )

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.errors.append(f"closed {frame.get_close_code()}")
            self.ready.set()
            self.all_acked.set()
            return
        data = frame.get_payload_as_bytes()
        if self.proto == "arq":
            if b'"type":"ack"' in data:
                at = data.find(b'"channel":"') + 11
                # An events frame's ack: one seq per event, the list's commas + 1.
                seqs = data.find(b'"seqs":[')
                count = 1 if seqs < 0 else data.count(b",", seqs, data.find(b"]", seqs)) + 1
                self.acked[data[at : data.find(b'"', at)].decode()] += count
                self.acks += count
                self.in_flight -= count
                self.slot.set()
                if self.in_flight == 0:
                    self.all_acked.set()
            elif b'"type":"welcome"' in data:
                self.ready.set()
            elif b'"type":"error"' in data:
                self.errors.append(data[:300].decode(errors="replace"))
                self.in_flight -= self.batch or 1
                self.slot.set()
                if self.in_flight <= 0:
                    self.all_acked.set()
        elif self.proto == "sio":
            if data == b"2":
                transport.send(WSMsgType.TEXT, b"3")
            elif data.startswith(b"0{"):
                transport.send(WSMsgType.TEXT, b"40")
            elif data.startswith(b"40"):
                self.ready.set()
        else:
            for line in data.split(b"\r\n"):
                if line == b"PONG":
                    self.ready.set()
                elif line == b"PING":
                    transport.send(WSMsgType.TEXT, b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    self.errors.append(line.decode(errors="replace"))


def encode_batch(channel: str, n: int, count: int, pad: int) -> bytes:
    """An ArqonBus ``events`` frame of ``count`` events (ids from ``n``), each stamped now."""
    now = time.monotonic_ns()
    events = [{"id": f"p{n + i}", "payload": payload(now, pad)} for i in range(count)]
    return orjson.dumps(
        {"id": f"b{n}", "type": "events", "room": ROOM, "channel": channel,
         "payload": {"events": events}}
    )  # fmt: skip


def encode_publish(proto: str, channel: str, n: int, body: dict[str, Any]) -> bytes:
    if proto == "arq":
        return orjson.dumps(
            {"id": f"p{n}", "type": "event", "room": ROOM, "channel": channel, "payload": body}
        )
    if proto == "sio":
        return b"42" + orjson.dumps(["publish", channel, body])
    data = orjson.dumps(body)
    return b"PUB %s.%s %d\r\n%s\r\n" % (ROOM.encode(), channel.encode(), len(data), data)


async def warm_up(transport: WSTransport, listener: PubListener, channel: str) -> float:
    """One event, published and acked before a workload's clock starts: a new tenant's
    first event creates its stream. The seconds it took; raises RuntimeError when it was
    refused."""
    started = time.monotonic()
    warm = {"id": "warm", "type": "event", "room": ROOM, "channel": channel, "payload": {}}
    batch, listener.batch = listener.batch, 0  # one event, whatever the workload sends
    listener.in_flight = 1
    listener.all_acked.clear()
    transport.send(WSMsgType.TEXT, orjson.dumps(warm))
    try:
        async with asyncio.timeout(60):
            await listener.all_acked.wait()
    finally:
        listener.batch = batch
    if listener.errors:
        raise RuntimeError(f"the warm-up publish failed: {listener.errors[0]}")
    return time.monotonic() - started


async def run_pub(args: argparse.Namespace) -> dict[str, Any]:
    channels = args.channels.split(",")
    listener = PubListener(args.proto)
    url = proto_url(args.proto, args.urls.split(",")[0], f"pub{args.index}")
    transport, _ = await open_connection(lambda: listener, url, None)
    async with asyncio.timeout(30):
        await listener.ready.wait()
    if args.proto == "arq":
        await warm_up(transport, listener, channels[0])
    sent: Counter[str] = Counter()
    window = args.window
    started = time.monotonic()
    deadline = started + args.duration
    n = 0
    while True:
        now = time.monotonic()
        if now >= deadline or (args.count and n >= args.count):
            break
        due = min(int((now - started) * args.rate) - n, 2000)
        if args.count:
            due = min(due, args.count - n)
        for _ in range(due):
            if args.proto == "arq":
                while listener.in_flight >= window:
                    listener.slot.clear()
                    await listener.slot.wait()
                listener.in_flight += 1
                listener.all_acked.clear()
            channel = channels[n % len(channels)]
            body = payload(time.monotonic_ns(), args.pad)
            transport.send(WSMsgType.TEXT, encode_publish(args.proto, channel, n, body))
            sent[channel] += 1
            n += 1
        # The pacing tick of an open-loop generator, not a synchronisation point.
        await asyncio.sleep(0.001)
    send_end = time.monotonic()
    if args.proto == "arq" and listener.in_flight > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                await listener.all_acked.wait()
    elif args.proto != "arq":
        # A round trip after the last publish: the server has read everything we sent.
        await round_trip(args.proto, transport, listener)
    transport.disconnect()
    delivered_to = dict(listener.acked) if args.proto == "arq" else dict(sent)
    return {
        "sent": n,
        "acked": listener.acks,
        "per_channel": delivered_to,
        "send_s": send_end - started,
        "start_ns": int(started * 1e9),
        "errors": listener.errors[:5],
        "error_count": len(listener.errors),
    }


async def round_trip(proto: str, transport: WSTransport, listener: PubListener) -> None:
    if proto == "natsws":
        listener.ready.clear()
        transport.send(WSMsgType.TEXT, b"PING\r\n")
        async with asyncio.timeout(30):
            await listener.ready.wait()


# -- ingest -----------------------------------------------------------------------------


async def run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    urls = args.urls.split(",")
    pubs: list[tuple[WSTransport, PubListener]] = []
    for i in range(args.conns):
        listener = PubListener("arq", args.batch)
        url = proto_url("arq", urls[i % len(urls)], f"ing{args.index}_{i}")
        transport, _ = await open_connection(lambda lst=listener: lst, url, None)
        pubs.append((transport, listener))
    for _, listener in pubs:
        async with asyncio.timeout(30):
            await listener.ready.wait()
    # Out of the figures, as the nats-py peer creates its stream before its clock starts.
    transport, listener = pubs[0]
    warm_s = await warm_up(transport, listener, "i0")
    listener.acks = 0
    listener.acked.clear()
    started = time.monotonic()
    deadline = started + args.duration

    async def pump(i: int, transport: WSTransport, listener: PubListener) -> None:
        n = 0
        channel = f"i{i % 10}"
        while time.monotonic() < deadline:
            while args.window - listener.in_flight < (args.batch or 1):
                listener.slot.clear()
                await listener.slot.wait()
            if args.batch:  # events frames of args.batch while the window has room
                while args.window - listener.in_flight >= args.batch:
                    listener.in_flight += args.batch
                    listener.all_acked.clear()
                    frame = encode_batch(channel, n, args.batch, args.pad)
                    transport.send(WSMsgType.TEXT, frame)
                    n += args.batch
                continue
            for _ in range(args.window - listener.in_flight):
                listener.in_flight += 1
                listener.all_acked.clear()
                body = payload(time.monotonic_ns(), args.pad)
                transport.send(WSMsgType.TEXT, encode_publish("arq", channel, n, body))
                n += 1
        if listener.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    await listener.all_acked.wait()

    await asyncio.gather(*(pump(i, t, lst) for i, (t, lst) in enumerate(pubs)))
    elapsed = time.monotonic() - started
    acked = sum(lst.acks for _, lst in pubs)
    errors = [e for _, lst in pubs for e in lst.errors]
    for transport, _ in pubs:
        transport.disconnect()
    return {
        "acked": acked,
        "elapsed_s": elapsed,
        "warm_s": warm_s,
        "errors": errors[:5],
        "error_count": len(errors),
    }


# -- plumbing -------------------------------------------------------------------------


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


async def read_line() -> bytes:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        return await reader.readline()
    finally:
        transport.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.loadgen")
    parser.add_argument("mode", choices=("sub", "pub", "ingest"))
    parser.add_argument("--proto", choices=("arq", "sio", "natsws"), default="arq")
    parser.add_argument("--urls", required=True)
    parser.add_argument("--channels", default="c0")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--src-ips", default="")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=0, help="pub: stop after this many")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--pad", type=int, default=120)
    parser.add_argument(
        "--batch", type=int, default=0, help="ingest: events per events frame (0: single events)"
    )
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch > args.window:
        parser.error(f"--batch {args.batch} is more than --window {args.window}: it never fits")
    return args


async def main_async(args: argparse.Namespace) -> None:
    if args.mode == "sub":
        emit(await run_sub(args))
    elif args.mode == "pub":
        emit(await run_pub(args))
    else:
        emit(await run_ingest(args))


def main() -> None:
    args = parse_args()
    try:
        import uvloop

        uvloop.run(main_async(args))
    except ImportError:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
