"""One trace from an SDK publisher through two gateway processes to every subscriber.

A real OTLP/HTTP receiver runs in the test (a thread serving ``POST /v1/traces`` on
127.0.0.1, decoding ``ExportTraceServiceRequest``); the two gateways are child processes
that export to it from the standard ``OTEL_*`` environment, and the publishing SDK client
exports to it through its own TracerProvider.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import nats
import orjson
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from arqonbus import Client, Event
from arqonbus_server.mesh.local import LocalCluster
from tests.timeouts import SEC

PRODUCER, CONSUMER, INTERNAL = (
    ProtoSpan.SPAN_KIND_PRODUCER,
    ProtoSpan.SPAN_KIND_CONSUMER,
    ProtoSpan.SPAN_KIND_INTERNAL,
)
ROOM, CHANNEL = "science", "general"


@dataclass(frozen=True)
class Received:
    service: str
    instance: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    links: tuple[tuple[str, str], ...]
    attributes: dict[str, Any]


def _value(kv: KeyValue) -> Any:
    which = kv.value.WhichOneof("value")
    return getattr(kv.value, which) if which else None


def _decode(body: bytes) -> list[Received]:
    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Received(
                        str(resource.get("service.name", "")),
                        str(resource.get("service.instance.id", "")),
                        span.name,
                        span.kind,
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                        tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        {kv.key: _value(kv) for kv in span.attributes},
                    )
                )
    return spans


class OtlpReceiver:
    """``POST /v1/traces`` (OTLP/HTTP, protobuf) on 127.0.0.1, in a thread of its own."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self._lock = threading.Lock()
        self._arrived = asyncio.Event()
        loop = asyncio.get_running_loop()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                spans = _decode(body)
                with receiver._lock:
                    receiver.spans.extend(spans)
                loop.call_soon_threadsafe(receiver._arrived.set)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.spans)

    async def wait_for(
        self, wanted: Callable[[list[Received]], bool], timeout: float
    ) -> list[Received]:
        """The spans received, once ``wanted`` holds for them (bounded by ``timeout``)."""
        async with asyncio.timeout(timeout):
            while True:
                self._arrived.clear()
                spans = self.snapshot()
                if wanted(spans):
                    return spans
                await self._arrived.wait()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    otlp = OtlpReceiver()
    try:
        yield otlp
    finally:
        otlp.close()


@pytest.fixture
def client_provider(receiver: OtlpReceiver) -> Iterator[TracerProvider]:
    provider = TracerProvider(resource=Resource.create({"service.name": "test-publisher"}))
    # Simple: exported at span end (the receiver is a thread, so this cannot deadlock).
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint)))
    yield provider
    provider.shutdown()


def tracing_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "arqonbus-gateway",
        **extra,
    }


async def next_event(sub: Any) -> Event:
    async with asyncio.timeout(10 * SEC):
        item = await sub.__anext__()
    assert isinstance(item, Event)
    return item


def trace_id_of(traceparent: str) -> str:
    return traceparent.split("-")[1]  # the test reads it to compare; the code never parses it


