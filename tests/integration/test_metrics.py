"""GET /metrics on real gateways over the real NATS cluster, and the Grafana dashboard's queries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.app import Gateway
from tests.conftest import gateway_url
from tests.support import WsClient
from tests.timeouts import SEC
from tests.timeouts import eventually as poll

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "arqonbus.json"
# A metric name in PromQL: an identifier not followed by "(" (a function) and not a label
# name inside {...} or by (...); ours all start with arqonbus_ or process_.
METRIC_NAME = re.compile(r"\b((?:arqonbus|process)_[a-zA-Z0-9_]+)\b")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(gateway: Gateway) -> tuple[str, str]:
    """GET /metrics: (content type, body)."""
    host, port = gateway.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    assert status.split()[1] == "200", status
    headers = dict(line.split(": ", 1) for line in header_lines)
    return headers["Content-Type"], body.decode()


def families(text: str) -> dict[str, str]:
    """Family name -> type (counter families are named without ``_total``)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= ls)


def family_of(name: str, types: dict[str, str]) -> str | None:
    """The family a PromQL series name belongs to: ``x_total`` of counter ``x``,
    ``x_bucket``/``x_sum``/``x_count`` of histogram ``x``, or ``x`` itself."""
    if name in types and types[name] not in ("counter", "histogram"):
        return name
    for suffix, kinds in (
        ("_total", {"counter"}),
        ("_bucket", {"histogram"}),
        ("_sum", {"histogram", "summary"}),
        ("_count", {"histogram", "summary"}),
    ):
        base = name.removesuffix(suffix)
        if base != name and types.get(base) in kinds:
            return base
    return None


