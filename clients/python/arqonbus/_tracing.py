"""Client-side spans, made only when ``Client(tracer_provider=...)`` is given.

OpenTelemetry is an optional extra (``pip install arqonbus[tracing]``): this module imports
it lazily, so a client without a tracer provider never loads it. Context is W3C trace
context, written and read only by ``opentelemetry.propagate``.

- ``send {room}/{channel}`` (PRODUCER) around a publish, from encoding to the ack; its
  context is the event's ``trace`` field, the creation context every subscriber sees.
- ``process {room}/{channel}`` (CONSUMER) when a delivered event reaches its
  subscription, child of the event's ``trace_context``.
- ``call {room}/{channel}`` (CLIENT) around a service command, its context in the command's
  ``trace`` field; ``handle {room}/{channel}`` (SERVER) around a handler, child of the
  request's ``trace_context`` (the handler's gateway span) and current while it runs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from arqonbus.models import CommandRequest, Event

_TRACE_KEYS = ("traceparent", "tracestate")


class ClientTracing:
    def __init__(self, tracer_provider: Any) -> None:
        try:
            from opentelemetry import propagate, trace
        except ImportError:  # pragma: no cover - the extra is missing
            raise ImportError(
                "tracer_provider needs OpenTelemetry: pip install 'arqonbus[tracing]'"
            ) from None
        self._propagate = propagate
        self._trace = trace
        self._tracer = tracer_provider.get_tracer("arqonbus")

    def _attributes(self, room: str, channel: str, operation: str) -> dict[str, Any]:
        return {
            "messaging.system": "arqonbus",
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.destination.name": f"{room}/{channel}",
        }

    def start_send(self, room: str, channel: str) -> tuple[Any, dict[str, str]]:
        """A PRODUCER span and the ``trace`` field that carries its context."""
        span = self._tracer.start_span(
            f"send {room}/{channel}",
            kind=self._trace.SpanKind.PRODUCER,
            attributes=self._attributes(room, channel, "send"),
        )
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=self._trace.set_span_in_context(span))
        return span, {k: carrier[k] for k in _TRACE_KEYS if k in carrier}

    def end_send(
        self, span: Any, msg_id: str, seq: int | None, error: BaseException | None
    ) -> None:
        span.set_attribute("messaging.message.id", msg_id)
        if seq is not None:
            span.set_attribute("arqonbus.seq", seq)
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)))
        span.end()

    def start_call(self, room: str, channel: str, command: str) -> tuple[Any, dict[str, str]]:
        """A CLIENT span for a service command and the ``trace`` field of its envelope."""
        attributes = self._attributes(room, channel, "send")
        attributes["arqonbus.command"] = command
        span = self._tracer.start_span(
            f"call {room}/{channel}", kind=self._trace.SpanKind.CLIENT, attributes=attributes
        )
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=self._trace.set_span_in_context(span))
        return span, {k: carrier[k] for k in _TRACE_KEYS if k in carrier}

    def end_call(self, span: Any, error: BaseException | None) -> None:
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)))
        span.end()

    def handling(self, request: CommandRequest) -> AbstractContextManager[Any]:
        """The handler's span (current while it runs, so its own spans nest under it)."""
        attributes = self._attributes(request.room, request.channel, "process")
        attributes["arqonbus.command"] = request.command
        manager: AbstractContextManager[Any] = self._tracer.start_as_current_span(
            f"handle {request.room}/{request.channel}",
            context=self._propagate.extract(request.trace_context or {}),
            kind=self._trace.SpanKind.SERVER,
            attributes=attributes,
        )
        return manager

    def received(self, event: Event) -> None:
        """A CONSUMER span for a delivered event, in the trace of its creation context."""
        context = self._propagate.extract(event.trace_context or {})
        attributes = self._attributes(event.room, event.channel, "process")
        attributes["messaging.message.id"] = event.id
        attributes["arqonbus.seq"] = event.seq
        self._tracer.start_span(
            f"process {event.room}/{event.channel}",
            context=context,
            kind=self._trace.SpanKind.CONSUMER,
            attributes=attributes,
        ).end()
