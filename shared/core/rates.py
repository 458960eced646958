"""Rate admission: token buckets of messages and bytes, the clock always passed in.

Two scopes, each a :class:`FrameMeter` (a message bucket and a byte bucket):

* **per connection**: every connection has its own meter;
* **per principal**: (tenant, principal) shares one meter among that principal's
  connections on one gateway (the registry that shares it is gateway/state/limits.py).

A frame is admitted when both scopes have the tokens; a refused frame takes nothing and the
answer is how long to wait. A handler's answer is never refused, only charged (its caller is
waiting), so the bucket may go into debt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


def retry_after_ms(wait_s: float) -> int:
    """A wait in seconds as the ``retry_after_ms`` a client is told: at least 1 ms."""
    return max(1, math.ceil(wait_s * 1000.0))


@dataclass(slots=True)
class TokenBucket:
    """A token bucket's state; the rate and the size (``burst``) are passed in by its owner."""

    tokens: float
    updated: float

    def take(self, amount: float, now: float, rate: float, burst: float) -> float:
        """Refill up to ``now``, then take ``amount``: 0.0 if taken, else seconds to wait.

        Nothing is taken when refused. An amount larger than the bucket needs a full
        bucket and leaves it in debt (negative), so a large frame is never refused forever.
        """
        elapsed = now - self.updated
        if elapsed > 0:
            tokens = self.tokens + elapsed * rate
            self.tokens = tokens if tokens < burst else burst
            self.updated = now
        need = amount if amount < burst else burst
        if self.tokens >= need:
            self.tokens -= amount
            return 0.0
        return (need - self.tokens) / rate


@dataclass(frozen=True, slots=True)
class RateSpec:
    """Rates of one scope; 0 = that limit off. A burst of 0 means two seconds' worth."""

    msgs_per_s: float = 0.0
    msgs_burst: float = 0.0
    bytes_per_s: float = 0.0
    bytes_burst: float = 0.0

    def __post_init__(self) -> None:
        for name in ("msgs_per_s", "msgs_burst", "bytes_per_s", "bytes_burst"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off)")

    @property
    def enabled(self) -> bool:
        return self.msgs_per_s > 0 or self.bytes_per_s > 0

    @property
    def msg_burst(self) -> float:
        return max(1.0, self.msgs_burst or 2 * self.msgs_per_s)

    @property
    def byte_burst(self) -> float:
        return max(1.0, self.bytes_burst or 2 * self.bytes_per_s)

    def describe(self) -> dict[str, float | int]:
        """The configured rates, as the ``limits`` command and the welcome show them."""
        return {
            "msgs_per_s": _number(self.msgs_per_s),
            "msgs_burst": _number(self.msg_burst) if self.msgs_per_s else 0,
            "bytes_per_s": _number(self.bytes_per_s),
            "bytes_burst": _number(self.byte_burst) if self.bytes_per_s else 0,
        }


class Rates(Protocol):
    """What a meter reads of its scope's rates (:class:`RateSpec`, or the gateway's)."""

    @property
    def msgs_per_s(self) -> float: ...
    @property
    def bytes_per_s(self) -> float: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def msg_burst(self) -> float: ...
    @property
    def byte_burst(self) -> float: ...

    def describe(self) -> dict[str, float | int]: ...


def _number(value: float) -> float | int:
    return int(value) if value == int(value) else value