async def test_one_trace_from_the_sdk_through_two_gateways_to_every_subscriber(
    nats_cluster: LocalCluster,
    gateway_processes: Any,
    receiver: OtlpReceiver,
    client_provider: TracerProvider,
) -> None:
    env = tracing_env(receiver, ARQONBUS_TRUST_CLIENT_TRACE="true")
    first = await gateway_processes(nats_cluster.url_csv, env=env)
    second = await gateway_processes(nats_cluster.url_csv, env=env)
    tenant = "t" + uuid.uuid4().hex[:12]
    gw1, gw2 = f"gw-{first.port}", f"gw-{second.port}"

    async with (
        Client(first.url, f"dev:{tenant}:alice", tracer_provider=client_provider) as publisher,
        Client(first.url, f"dev:{tenant}:bob") as bob,
        Client(first.url, f"dev:{tenant}:carol") as carol,
        Client(second.url, f"dev:{tenant}:dave", tracer_provider=client_provider) as dave,
    ):
        subs = [await c.subscribe(ROOM, CHANNEL).start() for c in (bob, carol, dave)]
        ack = await publisher.publish(ROOM, CHANNEL, {"text": "hello"}, id="traced-1")
        events = [await next_event(sub) for sub in subs]
        # A late joiner on the second gateway replays the event from the store.
        async with Client(second.url, f"dev:{tenant}:erin") as erin:
            replayed = await next_event(await erin.subscribe(ROOM, CHANNEL, since_seq=0).start())

    client_send = (await receiver.wait_for(lambda s: any(x.name.startswith("send") and x.service == "test-publisher" for x in s), 10 * SEC))  # fmt: skip
    trace_id = next(s for s in client_send if s.service == "test-publisher").trace_id
    # Every subscriber got the creation context: the publisher's send span.
    for event in [*events, replayed]:
        assert event.trace_context is not None
        assert trace_id_of(event.trace_context["traceparent"]) == trace_id

    def complete(spans: list[Received]) -> bool:
        names = {(s.instance, s.name) for s in spans}
        wanted = {
            (gw1, f"send {ROOM}/{CHANNEL}"),
            (gw1, f"process {ROOM}/{CHANNEL}"),
            (gw2, f"process {ROOM}/{CHANNEL}"),
            (gw1, f"deliver {ROOM}/{CHANNEL}"),
            (gw2, f"deliver {ROOM}/{CHANNEL}"),
            (gw2, f"replay {ROOM}/{CHANNEL}"),
        }
        return wanted <= names

    spans = await receiver.wait_for(complete, 15 * SEC)
    by = {(s.instance if s.service == "arqonbus-gateway" else s.service, s.name): s for s in spans}
    sdk = by[("test-publisher", f"send {ROOM}/{CHANNEL}")]
    send = by[(gw1, f"send {ROOM}/{CHANNEL}")]
    process1, process2 = (
        by[(gw1, f"process {ROOM}/{CHANNEL}")],
        by[(gw2, f"process {ROOM}/{CHANNEL}")],
    )
    deliver1, deliver2 = (
        by[(gw1, f"deliver {ROOM}/{CHANNEL}")],
        by[(gw2, f"deliver {ROOM}/{CHANNEL}")],
    )

    # One trace: the client, both gateway processes.
    assert {sdk.trace_id, send.trace_id, process1.trace_id, process2.trace_id} == {trace_id}
    assert sdk.kind == PRODUCER and sdk.attributes["messaging.message.id"] == "traced-1"
    assert sdk.attributes["arqonbus.seq"] == ack.seq
    # The receiving gateway: PRODUCER, child of the trusted client context, ends at the ack.
    assert send.kind == PRODUCER and send.parent_id == sdk.span_id and send.links == ()
    assert send.attributes == {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": f"arq.ev.{tenant}.{ROOM}.{CHANNEL}",
        "messaging.destination.template": "arq.ev.{tenant}.{room}.{channel}",
        "messaging.message.id": "traced-1",
        "arqonbus.tenant": tenant,
        "arqonbus.seq": ack.seq,
        "arqonbus.duplicate": False,
    }
    # Every delivering gateway: CONSUMER, parent = the hop context from the NATS headers
    # (so the stream's RePublish kept them), link = the creation context.
    for process in (process1, process2):
        assert process.kind == CONSUMER and process.parent_id == send.span_id
        assert process.links == ((trace_id, sdk.span_id),)
        assert (
            process.attributes["messaging.destination.name"]
            == f"arq.live.{tenant}.{ROOM}.{CHANNEL}"
        )
        assert process.attributes["arqonbus.seq"] == ack.seq
    # One span per fan-out, with the members this node sent the event to.
    assert deliver1.kind == INTERNAL and deliver1.parent_id == process1.span_id
    assert deliver2.parent_id == process2.span_id
    assert (deliver1.attributes["arqonbus.delivery.members"], deliver2.attributes["arqonbus.delivery.members"]) == (2, 1)  # fmt: skip
    replay = by[(gw2, f"replay {ROOM}/{CHANNEL}")]
    assert replay.attributes["arqonbus.replay.events"] == 1
    # The subscriber with a tracer provider continues the trace from the creation context.
    consumer = by[("test-publisher", f"process {ROOM}/{CHANNEL}")]
    assert consumer.kind == CONSUMER and consumer.parent_id == sdk.span_id
    assert consumer.trace_id == trace_id and consumer.attributes["arqonbus.seq"] == ack.seq


