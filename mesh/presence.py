"""The :class:`mesh.ports.PresenceStore` in NATS KV: who is present in each channel.

Two replicated buckets per subject prefix (:func:`shared.subjects.kv_bucket_name`):

* ``<prefix>_presence``: one key per session and channel,
  ``<tenant>.<room>.<channel>.<principal>.<gateway>.<session>``, whose value is the entry in
  compact JSON (:func:`encode_entry`). A channel is read (snapshot or watch) through an
  ordered consumer filtered to ``<tenant>.<room>.<channel>.>``, so answering for one channel
  never reads another channel's keys; a gateway's or a room's entries are found the same way
  (``*.*.*.*.<gateway>.*``, ``<tenant>.<room>.>``), headers only.
* ``<prefix>_presence-leases``: ``<gateway>`` -> the time of its last renewal. A separate
  bucket, so a lease is never mistaken for an entry and listing leases reads no entry.

Positions are the buckets' revisions (JetStream stream sequences): strictly increasing per
bucket. Removals are delete markers, so watchers see them as changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from nats.js.api import DeliverPolicy
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from arqonbus_server.mesh.kv import _Failures
from arqonbus_server.mesh.ports import (
    BrokerUnavailable,
    InvalidKey,
    KVChange,
    PresenceChange,
    PresenceEntry,
    RevisionMismatch,
)
from arqonbus_server.shared import subjects
from arqonbus_server.shared.errors import InvalidInput
from arqonbus_server.shared.jsonbytes import dumps_kept
from arqonbus_server.shared.subjects import ChannelRef

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from arqonbus_server.mesh.jetstream import JetStreamBroker

log = logging.getLogger("arqonbus.mesh.presence")

ENTRIES = subjects.KV_PRESENCE
LEASES = subjects.KV_PRESENCE_LEASES

# A snapshot (entries, leases, the keys to remove) that is not complete by then fails with
# BrokerUnavailable. 10k keys take about 0.3 s on a local 3-node cluster: this is generous.
SNAPSHOT_TIMEOUT_S = 60.0
# Delete markers written at once by remove_gateway / remove_room (each is one round trip).
_DELETES_IN_FLIGHT = 64
# nats-server 2.11+ writes markers of its own (TTL, max age) with this header instead.
_MARKER_REASON = "Nats-Marker-Reason"
# An idle watch's consumer is removed by the server after this long without its client.
_INACTIVE_S = 300.0


# -- keys and values (pure) ------------------------------------------------------------------


def _token(value: str, what: str) -> str:
    if not subjects.is_valid_name(value):
        raise InvalidKey(f"{what} {value[:80]!r} is not a valid name ([A-Za-z0-9_-], 1-64)")
    return value


def channel_filter(ref: ChannelRef) -> str:
    """The keys of one channel's entries."""
    tokens = (
        _token(ref.tenant, "tenant"),
        _token(ref.room, "room"),
        _token(ref.channel, "channel"),
    )
    return ".".join(tokens) + ".>"


def entry_key(ref: ChannelRef, principal: str, gateway: str, session: str) -> str:
    """``<tenant>.<room>.<channel>.<principal>.<gateway>.<session>``; InvalidKey if a token
    is not a valid name (so no key holds a wildcard or an extra token)."""
    own = (_token(principal, "principal"), _token(gateway, "gateway"), _token(session, "session"))
    return channel_filter(ref)[:-1] + ".".join(own)


def lease_key(gateway: str) -> str:
    """The key of ``gateway``'s lease (the gateway's node token, validated)."""
    return _token(gateway, "gateway")


def gateway_filter(gateway: str) -> str:
    """The keys of every entry of ``gateway``, in every tenant."""
    return f"*.*.*.*.{_token(gateway, 'gateway')}.*"


def room_filter(tenant: str, room: str) -> str:
    """The keys of every entry of every channel of ``tenant``'s ``room``."""
    return f"{_token(tenant, 'tenant')}.{_token(room, 'room')}.>"


def canonical_metadata(metadata: bytes) -> Any:
    """The metadata as a JSON object (parsed); InvalidInput if it is not one."""
    try:
        parsed = orjson.loads(metadata)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidInput("presence metadata must be a JSON object (encoded with orjson)")
    return parsed


def encode_entry(entry: PresenceEntry) -> bytes:
    """The stored value: the fields that are not in the key, in compact JSON."""
    return orjson.dumps(
        {
            "state": entry.state,
            "joined_at": entry.joined_at,
            "updated_at": entry.updated_at,
            "metadata": canonical_metadata(entry.metadata),
        }
    )


