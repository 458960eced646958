"""Contract checks: subscriptions per channel, stream config, per-sender order, error codes,
limits, byte-bounded history, dedupe keys, NATS unreachable at start, settings caps."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.js import JetStreamManager
from nats.js.api import StorageType, StreamInfo

from arqonbus_server.gateway.admin.dev import http_status
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.mesh.local import LocalCluster, free_port
from arqonbus_server.shared.settings import ConfigError
from arqonbus_server.shared.subjects import ChannelRef, SubjectScheme
from tests.conftest import gateway_url
from tests.support import Message, WsClient
from tests.timeouts import SEC, eventually

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 10.0


class MonitoredNats:
    """One NATS server with its HTTP monitoring endpoint: shows each client's subscriptions."""

    def __init__(self, cluster: LocalCluster, http_port: int) -> None:
        self.cluster, self.http_port = cluster, http_port

    async def live_subscriptions(self, gateway: Gateway, ref: ChannelRef) -> int:
        """Subscriptions on the channel's delivery subject that the server holds for the
        gateway's connection (named ``arqonbus-gateway <node id>``)."""
        url = f"http://127.0.0.1:{self.http_port}/connz?subs=detail&limit=1024"
        with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5 * SEC) as response:
            connz = orjson.loads(response.read())
        subject = SubjectScheme().live(ref)
        [connection] = [
            c
            for c in connz["connections"]
            if c.get("name") == f"arqonbus-gateway {gateway.node_id}"
        ]
        subs = connection.get("subscriptions_list_detail") or []
        return sum(1 for sub in subs if sub["subject"] == subject)


@pytest.fixture
async def monitored_nats(tmp_path: Path) -> AsyncIterator[MonitoredNats]:
    http_port = free_port()
    cluster = LocalCluster(
        tmp_path / "monitored", nodes=1, extra_config=f'http: "127.0.0.1:{http_port}"'
    )
    await cluster.start(timeout=30 * SEC)
    try:
        yield MonitoredNats(cluster, http_port)
    finally:
        await cluster.stop()


def event_frame(msg_id: str, room: str, channel: str, payload: Message) -> Message:
    return {"id": msg_id, "type": "event", "room": room, "channel": channel, "payload": payload}


@asynccontextmanager
async def jetstream(cluster: LocalCluster) -> AsyncIterator[JetStreamManager]:
    nc = await nats.connect(servers=cluster.urls)
    try:
        yield nc.jsm()
    finally:
        await nc.close()


# -- 1. one NATS subscription per channel per node ------------------------------------------


async def test_concurrent_joins_share_one_subscription_until_the_last_member_goes(
    start_gateway, clients, tenant, monitored_nats
):
    gw = await start_gateway(nats=monitored_nats.cluster.url_csv)
    live_subscriptions = monitored_nats.live_subscriptions
    ref = ChannelRef(tenant, "r", "shared")
    members = [await clients(gateway_url(gw), tenant, f"m{i}") for i in range(6)]

    await asyncio.gather(*(m.join("r", "shared") for m in members))

    assert gw.hub.subscription_count() == 1
    assert await live_subscriptions(gw, ref) == 1
    first = await members[0].publish("r", "shared", {"n": 1}, id="once-1")
    second = await members[0].publish("r", "shared", {"n": 2}, id="once-2")
    for member in members:
        events = await member.wait_events(2, "r", "shared")
        assert [(e["id"], e["seq"]) for e in events] == [
            ("once-1", first["payload"]["seq"]),
            ("once-2", second["payload"]["seq"]),
        ]

    for member in members[:3]:
        reply = await member.command("r", "shared", "leave_channel")
        assert reply["payload"]["status"] == "success", reply
    assert await live_subscriptions(gw, ref) == 1  # three members remain
    for member in members[3:]:
        await member.close()
    await asyncio.wait_for(gw.hub.wait_idle(), WAIT_S)
    # A publish through the same gateway: its ack means the server has read all that the
    # gateway's connection sent before it, the unsubscribe included (NATS keeps the order).
    probe = await clients(gateway_url(gw), tenant, "probe")
    assert (await probe.publish("r", "elsewhere", {}))["type"] == "ack"
    assert await live_subscriptions(gw, ref) == 0 and gw.hub.subscription_count() == 0


