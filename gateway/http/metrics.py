"""Prometheus metrics: one registry per gateway, and the one interface the shells call.

The shells report what they did (``metrics.publish_acked(latency_s, tenant)``,
``metrics.delivered(members, body)``, ...); this module owns every metric object, its name,
labels and buckets. ``NoMetrics`` is the same interface doing nothing (``ARQONBUS_METRICS=false``).

Label cardinality is bounded: labels take values from small fixed sets (frame types, error
codes, close codes, auth methods, outcomes), never room or channel names. A ``tenant`` label
exists only with ``metrics_tenant_labels``; then at most ``metrics_max_tenants`` tenants get
their own value and the rest are counted as ``other``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from arqonbus_server.gateway.http.phases import PHASES, PhaseSampler
from arqonbus_server.gateway.tracing import counters as trace_counters
from arqonbus_server.shared.core import effects as fx
from arqonbus_server.shared.envelope import (
    ClientCommand,
    ClientEvent,
    ClientEventBatch,
    ClientResponse,
)
from arqonbus_server.shared.errors import CloseCode
from arqonbus_server.shared.settings import Settings

CONTENT_TYPE = CONTENT_TYPE_LATEST
OTHER = "other"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
REPLAY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 120.0)
PHASE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Types of the messages a client sends and the gateway sends (envelope ``type``).
RECEIVED_TYPES = ("event", "events", "command", "command_response", "auth", "invalid")
SENT_TYPES = (
    "event", "ack", "error", "command", "command_response", "welcome", "gap", "auth_required",
)  # fmt: skip
_ERROR_PREFIX = b'{"version":"1.0","type":"error"'
_SERVER_PREFIX = b'{"version":"1.0","type":"'
_TIMESTAMP = b'"timestamp":"'
_SENT_BY_BYTES = {kind.encode(): kind for kind in SENT_TYPES}
_TIMESTAMP_LEN = len("2025-01-01T12:00:00.000Z")
# Close codes kept as label values: the protocol's (shared/errors.py CloseCode) and RFC 6455's.
_CLOSE_CODES = frozenset({int(c) for c in CloseCode} | set(range(1000, 1016)))
_MESSAGE_KINDS: dict[type, str] = {
    ClientEvent: "event",
    ClientEventBatch: "events",
    ClientCommand: "command",
    ClientResponse: "command_response",
}


def message_kind(message: object) -> str:
    """The received-type label of a parsed client message."""
    return _MESSAGE_KINDS.get(type(message), OTHER)


def sent_type(frame: bytes) -> str:
    """The ``type`` of a message the gateway encoded (its encoders put it first, after
    ``version``); a stored event starts with its ``id`` instead."""
    if frame.startswith(_SERVER_PREFIX):
        end = frame.find(b'"', len(_SERVER_PREFIX))
        return _SENT_BY_BYTES.get(frame[len(_SERVER_PREFIX) : end], OTHER)
    return "event"


def close_label(code: int | None) -> str:
    """A close code as a label: known codes as themselves, ``none`` if the socket did not
    close cleanly, anything else (a client may send any 3000-4999) as ``other``."""
    if code is None:
        return "none"
    return str(code) if code in _CLOSE_CODES else OTHER


def error_code(frame: bytes) -> str | None:
    """The ``code`` of an error frame the gateway encoded; None for any other frame."""
    if not frame.startswith(_ERROR_PREFIX):
        return None
    code = orjson.loads(frame).get("payload", {}).get("code")
    return str(code) if code else OTHER


class TenantLabels:
    """The ``tenant`` label's values: the first ``cap`` tenants seen, then ``other``."""

    def __init__(self, enabled: bool, cap: int) -> None:
        self.enabled = enabled
        self.cap = cap
        self._seen: set[str] = set()

    @property
    def names(self) -> tuple[str, ...]:
        return ("tenant",) if self.enabled else ()

    def values(self, tenant: str) -> tuple[str, ...]:
        if not self.enabled:
            return ()
        if tenant in self._seen:
            return (tenant,)
        if len(self._seen) < self.cap:
            self._seen.add(tenant)
            return (tenant,)
        return (OTHER,)