class FrameMeter:
    """The message and byte buckets of one scope, and its traffic in the last second."""

    __slots__ = (
        "_byte_burst",
        "_byte_rate",
        "_bytes",
        "_msg_burst",
        "_msg_rate",
        "_msgs",
        "_prev_bytes",
        "_prev_msgs",
        "_window",
        "_window_bytes",
        "_window_msgs",
        "connections",
        "spec",
    )

    def __init__(self, spec: Rates, now: float) -> None:
        self.spec = spec
        self._msg_rate = spec.msgs_per_s
        self._msg_burst = spec.msg_burst
        self._byte_rate = spec.bytes_per_s
        self._byte_burst = spec.byte_burst
        self._msgs = TokenBucket(self._msg_burst, now)
        self._bytes = TokenBucket(self._byte_burst, now)
        self._window = now  # start of the current one-second window
        self._window_msgs = self._window_bytes = 0
        self._prev_msgs = self._prev_bytes = 0
        self.connections = 0  # connections sharing this meter (principal scope)

    def retune(self, spec: Rates) -> None:
        """New rates (a tenant's limits changed): the buckets keep at most the new burst."""
        if spec == self.spec:
            return
        self.spec = spec
        self._msg_rate, self._msg_burst = spec.msgs_per_s, spec.msg_burst
        self._byte_rate, self._byte_burst = spec.bytes_per_s, spec.byte_burst
        self._msgs.tokens = min(self._msgs.tokens, self._msg_burst)
        self._bytes.tokens = min(self._bytes.tokens, self._byte_burst)

    def take(self, size: int, now: float, msgs: int = 1) -> float:
        """Admit one frame of ``size`` bytes carrying ``msgs`` messages (a batch of events
        counts each) (0.0), or say how long to wait (nothing taken)."""
        if self._msg_rate:
            wait = self._msgs.take(msgs, now, self._msg_rate, self._msg_burst)
            if wait:
                return wait
        if self._byte_rate:
            wait = self._bytes.take(size, now, self._byte_rate, self._byte_burst)
            if wait:
                if self._msg_rate:
                    self._msgs.tokens += msgs  # give the message tokens back
                return wait
        self.count(size, now, msgs)
        return 0.0

    def give_back(self, size: int, msgs: int = 1) -> None:
        """Undo a :meth:`take` (the other scope refused the frame)."""
        if self._msg_rate:
            self._msgs.tokens += msgs
        if self._byte_rate:
            self._bytes.tokens += size
        self._window_msgs -= msgs
        self._window_bytes -= size

    def charge(self, size: int, now: float) -> None:
        """Count bytes that are never refused (a handler's answer): the bucket may owe."""
        if self._byte_rate:
            self._bytes.take(0.0, now, self._byte_rate, self._byte_burst)
            self._bytes.tokens -= size
        self.count(size, now, msgs=0)

    def count(self, size: int, now: float, msgs: int = 1) -> None:
        """Add a frame to the last-second traffic (admitted, or limits off)."""
        elapsed = now - self._window
        if elapsed >= 1.0:
            if elapsed >= 2.0:  # the previous window was empty
                self._prev_msgs = self._prev_bytes = 0
            else:
                self._prev_msgs, self._prev_bytes = self._window_msgs, self._window_bytes
            self._window += elapsed // 1.0
            self._window_msgs = self._window_bytes = 0
        self._window_msgs += msgs
        self._window_bytes += size

    # The gateway's registry and tests called it by this name before it moved here.
    _count = count

    def usage(self, now: float) -> dict[str, float | int]:
        """Tokens left now and the traffic of the last second (a sliding estimate)."""
        elapsed = now - self._window
        if elapsed >= 2.0:
            cur_msgs = cur_bytes = prev_msgs = prev_bytes = 0
            fraction = 0.0
        elif elapsed >= 1.0:
            cur_msgs, cur_bytes = 0, 0
            prev_msgs, prev_bytes = self._window_msgs, self._window_bytes
            fraction = elapsed - 1.0
        else:
            cur_msgs, cur_bytes = self._window_msgs, self._window_bytes
            prev_msgs, prev_bytes = self._prev_msgs, self._prev_bytes
            fraction = elapsed
        keep = 1.0 - fraction
        result: dict[str, float | int] = {
            "msgs_last_s": round(cur_msgs + prev_msgs * keep),
            "bytes_last_s": round(cur_bytes + prev_bytes * keep),
        }
        if self._msg_rate:
            self._msgs.take(0.0, now, self._msg_rate, self._msg_burst)  # refill only
            result["msg_tokens"] = round(self._msgs.tokens, 3)
        if self._byte_rate:
            self._bytes.take(0.0, now, self._byte_rate, self._byte_burst)
            result["byte_tokens"] = round(self._bytes.tokens, 1)
        return result


class ConnectionRates:
    """The meters of one connection: its own and its principal's (shared on this gateway)."""

    __slots__ = ("_on", "_release", "connection", "principal")

    def __init__(
        self,
        connection: FrameMeter,
        principal: FrameMeter,
        release: Callable[[], None] | None = None,
    ) -> None:
        self.connection = connection
        self.principal = principal
        self._on = connection.spec.enabled or principal.spec.enabled
        self._release = release

    def admit_at(self, size: int, now: float, msgs: int = 1) -> float:
        """One event or command frame (``msgs`` messages: a batch's events): 0.0 to act on
        it, else seconds until it would pass."""
        if not self._on:
            self.connection.count(size, now, msgs)
            self.principal.count(size, now, msgs)
            return 0.0
        wait: float = self.connection.take(size, now, msgs)
        if wait:
            return wait
        wait = self.principal.take(size, now, msgs)
        if wait:
            self.connection.give_back(size, msgs)
        return wait

    def charge_at(self, size: int, now: float) -> None:
        """A frame that is never refused (a handler's answer): count its bytes."""
        self.connection.charge(size, now)
        self.principal.charge(size, now)

    def retune(self, connection: Rates, principal: Rates) -> None:
        """Apply changed rates to a live connection (and its principal's shared meter)."""
        self.connection.retune(connection)
        self.principal.retune(principal)
        self._on = connection.enabled or principal.enabled

    def close(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def report_at(self, now: float) -> dict[str, object]:
        return {
            "connection": {**self.connection.spec.describe(), **self.connection.usage(now)},
            "principal": {
                **self.principal.spec.describe(),
                **self.principal.usage(now),
                "connections_on_gateway": self.principal.connections,
            },
        }
