"""Admission control for new connections, per client address.

Two independent limits, both pure (no I/O; the clock is injected) so they are unit-testable:

* :class:`RateLimiter`: a token bucket per address for WebSocket upgrades. Each upgrade
  takes one token; a bucket holds at most ``burst`` tokens and refills at ``rate_per_s``.
  An empty bucket refuses the upgrade and says how long until the next token (the gateway
  answers HTTP 429 with that delay).
* :class:`PendingHandshakes`: how many accepted TCP connections of one address have not
  sent their complete HTTP request yet. Beyond the cap a new connection is dropped at
  accept, so one address cannot hold the process's file descriptors with connections that
  never finish their handshake (each one also ends at the open timeout).

Addresses are grouped by :func:`peer_key`: an IPv4 address is its own key; an IPv6 address
counts as its /64 network (one subscriber usually holds a whole /64).

Memory is bounded: a bucket that has refilled completely is indistinguishable from no bucket
and is dropped, and the table never holds more than ``max_entries`` buckets (the least
recently used one is evicted first). Pending counters exist only while a connection is
pending.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

# The bucket arithmetic is the connection core's (rate admission); re-exported for this module.
from arqonbus_server.shared.core.rates import TokenBucket as TokenBucket
from arqonbus_server.shared.core.rates import retry_after_ms as retry_after_ms

Clock = Callable[[], float]

DEFAULT_MAX_ENTRIES = 65_536
_SWEEP_PER_CALL = 32  # expired buckets dropped per call at most (amortized O(1), smooth latency)


def peer_key(ip: str) -> str:
    """The admission key of a peer address: IPv4 as is, IPv6 by its /64 network."""
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip.partition("%")[0])
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


class RateLimiter:
    """Token buckets per address: ``take(ip)`` admits (0.0) or says how long to wait (> 0).

    ``rate_per_s == 0`` turns the limit off: every call admits and nothing is stored.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Clock = time.monotonic,
    ) -> None:
        if rate_per_s < 0:
            raise ValueError("rate_per_s must be >= 0 (0 = off)")
        if rate_per_s > 0 and burst < 1:
            raise ValueError("burst must be >= 1 when the rate limit is on")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.max_entries = max_entries
        self._clock = clock
        # Least recently used first: ``updated`` never decreases along the order.
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        # A bucket untouched for this long is full again: dropping it changes nothing.
        self._refill_s = self.burst / self.rate if self.rate > 0 else 0.0
        self.refused = 0
        self.evicted = 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, ip: str) -> float:
        """Take one token for ``ip``. Returns 0.0 if admitted, else seconds until a token."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._expire(now)
        key = peer_key(ip)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_entries:
                self._buckets.popitem(last=False)
                self.evicted += 1
            bucket = self._buckets[key] = TokenBucket(self.burst, now)
        else:
            self._buckets.move_to_end(key)
        wait = bucket.take(1.0, now, self.rate, self.burst)
        if wait:
            self.refused += 1
        return wait

    def _expire(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(_SWEEP_PER_CALL):
            if not buckets:
                return
            oldest = next(iter(buckets.values()))
            if now - oldest.updated < self._refill_s:
                return
            buckets.popitem(last=False)


class PendingHandshakes:
    """Counts each address's connections still waiting for their HTTP request.

    ``acquire(ip)`` at TCP accept (False: over the cap, drop the connection);
    ``release(ip)`` exactly once for each successful acquire, when the request arrived or
    the connection closed. ``max_per_ip == 0`` turns the cap off.
    """

    def __init__(self, max_per_ip: int, on_refused: Callable[[], None] | None = None) -> None:
        if max_per_ip < 0:
            raise ValueError("max_per_ip must be >= 0 (0 = off)")
        self.max_per_ip = max_per_ip
        self._counts: dict[str, int] = {}
        self.refused = 0
        self._on_refused = on_refused  # e.g. a metric: a refusal is otherwise silent

    @property
    def enabled(self) -> bool:
        return self.max_per_ip > 0

    def __len__(self) -> int:
        """Addresses with at least one pending connection."""
        return len(self._counts)

    def pending(self, ip: str) -> int:
        return self._counts.get(peer_key(ip), 0)

    def acquire(self, ip: str) -> bool:
        key = peer_key(ip)
        count = self._counts.get(key, 0)
        if count >= self.max_per_ip > 0:
            self.refused += 1
            if self._on_refused is not None:
                self._on_refused()
            return False
        self._counts[key] = count + 1
        return True

    def release(self, ip: str) -> None:
        key = peer_key(ip)
        count = self._counts.get(key, 0)
        if count <= 1:
            self._counts.pop(key, None)
        else:
            self._counts[key] = count - 1


def retry_after_header(wait_s: float) -> str:
    """The ``Retry-After`` value (whole seconds, at least 1) for a wait of ``wait_s``."""
    return str(max(1, math.ceil(wait_s)))
