"""Rate limits and quotas of client traffic: messages/s and bytes/s, connections per tenant.

Two scopes of rate limits, each a pair of token buckets (messages and bytes; the arithmetic is
the connection core's, shared/core/rates.py, and this module keeps the gateway's registry):

* **per connection**: every connection has its own pair;
* **per principal**: (tenant, principal id) shares one pair among all of that principal's
  connections **on this gateway**. The buckets live in the gateway's memory, so a principal
  connected to N gateways gets up to N times the rate; a hard global cap needs a
  coordinated counter (NATS round trips on the message path) and is not done.

What counts: every client ``event`` and ``command`` frame (built-in or service, ``limits``
included), by its size on the wire. A refused frame takes no tokens and is not acted on;
the client gets an ``error`` frame ``rate_limited`` with ``retry_after_ms`` and the frame's
``request_id``, and the connection stays open. A handler's ``command_response`` is never
refused (its caller is waiting), but its bytes are charged, so a handler that answers
with a flood of bytes waits longer before its next event.

Connections per tenant (:class:`TenantConnections`): counted at the handshake, after
authentication. A handshake that passes reserves a slot, the session claims it when it
starts, and an unclaimed reservation (the upgrade failed) expires after ``reserve_s``.
Other gateways' counts come from their periodic reports (:class:`ConnectionReports`).

Everything here is pure (the clock is passed in), so it is unit-testable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from arqonbus_server.gateway.http.admission import Clock
from arqonbus_server.mesh.watched import ChangeHandler, WatchedBucket
from arqonbus_server.shared import subjects
from arqonbus_server.shared.core.rates import ConnectionRates, FrameMeter, Rates, RateSpec
from arqonbus_server.shared.settings import Settings

if TYPE_CHECKING:
    from arqonbus_server.gateway.state.tenant_limits import TenantLimitsTable
    from arqonbus_server.mesh.ports import KVBucket, StateStore

log = logging.getLogger("arqonbus.gateway.limits")

MIB = 1024 * 1024


class ConnectionLimits(ConnectionRates):
    """The meters of one connection (shared/core/rates.py), on the registry's clock."""

    __slots__ = ("_clock",)

    def __init__(
        self,
        connection: FrameMeter,
        principal: FrameMeter,
        release: Callable[[], None] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(connection, principal, release)
        self._clock = clock

    def admit(self, size: int, msgs: int = 1) -> float:
        """One event or command frame (``msgs`` messages: a batch's events): 0.0 to act on
        it, else seconds until it would pass."""
        return self.admit_at(size, self._clock(), msgs)

    def charge(self, size: int) -> None:
        """A frame that is never refused (a handler's answer): count its bytes."""
        self.charge_at(size, self._clock())

    def report(self) -> dict[str, object]:
        return self.report_at(self._clock())


class RateLimits:
    """The gateway's rate-limit registry: hands each new connection its meters."""

    def __init__(
        self, per_connection: RateSpec, per_principal: RateSpec, clock: Clock = time.monotonic
    ) -> None:
        self.per_connection = per_connection
        self.per_principal = per_principal
        self.clock = clock  # given to each new connection's meters
        self._principals: dict[tuple[str, str], FrameMeter] = {}
        # This tenant's connections over all gateways (set by the gateway), for ``limits``.
        self.tenant_connections: Callable[[str], int] | None = None
        # Per-tenant overrides (gateway/state/tenant_limits.py, set by the gateway): None = the
        # rates above for every tenant.
        self.tenant_limits: TenantLimitsTable | None = None

    def __len__(self) -> int:
        return len(self._principals)

    def open(self, tenant: str, principal: str) -> ConnectionLimits:
        """The meters of a new connection; call ``close()`` on them when it ends."""
        now = self.clock()
        per_connection, per_principal = self.specs(tenant)
        key = (tenant, principal)
        shared = self._principals.get(key)
        if shared is None:
            shared = self._principals[key] = FrameMeter(per_principal, now)
        else:
            shared.retune(per_principal)
        shared.connections += 1

        def release() -> None:
            shared.connections -= 1
            if shared.connections <= 0 and self._principals.get(key) is shared:
                del self._principals[key]

        return ConnectionLimits(FrameMeter(per_connection, now), shared, release, self.clock)

    def specs(self, tenant: str) -> tuple[RateSpec, RateSpec]:
        """The per-connection and per-principal rates of ``tenant`` (its overrides, if any)."""
        if self.tenant_limits is None:
            return self.per_connection, self.per_principal
        return self.tenant_limits.rate_specs(tenant)


# -- connections per tenant ------------------------------------------------------------


class TenantConnections:
    """Live connections per tenant on this gateway, plus handshakes that reserved a slot.

    ``try_reserve(tenant, others)`` at the handshake: False if this gateway's live and
    reserved connections of the tenant plus ``others`` (the other gateways' reported count)
    reach ``max_per_tenant``. ``claim(tenant)`` when the session starts turns the oldest
    reservation into a live connection; ``release(tenant)`` when it ends. A reservation
    never claimed (the upgrade failed after the HTTP check) lapses after ``reserve_s``.
    """

    def __init__(
        self, max_per_tenant: int, reserve_s: float = 15.0, clock: Clock = time.monotonic
    ) -> None:
        if max_per_tenant < 0:
            raise ValueError("max_per_tenant must be >= 0 (0 = off)")
        self.max_per_tenant = max_per_tenant
        self.reserve_s = reserve_s
        self._clock = clock
        self.live: dict[str, int] = {}
        self._reserved: dict[str, deque[float]] = {}
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self.max_per_tenant > 0

    def _pending(self, tenant: str, now: float) -> int:
        reserved = self._reserved.get(tenant)
        if reserved is None:
            return 0
        while reserved and reserved[0] <= now:
            reserved.popleft()
        if not reserved:
            del self._reserved[tenant]
            return 0
        return len(reserved)

    def count(self, tenant: str) -> int:
        """This gateway's connections of ``tenant``: live ones and reserved handshakes."""
        return self.live.get(tenant, 0) + self._pending(tenant, self._clock())

    def try_reserve(self, tenant: str, others: int = 0, limit: int | None = None) -> bool:
        """``limit``: the tenant's own cap (its override), else ``max_per_tenant``; 0 = off."""
        cap = self.max_per_tenant if limit is None else limit
        if cap <= 0:
            return True
        now = self._clock()
        if self.live.get(tenant, 0) + self._pending(tenant, now) + others >= cap:
            self.refused += 1
            return False
        self._reserved.setdefault(tenant, deque()).append(now + self.reserve_s)
        return True

    def claim(self, tenant: str) -> None:
        reserved = self._reserved.get(tenant)
        if reserved:
            reserved.popleft()
            if not reserved:
                del self._reserved[tenant]
        self.live[tenant] = self.live.get(tenant, 0) + 1

    def release(self, tenant: str) -> None:
        count = self.live.get(tenant, 0) - 1
        if count > 0:
            self.live[tenant] = count
        else:
            self.live.pop(tenant, None)


class ConnectionReports:
    """The other gateways' last reported connection counts per tenant.

    Each gateway writes ``{tenant: count}`` under its node key every health interval (a KV
    bucket, see :func:`report_key`); this keeps the last report of every other node, with
    the local time it arrived. A report older than ``max_age_s`` (a gateway that stopped
    reporting: it died or lost NATS) no longer counts. ``others(tenant)`` sums the fresh
    reports. Staleness: a report is at most one health interval old plus the watch's delay,
    so connections that other gateways accepted since their last report are not seen yet
    and the cap can be exceeded by what they accept within about one interval.
    """

    def __init__(self, node_key: str, max_age_s: float, clock: Clock = time.monotonic) -> None:
        self.node_key = node_key
        self.max_age_s = max_age_s
        self._clock = clock
        self._reports: dict[str, tuple[float, dict[str, int]]] = {}

    def update(self, node_key: str, counts: dict[str, int] | None) -> None:
        if node_key == self.node_key:
            return
        if not counts:
            self._reports.pop(node_key, None)
            return
        clean = {t: n for t, n in counts.items() if type(n) is int and n > 0}
        self._reports[node_key] = (self._clock(), clean)

    def others(self, tenant: str) -> int:
        oldest = self._clock() - self.max_age_s
        total = 0
        stale = []
        for node_key, (received, counts) in self._reports.items():
            if received >= oldest:
                total += counts.get(tenant, 0)
            else:
                stale.append(node_key)
        for node_key in stale:  # gone gateways (node ids change with every restart)
            del self._reports[node_key]
        return total


def report_key(node_id: str) -> str:
    """A node id as a KV key (letters, digits, ``-`` and ``_``; anything else becomes ``_``)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in node_id)


def rate_specs(settings: Settings) -> tuple[RateSpec, RateSpec]:
    """The per-connection and per-principal rates of ``settings``."""
    return (
        RateSpec(
            settings.msg_rate_per_conn,
            settings.msg_burst_per_conn,
            settings.bytes_rate_per_conn,
            settings.bytes_burst_per_conn,
        ),
        RateSpec(
            settings.msg_rate_per_principal,
            settings.msg_burst_per_principal,
            settings.bytes_rate_per_principal,
            settings.bytes_burst_per_principal,
        ),
    )


def welcome_limits(
    settings: Settings, specs: tuple[Rates, Rates] | None = None
) -> dict[str, float | int]:
    """The rates as the welcome's ``limits`` announce them (bursts resolved; 0 = off).

    ``specs``: the connection's own rates (its tenant's overrides), else the settings'."""
    conn, principal = specs or rate_specs(settings)
    result: dict[str, float | int] = {}
    for scope, spec in (("conn", conn), ("principal", principal)):
        described = spec.describe()
        result[f"msg_rate_per_{scope}"] = described["msgs_per_s"]
        result[f"msg_burst_per_{scope}"] = described["msgs_burst"]
        result[f"bytes_rate_per_{scope}"] = described["bytes_per_s"]
        result[f"bytes_burst_per_{scope}"] = described["bytes_burst"]
    return result


