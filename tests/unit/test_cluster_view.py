"""The cluster view's pure parts (shared/cluster.py, the names) and the gateway's heartbeat
loop and `arqonbus status` rendering over the in-memory ClusterView."""

from __future__ import annotations

import pytest

from arqonbus_server.gateway.admin.status import render
from arqonbus_server.gateway.state.heartbeat import (
    HeartbeatPublisher,
    NodeIdentity,
    server_version,
)
from arqonbus_server.mesh.memory import MemoryClusterView, MemoryMesh
from arqonbus_server.mesh.ports import NatsNode
from arqonbus_server.shared.cluster import (
    BadHeartbeat,
    Heartbeat,
    NatsServerRef,
    RateMeter,
    decode_heartbeat,
    encode_heartbeat,
)
from arqonbus_server.shared.subjects import SubjectScheme, node_token
from tests.timeouts import SEC, eventually

BEAT = Heartbeat("gw1", "eu", "0.1.0", 61.0, 3, 10.5, 20.0, NatsServerRef("n0", "h:4222"), 5.0)


def test_a_heartbeat_survives_its_encoding_and_expires_after_3_intervals() -> None:
    assert decode_heartbeat(encode_heartbeat(BEAT)) == BEAT
    assert BEAT.ttl_s == 15.0


@pytest.mark.parametrize(
    "data",
    [
        b"nope",
        b"[]",
        b'{"node":"x"}',
        encode_heartbeat(BEAT).replace(b'"connections":3', b'"connections":true'),
    ],
)
def test_a_bad_heartbeat_is_refused_with_what_is_wrong(data: bytes) -> None:
    with pytest.raises(BadHeartbeat):
        decode_heartbeat(data)


def test_a_newer_gateways_extra_fields_are_ignored() -> None:
    extra = encode_heartbeat(BEAT)[:-1] + b',"cpu":0.5}'
    assert decode_heartbeat(extra) == BEAT


def test_the_rate_is_the_count_difference_over_the_time_difference() -> None:
    meter = RateMeter()
    assert meter.rate(100, 10.0) == 0.0  # first reading: no interval yet
    assert meter.rate(150, 12.0) == 25.0
    assert meter.rate(150, 12.0) == 0.0  # no time passed


def test_node_ids_become_one_subject_token() -> None:
    scheme = SubjectScheme("arq")
    assert scheme.gateway_heartbeat("gw-1") == "arq.sys.gateway.gw-1"
    assert scheme.gateway_heartbeat("host.example.com-12") == "arq.sys.gateway.host_example_com-12"
    assert len(node_token("x" * 200)) == 64 and node_token("") == "_"
    assert scheme.heartbeat_stream() == "arq-sys_gateways" != scheme.stream_name("sys_gateways")


async def test_the_publisher_announces_its_counts_and_withdraws_on_close() -> None:
    now = [100.0]
    frames = [0, 0]
    view = MemoryClusterView(MemoryMesh())
    publisher = HeartbeatPublisher(
        view,
        NodeIdentity("gw1", "eu", server_version()),
        interval_s=0.05,
        connections=lambda: 2,
        frames=lambda: (frames[0], frames[1]),
        clock=lambda: now[0],
    )
    assert publisher.heartbeat().msgs_in_per_s == 0.0
    frames[:] = [30, 60]
    now[0] += 3.0
    beat = publisher.heartbeat()
    assert (beat.connections, beat.msgs_in_per_s, beat.msgs_out_per_s) == (2, 10.0, 20.0)
    assert (beat.uptime_s, beat.nats, beat.version) == (
        3.0,
        NatsServerRef("memory", "memory:0"),
        server_version(),
    )
    publisher.start()
    beats = await eventually(view.gateways, 5 * SEC, "the first heartbeat")
    assert decode_heartbeat(beats[0]).node == "gw1"
    await publisher.close()
    assert await view.gateways() == []


def test_status_renders_both_tables_and_marks_an_unreachable_server() -> None:
    servers = [
        NatsNode("h:4222", "n0", "2.15.1", "c", True, connected=True, reachable=True),
        NatsNode("h:4223", "", "", "", False, connected=False, reachable=False),
    ]
    text = render([BEAT], servers)
    lines = text.splitlines()
    assert lines[0] == "Gateways: 1"
    assert lines[2].split() == ["gw1", "eu", "0.1.0", "1m01s", "3", "10.5", "20", "n0", "(h:4222)"]
    assert "this connection" in text and "unreachable" in text
    assert "none announced itself" in render([], servers)
