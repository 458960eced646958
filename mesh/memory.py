"""In-memory twins of the mesh's ports, held to the same contract suite (tests/contract/).

One :class:`MemoryMesh` stands for a NATS cluster: every :class:`MemoryBroker`,
:class:`MemoryStateStore`, :class:`MemoryAuditSink` and :class:`MemoryClusterView` made on it sees the same streams,
buckets and handlers, as gateways on one cluster do. Nothing here does I/O; live events
and watch changes are handed over on the event loop (``call_soon``), after the write
returned, as they would arrive from NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import orjson

from arqonbus_server.mesh.mirrors import TenantConfirmers, mirrors_to_confirm
from arqonbus_server.mesh.ports import (
    BrokerUnavailable,
    ChannelDetail,
    ChannelStats,
    ChannelWindow,
    InvalidKey,
    KeyExists,
    KVChange,
    KVEntry,
    LiveEvent,
    LiveHandler,
    NatsNode,
    NoResponders,
    PresenceChange,
    PresenceEntry,
    PublishDone,
    PublishItem,
    PublishResult,
    ReconnectHandler,
    RequestTimeout,
    RevisionMismatch,
    ServiceHandler,
    ServiceRequest,
    StoredEvent,
    StoreQuotaExceeded,
    StreamStats,
    publish_in_task,
    trim_count,
)
from arqonbus_server.mesh.presence import (
    channel_filter,
    decode_entry,
    encode_entry,
    entry_key,
    gateway_filter,
    lease_key,
    room_filter,
)
from arqonbus_server.shared.regions import Placement
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme, node_token

_KEY_RE = re.compile(r"[-/_=.a-zA-Z0-9]+")
MAX_PAYLOAD = 1024 * 1024
# channel_detail sums the bytes of a channel of at most this many events, else estimates
# them from a sample of _SAMPLE_SIZE spread over the channel (as mesh/jetstream.py does).
DETAIL_EXACT_MAX = 10_000
_SAMPLE_SIZE = 1000


def _check_key(key: str) -> None:
    if not _KEY_RE.fullmatch(key) or key.startswith(".") or key.endswith("."):
        raise InvalidKey(f"{key[:80]!r} is not a valid KV key")


# -- streams -------------------------------------------------------------------------------


@dataclass
class _Stored:
    seq: int
    ref: ChannelRef
    body: bytes
    prev_seq: int
    expires: float | None = None  # by the mesh's clock: a per-message TTL (a room's retention)


@dataclass
class _Stream:
    max_bytes: int = -1
    events: list[_Stored] = field(default_factory=list)
    last_seq: int = 0
    stored_bytes: int = 0
    dedupe: dict[str, tuple[int, float]] = field(default_factory=dict)

    def last_of(self, ref: ChannelRef) -> int:
        for event in reversed(self.events):
            if event.ref == ref:
                return event.seq
        return 0

    def expire(self, now: float) -> None:
        """Remove the events whose TTL ran out (as JetStream does, on its own clock)."""
        if any(e.expires is not None and e.expires <= now for e in self.events):
            self.remove(lambda e: e.expires is not None and e.expires <= now)

    def remove(self, doomed: Callable[[_Stored], bool]) -> int:
        """Remove the events ``doomed`` picks; returns how many. last_seq stays."""
        kept = [e for e in self.events if not doomed(e)]
        removed = len(self.events) - len(kept)
        self.events = kept
        self.stored_bytes = sum(len(e.body) for e in kept)
        return removed


@dataclass
class _Bucket:
    ttl_s: float | None
    values: dict[str, tuple[bytes, int, float]] = field(default_factory=dict)
    revision: int = 0
    watchers: list[_MemoryWatch] = field(default_factory=list)


class MemoryMesh:
    """The shared state of a cluster: streams, buckets, handlers and subscribers."""

    def __init__(
        self,
        scheme: SubjectScheme | None = None,
        dedupe_window_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scheme = scheme or SubjectScheme()
        self.dedupe_window_s = dedupe_window_s
        self.clock = clock
        self.streams: dict[str, _Stream] = {}
        self.live: dict[ChannelRef, list[_Subscription]] = {}
        self.handlers: dict[tuple[ChannelRef, str], list[_Subscription]] = {}
        self.replies: dict[str, asyncio.Future[bytes]] = {}
        self.buckets: dict[str, _Bucket] = {}
        self.audit: dict[str, list[tuple[int, datetime, str, bytes]]] = {}
        self.audit_ids: dict[str, dict[str, tuple[int, float]]] = {}
        self.heartbeats: dict[str, tuple[bytes, float]] = {}  # node token -> (body, expires)
        # Mirror streams by name: (the tenant they copy, the seq they are held at or None
        # while they follow at once). Events themselves stay in the tenant's stream.
        self.mirrors: dict[str, tuple[str, int | None]] = {}
        self.presence = _PresenceTables()  # MemoryPresenceStore's entries and leases

    def add_mirror(self, name: str, tenant: str) -> None:
        """A mirror of the tenant's stream, up to date at once (until :meth:`hold_mirror`)."""
        self.mirrors[name] = (tenant, None)

    def hold_mirror(self, name: str, upto: int | None) -> None:
        """Make the mirror hold ``upto`` (lagging behind the stream); None: follow again."""
        self.mirrors[name] = (self.mirrors[name][0], upto)

    def mirror_last_seq(self, name: str) -> int:
        """The mirror's last seq (0: no such mirror)."""
        tenant, held = self.mirrors.get(name, ("", 0))
        stream = self.streams.get(tenant)
        last = stream.last_seq if stream is not None else 0
        return last if held is None else min(held, last)