class BatchCounts(NamedTuple):
    """What the store's publish batching did (mesh/ingest.py ``IngestStats``), as counters."""

    batches: int  # atomic batches stored
    events: int  # events stored through them
    alone: int  # events of refused batches, published one by one instead
    refusals: Mapping[str, int]  # refused batches by reason


class NoMetrics:
    """The metrics interface, doing nothing: what the shells hold when metrics are off."""

    enabled = False
    phases: PhaseSampler | None = None  # sampled phase timings (gateway/http/phases.py)

    def frame_received(self, kind: str) -> None: ...
    def frame_sent(self, frame: bytes) -> None: ...
    def frame_handled(
        self, kind: str, tenant: str, effects: Sequence[fx.Effect], events: int = 1
    ) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self, code: int | None) -> None: ...
    def publish_acked(
        self, latency_s: float, tenant: str, duplicate: bool = False, events: int = 1
    ) -> None: ...
    def publish_refused(self, code: str, tenant: str, events: int = 1) -> None: ...
    def delivered(self, members: int, body: bytes) -> None: ...
    def replayed(self, kind: str, events: int, duration_s: float) -> None: ...
    def replay_consumer(self, outcome: str) -> None: ...
    def service_call(self, outcome: str) -> None: ...
    def auth_failed(self, method: str) -> None: ...
    def rate_limited(self, scope: str) -> None: ...
    def nats_event(self, event: str) -> None: ...
    def jetstream_error(self, operation: str) -> None: ...
    def kv_reloaded(self, bucket: str) -> None: ...

    def observe(
        self,
        sessions: Callable[[], int],
        channels: Callable[[], int],
        members: Callable[[], int],
        frames: Callable[[], tuple[int, int]],
    ) -> None:
        """Values read at each scrape (nothing to do on the hot path)."""

    def observe_batches(self, read: Callable[[], BatchCounts]) -> None:
        """The store's publish batching, read at each scrape."""

    def render(self) -> bytes:
        return b""


NO_METRICS = NoMetrics()


class _Counter:
    """A counter family kept as plain numbers per label values.

    The gateway is one event loop and ``/metrics`` is answered on it, so no lock is needed:
    an increment is a dict update (prometheus_client's own counters take a lock each time,
    several times the cost on the publish and fan-out paths).
    """

    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        self.name, self.doc, self.labels = name, doc, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, key: tuple[str, ...] = (), amount: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(key, value)
        return family


