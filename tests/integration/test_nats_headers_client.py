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
