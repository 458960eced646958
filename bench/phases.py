"""The gateway's sampled phase timings under a bench workload (``arqonbus_event_phase_seconds``).

The gateway follows at most one client message per ``metrics_phase_sample_ms`` (10 ms by
default) from its socket through the store and back out to its members' sockets
(gateway/http/phases.py). The bench scrapes the histogram before and after a run and reads
each phase's p50 and p99 from the difference, interpolating inside a bucket as Prometheus's
``histogram_quantile`` does.
"""

from __future__ import annotations

import math

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from arqonbus_server.gateway.admin.dev import http_get

FAMILY = "arqonbus_event_phase_seconds"
PHASES = ("read", "handle", "store_ack", "store_to_live", "fanout_write", "total")

# phase -> [(upper bound, cumulative count)], the last bound +Inf
Hist = dict[str, list[tuple[float, float]]]


async def _families(port: int, timeout: float) -> list[Metric]:
    """The metric families of the gateway listening on 127.0.0.1:``port``."""
    status, body = await http_get("127.0.0.1", port, "/metrics", timeout)
    if status != 200:
        raise RuntimeError(f"GET /metrics on port {port}: status {status}")
    return list(text_string_to_metric_families(body.decode()))


async def scrape_phases(port: int, timeout: float = 10.0) -> Hist:
    """The phase histogram of the gateway listening on 127.0.0.1:``port``."""
    hist: Hist = {}
    for family in await _families(port, timeout):
        if family.name != FAMILY:
            continue
        for sample in family.samples:
            if sample.name == FAMILY + "_bucket":
                bound = float(sample.labels["le"])
                hist.setdefault(sample.labels["phase"], []).append((bound, sample.value))
    return {phase: sorted(buckets) for phase, buckets in hist.items()}


BATCH_FAMILIES = ("arqonbus_publish_batches", "arqonbus_publish_batched_events")


async def scrape_batches(port: int, timeout: float = 10.0) -> tuple[float, float]:
    """(batches, events) the publish lanes of the gateway on 127.0.0.1:``port`` stored."""
    found = {
        family.name: family.samples[0].value
        for family in await _families(port, timeout)
        if family.name in BATCH_FAMILIES and family.samples
    }
    return found.get(BATCH_FAMILIES[0], 0.0), found.get(BATCH_FAMILIES[1], 0.0)


def delta(after: Hist, before: Hist) -> Hist:
    """What was observed between two scrapes."""
    out: Hist = {}
    for phase, buckets in after.items():
        earlier = dict(before.get(phase, []))
        out[phase] = [(bound, count - earlier.get(bound, 0.0)) for bound, count in buckets]
    return out


def add(a: Hist, b: Hist) -> Hist:
    """Two runs' observations together (same buckets)."""
    out: Hist = {phase: list(buckets) for phase, buckets in a.items()}
    for phase, buckets in b.items():
        mine = dict(out.get(phase, []))
        out[phase] = sorted((bound, mine.get(bound, 0.0) + count) for bound, count in buckets)
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile in seconds (NaN without observations), interpolated linearly
    inside its bucket; in the +Inf bucket, the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def summary(hist: Hist) -> dict[str, dict[str, float]]:
    """phase -> {count, p50_ms, p99_ms}, in the order of :data:`PHASES`."""
    out: dict[str, dict[str, float]] = {}
    for phase in PHASES:
        buckets = hist.get(phase, [])
        out[phase] = {
            "count": buckets[-1][1] if buckets else 0.0,
            "p50_ms": quantile(buckets, 0.50) * 1000,
            "p99_ms": quantile(buckets, 0.99) * 1000,
        }
    return out