# -- connection counts shared between gateways ------------------------------------------

CONNS_BUCKET = subjects.KV_CONNS  # ``<prefix>_conns``: ``<node key>`` -> {"tenant": count}


class ConnectionReporter:
    """Publishes this gateway's per-tenant connection counts, reads the other gateways'.

    Every ``health_interval_s`` this gateway puts its live counts under its node key in the
    KV bucket ``<prefix>_conns``; a watch keeps :class:`ConnectionReports` of the others. A
    report counts for three intervals after it arrived (see ConnectionReports). Started
    only when ``max_connections_per_tenant`` is set or a tenant has a ``max_connections``
    override (gateway/state/tenant_limits.py).
    """

    def __init__(self, state: StateStore, settings: Settings, node_id: str) -> None:
        self._state = state
        self._interval = settings.health_interval_s
        self._bucket = subjects.kv_bucket_name(settings.subject_prefix, CONNS_BUCKET)
        self.node_key = report_key(node_id)
        self.reports = ConnectionReports(self.node_key, 3 * self._interval)
        self._watched: WatchedBucket | None = None
        self._task: asyncio.Task[None] | None = None
        self._report_handlers: list[ChangeHandler] = []

    def others(self, tenant: str) -> int:
        return self.reports.others(tenant)

    def on_report(self, handler: ChangeHandler) -> None:
        """Call ``handler(node_key, value)`` after each report of a gateway is taken in."""
        self._report_handlers.append(handler)

    def start(self, live: dict[str, int]) -> None:
        if self._task is not None:
            return
        self._watched = WatchedBucket(self._bucket, self._open)
        self._watched.on_change(self._on_report)
        self._watched.start()
        self._task = asyncio.create_task(self._report(live), name="connection reports")

    async def _open(self) -> KVBucket:
        return await self._state.bucket(CONNS_BUCKET, ttl_s=max(1.0, 3 * self._interval))

    def _on_report(self, key: str, value: bytes | None) -> None:
        counts = None
        if value:
            try:
                counts = orjson.loads(value)
            except orjson.JSONDecodeError:
                log.warning("unreadable connection report from %s", key)
                return
        self.reports.update(key, counts if isinstance(counts, dict) else None)
        for handler in self._report_handlers:
            handler(key, value)

    async def _report(self, live: dict[str, int]) -> None:
        while True:
            try:
                kv = await self._open()
                await kv.put(self.node_key, orjson.dumps(live))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down: the next round tries again
                log.debug("could not report connection counts: %s", exc)
            await asyncio.sleep(self._interval)  # the report period

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            with contextlib.suppress(Exception):  # best effort: it expires anyway
                kv = await asyncio.wait_for(self._open(), 1.0)
                await asyncio.wait_for(kv.delete(self.node_key), 1.0)
        if self._watched is not None:
            await self._watched.close()