async def eventually(gateway: Gateway, check: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``check`` holds (what it waits for happens after a client saw its
    answer: the close handshake, a delivery's count), for at most 10 s."""

    async def scraped() -> Samples | None:
        found = samples((await scrape(gateway))[1])
        return found if check(found) else None

    return await poll(scraped, 10 * SEC, "the metrics reached the expected values")


def dashboard_metric_names() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    assert len(exprs) > 20
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


async def test_metrics_move_with_real_traffic(start_gateway, clients, opened, tenant):
    g1, g2 = await start_gateway(), await start_gateway()
    alice = await clients(gateway_url(g1), tenant, "alice")
    reader = await clients(gateway_url(g1), tenant, "reader:read-only")
    bob = await clients(gateway_url(g2), tenant, "bob")
    await bob.join("r", "c")

    acks = [await alice.publish("r", "c", {"n": n}) for n in range(3)]
    assert [a["type"] for a in acks] == ["ack"] * 3
    refused = await reader.publish("r", "c", {"n": 99})
    assert refused["type"] == "error" and refused["payload"]["code"] == "forbidden"
    await bob.wait_events(3, "r", "c")
    history = await bob.command("r", "c", "history", {"since_seq": 0})
    assert len(history["payload"]["result"]["events"]) == 3
    late = await clients(gateway_url(g1), tenant, "late")
    await late.join("r", "c", since_seq=0)
    await late.wait_events(3, "r", "c")
    call = await alice.command("r", "c", "no_such_service")
    assert call["payload"]["status"] == "error"
    signed_in = WsClient(await websockets.connect(gateway_url(g1)))  # first-message auth
    opened.append(signed_in)
    await signed_in.wait_for(lambda m: m["type"] == "auth_required")
    await signed_in.send({"type": "auth", "payload": {"token": f"dev:{tenant}:eve"}})
    await signed_in.wait_for(lambda m: m["type"] == "welcome")
    with pytest.raises(InvalidStatus):
        await websockets.connect(
            gateway_url(g1), additional_headers={"Authorization": f"Bearer dev:{tenant}:x:nope"}
        )

    content_type, text = await scrape(g1)
    assert content_type.startswith("text/plain")
    one = samples(text)
    assert value(one, "arqonbus_publishes_acked_total", duplicate="false") == 3
    assert value(one, "arqonbus_publish_ack_latency_seconds_count") == 3
    assert value(one, "arqonbus_publishes_refused_total", code="forbidden") == 1
    assert value(one, "arqonbus_frames_received_total", type="event") == 4
    assert value(one, "arqonbus_frames_sent_total", type="ack") == 3
    assert value(one, "arqonbus_frames_sent_total", type="welcome") == 4
    assert value(one, "arqonbus_frames_sent_total", type="auth_required") == 1
    assert value(one, "arqonbus_frames_received_total", type="auth") == 1
    assert value(one, "arqonbus_replay_events_total", kind="catch_up") == 3
    assert value(one, "arqonbus_replay_duration_seconds_count", kind="catch_up") >= 1
    assert value(one, "arqonbus_service_calls_total", outcome="no_responders") == 1
    assert value(one, "arqonbus_auth_failures_total", method="dev") == 1
    assert value(one, "arqonbus_connections_opened_total") == 4
    assert value(one, "arqonbus_sessions") == 4
    assert value(one, "arqonbus_hub_channels") == 1 and value(one, "arqonbus_hub_members") == 1
    assert value(one, "arqonbus_kv_watch_reloads_total") >= 5  # every watched bucket loaded
    assert value(one, "arqonbus_ws_messages_received_total") >= 6
    assert value(one, "process_resident_memory_bytes") > 0
    assert "tenant=" not in text  # no tenant label unless opted in

    # On the other gateway: deliveries to bob, timed from the store timestamp; his history.
    two = await eventually(g2, lambda s: value(s, "arqonbus_deliveries_total") == 3)
    assert value(two, "arqonbus_publish_deliver_latency_seconds_count") == 3
    assert 0 <= value(two, "arqonbus_publish_deliver_latency_seconds_sum") < 3 * 10
    assert value(two, "arqonbus_frames_sent_total", type="event") == 3
    assert value(two, "arqonbus_replay_events_total", kind="history") == 3
    assert value(two, "arqonbus_publishes_acked_total") == 0

    await reader.close()
    closed = await eventually(
        g1, lambda s: value(s, "arqonbus_connections_closed_total", code="1000") == 1
    )
    assert value(closed, "arqonbus_connections") == 3


async def test_every_metric_the_dashboard_queries_is_served(start_gateway):
    gateway = await start_gateway()
    types = families((await scrape(gateway))[1])
    names = dashboard_metric_names()
    assert "arqonbus_publish_deliver_latency_seconds_bucket" in names
    missing = sorted(name for name in names if family_of(name, types) is None)
    assert missing == [], f"the dashboard queries metrics no gateway serves: {missing}"


async def test_metrics_off_is_404(start_gateway):
    gateway = await start_gateway(metrics=False)
    host, port = gateway.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status = (await reader.readline()).split()[1]
    writer.close()
    assert status == b"404"


async def test_sampled_messages_are_timed_through_every_phase(start_gateway, clients, tenant):
    # Every message sampled (an interval of 1 µs), publisher and member on one gateway.
    gateway = await start_gateway(metrics_phase_sample_ms=0.001)
    alice = await clients(gateway_url(gateway), tenant, "alice")
    bob = await clients(gateway_url(gateway), tenant, "bob")
    await bob.join("r", "c")
    for n in range(5):
        assert (await alice.publish("r", "c", {"n": n}))["type"] == "ack"
    await bob.wait_events(5, "r", "c")

    def counted(s: Samples) -> bool:
        return value(s, "arqonbus_event_phase_seconds_count", phase="total") == 5

    found = await eventually(gateway, counted)
    phases = ("read", "handle", "store_ack", "store_to_live", "fanout_write", "total")
    for phase in phases:
        assert value(found, "arqonbus_event_phase_seconds_count", phase=phase) == 5, phase
    sums = {p: value(found, "arqonbus_event_phase_seconds_sum", phase=p) for p in phases}
    assert all(s >= 0 for s in sums.values()), sums
    # total is read + handle + store_to_live + fanout_write, sample by sample.
    parts = sums["read"] + sums["handle"] + sums["store_to_live"] + sums["fanout_write"]
    assert sums["total"] == pytest.approx(parts, abs=1e-6)
    assert 0 < sums["store_ack"] < 5 * 10


async def test_phase_sampling_off_observes_nothing(start_gateway, clients, tenant):
    gateway = await start_gateway(metrics_phase_sample_ms=0)
    assert gateway.metrics.phases is None
    alice = await clients(gateway_url(gateway), tenant, "alice")
    await alice.join("r", "c")
    assert (await alice.publish("r", "c", {"n": 1}))["type"] == "ack"
    await alice.wait_events(1, "r", "c")
    found = samples((await scrape(gateway))[1])
    assert value(found, "arqonbus_event_phase_seconds_count") == 0
