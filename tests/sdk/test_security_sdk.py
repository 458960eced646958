"""The SDK and the security core: agent sign-in on every (re)connect, admin commands,
refresh_token in place, and waiting out rate limits."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from arqonbus import (
    AgentCredentials,
    AuthenticationError,
    Banned,
    Client,
    Event,
    Forbidden,
    RateLimited,
    RoomKeyRequired,
)
from arqonbus_server.shared import agent_identity as ai
from tests.conftest import GatewayFactory, gateway_url
from tests.timeouts import SEC

pytestmark = pytest.mark.integration


async def test_an_agent_signs_in_again_with_a_fresh_nonce_after_its_gateway_drains(
    start_gateway: GatewayFactory, sdk_client: Any, tenant: str
) -> None:
    gw_a, gw_b = await start_gateway(auth="dev,agent"), await start_gateway(auth="dev,agent")
    urls = [gateway_url(gw_a), gateway_url(gw_b)]
    owner: Client = await sdk_client(urls, tenant, "owner")
    key = ai.generate_private_key()
    registered = await owner.admin(
        "lab", "register_agent", {"public_key": ai.public_key_b64(key), "name": "bot"}
    )
    agent_id = registered["agent_id"]
    creds = AgentCredentials.from_pem(agent_id, ai.private_key_pem(key))
    assert "PRIVATE" not in repr(creds)

    async with Client(urls, agent=creds) as agent:
        first = await agent.publish("lab", "results", {"n": 1})
        first_url = agent.url
        # 1012: reconnect to the other gateway, signing a new nonce there.
        await (gw_a if first_url == gateway_url(gw_a) else gw_b).drain()
        second = await agent.publish("lab", "results", {"n": 2}, timeout=20 * SEC)
        assert agent.url in urls and agent.url != first_url
        assert second.seq > first.seq
    history = [e async for e in owner.history("lab", "results", since_seq=0)]
    assert [(e.from_, e.payload["n"]) for e in history] == [(agent_id, 1), (agent_id, 2)]


async def test_an_agent_with_the_wrong_key_is_refused_at_once(
    start_gateway: GatewayFactory, sdk_client: Any, tenant: str
) -> None:
    gw = await start_gateway(auth="dev,agent")
    owner: Client = await sdk_client([gateway_url(gw)], tenant, "owner")
    key = ai.generate_private_key()
    registered = await owner.admin(
        "lab", "register_agent", {"public_key": ai.public_key_b64(key), "name": "bot"}
    )
    impostor = AgentCredentials(registered["agent_id"], ai.generate_private_key())
    client = Client([gateway_url(gw)], agent=impostor, connect_timeout=10)
    with pytest.raises(AuthenticationError, match="refused the agent"):
        await client.connect()
    await client.close()


async def test_refresh_token_changes_the_role_in_place_and_for_reconnects(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gw_a, gw_b = await start_gateway(), await start_gateway()
    urls = [gateway_url(gw_a), gateway_url(gw_b)]
    async with Client(urls, f"dev:{tenant}:alice") as alice:
        await alice.publish("r", "c", {"n": 1})
        with pytest.raises(Forbidden):  # another principal's token: refused, nothing changes
            await alice.refresh_token(f"dev:{tenant}:mallory")
        await alice.publish("r", "c", {"n": 2})
        result = await alice.refresh_token(f"dev:{tenant}:alice:read-only")
        assert result["role"] == "read-only"
        with pytest.raises(Forbidden):
            await alice.publish("r", "c", {"n": 3})
        await gw_a.drain()  # the reconnect uses the refreshed (read-only) token
        with pytest.raises(Forbidden):
            await alice.publish("r", "c", {"n": 4}, timeout=20 * SEC)
        assert alice.url == gateway_url(gw_b)


async def test_publish_waits_out_the_rate_limit_and_every_event_is_stored(
    start_gateway: GatewayFactory, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_gateway(msg_rate_per_conn=20, msg_burst_per_conn=5)
    caplog.set_level(logging.DEBUG, logger="arqonbus.client")
    async with Client([gateway_url(gw)], f"dev:{tenant}:alice") as alice:
        acks = [await alice.publish("r", "c", {"n": n}, timeout=20 * SEC) for n in range(15)]
        history = [e async for e in alice.history("r", "c", since_seq=0)]
    assert [e.payload["n"] for e in history] == list(range(15))
    assert len({ack.seq for ack in acks}) == 15
    waited = [r for r in caplog.records if RateLimited.default_code in r.getMessage()]
    assert waited, "the limit (5 at once, then 20/s) was never reached"


async def test_concurrent_publishes_over_the_rate_are_resent_at_the_buckets_rate(
    start_gateway: GatewayFactory, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_gateway(msg_rate_per_conn=20, msg_burst_per_conn=5)
    caplog.set_level(logging.DEBUG, logger="arqonbus.client")
    count = 40
    async with Client([gateway_url(gw)], f"dev:{tenant}:alice") as alice:
        publishes = (alice.publish("r", "c", {"n": n}, timeout=30 * SEC) for n in range(count))
        acks = await asyncio.gather(*publishes)
        history = [e async for e in alice.history("r", "c", since_seq=0)]
    assert sorted(e.payload["n"] for e in history) == list(range(count))
    assert len({ack.seq for ack in acks}) == count and not any(a.duplicate for a in acks)
    refused = [r for r in caplog.records if RateLimited.default_code in r.getMessage()]
    # 35 must wait for the bucket; resent all at once they would be refused again and again
    # (hundreds of refusals), paced at its rate each is refused about once.
    assert count // 2 <= len(refused) <= 2 * count, len(refused)


async def test_private_room_with_a_key_and_a_ban_that_ends_the_subscription(
    start_gateway: GatewayFactory, sdk_client: Any, tenant: str
) -> None:
    gw = await start_gateway()
    url = [gateway_url(gw)]
    owner: Client = await sdk_client(url, tenant, "owner")
    configured = asyncio.Event()
    gw.security.rooms.on_change(lambda key, _v: key == f"{tenant}.vault" and configured.set())
    await owner.admin("vault", "room_configure", {"private": True, "key": "vault-key-123"})
    await asyncio.wait_for(configured.wait(), 10 * SEC)

    alice: Client = await sdk_client(url, tenant, "alice:member")
    with pytest.raises(RoomKeyRequired):
        await alice.subscribe("vault", "chat").start(timeout=5 * SEC)
    sub = await alice.subscribe("vault", "chat", since_seq=0, room_key="vault-key-123").start()
    await owner.publish("vault", "chat", {"n": 1})
    first = await asyncio.wait_for(anext(aiter(sub)), 10 * SEC)
    assert isinstance(first, Event) and first.payload == {"n": 1}
    history = await alice.history("vault", "chat", room_key="vault-key-123").list()
    assert [e.payload["n"] for e in history] == [1]

    await owner.admin("vault", "room_ban", {"principal": "alice", "reason": "spam"})
    with pytest.raises(Banned):  # the pushed ban ends the subscription on the client
        async with asyncio.timeout(10 * SEC):
            async for _ in sub:
                pass
