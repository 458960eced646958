"""OpenTelemetry tracing of publishes, deliveries and replays (issue 13).

Off unless configured: :func:`tracing_from` returns None, and every hot path checks
``tracing is not None`` before making anything, so an untraced gateway allocates no span.
On when ``ARQONBUS_TRACING=true`` or the standard environment names an exporter
(``OTEL_TRACES_EXPORTER`` other than ``none``, ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); the exporter, batching, sampler and resource are
the OpenTelemetry SDK's, read from ``OTEL_*`` only.

The span model (messaging semantic conventions 1.28+), for one event:

- ``send {room}/{channel}`` (PRODUCER) on the receiving gateway, ending at the store's ack.
  Its context travels in the NATS message headers (the hop context; the stream's RePublish
  copies them to the live subject).
- ``process {room}/{channel}`` (CONSUMER) on every gateway with members of the channel:
  parent = the hop context, link = the event's creation context (its ``trace`` field).
- ``deliver {room}/{channel}`` (INTERNAL), one per fan-out, with the member count.
- ``replay {room}/{channel}`` / ``history {room}/{channel}``: one per replay, with the count.
- Service commands: ``call {room}/{channel}`` (CLIENT) on the caller's gateway until the
  answer, its context in the NATS request headers; ``process {room}/{channel}`` (CONSUMER)
  on the handler's gateway, whose context goes to the handler in the command's ``trace``.

Context is W3C trace context, read and written only by ``opentelemetry.propagate``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from arqonbus_server.shared.envelope import TRACE_KEYS
from arqonbus_server.shared.settings import Settings
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme

log = logging.getLogger("arqonbus.gateway.tracing")

_EXPORTER_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


@dataclass(slots=True)
class TraceCounters:
    """Counted for the metrics: ``trace`` fields that were not usable (the event went on)."""

    malformed_trace_fields: int = 0


counters = TraceCounters()


def tracing_wanted(settings: Settings, environ: Mapping[str, str]) -> bool:
    """Whether this gateway traces: the switch, or an exporter named in the OTEL_* env."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return settings.tracing or bool(exporter) or any(environ.get(k) for k in _EXPORTER_VARIABLES)


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    exporters: list[SpanExporter] = []
    for name in filter(None, names):
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            if environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") != "http/protobuf":
                log.warning("OTLP over http/protobuf only: OTEL_EXPORTER_OTLP_PROTOCOL ignored")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # endpoint, headers, timeout: OTEL_* env
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console): ignored", name)
    return exporters


def tracing_from(settings: Settings, environ: Mapping[str, str], node_id: str) -> Tracing | None:
    """The gateway's tracing, or None when it is off (then nothing is traced, nothing made)."""
    if not tracing_wanted(settings, environ):
        return None
    resource = Resource.create(
        {
            "service.name": environ.get("OTEL_SERVICE_NAME") or "arqonbus-gateway",
            "service.instance.id": node_id,
        }
    )
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
    for exporter in _exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* env
    log.info("tracing on (trust client trace: %s)", settings.trust_client_trace)
    return Tracing(
        provider,
        SubjectScheme(settings.subject_prefix),
        settings.trust_client_trace,
        settings.nats_msg_trace_subject,
    )


def _extract(carrier: Mapping[str, str] | None) -> Context | None:
    """The remote context in ``carrier`` (W3C headers), or None if there is no valid one."""
    if not carrier:
        return None
    context = propagate.extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def _inject(context: Context) -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def _link_to(context: Context | None) -> list[Link]:
    if context is None:
        return []
    return [Link(trace.get_current_span(context).get_span_context())]


def _trace_field(carrier: Mapping[str, str]) -> dict[str, str]:
    return {k: carrier[k] for k in TRACE_KEYS if k in carrier}