async def one_event(publish_url: str, subscribe_url: str, provider: TracerProvider) -> Event:
    """A traced SDK publisher on one gateway, a plain subscriber on another: the event it got."""
    tenant = "t" + uuid.uuid4().hex[:12]
    async with (
        Client(publish_url, f"dev:{tenant}:alice", tracer_provider=provider) as publisher,
        Client(subscribe_url, f"dev:{tenant}:bob") as bob,
    ):
        sub = await bob.subscribe(ROOM, CHANNEL).start()
        await publisher.publish(ROOM, CHANNEL, {"text": "hello"})
        return await next_event(sub)


async def test_an_untrusted_client_context_is_linked_not_continued_and_drain_flushes(
    nats_cluster: LocalCluster,
    gateway_processes: Any,
    receiver: OtlpReceiver,
    client_provider: TracerProvider,
) -> None:
    # A batch delay of 10 minutes: the gateway's spans can only arrive through its drain.
    env = tracing_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000")
    gateway = await gateway_processes(nats_cluster.url_csv, env=env)
    event = await one_event(gateway.url, gateway.url, client_provider)
    assert not [s for s in receiver.snapshot() if s.service == "arqonbus-gateway"]
    await gateway.stop()  # SIGTERM: the drain exports what the batch still holds
    name = f"send {ROOM}/{CHANNEL}"
    spans = await receiver.wait_for(lambda s: {x.service for x in s if x.name == name} == {"test-publisher", "arqonbus-gateway"}, 10 * SEC)  # fmt: skip
    sdk = next(s for s in spans if s.service == "test-publisher")
    send = next(s for s in spans if s.service == "arqonbus-gateway" and s.name == name)
    assert send.trace_id != sdk.trace_id and send.parent_id == ""  # a new trace...
    assert send.links == ((sdk.trace_id, sdk.span_id),)  # ...linked to the client's
    assert event.trace_context is not None  # the creation context is now the gateway's
    assert trace_id_of(event.trace_context["traceparent"]) == send.trace_id


async def test_no_spans_when_tracing_is_off_and_the_client_context_passes_through(
    nats_cluster: LocalCluster,
    gateway_processes: Any,
    receiver: OtlpReceiver,
    client_provider: TracerProvider,
) -> None:
    # An endpoint is known, but the exporter is "none": the gateways must not trace.
    env = tracing_env(receiver, OTEL_TRACES_EXPORTER="none")
    first = await gateway_processes(nats_cluster.url_csv, env=env)
    second = await gateway_processes(nats_cluster.url_csv, env=env)
    event = await one_event(first.url, second.url, client_provider)
    await first.stop()  # the drain would flush any span a gateway had made
    await second.stop()
    spans = await receiver.wait_for(lambda s: len(s) >= 1, 10 * SEC)
    assert {s.service for s in spans} == {"test-publisher"}  # the client's own spans only
    sdk = next(s for s in spans if s.name.startswith("send"))
    assert event.trace_context is not None
    assert trace_id_of(event.trace_context["traceparent"]) == sdk.trace_id