async def test_leave_of_a_never_joined_channel_does_not_drop_anothers_join(
    start_gateway, clients, tenant, monitored_nats
):
    gw = await start_gateway(nats=monitored_nats.cluster.url_csv)
    live_subscriptions = monitored_nats.live_subscriptions
    joiner = await clients(gateway_url(gw), tenant, "joiner")
    stranger = await clients(gateway_url(gw), tenant, "stranger")
    channels = [f"c{i}" for i in range(5)]

    for channel in channels:
        _, leave = await asyncio.gather(
            joiner.join("r", channel), stranger.command("r", channel, "leave_channel")
        )
        assert leave["payload"]["status"] == "error", leave
        assert leave["payload"]["error"]["code"] == "not_joined", leave

    assert gw.hub.subscription_count() == len(channels)
    for channel in channels:
        assert await live_subscriptions(gw, ChannelRef(tenant, "r", channel)) == 1
        ack = await stranger.publish("r", channel, {"to": channel})
        [event] = await joiner.wait_events(1, "r", channel)
        assert event["seq"] == ack["payload"]["seq"]


# -- 2. stream configuration ----------------------------------------------------------------


def assert_tenant_stream(info: StreamInfo, tenant: str) -> None:
    config = info.config
    assert config.name == f"arq_{tenant}"
    assert config.num_replicas == 3
    assert config.storage == StorageType.FILE
    assert config.max_age == pytest.approx(86400.0)
    assert config.duplicate_window == pytest.approx(120.0)
    assert config.subjects == [f"arq.ev.{tenant}.>"]
    assert config.republish is not None
    assert config.republish.src == f"arq.ev.{tenant}.>"
    assert config.republish.dest == f"arq.live.{tenant}.>"


