"""The cycle collector's policy for a gateway process: pauses that follow what is new, not the heap.

CPython's full collection (generation 2) walks every container object the process holds.
A gateway holds on the order of 130 of them per connection (its tasks, futures, buffers
and limiter state), so at 5,000 connections a full collection walks ~700k objects and
stops the event loop for 0.2-0.7 s on this class of machine; while connections arrive
CPython runs one every time the old generation grew by a quarter, and every call queued
behind the pause waits for it (presence ``occupancy`` p99 went from 0.6 ms to 300 ms).

The policy: after each full collection, :func:`gc.freeze` moves the survivors to the
permanent generation, which later collections do not walk. A full collection then costs
what was allocated since the previous one. What it gives up: a reference cycle among
frozen objects that becomes garbage (a closed connection's task and its coroutine, say)
is not reclaimed until the next **sweep**, which unfreezes everything and collects once
(one pause the size of the heap). A sweep runs when the frozen set has grown to
``growth`` times its size after the previous sweep, and at most once per
``min_interval_s``: memory held by frozen garbage is bounded by that growth between sweeps,
and a steady gateway (no growth) never pays a whole-heap pause.

The young generation's threshold is raised too (``young_threshold``, 50,000 by default
against CPython's 700), and each older generation is collected after every second
collection of the one below it. CPython counts a generation-0 collection due when the
tracked objects allocated since the last one, less those freed, pass the threshold. A
gateway's in-flight work (each publish waiting for its store ack holds a dozen tracked
objects) swings by thousands of objects as acks come and go, so at 700 the collector ran
about 450 times a second under ingest and walked the same in-flight objects again and
again: 19 % of the gateway's CPU at 16k events/s (docs/performance.md, "The collector
under ingest"). At 50,000 a steady gateway rarely collects at all; a growing one (new
connections) pauses for a young walk of at most that many objects (about 10 ms here), and
every second and fourth such pause walks up to 2 and 4 times as many.

Process-wide: installed by ``arqonbus gateway`` (:func:`gateway.app.run_gateway`) when
``ARQONBUS_GC_FREEZE`` is on, never by a gateway started inside another program.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("arqonbus.gateway.gc")

CHECK_INTERVAL_S = 10.0
YOUNG_THRESHOLD = 50_000  # tracked objects allocated (net) before a young collection
OLDER_EVERY = 2  # each older generation: collected after every 2nd collection below it


class FreezingCollector:
    """Freeze after every full collection; sweep when the frozen set has grown enough."""

    def __init__(
        self,
        min_interval_s: float = 300.0,
        growth: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        young_threshold: int = YOUNG_THRESHOLD,
    ) -> None:
        self.min_interval_s = min_interval_s
        self.growth = growth
        self.young_threshold = young_threshold
        self._thresholds: tuple[int, ...] = gc.get_threshold()  # restored by uninstall
        self._clock = clock
        self._installed = False
        self._baseline = 0  # frozen objects right after the last sweep
        self._last_sweep = 0.0
        self.freezes = 0  # full collections followed by a freeze
        self.sweeps = 0
        self.last_sweep_s = 0.0  # how long the last sweep took

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> None:
        """Collect and freeze what the process holds now (start-up state), then follow
        every full collection with a freeze; raise the young generation's threshold."""
        if self._installed:
            return
        self._thresholds = gc.get_threshold()
        gc.set_threshold(self.young_threshold, OLDER_EVERY, OLDER_EVERY)
        gc.collect()
        gc.freeze()
        self._baseline = gc.get_freeze_count()
        self._last_sweep = self._clock()
        gc.callbacks.append(self._after_collection)
        self._installed = True

    def uninstall(self) -> None:
        """Back to CPython's own policy (everything unfrozen)."""
        if not self._installed:
            return
        gc.callbacks.remove(self._after_collection)
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()
        self._installed = False

    def _after_collection(self, phase: str, info: dict[str, Any]) -> None:
        # At the end of a full collection every younger generation is empty: the freeze
        # moves only what survived it.
        if phase == "stop" and info.get("generation") == 2:
            gc.freeze()
            self.freezes += 1

    def due(self) -> bool:
        """A sweep is due: the frozen set grew ``growth`` times and the interval passed."""
        if not self._installed:
            return False
        if self._clock() - self._last_sweep < self.min_interval_s:
            return False
        return gc.get_freeze_count() >= self.growth * max(self._baseline, 1)

    def sweep(self) -> int:
        """Unfreeze, collect everything once (the callback freezes the survivors again).
        Returns the number of unreachable objects found."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        if self._after_collection not in gc.callbacks:  # not installed: freeze by hand
            gc.freeze()
        self.last_sweep_s = time.perf_counter() - started
        self._baseline = gc.get_freeze_count()
        self._last_sweep = self._clock()
        self.sweeps += 1
        log.info(
            "gc sweep: %d unreachable objects freed, %d kept, in %.0f ms",
            found,
            self._baseline,
            self.last_sweep_s * 1000,
        )
        return found

    async def run(self, interval_s: float = CHECK_INTERVAL_S) -> None:
        """Check every ``interval_s`` whether a sweep is due (until cancelled)."""
        while True:
            await asyncio.sleep(interval_s)  # a period, not a wait for another task
            if self.due():
                self.sweep()