async def test_nats_msg_trace_reports_the_hops_of_a_traced_publish_when_asked(
    nats_cluster: LocalCluster, gateway_processes: Any, receiver: OtlpReceiver
) -> None:
    subject = "msgtrace." + uuid.uuid4().hex[:10]
    env = tracing_env(receiver, ARQONBUS_NATS_MSG_TRACE_SUBJECT=subject)
    gateway = await gateway_processes(nats_cluster.url_csv, env=env)
    tenant = "t" + uuid.uuid4().hex[:12]
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        hops = await nc.subscribe(subject)
        await nc.flush()
        async with Client(gateway.url, f"dev:{tenant}:alice") as publisher:
            ack = await publisher.publish(ROOM, CHANNEL, {"text": "hello"})
        # One report per server the message crossed; the stream leader's has the store.
        reports = [orjson.loads((await hops.next_msg(timeout=10 * SEC)).data)]
        while not any(e["type"] == "js" for e in reports[-1]["events"]):
            reports.append(orjson.loads((await hops.next_msg(timeout=10 * SEC)).data))
    finally:
        await nc.close()
    assert ack.seq >= 1  # still stored and acked
    assert reports[0]["events"][0]["type"] == "in"  # the ingress of the gateway's publish
    assert reports[0]["events"][0]["subj"] == f"arq.ev.{tenant}.{ROOM}.{CHANNEL}"
    header = reports[-1]["request"]["header"]
    assert header["Nats-Trace-Dest"] == [subject] and "traceparent" in header


async def test_a_service_command_is_one_trace_across_caller_gateways_and_handler(
    nats_cluster: LocalCluster,
    gateway_processes: Any,
    receiver: OtlpReceiver,
    client_provider: TracerProvider,
) -> None:
    env = tracing_env(receiver, ARQONBUS_TRUST_CLIENT_TRACE="true")
    first = await gateway_processes(nats_cluster.url_csv, env=env)
    second = await gateway_processes(nats_cluster.url_csv, env=env)
    tenant = "t" + uuid.uuid4().hex[:12]
    gw1, gw2 = f"gw-{first.port}", f"gw-{second.port}"
    seen: list[dict[str, str] | None] = []

    def add(request: Any) -> dict[str, Any]:
        seen.append(request.trace_context)
        return {"sum": request.parameters["a"] + request.parameters["b"]}

    async with (
        Client(second.url, f"dev:{tenant}:svc", tracer_provider=client_provider) as handler,
        Client(first.url, f"dev:{tenant}:caller", tracer_provider=client_provider) as caller,
    ):
        await handler.register_handler(ROOM, CHANNEL, "add", add)
        assert await caller.command(ROOM, CHANNEL, "add", {"a": 2, "b": 3}) == {"sum": 5}

    def complete(spans: list[Received]) -> bool:
        names = {(s.instance, s.name) for s in spans} | {(s.service, s.name) for s in spans}
        return {
            ("test-publisher", f"call {ROOM}/{CHANNEL}"),
            ("test-publisher", f"handle {ROOM}/{CHANNEL}"),
            (gw1, f"call {ROOM}/{CHANNEL}"),
            (gw2, f"process {ROOM}/{CHANNEL}"),
        } <= names

    spans = await receiver.wait_for(complete, 15 * SEC)
    by = {(s.instance if s.service == "arqonbus-gateway" else s.service, s.name): s for s in spans}
    sdk_call = by[("test-publisher", f"call {ROOM}/{CHANNEL}")]
    gw_call = by[(gw1, f"call {ROOM}/{CHANNEL}")]
    gw_serve = by[(gw2, f"process {ROOM}/{CHANNEL}")]
    handled = by[("test-publisher", f"handle {ROOM}/{CHANNEL}")]
    assert {sdk_call.trace_id, gw_call.trace_id, gw_serve.trace_id, handled.trace_id} == {
        sdk_call.trace_id
    }
    assert sdk_call.kind == ProtoSpan.SPAN_KIND_CLIENT and sdk_call.parent_id == ""
    assert gw_call.kind == ProtoSpan.SPAN_KIND_CLIENT and gw_call.parent_id == sdk_call.span_id
    assert gw_call.attributes["arqonbus.command"] == "add"
    # The NATS request carried the caller gateway's context to the handler's gateway...
    assert gw_serve.kind == CONSUMER and gw_serve.parent_id == gw_call.span_id
    # ...and the delivered command carried that gateway's context to the handler's SDK.
    assert handled.kind == ProtoSpan.SPAN_KIND_SERVER and handled.parent_id == gw_serve.span_id
    assert seen and seen[0] is not None
    assert trace_id_of(seen[0]["traceparent"]) == sdk_call.trace_id
