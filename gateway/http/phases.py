"""Where an event's time goes inside one gateway: sampled phase timings.

At most one client message per ``interval_s`` (over all of the gateway's sockets) is
followed from the socket to the store and, when this gateway also has members of its
channel, back out to their sockets. Each phase is one series of the histogram
``arqonbus_event_phase_seconds``:

==============  ==========================================================================
``read``        the message parsed from the socket's bytes -> its session takes it (the
                socket's queue and the event loop's backlog)
``handle``      taken -> handed to the store client (parse, checks, publish back-pressure)
``store_ack``   handed to the store client -> its ack (stored by a quorum; a wait in the
                stream's batching lane included)
``store_to_live`` the store request sent -> the live copy received by this gateway (stored,
                then republished to the live subject)
``fanout_write`` the live copy received -> its frames handed to the kernel for every member
``total``       read -> the end of ``fanout_write``
==============  ==========================================================================

Sampling keeps the cost off the hot paths: per parsed message one comparison, per live
event one dict lookup while samples are open. A sample is recognised in the live path by
its dedupe key (``LiveEvent.dedupe_key``); at most :data:`MAX_OPEN` are open, the oldest
dropped first (an event with no member on this gateway never comes back live).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

PHASES: Final = ("read", "handle", "store_ack", "store_to_live", "fanout_write", "total")
MAX_OPEN: Final = 64


class _Sample:
    __slots__ = ("acked", "live", "read_at", "sent_at")

    def __init__(self, read_at: float, sent_at: float) -> None:
        self.read_at, self.sent_at = read_at, sent_at
        self.acked = self.live = False


class PhaseSampler:
    """Samples messages through the phases above and reports each duration to ``observe``."""

    __slots__ = ("_clock", "_interval_s", "_observe", "next_read_at", "open")

    def __init__(
        self,
        observe: Callable[[str, float], None],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be above 0")
        self._observe = observe
        self._interval_s = interval_s
        self._clock = clock
        self.next_read_at = 0.0
        self.open: dict[str, _Sample] = {}

    def read_due(self, now: float) -> bool:
        """True when a message parsed at ``now`` (monotonic) is to be sampled."""
        if now < self.next_read_at:
            return False
        self.next_read_at = now + self._interval_s
        return True

    def sent(self, key: str, read_at: float, taken_at: float) -> None:
        """A sampled message became a store request with dedupe key ``key`` (sent now)."""
        now = self._clock()
        self._observe("read", taken_at - read_at)
        self._observe("handle", now - taken_at)
        self.open.pop(key, None)  # a resend with the same key starts over
        if len(self.open) >= MAX_OPEN:
            del self.open[next(iter(self.open))]
        self.open[key] = _Sample(read_at, now)

    def acked(self, key: str) -> None:
        """The store acknowledged ``key`` (call only while ``open`` is not empty)."""
        sample = self.open.get(key)
        if sample is None or sample.acked:
            return
        sample.acked = True
        self._observe("store_ack", self._clock() - sample.sent_at)
        if sample.live:
            del self.open[key]

    def live(self, key: str, received_at: float | None = None) -> None:
        """This gateway received ``key``'s live copy (at ``received_at``, when that was
        before now) and is about to fan it out, or has just queued its frames."""
        sample = self.open.get(key)
        if sample is None or sample.live:
            return
        sample.live = True
        now = self._clock() if received_at is None else received_at
        self._observe("store_to_live", now - sample.sent_at)
        if sample.acked:
            del self.open[key]
        # Called once the fan-out has queued its frames: this runs after the sockets'
        # flush that the fan-out scheduled (call_soon is FIFO).
        asyncio.get_running_loop().call_soon(self._written, sample, now)

    def _written(self, sample: _Sample, live_at: float) -> None:
        now = self._clock()
        self._observe("fanout_write", now - live_at)
        self._observe("total", now - sample.read_at)