async def run_cli(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arqonbus_server.gateway", *args,
        cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_first_publish_creates_the_tenant_stream_as_documented(
    start_gateway, clients, tenant, nats_cluster
):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")
    ack = await client.publish("r", "c", {"first": True})
    assert ack["type"] == "ack", ack

    async with jetstream(nats_cluster) as jsm:
        assert_tenant_stream(await jsm.stream_info(f"arq_{tenant}"), tenant)


async def test_mesh_provision_creates_the_same_stream_and_is_idempotent(tenant, nats_cluster):
    for _ in range(2):
        code, out, err = await run_cli(
            "mesh", "provision", "--tenant", tenant, "--nats", nats_cluster.url_csv
        )
        assert code == 0, err
        assert any(f"arq_{tenant}" in line for line in out.splitlines()), out

    async with jetstream(nats_cluster) as jsm:
        assert_tenant_stream(await jsm.stream_info(f"arq_{tenant}"), tenant)


async def test_mesh_provision_refuses_an_invalid_tenant_name(nats_cluster):
    async with jetstream(nats_cluster) as jsm:
        before = {s.config.name for s in await jsm.streams_info()}
    code, out, err = await run_cli(
        "mesh", "provision", "--tenant", "bad.name", "--nats", nats_cluster.url_csv
    )
    assert code != 0
    assert "bad.name" in err and "tenant" in err, (out, err)
    async with jetstream(nats_cluster) as jsm:  # tests of one worker run one at a time
        assert {s.config.name for s in await jsm.streams_info()} == before


async def test_mesh_provision_invalid_tenant_message_names_the_fix_not_nats(nats_cluster):
    """The fix for a bad name is the name: the message must not send the user to --nats."""
    code, _, err = await run_cli(
        "mesh", "provision", "--tenant", "bad.name", "--nats", nats_cluster.url_csv
    )
    assert code != 0
    assert "--nats" not in err and "ARQONBUS_NATS" not in err, err
    assert ".." not in err, err


# -- 3. per-sender order on a brand-new tenant ----------------------------------------------


def is_reply(message: Message) -> bool:
    return message["type"] in ("ack", "error")


async def pipeline(sender: WsClient, frames: list[Message]) -> None:
    """Send every frame without waiting for its ack.

    Until the store has answered anything, each send first waits up to 1 ms for that
    answer: the frames then keep arriving while the new tenant's stream is being created,
    which is the moment a later event could overtake an earlier one. Afterwards the rest
    go back to back.
    """
    answered = False
    for frame in frames:
        await sender.send(frame)
        if not answered:
            try:
                await sender.wait_for(is_reply, timeout=0.001 * SEC)
                answered = True
            except TimeoutError:
                pass


async def test_pipelined_events_of_one_sender_keep_send_order_on_a_new_tenant(
    start_gateway, clients, tenant
):
    sender_gw, member_gw = await start_gateway(), await start_gateway()
    for run in range(5):
        fresh = f"{tenant}n{run}"
        member = await clients(gateway_url(member_gw), fresh, "member")
        sender = await clients(gateway_url(sender_gw), fresh, "sender")
        await member.join("r", "c")
        ids = [f"p{run}-{n:03d}" for n in range(200)]

        await pipeline(sender, [event_frame(i, "r", "c", {"n": i}) for i in ids])

        acks = [await sender.reply_to(msg_id) for msg_id in ids]
        assert all(a["type"] == "ack" for a in acks), [a for a in acks if a["type"] != "ack"][:3]
        seqs = [a["payload"]["seq"] for a in acks]
        assert all(a < b for a, b in itertools.pairwise(seqs)), f"run {run}: {seqs}"
        events = await member.wait_events(200, "r", "c")
        assert [e["id"] for e in events] == ids, f"run {run}"
        assert [e["seq"] for e in events] == seqs, f"run {run}"


# -- 4. internal -----------------------------------------------------------------------------


async def test_unexpected_publish_failure_is_internal_and_the_connection_lives(
    start_gateway, clients, tenant, monkeypatch
):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")

    def broken_publish(*args: Any) -> None:  # (ref, body, key, headers, ttl_s, done)
        bug = RuntimeError("simulated bug in the broker")
        asyncio.get_running_loop().call_soon(args[-1], bug)  # later, as the port requires

    monkeypatch.setattr(gw.broker, "publish_then", broken_publish)
    reply = await client.publish("r", "c", {"n": 1}, id="boom-1")

    assert reply["type"] == "error", reply
    assert reply["payload"]["code"] == "internal"
    assert reply["payload"]["retryable"] is True
    assert reply["payload"]["request_id"] == "boom-1"
    assert reply["payload"]["message"]
    assert (await client.join("r", "c")) == {"last_seq": 0}  # nothing was stored
    monkeypatch.undo()
    ack = await client.publish("r", "c", {"n": 1}, id="boom-1")  # the retry it advised
    assert ack["type"] == "ack" and "duplicate" not in ack["payload"], ack


# -- 5. limit_exceeded -----------------------------------------------------------------------


async def test_a_third_channel_exceeds_a_limit_of_two(start_gateway, clients, tenant):
    gw = await start_gateway(max_channels_per_connection=2)
    client = await clients(gateway_url(gw), tenant, "alice")
    assert client.welcome is not None
    assert client.welcome["payload"]["limits"]["max_channels"] == 2
    await client.join("r", "one")
    await client.join("r", "two")

    refused = await client.command("r", "three", "join_channel")

    assert refused["type"] == "command_response", refused
    assert refused["payload"]["status"] == "error", refused
    assert refused["payload"]["error"]["code"] == "limit_exceeded", refused
    assert refused["payload"]["error"]["retryable"] is False
    assert await client.join("r", "one") == {"last_seq": 0}  # rejoining is not a new channel
    leave = await client.command("r", "two", "leave_channel")
    assert leave["payload"]["status"] == "success", leave
    assert await client.join("r", "three") == {"last_seq": 0}


# -- 6. history is bounded by bytes ----------------------------------------------------------


async def test_history_pages_are_bounded_by_bytes_and_page_through_everything(
    start_gateway, clients, tenant
):
    gw = await start_gateway(send_buffer_bytes=262144)
    client = await clients(gateway_url(gw), tenant, "alice")
    blob = "x" * 30_000
    sent = []
    for n in range(20):
        ack = await client.publish("r", "c", {"n": n, "blob": blob}, id=f"big-{n:02d}")
        assert ack["type"] == "ack", ack
        sent.append((f"big-{n:02d}", ack["payload"]["seq"]))

    first = await client.command("r", "c", "history", {"since_seq": 0, "limit": 100})
    page = first["payload"]["result"]
    sizes = [len(orjson.dumps(e)) for e in page["events"]]
    assert 0 < len(sizes) < 20, len(sizes)
    assert sum(sizes) <= 131072 + max(sizes)
    assert page["more"] is True

    seen = [(e["id"], e["seq"]) for e in page["events"]]
    since = page["next_since_seq"]
    for _ in range(20):
        if not page["more"]:
            break
        reply = await client.command("r", "c", "history", {"since_seq": since, "limit": 100})
        page = reply["payload"]["result"]
        assert page["events"] or not page["more"], page
        seen += [(e["id"], e["seq"]) for e in page["events"]]
        since = page["next_since_seq"]
    assert page["more"] is False
    assert seen == sent


# -- 7. dedupe ids differing by trailing whitespace ------------------------------------------


async def test_ids_differing_only_by_trailing_whitespace_are_distinct(
    start_gateway, clients, tenant
):
    gw = await start_gateway()
    client = await clients(gateway_url(gw), tenant, "alice")

    plain = await client.publish("r", "c", {"v": 1}, id="abc")
    spaced = await client.publish("r", "c", {"v": 2}, id="abc ")
    spaced_again = await client.publish("r", "c", {"v": 2}, id="abc ")

    assert plain["type"] == spaced["type"] == "ack", (plain, spaced)
    assert plain["payload"]["seq"] != spaced["payload"]["seq"]
    assert "duplicate" not in spaced["payload"]
    assert spaced_again["payload"] == {**spaced["payload"], "duplicate": True}
    reply = await client.command("r", "c", "history", {"since_seq": 0})
    stored = [(e["id"], e["seq"]) for e in reply["payload"]["result"]["events"]]
    assert stored == [("abc", plain["payload"]["seq"]), ("abc ", spaced["payload"]["seq"])]


# -- 8. NATS unreachable at start ------------------------------------------------------------


async def test_unreachable_nats_logs_one_warning_and_keeps_readyz_503(caplog):
    url = f"nats://127.0.0.1:{free_port()}"
    caplog.set_level(logging.DEBUG, logger="arqonbus.mesh.jetstream")
    gw = Gateway(load_settings(nats=url, listen="127.0.0.1:0", auth="dev"))
    statuses: list[int | None] = []
    second_attempt = asyncio.Event()

    class SecondAttempt(logging.Handler):
        """Sets the event when the gateway logs its second connect attempt."""

        seen = 0

        def emit(self, record: logging.LogRecord) -> None:
            if "retrying with backoff" in record.getMessage():
                self.seen += 1
                if self.seen >= 2:
                    second_attempt.set()

    watcher = SecondAttempt()
    logging.getLogger("arqonbus.mesh.jetstream").addHandler(watcher)
    await gw.start()
    try:
        statuses.append(await http_status(*gw.address, "/readyz"))
        await asyncio.wait_for(second_attempt.wait(), 10 * SEC)
        statuses.append(await http_status(*gw.address, "/readyz"))
    finally:
        logging.getLogger("arqonbus.mesh.jetstream").removeHandler(watcher)
        await gw.close()

    records = [r for r in caplog.records if r.name == "arqonbus.mesh.jetstream"]
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    attempts = [r for r in records if "retrying with backoff" in r.getMessage()]
    assert statuses and set(statuses) == {503}, statuses
    assert len(attempts) >= 2, [r.getMessage() for r in records]  # it did retry meanwhile
    assert len(warnings) == 1, warnings
    assert url in warnings[0]


# -- 9. the envelope limit cannot exceed NATS' default max_payload ---------------------------


def test_settings_refuse_an_envelope_limit_above_one_mebibyte(monkeypatch):
    monkeypatch.setenv("ARQONBUS_MAX_ENVELOPE_BYTES", "1048577")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "ARQONBUS_MAX_ENVELOPE_BYTES" in str(info.value)

    monkeypatch.setenv("ARQONBUS_MAX_ENVELOPE_BYTES", "1048576")
    assert load_settings().max_envelope_bytes == 1048576


async def test_replay_falls_back_to_an_ordered_consumer_without_batched_direct_get(
    start_gateway, clients, tenant, monkeypatch
):
    """Servers before 2.11 have no batched direct get: history and resume still read all."""
    gw = await start_gateway()
    monkeypatch.setattr(gw.broker, "_has_batched_direct_get", lambda: False)
    writer = await clients(gateway_url(gw), tenant, "writer")
    acks = [await writer.publish("r", "c", {"n": n}) for n in range(5)]
    seqs = [a["payload"]["seq"] for a in acks]
    reply = await writer.command("r", "c", "history", {"since_seq": 0, "limit": 3})
    assert [e["seq"] for e in reply["payload"]["result"]["events"]] == seqs[:3]
    reader = await clients(gateway_url(gw), tenant, "reader")
    await reader.join("r", "c", since_seq=seqs[0])
    assert [e["seq"] for e in await reader.wait_events(4)] == seqs[1:]


async def test_a_long_resume_reads_through_a_pull_consumer_and_is_counted(
    start_gateway, clients, tenant
):
    """A resume spanning replay_consumer_min_span stream seqs or more: the same events,
    read through a pull consumer, and arqonbus_replay_consumers_total says so."""
    gw = await start_gateway(replay_consumer_min_span=20)
    writer = await clients(gateway_url(gw), tenant, "writer")
    acks = [await writer.publish("r", "c", {"n": n}) for n in range(30)]
    seqs = [a["payload"]["seq"] for a in acks]
    reader = await clients(gateway_url(gw), tenant, "reader")
    await reader.join("r", "c", since_seq=seqs[0])
    assert [e["seq"] for e in await reader.wait_events(29)] == seqs[1:]
    assert gw.broker.pulled_replays == 1

    async def counted() -> bool:
        # Counted as the replay's reader ends, which may be a moment after its last event.
        return b'arqonbus_replay_consumers_total{outcome="read"} 1.0' in gw.metrics.render()

    await eventually(counted, 10 * SEC, "the replay through a consumer counted as read")


async def test_concurrent_publishes_are_stored_in_batches_and_counted(
    start_gateway, clients, tenant
):
    """Many publishes at once from one socket: each acked with its own seq, and
    arqonbus_publish_batch* show that they went to the store in fewer batches."""
    gw = await start_gateway()
    writer = await clients(gateway_url(gw), tenant, "writer")
    acks = await asyncio.gather(*(writer.publish("r", "c", {"n": n}) for n in range(60)))
    seqs = sorted(a["payload"]["seq"] for a in acks)
    assert len(set(seqs)) == 60
    text = gw.metrics.render().decode()
    events = float(metric_value(text, "arqonbus_publish_batched_events_total"))
    batches = float(metric_value(text, "arqonbus_publish_batches_total"))
    assert events == 60 and 1 <= batches < 60, (events, batches)
    assert "arqonbus_publish_unbatched_events_total 0.0" in text


def metric_value(text: str, name: str) -> str:
    return next(line.split()[1] for line in text.splitlines() if line.startswith(name + " "))