class Tracing:
    """The spans of one gateway, over its own TracerProvider (not the global one)."""

    def __init__(
        self,
        provider: TracerProvider,
        scheme: SubjectScheme,
        trust_client: bool,
        nats_trace_dest: str = "",
    ) -> None:
        self.provider = provider
        # nats-server 2.11+ message tracing (ADR-41): every server the publish crosses
        # reports its hop (ingress, stream store, egress) as JSON on this subject.
        self.nats_trace_dest = nats_trace_dest
        self.tracer = provider.get_tracer("arqonbus.gateway")
        self.scheme = scheme
        self.trust_client = trust_client
        self._ingest_template = scheme.template("ev")
        self._live_template = scheme.template("live")
        self._command_template = scheme.template("cmd") + ".{command}"

    def _attributes(
        self, ref: ChannelRef, operation: str, subject: str, template: str
    ) -> dict[str, Any]:
        return {
            "messaging.system": "nats",
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.destination.name": subject,
            "messaging.destination.template": template,
            "arqonbus.tenant": ref.tenant,
        }

    # -- the receiving gateway ------------------------------------------------------------

    def start_send(
        self, ref: ChannelRef, event_id: str, client_trace: Mapping[str, str] | None
    ) -> tuple[Span, dict[str, str], dict[str, str]]:
        """The PRODUCER span of a publish; the hop headers; the event's ``trace`` field.

        A trusted client context is the parent and stays the creation context; an
        untrusted one is only linked, and this span's context becomes the creation context.
        """
        client = _extract(client_trace)
        trusted = client is not None and self.trust_client
        attributes = self._attributes(ref, "send", self.scheme.ingest(ref), self._ingest_template)
        attributes["messaging.message.id"] = event_id
        span = self.tracer.start_span(
            f"send {ref.room}/{ref.channel}",
            context=client if trusted else Context(),
            kind=SpanKind.PRODUCER,
            links=[] if trusted else _link_to(client),
            attributes=attributes,
        )
        hop = _inject(trace.set_span_in_context(span))
        created = _trace_field(_inject(client) if trusted and client is not None else hop)
        if self.nats_trace_dest:
            hop["Nats-Trace-Dest"] = self.nats_trace_dest
        return span, hop, created

    @staticmethod
    def end_send(span: Span, seq: int | None, duplicate: bool, error_code: str | None) -> None:
        if seq is not None:
            span.set_attribute("arqonbus.seq", seq)
            span.set_attribute("arqonbus.duplicate", duplicate)
        if error_code is not None:
            span.set_attribute("error.type", error_code)
            span.set_attribute("arqonbus.error_code", error_code)
            span.set_status(Status(StatusCode.ERROR, error_code))
        span.end()

    # -- service commands -------------------------------------------------------------------

    def start_call(
        self, ref: ChannelRef, name: str, client_trace: Mapping[str, str] | None
    ) -> tuple[Span, dict[str, str]]:
        """The caller's gateway: a CLIENT span until the answer; the request's headers."""
        client = _extract(client_trace)
        trusted = client is not None and self.trust_client
        subject = self.scheme.command(ref, name)
        attributes = self._attributes(ref, "send", subject, self._command_template)
        attributes["arqonbus.command"] = name
        span = self.tracer.start_span(
            f"call {ref.room}/{ref.channel}",
            context=client if trusted else Context(),
            kind=SpanKind.CLIENT,
            links=[] if trusted else _link_to(client),
            attributes=attributes,
        )
        return span, _inject(trace.set_span_in_context(span))

    @staticmethod
    def end_call(span: Span, error_code: str | None) -> None:
        if error_code is not None:
            span.set_attribute("error.type", error_code)
            span.set_status(Status(StatusCode.ERROR, error_code))
        span.end()

    def serve_call(
        self, ref: ChannelRef, name: str, headers: Mapping[str, str] | None
    ) -> dict[str, str]:
        """The handler's gateway: a CONSUMER span (child of the caller's gateway span) for
        handing the command to the handler; the ``trace`` field its SDK continues."""
        subject = self.scheme.command(ref, name)
        attributes = self._attributes(ref, "process", subject, self._command_template)
        attributes["arqonbus.command"] = name
        span = self.tracer.start_span(
            f"process {ref.room}/{ref.channel}",
            context=_extract(headers) or Context(),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        span.end()
        return _trace_field(_inject(trace.set_span_in_context(span)))

    # -- every delivering gateway ---------------------------------------------------------

    def start_process(
        self, ref: ChannelRef, seq: int, body: bytes, headers: Mapping[str, str] | None
    ) -> Span:
        """The CONSUMER span of a live event: parent = hop context, link = creation."""
        envelope = orjson.loads(body)
        created = _extract(envelope.get("trace")) if isinstance(envelope, dict) else None
        attributes = self._attributes(ref, "process", self.scheme.live(ref), self._live_template)
        attributes["arqonbus.seq"] = seq
        event_id = envelope.get("id") if isinstance(envelope, dict) else None
        if isinstance(event_id, str):
            attributes["messaging.message.id"] = event_id
        return self.tracer.start_span(
            f"process {ref.room}/{ref.channel}",
            context=_extract(headers) or Context(),
            kind=SpanKind.CONSUMER,
            links=_link_to(created),
            attributes=attributes,
        )

    def record_fanout(self, parent: Span, ref: ChannelRef, start_ns: int, members: int) -> None:
        """One span for a fan-out to this node's sockets (not one per socket: see docs)."""
        span = self.tracer.start_span(
            f"deliver {ref.room}/{ref.channel}",
            context=trace.set_span_in_context(parent),
            start_time=start_ns,
            attributes={"arqonbus.delivery.members": members, "arqonbus.tenant": ref.tenant},
        )
        span.end()
        parent.end()

    def record_replay(self, what: str, ref: ChannelRef, start_ns: int, events: int) -> None:
        """One span per replay (a ``since_seq`` join, a catch-up or a history page)."""
        span = self.tracer.start_span(
            f"{what} {ref.room}/{ref.channel}",
            context=Context(),
            start_time=start_ns,
            attributes={"arqonbus.replay.events": events, "arqonbus.tenant": ref.tenant},
        )
        span.end()

    # -- shutdown ---------------------------------------------------------------------------

    def flush(self, timeout_s: float) -> None:
        """Export what is buffered, then stop (the drain's last step)."""
        self.provider.force_flush(int(timeout_s * 1000))
        self.provider.shutdown()


def now_ns() -> int:
    return time.time_ns()
