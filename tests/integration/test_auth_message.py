"""First-message auth (a connection without a credential) and refresh_token."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.shared import agent_identity as ai
from tests.conftest import GatewayFactory, gateway_url
from tests.integration.test_agents import known_everywhere
from tests.integration.test_auth_jwt import jwks_document
from tests.integration.test_auth_jwt import token as jwt_token
from tests.support import WsClient
from tests.timeouts import SEC

pytestmark = pytest.mark.integration


@pytest.fixture
def jwks_file(tmp_path: Path) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_document()))
    return str(path)


async def no_credential(gw: Gateway, opened: list[WsClient]) -> tuple[WsClient, dict[str, Any]]:
    client = WsClient(await websockets.connect(gateway_url(gw)))
    opened.append(client)
    required = await client.wait_for(lambda m: m["type"] == "auth_required")
    return client, required["payload"]


async def auth(client: WsClient, token: str) -> dict[str, Any]:
    await client.send({"type": "auth", "payload": {"token": token}})
    return await client.wait_for(lambda m: m["type"] == "welcome")


async def closed_with(client: WsClient) -> tuple[int | None, str]:
    await asyncio.wait_for(client.closed.wait(), 10 * SEC)
    return client.close_code, client.ws.close_reason or ""


@pytest.fixture
async def gw(start_gateway: GatewayFactory, jwks_file: str) -> Gateway:
    return await start_gateway(
        auth="dev,jwt,agent", jwt_jwks_file=jwks_file, jwt_audience="arqonbus", jwt_leeway_s=0
    )


async def test_dev_and_jwt_tokens_in_the_first_frame(gw, tenant, opened):
    client, required = await no_credential(gw, opened)
    assert required["methods"] == ["dev", "jwt", "agent"]
    assert required["timeout_ms"] == 10_000 and ai.is_nonce(required["nonce"])
    await auth(client, f"dev:{tenant}:alice")
    await client.join("r", "c")
    await client.publish("r", "c", {"n": 1})
    [event] = await client.wait_events(1)
    assert event["from"] == "alice"

    client, _ = await no_credential(gw, opened)
    await auth(client, jwt_token(tenant, "bob"))
    assert any(s.principal.id == "bob" and s.principal.method == "jwt" for s in gw.sessions)


async def test_an_agent_signs_the_nonce_of_auth_required(gw, tenant, opened):
    key = ai.generate_private_key()
    admin = await WsClient.open(gateway_url(gw), f"dev:{tenant}:boss:admin")
    opened.append(admin)
    reply = await admin.command(
        "r", "c", "register_agent", {"public_key": ai.public_key_b64(key), "name": "b"}
    )
    agent_id = reply["payload"]["result"]["agent_id"]
    await known_everywhere(agent_id, gw)
    client, required = await no_credential(gw, opened)
    await auth(client, ai.sign_token(key, agent_id, required["nonce"]))
    assert any(s.principal.id == agent_id for s in gw.sessions)
    # The same token on a second connection: refused (4501), the nonce is spent.
    again, _ = await no_credential(gw, opened)
    await again.send(
        {"type": "auth", "payload": {"token": ai.sign_token(key, agent_id, required["nonce"])}}
    )
    code, reason = await closed_with(again)
    assert code == 4501 and "already used" in reason


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "auth", "payload": {"token": "dev:x"}}, "unauthorized"),
        ({"type": "event", "room": "r", "channel": "c", "payload": {}}, "invalid_envelope"),
        ("not json", "invalid_json"),
    ],
)
async def test_a_refused_first_frame_closes_4501(gw, opened, frame, expected):
    client, _ = await no_credential(gw, opened)
    await client.send(frame)
    code, reason = await closed_with(client)
    assert code == 4501 and reason.startswith(expected)
    assert not gw.sessions


async def test_no_auth_frame_in_time_closes_4502(start_gateway, opened):
    gw = await start_gateway(auth_message_timeout_s=0.3)
    client, required = await no_credential(gw, opened)
    assert required["timeout_ms"] == 300
    code, _ = await closed_with(client)
    assert code == 4502


async def test_off_means_401_without_a_credential(start_gateway):
    gw = await start_gateway(auth_message_timeout_s=0)
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(gateway_url(gw))
    assert info.value.response.status_code == 401


# -- refresh_token --------------------------------------------------------------------


async def test_refresh_token_same_principal_moves_the_expiry(gw, tenant, opened):
    now = int(time.time())
    client = await WsClient.open(gateway_url(gw), jwt_token(tenant, "alice", exp=now + 60))
    opened.append(client)
    [session] = [s for s in gw.sessions if s.principal.id == "alice"]
    assert session.principal.expires_at == now + 60
    reply = await client.command(
        "r", "c", "refresh_token", {"token": jwt_token(tenant, "alice", exp=now + 600)}
    )
    assert reply["payload"]["result"]["expires_at"] == now + 600
    assert session.principal.expires_at == now + 600
    # The 4004 timer follows the new credential: a short one closes the connection.
    reply = await client.command(
        "r", "c", "refresh_token", {"token": jwt_token(tenant, "alice", exp=now + 2)}
    )
    assert reply["payload"]["status"] == "success"
    code, _ = await closed_with(client)
    assert code == 4004


async def test_refresh_token_replaces_role_and_grants(gw, tenant, opened):
    client = await WsClient.open(gateway_url(gw), f"dev:{tenant}:alice:read-only")
    opened.append(client)
    reply = await client.publish("r", "c", {"n": 1})
    assert reply["payload"]["code"] == "forbidden"
    reply = await client.command("r", "c", "refresh_token", {"token": f"dev:{tenant}:alice"})
    assert reply["payload"]["result"]["role"] == "owner"
    reply = await client.publish("r", "c", {"n": 2})
    assert reply["type"] == "ack"


@pytest.mark.parametrize("who", ["other-principal", "other-tenant"])
async def test_refresh_token_for_someone_else_is_forbidden(gw, tenant, opened, who):
    client = await WsClient.open(gateway_url(gw), f"dev:{tenant}:alice:read-only")
    opened.append(client)
    token = f"dev:{tenant}:mallory" if who == "other-principal" else "dev:elsewhere:alice"
    reply = await client.command("r", "c", "refresh_token", {"token": token})
    assert reply["payload"]["error"]["code"] == "forbidden"
    [session] = [s for s in gw.sessions if s.principal.id == "alice"]
    assert (session.principal.tenant, session.principal.role) == (tenant, "read-only")


async def test_refresh_token_with_a_bad_token(gw, tenant, opened):
    client = await WsClient.open(gateway_url(gw), f"dev:{tenant}:alice")
    opened.append(client)
    for params in ({}, {"token": 5}, {"token": "dev:x"}):
        reply = await client.command("r", "c", "refresh_token", params)
        assert reply["payload"]["error"]["code"] == "invalid_parameters"


async def test_waiting_to_authenticate_is_capped_per_address_and_issues_no_needless_nonce(
    start_gateway, opened
):
    gw = await start_gateway(auth="dev", max_pending_handshakes_per_ip=2)
    waiting = [await no_credential(gw, opened) for _ in range(2)]
    for _, required in waiting:
        assert required["nonce"] is None  # no agents here: no KV write for a nonce
    third = WsClient(await websockets.connect(gateway_url(gw)))
    opened.append(third)
    assert (await closed_with(third))[0] == 1013  # try again later
    assert b'arqonbus_rate_limited_total{scope="pending_auth"} 1.0' in gw.metrics.render()
    # One of the two authenticates: its slot frees, and a new connection may wait again.
    await auth(waiting[0][0], "dev:t1:alice")
    _, required = await no_credential(gw, opened)
    assert required["methods"] == ["dev"]


async def test_refresh_token_that_narrows_the_rights_drops_what_they_no_longer_allow(
    gw, tenant, opened
):
    client = await WsClient.open(gateway_url(gw), f"dev:{tenant}:alice:member")
    caller = await WsClient.open(gateway_url(gw), f"dev:{tenant}:bob:member")
    opened += [client, caller]
    await client.join("r", "c")
    registered = await client.command("r", "c", "register_handler", {"command": "svc"})
    assert registered["payload"]["status"] == "success", registered
    start = len(client.received)
    reply = await client.command(
        "r", "c", "refresh_token", {"token": f"dev:{tenant}:alice:read-only"}
    )
    assert reply["payload"]["result"]["role"] == "read-only"
    pushed = await client.wait_for(
        lambda m: m["type"] == "error" and "dropped" in m["payload"], start=start
    )
    assert pushed["payload"]["code"] == "forbidden"
    assert pushed["payload"]["dropped"] == ["r/c:svc"]  # read-only may still subscribe
    # The handler no longer serves: calls find no one once its unsubscribe has reached
    # the NATS server (bounded), and none is ever delivered to it.
    for _ in range(20):
        answer = await caller.command("r", "c", "svc", {}, timeout_ms=200)
        if answer["payload"]["error"]["code"] == "no_responders":
            break
    assert answer["payload"]["error"]["code"] == "no_responders", answer
    assert client.deliveries() == []
