"""Security state in NATS KV: buckets every gateway reads, and watched copies of them.

API keys, agent identities, private-room settings and content policies live in
replicated KV buckets, so every gateway enforces the same state and a change (a
revoke, a ban) reaches every gateway through a watch. A :class:`WatchedBucket`
keeps an in-memory copy of one bucket: lookups on the handshake and message paths
never wait on NATS, and ``on_change`` callbacks act on updates (closing the sessions
of a revoked key, for example).

Bucket names carry the subject prefix (``<prefix>_keys``), so meshes that share a
NATS cluster under different prefixes do not see each other's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoStreamResponseError
from nats.js.kv import KeyValue

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

log = logging.getLogger("arqonbus.mesh.kv")

# Bucket kinds (the name is ``<subject prefix>_<kind>``).
KEYS = "keys"  # API keys: ``<tenant>.<key id>`` -> record with the secret's hash
AGENTS = "agents"  # Ed25519 agents: ``<agent id>`` -> record with tenant and public key
NONCES = "nonces"  # agent sign-in nonces: ``<nonce>`` -> issued/used, expire after NONCE_TTL_S
ROOMS = "rooms"  # private rooms: ``<tenant>.<room>`` -> key hash, invites, bans, mutes
POLICIES = "policies"  # content policies: ``<tenant>`` -> policy JSON
TENANTS = "tenants"  # per-tenant limit overrides: ``<tenant>`` -> JSON (gateway/tenant_limits.py)

NONCE_TTL_S = 120.0
_RETRY_S = 1.0
_WRITE_RETRIES = 8  # about 2.5 s in all (see _RetryingJetStream)
_OPEN_ATTEMPTS = 3  # see open_bucket

ChangeHandler = Callable[[str, "bytes | None"], None]


def bucket_name(prefix: str, kind: str) -> str:
    return f"{prefix}_{kind}"


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


async def get_value(kv: KeyValue, key: str) -> bytes | None:
    """The value of ``key``, or None when it is absent or deleted."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # also KeyDeletedError
        return None
    return entry.value or None


class WatchedBucket:
    """An in-memory copy of a KV bucket, kept current by a watch.

    ``get`` answers from memory. ``ready`` is set once the initial values are in. The
    watch restarts (with a full reload) after an error; ``on_change(key, value)`` is
    called for every change seen after the initial load (``value`` None: deleted).
    """

    def __init__(self, name: str, open_kv: Callable[[], object]) -> None:
        self.name = name
        self._open_kv = open_kv
        self._values: dict[str, bytes] = {}
        self._handlers: list[ChangeHandler] = []
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._restart = asyncio.Event()
        self.kv: KeyValue | None = None

    def on_change(self, handler: ChangeHandler) -> None:
        self._handlers.append(handler)

    def get(self, key: str) -> bytes | None:
        return self._values.get(key)

    def items(self) -> list[tuple[str, bytes]]:
        return list(self._values.items())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"watch {self.name}")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def restart(self) -> None:
        """Reload and watch again (after a NATS reconnect: the old watch may be stale)."""
        self._restart.set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            self._restart.clear()
            watch = asyncio.create_task(self._watch_once())
            restart = asyncio.create_task(self._restart.wait())
            try:
                await asyncio.wait({watch, restart}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when close() cancels this task
                restart.cancel()
                if self._stop.is_set():
                    watch.cancel()
            if not watch.done():  # restarted: drop this watch, reload at once
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watch
                continue
            exc = watch.exception()
            if exc is not None:
                log.warning("watch of KV bucket %s failed (%s); restarting", self.name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), _RETRY_S)

    async def _watch_once(self) -> None:
        kv = await self._open_kv()  # type: ignore[misc]
        self.kv = kv
        watcher = await kv.watchall()
        loaded: dict[str, bytes] = {}
        initial = True
        try:
            async for entry in watcher:
                if entry is None:  # the initial values are in
                    if initial:
                        self._replace(loaded)
                        initial = False
                        self.ready.set()
                    continue
                deleted = entry.operation in ("DEL", "PURGE") or entry.value is None
                if initial:
                    if deleted:
                        loaded.pop(entry.key, None)
                    else:
                        loaded[entry.key] = entry.value or b""
                    continue
                self._apply(entry.key, None if deleted else (entry.value or b""))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _replace(self, loaded: dict[str, bytes]) -> None:
        """After a (re)load: report what changed while the watch was down."""
        old = self._values
        self._values = loaded
        for key in old.keys() - loaded.keys():
            self._notify(key, None)
        for key, value in loaded.items():
            if old.get(key) != value:
                self._notify(key, value)

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            if self._values.pop(key, None) is None:
                return
        else:
            self._values[key] = value
        self._notify(key, value)

    def _notify(self, key: str, value: bytes | None) -> None:
        for handler in self._handlers:
            try:
                handler(key, value)
            except Exception:
                log.exception("KV change handler for %s failed", self.name)
