"""The :class:`mesh.ports.StateStore` in NATS KV: buckets every gateway reads and writes.

API keys, agent identities, nonces, private-room settings, content policies, tenant limits
and connection counts live in replicated KV buckets, so every gateway enforces the same
state and a change (a revoke, a ban) reaches every gateway through a watch
(:class:`mesh.watched.WatchedBucket` keeps an in-memory copy of one bucket).

Bucket names carry the subject prefix (``<prefix>_keys``, :func:`shared.subjects.kv_bucket_name`),
so meshes that share a NATS cluster under different prefixes do not see each other's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import nats.errors
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    InvalidKeyError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from arqonbus_server.mesh.ports import (
    BrokerUnavailable,
    InvalidKey,
    KeyContended,
    KeyExists,
    KVChange,
    KVEntry,
    RevisionMismatch,
)
from arqonbus_server.mesh.watched import WatchedBucket
from arqonbus_server.shared import subjects

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from arqonbus_server.mesh.jetstream import JetStreamBroker

log = logging.getLogger("arqonbus.mesh.kv")

# Bucket kinds (the name is ``<subject prefix>_<kind>``; shared/subjects.py names them).
KEYS = subjects.KV_KEYS
AGENTS = subjects.KV_AGENTS
NONCES = subjects.KV_NONCES  # entries expire (gateway/state/security.py: NONCE_TTL_S)
ROOMS = subjects.KV_ROOMS
POLICIES = subjects.KV_POLICIES
TENANTS = subjects.KV_TENANTS
bucket_name = subjects.kv_bucket_name

_WRITE_RETRIES = 8  # about 2.5 s in all (see _RetryingJetStream)
_OPEN_ATTEMPTS = 3  # see open_bucket
# create: conditional writes tried while the key keeps changing between write and read, or
# while another write to it is still in flight (the leader refuses without comparing, and the
# key reads as absent until that write is applied). Bounded in count and in time.
_CREATE_ATTEMPTS = 30
_CREATE_WINDOW_S = 3.0
_CREATE_BACKOFF_S = (0.002, 0.2)  # first and longest pause after an in-flight refusal
# Failures of the store itself (no answer), as opposed to answers about a key.
_UNAVAILABLE = (nats.errors.Error, TimeoutError, OSError)


class _RetryingJetStream:
    """A JetStream context whose publishes are sent again while no stream listens.

    Right after a bucket is created, its subjects take a moment to reach every server of
    the cluster: a write then meets no responder (nats-py: NoStreamResponseError) and
    nothing is stored, so sending it again is safe. Everything else is the real context.
    """

    def __init__(self, js: JetStreamContext) -> None:
        self._real = js

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        delay = 0.02
        for attempt in range(_WRITE_RETRIES):
            try:
                return await self._real.publish(*args, **kwargs)
            except NoStreamResponseError:
                if attempt == _WRITE_RETRIES - 1:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")


def _retrying(kv: KeyValue) -> KeyValue:
    js = cast("JetStreamContext", _RetryingJetStream(kv._js))
    return KeyValue(kv._name, kv._stream, kv._pre, js, kv._direct)


async def open_bucket(
    js: JetStreamContext, name: str, replicas: int, ttl_s: float | None = None
) -> KeyValue:
    """The KV bucket ``name``, created (file storage, ``replicas`` copies) if missing.

    Gateways that start together all create the same buckets. JetStream can leave one of two
    identical, concurrent creates unanswered until the stream has a leader (nats-server#3677),
    so a request that times out is asked again, up to ``_OPEN_ATTEMPTS`` times: by then the
    bucket exists, and the lookup finds it. Only the last timeout propagates.
    """
    config = KeyValueConfig(
        bucket=name,
        history=1,
        replicas=replicas,
        storage=StorageType.FILE,
        ttl=ttl_s,
    )
    for attempt in range(1, _OPEN_ATTEMPTS + 1):
        try:
            return _retrying(await _lookup_or_create(js, config))
        except NatsTimeoutError:
            if attempt == _OPEN_ATTEMPTS:
                raise
            log.debug("opening KV bucket %s timed out (attempt %d); asking again", name, attempt)
    raise AssertionError("unreachable")


async def _lookup_or_create(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    assert config.bucket is not None
    try:
        return await js.key_value(config.bucket)
    except BucketNotFoundError:
        pass
    # Two gateways may race to create it: the same config is idempotent in JetStream.
    return await js.create_key_value(config)


def _is_wrong_revision(exc: BaseException) -> bool:
    if isinstance(exc, KeyWrongLastSequenceError):
        return True
    return isinstance(exc, APIError) and "wrong last sequence" in str(exc.description or "")


class _Failures:
    """Maps nats-py's errors to the port's: InvalidKey, RevisionMismatch, BrokerUnavailable."""

    def __init__(self, bucket: str, key: str) -> None:
        self._what = f"KV {bucket}/{key}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, KeyExists | KeyContended | RevisionMismatch):
            return
        if isinstance(exc, InvalidKeyError):
            raise InvalidKey(f"{self._what}: not a valid key") from exc
        if _is_wrong_revision(exc):
            raise RevisionMismatch(self._what) from exc
        if isinstance(exc, _UNAVAILABLE):
            raise BrokerUnavailable(f"{self._what}: {type(exc).__name__} {exc}") from exc


class _JetStreamWatch:
    """A nats-py KeyWatcher as a :class:`mesh.ports.KVWatch`.

    The marker (None) comes only once every initial value is out. nats-py gives one too
    early when its consumer-info check races the values: the server has pushed them
    (nothing left pending) but none has been read yet, so it calls the bucket empty and
    the values follow the marker as if they were changes. A copy built on that would be
    empty for a moment (a reload would report every key deleted). So a marker that comes
    before any value is checked against the consumer's own count of what it delivered;
    when that is above zero, the marker is held back until the value delivered with
    nothing pending behind it (the last initial one) has been yielded.
    """

    def __init__(self, watcher: Any) -> None:
        self._watcher = watcher

    async def __aiter__(self) -> AsyncIterator[KVChange | None]:
        seen = 0  # values read
        held = False  # nats-py's early marker, held back until the last initial value
        marked = False
        async for entry in self._watcher:
            if entry is None:
                if marked:
                    continue
                if seen or not await self._values_on_their_way():
                    marked = True
                    yield None
                else:
                    held = True
                continue
            seen += 1
            deleted = entry.operation in (KV_DEL, KV_PURGE, "DEL", "PURGE") or entry.value is None
            yield KVChange(entry.key, None if deleted else entry.value or b"", entry.revision or 0)
            if held and not entry.delta:  # nothing pending behind it: the initial part is in
                held, marked = False, True
                yield None

    async def _values_on_their_way(self) -> bool:
        """Whether the watch's consumer has delivered or still holds values (asked of the
        server: called before any value was yielded, so any delivered one is on its way)."""
        info = await self._watcher._sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        return bool(delivered or info.num_pending)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._watcher.stop()


class JetStreamBucket:
    """A NATS KV bucket as a :class:`mesh.ports.KVBucket` (guarantees stated there)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        # Reads that must see the latest write go to the stream leader (STREAM.MSG.GET):
        # a direct get may be answered by a replica that has not applied it yet.
        self._leader = KeyValue(kv._name, kv._stream, kv._pre, kv._js, False)

    @property
    def name(self) -> str:
        return self._kv._name

    async def get(self, key: str) -> KVEntry | None:
        with _Failures(self.name, key):
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:  # also deleted
                return None
        return KVEntry(key, entry.value or b"", entry.revision or 0)

    async def create(self, key: str, value: bytes) -> int:
        """Create-if-absent that reads the leader after a refused write.

        ``KeyValue.create`` is not enough under a race: after its conditional write is
        refused it reads the key back to tell a live value from a delete marker, and that
        read may be a direct get, answered by any replica. A replica that has not yet
        applied the winner's write answers "not found", which looked like a store failure.
        Here the read goes to the stream leader, which refused the write and so holds what
        refused it. A delete marker is written over (at its revision). The leader also
        refuses while another write to the key is in flight, and until that write is applied
        the key reads as absent: then the write is tried again after a short pause.
        """
        last = 0
        pause, longest = _CREATE_BACKOFF_S
        deadline = asyncio.get_running_loop().time() + _CREATE_WINDOW_S
        with _Failures(self.name, key):
            for attempt in range(1, _CREATE_ATTEMPTS + 1):
                try:
                    return await self._kv.update(key, value, last=last)
                except KeyWrongLastSequenceError:
                    pass
                try:
                    entry = await self._leader.get(key)
                except KeyNotFoundError as exc:
                    # A delete marker (its entry names the revision to write over), or
                    # nothing: another write to the key is still in flight (the leader
                    # refuses a conditional write then, without comparing), or the key was
                    # purged since. Write again; after an in-flight refusal, once it had
                    # a moment to land.
                    marker = exc.entry
                    last = marker.revision if marker is not None and marker.revision else 0
                    if asyncio.get_running_loop().time() >= deadline:
                        break
                    if not last:
                        await asyncio.sleep(min(longest, pause * 2 ** (attempt - 1)))
                    continue
                raise KeyExists(key, entry.value or b"", entry.revision or 0)
        raise KeyContended(
            f"key {key!r} kept changing: {attempt} writes were refused in "
            f"{_CREATE_WINDOW_S:g} s; try again"
        )

    async def update(self, key: str, value: bytes, revision: int) -> int:
        if revision <= 0:
            raise RevisionMismatch(f"KV {self.name}/{key}: revision {revision}")
        with _Failures(self.name, key):
            return await self._kv.update(key, value, last=revision)

    async def put(self, key: str, value: bytes) -> int:
        with _Failures(self.name, key):
            return await self._kv.put(key, value)

    async def delete(self, key: str) -> None:
        with _Failures(self.name, key):
            await self._kv.delete(key)

    async def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        """The stream's subjects under the prefix (STREAM.INFO), then each key's latest value
        from the leader. Not a watch: nats-py's watch can mark "no more values" before
        delivering the ones that raced its consumer-info check, and a snapshot must not
        come back short."""
        if prefix and not prefix.endswith("."):
            raise InvalidKey(f"prefix {prefix!r} must end with '.'")
        found: list[tuple[str, bytes]] = []
        with _Failures(self.name, prefix or ">"):
            pre = self._kv._pre
            info = await self._kv._js.stream_info(
                self._kv._stream, subjects_filter=f"{pre}{prefix}>"
            )
            for subject in sorted(info.state.subjects or {}):
                key = subject[len(pre) :]
                try:
                    entry = await self._leader.get(key)
                except KeyNotFoundError:  # deleted
                    continue
                found.append((key, entry.value or b""))
        return found

    async def watch(self) -> _JetStreamWatch:
        with _Failures(self.name, ">"):
            return _JetStreamWatch(await self._kv.watchall())

    async def last_revision(self) -> int:
        with _Failures(self.name, ">"):
            info = await self._kv._js.stream_info(self._kv._stream)  # answered by the leader
        return int(info.state.last_seq or 0)


class JetStreamStateStore:
    """The :class:`mesh.ports.StateStore` on a connected :class:`JetStreamBroker`."""

    def __init__(self, broker: JetStreamBroker) -> None:
        self._broker = broker

    async def bucket(self, kind: str, ttl_s: float | None = None) -> JetStreamBucket:
        name = self._broker.scheme.kv_bucket(kind)
        return JetStreamBucket(await self._broker.key_value(name, ttl_s))


__all__ = [
    "AGENTS",
    "KEYS",
    "NONCES",
    "POLICIES",
    "ROOMS",
    "TENANTS",
    "JetStreamBucket",
    "JetStreamStateStore",
    "WatchedBucket",
    "bucket_name",
    "open_bucket",
]
