"""The envelope's ``trace`` field (plain data in shared/) and the gateway's spans, in process."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from arqonbus_server.gateway.tracing import Tracing, tracing_from, tracing_wanted
from arqonbus_server.shared.core.effects import CallService, Publish
from arqonbus_server.shared.envelope import (
    ClientEvent,
    encode_delivery,
    parse_client_frame,
    parse_trace,
    with_seq,
    with_trace,
)
from arqonbus_server.shared.settings import Settings
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme
from tests.unit.test_core_connection import T0, core

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
REF = ChannelRef("acme", "science", "general")


def event_frame(**extra: Any) -> bytes:
    envelope = {"id": "e1", "type": "event", "room": "science", "channel": "general"}
    return orjson.dumps({**envelope, "payload": {"n": 1}, **extra})


# -- the field, as plain data ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ({"traceparent": PARENT}, {"traceparent": PARENT}),
        (
            {"traceparent": PARENT, "tracestate": "a=1"},
            {"traceparent": PARENT, "tracestate": "a=1"},
        ),
        ({"traceparent": PARENT, "baggage": "x"}, {"traceparent": PARENT}),  # others ignored
        ({"traceparent": "x" * 257}, None),
        ({"traceparent": 7}, None),
        ({"traceparent": PARENT, "tracestate": 1}, None),
        ({"traceparent": "\u00e9" + PARENT}, None),
        ({"tracestate": "a=1"}, None),
        ("00-abc", None),
        (None, None),
    ],
)
def test_parse_trace_keeps_well_shaped_strings_only(value: Any, parsed: Any) -> None:
    assert parse_trace(value) == parsed


def test_a_malformed_trace_never_refuses_the_event_and_is_flagged() -> None:
    event = parse_client_frame(event_frame(trace=["not", "an", "object"]), 65536)
    assert isinstance(event, ClientEvent)
    assert (event.trace, event.trace_malformed) == (None, True)
    plain = parse_client_frame(event_frame(), 65536)
    assert isinstance(plain, ClientEvent) and not plain.trace_malformed


def test_the_core_hands_the_trace_to_the_shell_with_the_malformed_flag() -> None:
    good = core().receive(event_frame(trace={"traceparent": PARENT}), T0)
    bad = core().receive(event_frame(trace="garbage"), T0)
    assert isinstance(good[-1], Publish) and isinstance(bad[-1], Publish)
    assert good[-1].trace == {"traceparent": PARENT} and not good[-1].trace_malformed
    assert bad[-1].trace is None and bad[-1].trace_malformed
    assert b"trace" not in good[-1].body  # the shell splices it: its own or the client's


def test_a_service_command_carries_its_trace_to_the_call_and_the_delivery() -> None:
    command = {"command": "add", "parameters": {}}
    frame = orjson.dumps(
        {"id": "c1", "type": "command", "room": "science", "channel": "general",
         "payload": command, "trace": {"traceparent": PARENT}}
    )  # fmt: skip
    (call,) = core().receive(frame, T0)
    assert isinstance(call, CallService) and call.trace == {"traceparent": PARENT}
    malformed = orjson.loads(frame)
    malformed["trace"] = {"traceparent": None}
    (call,) = core().receive(orjson.dumps(malformed), T0)
    assert isinstance(call, CallService) and call.trace is None and call.trace_malformed
    delivered = encode_delivery(
        "dlv_1", "science", "general", "bob", "t", {}, {"traceparent": PARENT}
    )
    assert orjson.loads(delivered)["trace"] == {"traceparent": PARENT}


def test_with_trace_splices_the_field_and_seq_still_follows() -> None:
    stored = orjson.dumps({"id": "e1", "payload": {}})
    delivered = orjson.loads(with_seq(with_trace(stored, {"traceparent": PARENT}), 3))
    assert delivered == {"id": "e1", "payload": {}, "trace": {"traceparent": PARENT}, "seq": 3}
    assert with_trace(stored, None) == stored


# -- on or off ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("switch", "environ", "wanted"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        (False, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        (False, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
        (True, {"OTEL_TRACES_EXPORTER": "none"}, False),
        (True, {"OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_off_unless_configured(
    switch: bool, environ: dict[str, str], wanted: bool
) -> None:
    assert tracing_wanted(Settings(tracing=switch), environ) is wanted


def test_an_untraced_gateway_has_no_tracing_object() -> None:
    assert tracing_from(Settings(), {}, "gw1") is None


# -- the spans ---------------------------------------------------------------------------


def traced(trust: bool) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider, SubjectScheme("arq"), trust), exporter


def test_a_trusted_client_context_is_the_parent_and_stays_the_creation_context() -> None:
    tracing, exporter = traced(trust=True)
    span, hop, created = tracing.start_send(REF, "e1", {"traceparent": PARENT})
    tracing.end_send(span, 9, False, None)
    (sent,) = exporter.get_finished_spans()
    assert sent.kind == trace.SpanKind.PRODUCER and sent.name == "send science/general"
    assert sent.parent is not None and f"{sent.parent.span_id:016x}" == PARENT.split("-")[2]
    assert created == {"traceparent": PARENT} and hop["traceparent"] != PARENT
    assert sent.attributes is not None and sent.attributes["arqonbus.seq"] == 9


def test_an_untrusted_client_context_is_linked_and_replaced() -> None:
    tracing, exporter = traced(trust=False)
    span, hop, created = tracing.start_send(REF, "e1", {"traceparent": PARENT})
    tracing.end_send(span, None, False, "quota_exceeded")
    (sent,) = exporter.get_finished_spans()
    assert sent.parent is None and f"{sent.links[0].context.trace_id:032x}" == PARENT.split("-")[1]
    assert created == hop  # the gateway's span is the creation context now
    assert sent.attributes is not None and sent.attributes["error.type"] == "quota_exceeded"
    assert not sent.status.is_ok


def test_process_has_the_hop_parent_and_links_the_creation_context() -> None:
    tracing, exporter = traced(trust=True)
    span, hop, created = tracing.start_send(REF, "e1", {"traceparent": PARENT})
    span.end()
    body = with_trace(orjson.dumps({"id": "e1", "payload": {}}), created)
    process = tracing.start_process(REF, 9, body, {**hop, "Nats-Sequence": "9"})
    tracing.record_fanout(process, REF, 0, 3)
    send, deliver, consumed = exporter.get_finished_spans()
    assert consumed.kind == trace.SpanKind.CONSUMER and consumed.parent is not None
    assert consumed.parent.span_id == send.context.span_id
    assert f"{consumed.links[0].context.span_id:016x}" == PARENT.split("-")[2]
    assert deliver.parent is not None and deliver.parent.span_id == consumed.context.span_id
    assert deliver.attributes is not None and deliver.attributes["arqonbus.delivery.members"] == 3
