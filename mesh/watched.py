"""An in-memory copy of a KV bucket (any :class:`mesh.ports.KVBucket`), kept current by a watch.

Lookups on the handshake and message paths never wait on the store, and ``on_change``
callbacks act on updates (closing the sessions of a revoked key, for example).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from arqonbus_server.mesh.ports import BrokerUnavailable, KVBucket

log = logging.getLogger("arqonbus.mesh.kv")

_RETRY_S = 1.0
# A watch failing before its first load within this long of the start is the store still
# forming (buckets created by another gateway, streams electing leaders): INFO, not WARNING.
START_GRACE_S = 30.0
# How long a lookup that missed waits for the copy to catch up with the store.
CATCH_UP_S = 2.0

ChangeHandler = Callable[[str, "bytes | None"], None]


class WatchedBucket:
    """An in-memory copy of a KV bucket, kept current by a watch.

    ``get`` answers from memory. ``ready`` is set once the initial values are in. The
    watch restarts (with a full reload) after an error; ``on_change(key, value)`` is
    called for every change seen after the initial load (``value`` None: deleted).
    ``caught_up()`` waits until the copy holds every write made before the call (a lookup
    that missed calls it before it calls the key unknown: a key written a moment ago on
    another node is found, not refused).
    """

    def __init__(
        self,
        name: str,
        open_kv: Callable[[], Awaitable[KVBucket]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._open_kv = open_kv
        self._clock = clock
        self._started_at = 0.0
        self._values: dict[str, bytes] = {}
        self._handlers: list[ChangeHandler] = []
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._restart = asyncio.Event()
        self.kv: KVBucket | None = None  # the bucket, once opened
        # The store revision the copy has reached (every write up to it is in), and an
        # event set at each advance; one store query is shared by concurrent caught_up().
        self.revision = 0
        self._advanced = asyncio.Event()
        self._sync: asyncio.Task[bool] | None = None
        # Observability (the gateway's metrics): called with the bucket's name at each full
        # (re)load; it must not raise or block.
        self.on_reload: Callable[[str], None] | None = None

    def on_change(self, handler: ChangeHandler) -> None:
        self._handlers.append(handler)

    def get(self, key: str) -> bytes | None:
        return self._values.get(key)

    def items(self) -> list[tuple[str, bytes]]:
        return list(self._values.items())

    def start(self) -> None:
        if self._task is None:
            self._started_at = self._clock()
            self._task = asyncio.create_task(self._run(), name=f"watch {self.name}")

    async def close(self) -> None:
        self._stop.set()
        if self._sync is not None:
            self._sync.cancel()  # a catch-up in progress: its callers get False
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
                forming = (
                    not self.ready.is_set() and self._clock() - self._started_at < START_GRACE_S
                )
                log.log(
                    logging.INFO if forming else logging.WARNING,
                    "watch of KV bucket %s failed (%s); restarting%s",
                    self.name,
                    exc,
                    " (the store is still forming)" if forming else "",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), _RETRY_S)

    async def caught_up(self, timeout: float = CATCH_UP_S) -> bool:
        """Wait (up to ``timeout`` s) until the copy holds every write the store had made
        when this was called. False when it did not within the time or the store did not
        answer. Concurrent callers share one query of the store."""
        sync = self._sync
        if sync is None or sync.done():
            sync = self._sync = asyncio.create_task(self._catch_up(timeout))
        try:
            return await asyncio.wait_for(asyncio.shield(sync), timeout)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if sync.cancelled() and (task is None or not task.cancelling()):
                return False  # close() ended the catch-up, not our caller
            raise

    async def _catch_up(self, timeout: float) -> bool:
        kv = self.kv
        if kv is None or not self.ready.is_set():
            return False
        try:
            async with asyncio.timeout(timeout):
                target = await kv.last_revision()
                while self.revision < target:
                    self._advanced.clear()
                    await self._advanced.wait()
        except (TimeoutError, BrokerUnavailable):
            return False
        return True

    def _advance(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            self._advanced.set()

    async def _watch_once(self) -> None:
        kv = await self._open_kv()
        self.kv = kv
        # A watch started after this read holds every write up to it in its initial part
        # (a delete there may not show as a change, so the revisions seen can fall short).
        floor = await kv.last_revision()
        watcher = await kv.watch()
        loaded: dict[str, bytes] = {}
        initial = True
        try:
            async for change in watcher:
                if change is None:  # the initial values are in
                    if initial:
                        self._replace(loaded)
                        initial = False
                        self._advance(floor)
                        self.ready.set()
                    continue
                if initial:
                    floor = max(floor, change.revision)
                    if change.value is None:
                        loaded.pop(change.key, None)
                    else:
                        loaded[change.key] = change.value
                    continue
                self._apply(change.key, change.value)
                self._advance(change.revision)
        finally:
            await watcher.stop()

    def _replace(self, loaded: dict[str, bytes]) -> None:
        """After a (re)load: report what changed while the watch was down."""
        old = self._values
        self._values = loaded
        if self.on_reload is not None:
            self.on_reload(self.name)
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
