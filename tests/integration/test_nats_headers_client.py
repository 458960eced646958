"""The gateway's NATS client parses received headers with mesh/nats_client.py's parser."""

from __future__ import annotations

import asyncio

import pytest

from arqonbus_server.mesh import nats_client
from arqonbus_server.mesh.local import LocalCluster
from tests.timeouts import SEC


async def test_a_received_messages_headers_go_through_the_faster_parser(
    nats_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bytes] = []
    original = nats_client.parse_header_lines

    def spy(raw: bytes) -> dict[str, str]:
        seen.append(raw)
        return original(raw)

    monkeypatch.setattr(nats_client, "parse_header_lines", spy)
    nc = nats_client.FastHeaderClient()
    await nc.connect(servers=nats_cluster.urls)
    try:
        got: asyncio.Future[dict[str, str] | None] = asyncio.get_running_loop().create_future()

        async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
            if not got.done():
                got.set_result(msg.headers)

        await nc.subscribe("hdr.test", cb=on_msg)
        await nc.publish("hdr.test", b"x", headers={"Nats-Msg-Id": "m1", "Trace": "t"})
        headers = await asyncio.wait_for(got, 10 * SEC)
    finally:
        await nc.close()
    assert headers == {"Nats-Msg-Id": "m1", "Trace": "t"}
    assert seen and b"Nats-Msg-Id" in seen[0]


async def test_a_raw_subscription_gets_payload_and_header_block_in_order_until_it_ends(
    nats_cluster: LocalCluster,
) -> None:
    nc = nats_client.FastHeaderClient()
    await nc.connect(servers=nats_cluster.urls)
    try:
        raw: list[tuple[bytes, bytes | None]] = []
        replies: list[bytes] = []
        got_all = asyncio.Event()
        plain: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def on_raw(data: bytes, headers: bytes | None, reply: bytes) -> None:
            raw.append((data, headers))
            replies.append(reply)
            if len(raw) == 3:
                got_all.set()

        async def on_plain(msg) -> None:  # type: ignore[no-untyped-def]
            if not plain.done():
                plain.set_result(msg.data)

        sub = await nc.subscribe_raw("raw.test", on_raw)
        await nc.subscribe("plain.test", cb=on_plain)  # the client's other subscriptions
        await nc.publish("raw.test", b"a", headers={"Nats-Sequence": "7"})
        await nc.publish("raw.test", b"b", reply="back.here")
        await nc.publish("raw.test", b"c", headers={"X": "y"})
        await nc.publish("plain.test", b"p")
        await asyncio.wait_for(got_all.wait(), 10 * SEC)
        assert await asyncio.wait_for(plain, 10 * SEC) == b"p"
        assert [data for data, _ in raw] == [b"a", b"b", b"c"]
        assert replies == [b"", b"back.here", b""]
        assert nats_client.header_int(raw[0][1], b"Nats-Sequence") == 7
        assert raw[1][1] is None and nats_client.header_fields(raw[2][1]) == {"X": "y"}
        await nc.unsubscribe_raw(sub)
        await nc.publish("raw.test", b"after")
        await nc.flush()
        ping = await nc.request("$JS.API.INFO", b"", timeout=10 * SEC)  # a round trip later
        assert ping is not None and len(raw) == 3  # nothing after the end
        assert sub._id not in nc._raw_handlers
    finally:
        await nc.close()


async def test_reply_subjects_route_each_reply_to_its_handler_under_one_subscription(
    nats_cluster: LocalCluster,
) -> None:
    nc = nats_client.FastHeaderClient()
    await nc.connect(servers=nats_cluster.urls)
    try:
        got: dict[str, list[bytes]] = {"a": [], "b": []}
        both = asyncio.Event()

        def handler(name: str) -> nats_client.RawHandler:
            def on_raw(data: bytes, headers: bytes | None, reply: bytes) -> None:
                got[name].append(data)
                if got["a"] and got["b"]:
                    both.set()

            return on_raw

        subs_before = len(nc._subs)
        a, b = await asyncio.gather(nc.reply_subject(handler("a")), nc.reply_subject(handler("b")))
        assert a != b
        assert len(nc._subs) == subs_before + 1  # one wildcard subscription for both
        # A real request: the stream-less API answers on the reply subject it was given.
        await nc.publish("$JS.API.INFO", b"", reply=a)
        await nc.publish(b, b"to b", headers={"Nats-Sequence": "3"})
        await asyncio.wait_for(both.wait(), 10 * SEC)
        assert got["b"] == [b"to b"] and b"api" in got["a"][0].lower()
        nc.release_reply_subject(b)
        await nc.publish(b, b"late")
        after = asyncio.Event()
        third = await nc.reply_subject(lambda data, headers, reply: after.set())
        assert len(nc._subs) == subs_before + 1  # still the one subscription
        await nc.publish(third, b"after")  # comes after "late": one connection keeps order
        await asyncio.wait_for(after.wait(), 10 * SEC)
        assert got["b"] == [b"to b"]  # the late reply to a released subject went nowhere
    finally:
        await nc.close()