class _Subscription:
    def __init__(self, registry: list[_Subscription], handler: Callable[..., None]) -> None:
        self._registry = registry
        self.handler = handler
        registry.append(self)

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._registry.remove(self)


# -- Broker -------------------------------------------------------------------------------


class MemoryBroker:
    """A :class:`mesh.ports.Broker` in memory (guarantees stated there)."""

    def __init__(self, mesh: MemoryMesh | None = None, default_max_bytes: int = -1) -> None:
        self.mesh = mesh or MemoryMesh()
        self._default_max_bytes = default_max_bytes
        self._connected = False
        self._known: set[str] = set()
        self._reconnect_handlers: list[ReconnectHandler] = []
        self._replies = itertools.count(1)
        self.max_bytes_for: Callable[[str], int] | None = None
        self.placement_for: Callable[[str], Placement | None] | None = None
        self.publish_timeout_s = 5.0  # how long a placed tenant's ack waits for a mirror
        self._confirmers = TenantConfirmers(self._mirror_last_seq)
        # channel_detail sums the bytes of a channel up to this many events (tests lower it).
        self.detail_exact_max = DETAIL_EXACT_MAX

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def max_payload(self) -> int:
        return MAX_PAYLOAD

    async def connect(self) -> None:
        self._connected = True

    async def connect_with_retry(self, stop: Any) -> bool:
        await self.connect()
        return True

    def _require(self) -> None:
        if not self._connected:
            raise BrokerUnavailable("not connected")

    def _quota(self, tenant: str) -> int:
        own = self.max_bytes_for(tenant) if self.max_bytes_for is not None else 0
        return own if own > 0 else self._default_max_bytes

    def _placement(self, tenant: str) -> Placement | None:
        return self.placement_for(tenant) if self.placement_for is not None else None

    def stream_known(self, tenant: str) -> bool:
        return self._connected and (tenant in self._known or self._placement(tenant) is not None)

    async def ensure_stream(self, tenant: str) -> int:
        self._require()
        if tenant in self._known or self._placement(tenant) is not None:
            return -1
        if tenant not in self.mesh.streams:
            self.mesh.streams[tenant] = _Stream(max_bytes=self._quota(tenant))
        self._known.add(tenant)
        return 1

    async def apply_quota(self, tenant: str) -> bool:
        self._require()
        stream = self.mesh.streams.get(tenant)
        if stream is None:
            return False
        stream.max_bytes = self._quota(tenant)
        return True

    async def publish(
        self,
        ref: ChannelRef,
        body: bytes,
        dedupe_key: str,
        headers: Mapping[str, str] | None = None,
        ttl_s: int | None = None,
    ) -> PublishResult:
        if ttl_s is not None and ttl_s < 1:
            raise ValueError(f"ttl_s must be at least 1 second, not {ttl_s}")
        await self.ensure_stream(ref.tenant)
        stream = self._stream(ref.tenant)
        if stream is None:  # a placed tenant whose stream is not provisioned (yet)
            raise BrokerUnavailable(f"no stream stores the events of {ref.tenant}")
        placement = self._placement(ref.tenant)
        if ttl_s is not None:
            headers = {**(headers or {}), "Nats-TTL": f"{ttl_s}s"}  # as the real store keeps it
        result = self._store(stream, ref, body, dedupe_key, headers, placement, ttl_s)
        if mirrors := mirrors_to_confirm(placement):
            await self.wait_mirrored(ref.tenant, mirrors, result.seq, self.publish_timeout_s)
        return result

    def publish_then(
        self,
        ref: ChannelRef,
        body: bytes,
        dedupe_key: str,
        headers: Mapping[str, str] | None,
        ttl_s: int | None,
        done: PublishDone,
    ) -> None:
        publish_in_task(self.publish(ref, body, dedupe_key, headers, ttl_s), done)

    async def publish_many(
        self, ref: ChannelRef, items: Sequence[PublishItem], ttl_s: int | None = None
    ) -> list[PublishResult]:
        return [await self.publish(ref, body, key, headers, ttl_s) for body, key, headers in items]

    async def wait_mirrored(
        self, tenant: str, mirrors: Sequence[str], seq: int, timeout: float
    ) -> None:
        self._require()
        await self._confirmers.wait(tenant, mirrors, seq, timeout)

    async def _mirror_last_seq(self, name: str) -> int:
        return self.mesh.mirror_last_seq(name)

    def _stream(self, tenant: str) -> _Stream | None:
        """The tenant's stream without its expired events (None: it has none)."""
        stream = self.mesh.streams.get(tenant)
        if stream is not None:
            stream.expire(self.mesh.clock())
        return stream

    def _store(
        self,
        stream: _Stream,
        ref: ChannelRef,
        body: bytes,
        dedupe_key: str,
        headers: Mapping[str, str] | None,
        placement: Placement | None,
        ttl_s: int | None = None,
    ) -> PublishResult:
        """Store in the tenant's stream: a placed tenant's is its primary, of its epoch."""
        epoch = None if placement is None else placement.epoch
        now = self.mesh.clock()
        known = stream.dedupe.get(dedupe_key)
        if known is not None and now - known[1] < self.mesh.dedupe_window_s:
            return PublishResult(known[0], True, epoch)
        if 0 < stream.max_bytes < stream.stored_bytes + len(body):
            raise StoreQuotaExceeded("maximum bytes exceeded")
        stream.last_seq += 1
        expires = None if ttl_s is None else now + ttl_s
        event = _Stored(stream.last_seq, ref, body, stream.last_of(ref), expires)
        stream.events.append(event)
        stream.stored_bytes += len(body)
        stream.dedupe[dedupe_key] = (event.seq, now)
        name = (
            self.mesh.scheme.stream_name(ref.tenant)
            if placement is None
            else placement.primary.stream
        )
        live = LiveEvent(
            event.seq, event.prev_seq, body, dict(headers) if headers else None, name, dedupe_key
        )
        loop = asyncio.get_running_loop()
        for sub in list(self.mesh.live.get(ref, ())):
            loop.call_soon(sub.handler, ref, live)
        return PublishResult(event.seq, False, epoch)

    async def subscribe_live(self, ref: ChannelRef, handler: LiveHandler) -> _Subscription:
        self._require()
        return _Subscription(self.mesh.live.setdefault(ref, []), handler)

    async def window(self, ref: ChannelRef) -> ChannelWindow:
        self._require()
        stream = self._stream(ref.tenant)
        if stream is None:
            return ChannelWindow(0, 0)
        first = stream.events[0].seq if stream.events else 0
        return ChannelWindow(stream.last_of(ref), first)

    async def stream_stats(self, tenant: str) -> StreamStats:
        self._require()
        stream = self._stream(tenant)
        if stream is None or not stream.events:
            return StreamStats(0, 0, 0, 0)
        first, last = stream.events[0].seq, stream.events[-1].seq
        return StreamStats(len(stream.events), stream.stored_bytes, first, last)

    async def channel_stats(self, tenant: str, room: str | None = None) -> list[ChannelStats]:
        self._require()
        stream = self._stream(tenant)
        found: dict[ChannelRef, tuple[int, int]] = {}
        for event in stream.events if stream is not None else ():
            if room is None or event.ref.room == room:
                count, _ = found.get(event.ref, (0, 0))
                found[event.ref] = (count + 1, event.seq)
        stats = [ChannelStats(r.room, r.channel, n, last) for r, (n, last) in found.items()]
        return sorted(stats, key=lambda s: (s.room, s.channel))

    async def channel_detail(self, ref: ChannelRef) -> ChannelDetail:
        self._require()
        stream = self._stream(ref.tenant)
        events = [e for e in stream.events if e.ref == ref] if stream is not None else []
        if not events:
            return ChannelDetail(0, 0, 0, 0, True)
        first, last = events[0].seq, events[-1].seq
        if len(events) <= self.detail_exact_max:
            return ChannelDetail(len(events), first, last, sum(len(e.body) for e in events), True)
        sample = events[:: max(1, len(events) // _SAMPLE_SIZE)]
        estimate = round(sum(len(e.body) for e in sample) / len(sample) * len(events))
        return ChannelDetail(len(events), first, last, estimate, False)

    async def purge_room(self, tenant: str, room: str) -> int:
        self._require()
        stream = self._stream(tenant)
        return 0 if stream is None else stream.remove(lambda e: e.ref.room == room)

    async def trim_room(self, tenant: str, room: str, max_bytes: int) -> int:
        """The room's oldest events past the cap go, as one step (no event is awaited)."""
        self._require()
        stream = self._stream(tenant)
        events = [e for e in stream.events if e.ref.room == room] if stream else []
        removed = trim_count((len(e.body) for e in events), max_bytes)
        if stream is None or removed == 0:
            return 0
        cut = events[removed - 1].seq  # the newest removed
        return stream.remove(lambda e: e.ref.room == room and e.seq <= cut)

    async def replay(
        self, ref: ChannelRef, start_seq: int, end_seq: int | None, limit: int | None = None
    ) -> AsyncGenerator[StoredEvent, None]:
        self._require()
        stream = self._stream(ref.tenant)
        if stream is None:
            return
        end = stream.last_of(ref) if end_seq is None else end_seq
        count = 0
        for event in list(stream.events):
            if limit is not None and count >= limit:
                return
            if event.ref == ref and start_seq <= event.seq <= end:
                count += 1
                yield StoredEvent(event.seq, event.body)

    async def request(
        self,
        ref: ChannelRef,
        command: str,
        body: bytes,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        self._require()
        handlers = self.mesh.handlers.get((ref, self.mesh.scheme.command(ref, command)), [])
        if not handlers:
            raise NoResponders(command)
        reply = f"_INBOX.memory.{id(self)}.{next(self._replies)}"
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.mesh.replies[reply] = future
        random.choice(handlers).handler(
            ServiceRequest(body, reply, dict(headers) if headers else None)
        )
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise RequestTimeout(command) from None
        finally:
            self.mesh.replies.pop(reply, None)

    async def serve(self, ref: ChannelRef, command: str, handler: ServiceHandler) -> _Subscription:
        self._require()
        key = (ref, self.mesh.scheme.command(ref, command))
        return _Subscription(self.mesh.handlers.setdefault(key, []), handler)

    async def respond(self, reply: str, body: bytes) -> None:
        self._require()
        future = self.mesh.replies.get(reply)
        if future is not None and not future.done():
            future.set_result(body)

    async def check_health(self, timeout: float = 5.0) -> bool:
        return self._connected

    async def check_link(self, timeout: float = 5.0) -> bool:
        return self._connected

    async def reconnect_elsewhere(self) -> bool:
        if not self._connected:
            return False
        for handler in list(self._reconnect_handlers):
            await handler()
        return True

    def on_reconnect(self, handler: ReconnectHandler) -> None:
        self._reconnect_handlers.append(handler)

    async def close(self, timeout: float = 5.0) -> None:
        self._connected = False
        await self._confirmers.close()


# -- StateStore ----------------------------------------------------------------------------


C = TypeVar("C")


class _QueuedWatch(Generic[C]):
    """A watch of the twins: its initial changes, ``None``, then each change offered.

    It registers itself in ``registry`` (the watched bucket's or channel's list), where
    writers find it, and leaves it when stopped."""

    def __init__(self, registry: list[_QueuedWatch[C]], initial: list[C]) -> None:
        self._registry = registry
        self._queue: asyncio.Queue[C | None] = asyncio.Queue()
        for change in initial:
            self._queue.put_nowait(change)
        self._queue.put_nowait(None)
        self._stopped = False
        registry.append(self)

    def offer(self, change: C) -> None:
        asyncio.get_running_loop().call_soon(self._queue.put_nowait, change)

    async def __aiter__(self) -> AsyncIterator[C | None]:
        while not self._stopped:
            item = await self._queue.get()
            if self._stopped:
                return
            yield item

    async def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(ValueError):
            self._registry.remove(self)
        self._queue.put_nowait(None)  # wakes an iteration waiting for a change


_MemoryWatch = _QueuedWatch[KVChange]


class MemoryBucket:
    """A :class:`mesh.ports.KVBucket` in memory (guarantees stated there)."""

    def __init__(self, name: str, bucket: _Bucket, clock: Callable[[], float]) -> None:
        self._name = name
        self._bucket = bucket
        self._clock = clock

    @property
    def name(self) -> str:
        return self._name

    def _live(self, key: str) -> tuple[bytes, int] | None:
        found = self._bucket.values.get(key)
        if found is None:
            return None
        value, revision, written = found
        ttl = self._bucket.ttl_s
        if ttl is not None and self._clock() - written >= ttl:
            del self._bucket.values[key]
            return None
        return value, revision

    def _write(self, key: str, value: bytes | None) -> int:
        bucket = self._bucket
        bucket.revision += 1
        if value is None:
            bucket.values.pop(key, None)
        else:
            bucket.values[key] = (value, bucket.revision, self._clock())
        for watch in list(bucket.watchers):
            watch.offer(KVChange(key, value, bucket.revision))
        return bucket.revision

    async def get(self, key: str) -> KVEntry | None:
        _check_key(key)
        live = self._live(key)
        return None if live is None else KVEntry(key, live[0], live[1])

    async def create(self, key: str, value: bytes) -> int:
        _check_key(key)
        live = self._live(key)
        if live is not None:
            raise KeyExists(key, live[0], live[1])
        return self._write(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        _check_key(key)
        live = self._live(key)
        if live is None or live[1] != revision:
            raise RevisionMismatch(f"KV {self._name}/{key}: revision {revision}")
        return self._write(key, value)

    async def put(self, key: str, value: bytes) -> int:
        _check_key(key)
        return self._write(key, value)

    async def delete(self, key: str) -> None:
        _check_key(key)
        self._write(key, None)

    async def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        if prefix and not prefix.endswith("."):
            raise InvalidKey(f"prefix {prefix!r} must end with '.'")
        found = []
        for key in sorted(self._bucket.values):
            live = self._live(key)
            if key.startswith(prefix) and live is not None:
                found.append((key, live[0]))
        return found

    async def watch(self) -> _MemoryWatch:
        initial = []
        for key in sorted(self._bucket.values):
            live = self._live(key)
            if live is not None:
                initial.append(KVChange(key, live[0], live[1]))
        return _MemoryWatch(self._bucket.watchers, initial)

    async def last_revision(self) -> int:
        return self._bucket.revision


class MemoryStateStore:
    """A :class:`mesh.ports.StateStore` in memory."""

    def __init__(self, mesh: MemoryMesh | None = None) -> None:
        self.mesh = mesh or MemoryMesh()

    async def bucket(self, kind: str, ttl_s: float | None = None) -> MemoryBucket:
        name = self.mesh.scheme.kv_bucket(kind)
        bucket = self.mesh.buckets.setdefault(name, _Bucket(ttl_s))
        return MemoryBucket(name, bucket, self.mesh.clock)


# -- AuditSink -------------------------------------------------------------------------------


class MemoryAuditSink:
    """A :class:`mesh.ports.AuditSink` in memory."""

    def __init__(self, mesh: MemoryMesh | None = None) -> None:
        self.mesh = mesh or MemoryMesh()

    @property
    def connected(self) -> bool:
        return True

    async def append(self, tenant: str, type_: str, event_id: str, body: bytes) -> int:
        self.mesh.scheme.audit(tenant, type_)  # the same name checks as the real sink
        events = self.mesh.audit.setdefault(tenant, [])
        ids = self.mesh.audit_ids.setdefault(tenant, {})
        now = self.mesh.clock()
        known = ids.get(event_id)
        if known is not None and now - known[1] < self.mesh.dedupe_window_s:
            return known[0]
        seq = events[-1][0] + 1 if events else 1
        events.append((seq, datetime.now(UTC), type_, body))
        ids[event_id] = (seq, now)
        return seq

    async def read(
        self,
        tenant: str,
        since: datetime | None = None,
        types: Iterable[str] = (),
        limit: int = 1000,
    ) -> tuple[list[dict[str, Any]], bool]:
        wanted = set(types)
        found: list[dict[str, Any]] = []
        for _, stored_at, type_, body in self.mesh.audit.get(tenant, []):
            if (since is not None and stored_at < since) or (wanted and type_ not in wanted):
                continue
            try:
                event = orjson.loads(body)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(event, dict) or event.get("tenant") != tenant:
                continue
            if len(found) >= limit:
                return found, True
            found.append(event)
        return found, False


# -- ClusterView -------------------------------------------------------------------------------


class MemoryClusterView:
    """A :class:`mesh.ports.ClusterView` in memory: one NATS node, heartbeats with a TTL."""

    def __init__(self, mesh: MemoryMesh | None = None) -> None:
        self.mesh = mesh or MemoryMesh()

    async def announce(self, node: str, heartbeat: bytes, ttl_s: float) -> None:
        self.mesh.scheme.gateway_heartbeat(node)  # the same name rules as the real view
        self.mesh.heartbeats[node_token(node)] = (heartbeat, self.mesh.clock() + ttl_s)

    async def withdraw(self, node: str) -> None:
        self.mesh.heartbeats.pop(node_token(node), None)

    async def gateways(self) -> list[bytes]:
        now = self.mesh.clock()
        live = {n: hb for n, (hb, expires) in self.mesh.heartbeats.items() if now < expires}
        return [live[node] for node in sorted(live)]

    def connected_server(self) -> tuple[str, str]:
        return "memory", "memory:0"

    async def nats_servers(self, timeout: float = 1.0) -> list[NatsNode]:
        return [NatsNode("memory:0", "memory", "", "", True, connected=True, reachable=True)]


# -- PresenceStore -----------------------------------------------------------------------------


@dataclass
class _PresenceTables:
    """Presence on one mesh, keyed as in mesh/presence.py: channel filter -> key -> entry."""

    channels: dict[str, dict[str, tuple[PresenceEntry, int]]] = field(default_factory=dict)
    position: int = 0
    leases: dict[str, int] = field(default_factory=dict)
    lease_position: int = 0
    watchers: dict[str, list[_MemoryPresenceWatch]] = field(default_factory=dict)


_MemoryPresenceWatch = _QueuedWatch[PresenceChange]


class MemoryPresenceStore:
    """A :class:`mesh.ports.PresenceStore` in memory, with the real store's keys and value
    encoding (mesh/presence.py): the same InvalidKey and the same metadata it returns."""

    def __init__(self, mesh: MemoryMesh | None = None) -> None:
        self.mesh = mesh or MemoryMesh()

    def _write(self, channel: str, key: str, entry: PresenceEntry | None) -> int:
        tables = self.mesh.presence
        tables.position += 1
        entries = tables.channels.setdefault(channel, {})
        if entry is None:
            entries.pop(key, None)
        else:
            entries[key] = (entry, tables.position)
        principal, gateway, session = key.split(".")[3:]
        change = PresenceChange(tables.position, principal, session, gateway, entry)
        for watch in list(tables.watchers.get(channel, ())):
            watch.offer(change)
        return tables.position

    async def put(self, ref: ChannelRef, entry: PresenceEntry) -> int:
        key = entry_key(ref, entry.principal, entry.gateway, entry.session)
        stored = decode_entry(key, encode_entry(entry))
        assert stored is not None  # encode_entry refused anything it cannot read back
        return self._write(channel_filter(ref), key, stored)

    async def remove(self, ref: ChannelRef, principal: str, gateway: str, session: str) -> None:
        self._write(channel_filter(ref), entry_key(ref, principal, gateway, session), None)

    async def entries(self, ref: ChannelRef) -> list[PresenceEntry]:
        found = self.mesh.presence.channels.get(channel_filter(ref), {})
        return sorted(
            (e for e, _ in found.values()), key=lambda e: (e.principal, e.gateway, e.session)
        )

    async def watch(self, ref: ChannelRef) -> _MemoryPresenceWatch:
        channel = channel_filter(ref)
        found = self.mesh.presence.channels.get(channel, {})
        initial = [
            PresenceChange(position, e.principal, e.session, e.gateway, e)
            for e, position in sorted(found.values(), key=lambda item: item[1])
        ]
        return _MemoryPresenceWatch(self.mesh.presence.watchers.setdefault(channel, []), initial)

    async def renew_lease(self, gateway: str, after: int | None = None) -> int:
        tables = self.mesh.presence
        key = lease_key(gateway)
        if after is not None and tables.leases.get(key) != after:
            raise RevisionMismatch(f"lease {key}: not at position {after}")
        tables.lease_position += 1
        tables.leases[key] = tables.lease_position
        return tables.lease_position

    async def leases(self) -> dict[str, int]:
        return dict(self.mesh.presence.leases)

    async def remove_gateway(self, gateway: str) -> int:
        gateway_filter(gateway)  # the same name checks as the real store
        removed = self._remove_where(lambda key: key.split(".")[4] == gateway)
        self.mesh.presence.leases.pop(gateway, None)
        return removed

    async def remove_room(self, tenant: str, room: str) -> int:
        prefix = room_filter(tenant, room)[:-1]
        return self._remove_where(lambda key: key.startswith(prefix))

    def _remove_where(self, matches: Callable[[str], bool]) -> int:
        doomed = [
            (channel, key)
            for channel, entries in self.mesh.presence.channels.items()
            for key in entries
            if matches(key)
        ]
        for channel, key in doomed:
            self._write(channel, key, None)
        return len(doomed)