def decode_entry(key: str, value: bytes) -> PresenceEntry | None:
    """The entry stored under ``key``, or None (logged) if the key or value is not one."""
    parts = key.split(".")
    try:
        fields = orjson.loads(value)
        if len(parts) != 6 or not isinstance(fields.get("metadata"), dict):
            raise ValueError("not a presence entry")
        return PresenceEntry(
            principal=parts[3],
            session=parts[5],
            gateway=parts[4],
            joined_at=float(fields["joined_at"]),
            state=str(fields["state"]),
            metadata=dumps_kept(fields["metadata"]),  # kept by every mirror of the channel
            updated_at=float(fields["updated_at"]),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("presence key %r holds no valid entry (%s): ignored", key, exc)
        return None


def _presence_change(change: KVChange) -> PresenceChange | None:
    parts = change.key.split(".")
    if len(parts) != 6:
        return None
    entry = None
    if change.value is not None:
        entry = decode_entry(change.key, change.value)
        if entry is None:
            return None
    return PresenceChange(change.revision, parts[3], parts[5], parts[4], entry)


# -- reading keys: an ordered consumer, its initial part, then changes -----------------------


class _Stopped:
    """Queued by :meth:`_KeyStream.stop`: the iteration ends."""


_STOPPED = _Stopped()


def _change_of(msg: Msg, prefix: str) -> KVChange:
    headers = msg.headers or {}
    removed = headers.get(KV_OP) in (KV_DEL, KV_PURGE) or _MARKER_REASON in headers
    revision = msg.metadata.sequence.stream
    return KVChange(msg.subject[len(prefix) :], None if removed else msg.data, revision)


class _KeyStream:
    """The keys under a filter: the live ones once (in revision order), None, then changes.

    An ordered push consumer, last value per subject. Unlike nats-py's ``KeyValue.watch``,
    the end of the initial part is exact: it is the first message the server sent with
    nothing pending after it, or, when the consumer info says nothing was pending nor sent,
    at once (nats-py compares with what the client had *received*, and may end it early).
    The initial part is folded by key (a key changed while it is read appears once, with
    its latest value; delete markers are dropped), so it holds each live key once.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._queue: asyncio.Queue[KVChange | _Stopped | None] = asyncio.Queue()
        self._initial: dict[str, KVChange] | None = {}
        self._sub: Any = None
        self._stopped = False

    @classmethod
    async def open(cls, kv: KeyValue, keys: str, headers_only: bool = False) -> _KeyStream:
        stream = cls(kv._pre)
        with _Failures(kv._name, keys):
            stream._sub = await kv._js.subscribe(
                f"{kv._pre}{keys}",
                stream=kv._stream,
                cb=stream._on_message,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                headers_only=headers_only or None,
                inactive_threshold=_INACTIVE_S,
            )
            try:
                info = await stream._sub.consumer_info()
            except BaseException:
                await stream.stop()
                raise
        if info.num_pending == 0 and (info.delivered.consumer_seq or 0) == 0:
            stream._end_initial()  # nothing stored, nothing on its way
        return stream

    async def _on_message(self, msg: Msg) -> None:
        change = _change_of(msg, self._prefix)
        if self._initial is None:
            self._queue.put_nowait(change)
            return
        self._initial.pop(change.key, None)  # re-inserted last: revision order
        if change.value is not None:
            self._initial[change.key] = change
        if msg.metadata.num_pending == 0:
            self._end_initial()

    def _end_initial(self) -> None:
        if self._initial is None:
            return
        for change in self._initial.values():
            self._queue.put_nowait(change)
        self._initial = None
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[KVChange | None]:
        while not self._stopped and not isinstance(item := await self._queue.get(), _Stopped):
            yield item

    async def stop(self) -> None:
        self._stopped = True  # nothing more is yielded, even if already queued
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        self._queue.put_nowait(_STOPPED)


async def _snapshot(kv: KeyValue, keys: str, headers_only: bool = False) -> list[KVChange]:
    """The live keys under ``keys`` now (values empty when ``headers_only``)."""
    stream = await _KeyStream.open(kv, keys, headers_only)
    found: list[KVChange] = []
    try:
        async with asyncio.timeout(SNAPSHOT_TIMEOUT_S):
            async for change in stream:
                if change is None:
                    return found
                found.append(change)
    except TimeoutError:
        pass
    finally:
        await stream.stop()
    raise BrokerUnavailable(
        f"KV {kv._name}/{keys}: the snapshot was not complete within {SNAPSHOT_TIMEOUT_S:g} s "
        f"({len(found)} keys read); retry"
    )


class _JetStreamPresenceWatch:
    """One channel's :class:`mesh.ports.PresenceWatch` on a :class:`_KeyStream`."""

    def __init__(self, keys: _KeyStream) -> None:
        self._keys = keys

    async def __aiter__(self) -> AsyncIterator[PresenceChange | None]:
        async for change in self._keys:
            if change is None:
                yield None
            elif (presence := _presence_change(change)) is not None:
                yield presence

    async def stop(self) -> None:
        await self._keys.stop()


# -- the store ---------------------------------------------------------------------------------


class JetStreamPresenceStore:
    """The :class:`mesh.ports.PresenceStore` on a connected :class:`JetStreamBroker`
    (guarantees stated there); its buckets are opened on first use, replicated like the
    streams (:meth:`JetStreamBroker.key_value`)."""

    def __init__(self, broker: JetStreamBroker) -> None:
        self._broker = broker
        self._buckets: dict[str, KeyValue] = {}
        self._opening = asyncio.Lock()

    async def _bucket(self, kind: str) -> KeyValue:
        if (kv := self._buckets.get(kind)) is None:
            async with self._opening:
                if (kv := self._buckets.get(kind)) is None:
                    name = self._broker.scheme.kv_bucket(kind)
                    kv = self._buckets[kind] = await self._broker.key_value(name)
        return kv

    async def put(self, ref: ChannelRef, entry: PresenceEntry) -> int:
        key = entry_key(ref, entry.principal, entry.gateway, entry.session)
        value = encode_entry(entry)
        kv = await self._bucket(ENTRIES)
        with _Failures(kv._name, key):
            return await kv.put(key, value)

    async def remove(self, ref: ChannelRef, principal: str, gateway: str, session: str) -> None:
        key = entry_key(ref, principal, gateway, session)
        kv = await self._bucket(ENTRIES)
        with _Failures(kv._name, key):
            await kv.delete(key)

    async def entries(self, ref: ChannelRef) -> list[PresenceEntry]:
        kv = await self._bucket(ENTRIES)
        found = (
            decode_entry(c.key, c.value or b"") for c in await _snapshot(kv, channel_filter(ref))
        )
        present = [entry for entry in found if entry is not None]
        return sorted(present, key=lambda e: (e.principal, e.gateway, e.session))

    async def watch(self, ref: ChannelRef) -> _JetStreamPresenceWatch:
        keys = channel_filter(ref)
        kv = await self._bucket(ENTRIES)
        return _JetStreamPresenceWatch(await _KeyStream.open(kv, keys))

    async def renew_lease(self, gateway: str, after: int | None = None) -> int:
        key = lease_key(gateway)
        kv = await self._bucket(LEASES)
        value = orjson.dumps({"renewed_at": time.time()})
        with _Failures(kv._name, key):
            if after is None:
                return await kv.put(key, value)
            return await kv.update(key, value, last=after)

    async def leases(self) -> dict[str, int]:
        kv = await self._bucket(LEASES)
        return {c.key: c.revision for c in await _snapshot(kv, ">", headers_only=True)}

    async def remove_gateway(self, gateway: str) -> int:
        keys = gateway_filter(gateway)
        removed = await self._remove_under(keys)
        leases = await self._bucket(LEASES)
        with _Failures(leases._name, gateway):
            await leases.delete(gateway)
        return removed

    async def remove_room(self, tenant: str, room: str) -> int:
        return await self._remove_under(room_filter(tenant, room))

    async def _remove_under(self, keys: str) -> int:
        """Delete every live key under ``keys``, each only at the revision it was found at:
        a key removed meanwhile (another gateway running the same removal) or written again
        is left alone and not counted, so concurrent removals count each entry once."""
        kv = await self._bucket(ENTRIES)
        found = await _snapshot(kv, keys, headers_only=True)
        removed = 0
        for start in range(0, len(found), _DELETES_IN_FLIGHT):
            batch = found[start : start + _DELETES_IN_FLIGHT]
            done = await asyncio.gather(*(_delete_at(kv, change) for change in batch))
            removed += sum(done)
        return removed


async def _delete_at(kv: KeyValue, change: KVChange) -> bool:
    try:
        with _Failures(kv._name, change.key):
            await kv.delete(change.key, last=change.revision)
    except RevisionMismatch:
        return False
    return True


__all__ = [
    "ENTRIES",
    "LEASES",
    "JetStreamPresenceStore",
    "canonical_metadata",
    "channel_filter",
    "decode_entry",
    "encode_entry",
    "entry_key",
    "gateway_filter",
    "lease_key",
    "room_filter",
]