class _Histogram:
    """A histogram family as plain numbers per label values (see _Counter: no lock)."""

    __slots__ = ("bounds", "doc", "labels", "name", "series")

    def __init__(
        self, name: str, doc: str, bounds: Sequence[float], labels: Sequence[str] = ()
    ) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, tuple(labels), tuple(bounds)
        # label values -> [count per bucket (the last: above every bound)..., sum]
        self.series: dict[tuple[str, ...], list[float]] = {}
        if not labels:
            self.series[()] = [0.0] * (len(bounds) + 2)

    def observe(self, value: float, key: tuple[str, ...] = ()) -> None:
        counts = self.series.get(key)
        if counts is None:
            counts = self.series[key] = [0.0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, value)] += 1  # le is inclusive
        counts[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, counts in self.series.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip((*self.bounds, float("inf")), counts[:-1], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric(key, buckets, counts[-1])
        return family


class _Families(Collector):
    """Every ``arqonbus_*`` family: the counters and histograms, and what is read at scrape."""

    def __init__(self) -> None:
        self.families: list[_Counter | _Histogram] = []
        self.gauges: list[tuple[str, str, Callable[[], float]]] = []
        self.frames: Callable[[], tuple[int, int]] | None = None
        self.batches: Callable[[], BatchCounts] | None = None

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> _Counter:
        counter = _Counter(name, doc, labels)
        self.families.append(counter)
        return counter

    def histogram(
        self, name: str, doc: str, bounds: Sequence[float], labels: Sequence[str] = ()
    ) -> _Histogram:
        histogram = _Histogram(name, doc, bounds, labels)
        self.families.append(histogram)
        return histogram

    def collect(self) -> Iterable[Metric]:
        for family in self.families:
            yield family.family()
        for name, doc, read in self.gauges:
            yield GaugeMetricFamily(name, doc, value=read())
        yield CounterMetricFamily(
            "arqonbus_trace_fields_malformed",
            "Envelope trace fields that were not usable and were ignored (the event went on); "
            "counted per process",
            value=trace_counters.malformed_trace_fields,
        )
        if self.frames is not None:
            received, sent = self.frames()
            yield CounterMetricFamily(
                "arqonbus_ws_messages_received",
                "WebSocket messages received from clients (all sockets, counted by the transport)",
                value=received,
            )
            yield CounterMetricFamily(
                "arqonbus_ws_messages_sent",
                "WebSocket messages queued to clients (all sockets, counted by the transport)",
                value=sent,
            )
        if self.batches is not None:
            yield from _batch_families(self.batches())


def _batch_families(counts: BatchCounts) -> Iterable[Metric]:
    yield CounterMetricFamily(
        "arqonbus_publish_batches",
        "Batches of publishes stored by the publish lanes, one store ack each: JetStream "
        "atomic batches, and events a quiet lane sent alone (a batch of one)",
        value=counts.batches,
    )
    yield CounterMetricFamily(
        "arqonbus_publish_batched_events",
        "Events stored through the publish lanes' batches (divided by "
        "arqonbus_publish_batches_total: the mean batch size)",
        value=counts.events,
    )
    yield CounterMetricFamily(
        "arqonbus_publish_unbatched_events",
        "Events of refused batches, published one by one instead",
        value=counts.alone,
    )
    refusals = CounterMetricFamily(
        "arqonbus_publish_batch_refusals",
        "Atomic batches the store refused for a batch-only reason (their events were "
        "published one by one), by reason",
        labels=["reason"],
    )
    for reason, count in sorted(counts.refusals.items()):
        refusals.add_metric([reason], count)
    yield refusals


class PrometheusMetrics(NoMetrics):
    """Every metric of one gateway, in a registry of its own (never the global one)."""

    enabled = True

    def __init__(
        self, tenant_labels: bool = False, max_tenants: int = 100, phase_sample_s: float = 0.0
    ) -> None:
        self.registry = CollectorRegistry()
        self.tenants = TenantLabels(tenant_labels, max_tenants)
        ProcessCollector(namespace="", registry=self.registry)  # process_cpu_seconds_total, ...
        self._all = _Families()
        self.registry.register(self._all)
        counter, t = self._all.counter, self.tenants.names
        self.connections = 0
        self.opened = counter("arqonbus_connections_opened", "WebSocket connections upgraded")
        self.closed = counter(
            "arqonbus_connections_closed",
            "WebSocket connections closed, by close code (ours if we closed, else the peer's)",
            ["code"],
        )
        self.slow_consumer = counter(
            "arqonbus_slow_consumer_closes",
            "Connections closed with 4001 (their send buffer overflowed)",
        )
        self.received = counter(
            "arqonbus_frames_received", "Client messages by envelope type", ["type"]
        )
        self.sent = counter(
            "arqonbus_frames_sent", "Messages to clients by envelope type", ["type"]
        )
        for kind in RECEIVED_TYPES:
            self.received.inc((kind,), 0)
        for kind in SENT_TYPES:
            self.sent.inc((kind,), 0)
        self.acked = counter(
            "arqonbus_publishes_acked", "Events stored and acknowledged", ["duplicate", *t]
        )
        self.refused = counter(
            "arqonbus_publishes_refused",
            "Events answered with an error instead of an ack, by error code",
            ["code", *t],
        )
        self.ack_latency = self._all.histogram(
            "arqonbus_publish_ack_latency_seconds",
            "From taking an event to its store ack (stream ensured, stored by a quorum)",
            LATENCY_BUCKETS,
        )
        self.deliver_latency = self._all.histogram(
            "arqonbus_publish_deliver_latency_seconds",
            "From the stored envelope's timestamp to the live event written to the sockets",
            LATENCY_BUCKETS,
        )
        self.deliveries = counter("arqonbus_deliveries", "Live events written to members' sockets")
        self.event_phases = self._all.histogram(
            "arqonbus_event_phase_seconds",
            "Sampled client messages through the gateway, by phase: read, handle, store_ack, "
            "store_to_live, fanout_write, total (docs/observability.md)",
            PHASE_BUCKETS,
            ["phase"],
        )
        if phase_sample_s > 0:
            for phase in PHASES:
                self.event_phases.series[(phase,)] = [0.0] * (len(PHASE_BUCKETS) + 2)
            self.phases = PhaseSampler(self._observe_phase, phase_sample_s)
        self.replay_events = counter(
            "arqonbus_replay_events", "Stored events sent by replays", ["kind"]
        )
        self.replay_duration = self._all.histogram(
            "arqonbus_replay_duration_seconds",
            "Duration of one replay (catch-up of a member, or a history page)",
            REPLAY_BUCKETS,
            ["kind"],
        )
        self.calls = counter("arqonbus_service_calls", "Service commands by outcome", ["outcome"])
        self.auth_failures = counter(
            "arqonbus_auth_failures", "Refused credentials by method", ["method"]
        )
        self.rate_limits = counter(
            "arqonbus_rate_limited",
            "Refusals for rate: frames (message), upgrades per address (upgrade), connections"
            " over an address's cap of unfinished handshakes (pending_handshake) or of waits"
            " for an auth frame (pending_auth)",
            ["scope"],
        )
        self.nats = counter(
            "arqonbus_nats_events",
            "NATS connection events: disconnect, reconnect, slow_consumer, error",
            ["event"],
        )
        self.reconnects = counter("arqonbus_nats_reconnects", "Reconnects of the NATS connection")
        self.js_errors = counter(
            "arqonbus_jetstream_errors",
            "JetStream requests that failed (store unavailable), by operation",
            ["operation"],
        )
        self.replay_consumers = counter(
            "arqonbus_replay_consumers",
            "Replays read through a pull consumer, by outcome: read (as far as asked) or "
            "cut_short (direct gets read the rest)",
            ["outcome"],
        )
        self.kv_reloads = counter(
            "arqonbus_kv_watch_reloads",
            "Full (re)loads of a watched KV bucket (the first load, then after each restart)",
            ["bucket"],
        )
        self._all.gauges.append(
            ("arqonbus_connections", "Open WebSocket connections", lambda: self.connections)
        )
        self._stamp: tuple[bytes, float] = (b"", 0.0)

    # -- frames -----------------------------------------------------------------------

    def frame_received(self, kind: str) -> None:
        self.received.inc((kind if kind in RECEIVED_TYPES else "invalid",))

    def frame_sent(self, frame: bytes) -> None:
        self.sent.inc((sent_type(frame),))

    def frame_handled(
        self, kind: str, tenant: str, effects: Sequence[fx.Effect], events: int = 1
    ) -> None:
        """The core's answer to one client frame (of ``events`` events, for a batch): count
        what it refused, and why."""
        for effect in effects:
            if not isinstance(effect, fx.Send):
                continue
            code = error_code(effect.frame)
            if code is None:
                continue
            if code == "rate_limited":
                self.rate_limited("message")
            if kind == "event":
                self.publish_refused(code, tenant)
            elif kind == "events":
                self.publish_refused(code, tenant, events)

    # -- connections ------------------------------------------------------------------

    def connection_opened(self) -> None:
        self.opened.inc()
        self.connections += 1

    def connection_closed(self, code: int | None) -> None:
        self.connections -= 1
        self.closed.inc((close_label(code),))
        if code == CloseCode.SLOW_CONSUMER:
            self.slow_consumer.inc()

    # -- events -----------------------------------------------------------------------

    def publish_acked(
        self, latency_s: float, tenant: str, duplicate: bool = False, events: int = 1
    ) -> None:
        """``events`` acked by one ack frame (a batch's: its latency observed once)."""
        self.ack_latency.observe(latency_s)
        key = ("true" if duplicate else "false",)
        self.acked.inc(key + self.tenants.values(tenant) if self.tenants.enabled else key, events)

    def publish_refused(self, code: str, tenant: str, events: int = 1) -> None:
        self.refused.inc((code, *self.tenants.values(tenant)), events)

    def delivered(self, members: int, body: bytes) -> None:
        """A live event written to ``members`` sockets (its latency observed once)."""
        self.deliveries.inc((), members)
        self.sent.inc(("event",), members)
        stamped = self._stored_at(body)
        if stamped is not None:
            self.deliver_latency.observe(max(0.0, time.time() - stamped))

    def _stored_at(self, body: bytes) -> float | None:
        """The stored envelope's ``timestamp`` (Unix s); events of one ms share a parse."""
        start = body.find(_TIMESTAMP)
        if start < 0:
            return None
        start += len(_TIMESTAMP)
        text = body[start : start + _TIMESTAMP_LEN]
        if text == self._stamp[0]:
            return self._stamp[1]
        try:
            stamped = datetime.fromisoformat(text.decode()).timestamp()
        except ValueError:
            return None
        self._stamp = (text, stamped)
        return stamped

    def _observe_phase(self, phase: str, seconds: float) -> None:
        self.event_phases.observe(seconds, (phase,))

    def replayed(self, kind: str, events: int, duration_s: float) -> None:
        self.replay_events.inc((kind,), events)
        self.replay_duration.observe(duration_s, (kind,))
        if kind != "history":  # a history page is one command_response
            self.sent.inc(("event",), events)

    # -- commands, auth, rates ----------------------------------------------------------

    def service_call(self, outcome: str) -> None:
        self.calls.inc((outcome,))

    def auth_failed(self, method: str) -> None:
        self.auth_failures.inc((method,))

    def rate_limited(self, scope: str) -> None:
        self.rate_limits.inc((scope,))

    # -- the mesh ---------------------------------------------------------------------

    def replay_consumer(self, outcome: str) -> None:
        self.replay_consumers.inc((outcome,))

    def nats_event(self, event: str) -> None:
        self.nats.inc((event,))
        if event == "reconnect":
            self.reconnects.inc()

    def jetstream_error(self, operation: str) -> None:
        self.js_errors.inc((operation,))

    def kv_reloaded(self, bucket: str) -> None:
        self.kv_reloads.inc((bucket,))

    # -- scrape ------------------------------------------------------------------------

    def observe(
        self,
        sessions: Callable[[], int],
        channels: Callable[[], int],
        members: Callable[[], int],
        frames: Callable[[], tuple[int, int]],
    ) -> None:
        self._all.gauges += [
            ("arqonbus_sessions", "Authenticated sessions", sessions),
            ("arqonbus_hub_channels", "Channels with local members (one NATS sub each)", channels),
            ("arqonbus_hub_members", "(socket, channel) members on this gateway", members),
        ]
        self._all.frames = frames

    def observe_batches(self, read: Callable[[], BatchCounts]) -> None:
        self._all.batches = read

    def render(self) -> bytes:
        """The text exposition format (``GET /metrics``)."""
        return generate_latest(self.registry)


def metrics_from(settings: Settings) -> NoMetrics:
    """Prometheus metrics as configured, or the no-op twin (``ARQONBUS_METRICS=false``)."""
    if not settings.metrics:
        return NO_METRICS
    return PrometheusMetrics(
        settings.metrics_tenant_labels,
        settings.metrics_max_tenants,
        settings.metrics_phase_sample_ms / 1000,
    )
