"""JWT mode end to end: a real gateway on the shared NATS cluster, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.auth.jwt import JwtAuthenticator
from tests.conftest import gateway_url
from tests.jwks import JwksServer
from tests.support import WsClient, new_id
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

ED_KEY = ed25519.Ed25519PrivateKey.generate()
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ROGUE_KEY = ed25519.Ed25519PrivateKey.generate()


def jwks_document() -> dict[str, Any]:
    jwk = jwt.algorithms.OKPAlgorithm.to_jwk(ED_KEY.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": "ed1", "use": "sig"}]}


def token(tenant: str, sub: str = "alice", key: Any = ED_KEY, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "tenant": tenant, "aud": "arqonbus", "exp": now + 300, **claims}
    return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": "ed1"})


async def connect(gw: Gateway, opened: list[WsClient], **kwargs: Any) -> WsClient:
    client = WsClient(await websockets.connect(gateway_url(gw), **kwargs))
    opened.append(client)
    client.welcome = await client.wait_for(lambda m: m["type"] == "welcome")
    return client


async def refused(gw: Gateway, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(gateway_url(gw), **kwargs)
    response = info.value.response
    assert response.status_code == 401
    body: dict[str, Any] = orjson.loads(response.body or b"{}")
    assert body["error"] == "unauthorized"
    return body


@pytest.fixture
def jwks_file(tmp_path: Path) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_document()))
    return str(path)


async def test_valid_token_publishes_as_its_principal(start_gateway, tenant, jwks_file, opened):
    gw = await start_gateway(auth="jwt", jwt_jwks_file=jwks_file, jwt_audience="arqonbus")
    assert isinstance(gw.authenticator, JwtAuthenticator)
    alice = await connect(
        gw, opened, additional_headers={"Authorization": f"Bearer {token(tenant)}"}
    )
    bob = await connect(
        gw, opened, additional_headers={"Authorization": f"Bearer {token(tenant, 'bob')}"}
    )
    await bob.join("lab", "results")
    reply = await alice.publish("lab", "results", {"n": 1}, id=new_id())
    assert reply["type"] == "ack", reply
    events = await bob.wait_events(1, "lab", "results")
    assert events[0]["from"] == "alice"


async def test_token_in_subprotocol_is_accepted(start_gateway, tenant, jwks_file, opened):
    gw = await start_gateway(auth="jwt", jwt_jwks_file=jwks_file, jwt_audience="arqonbus")
    offered = ["arqonbus.bearer", f"arqonbus.bearer.{token(tenant)}"]
    client = await connect(gw, opened, subprotocols=offered)
    # Browsers fail a handshake that echoes none of the offered subprotocols; the token
    # itself is never echoed.
    assert client.ws.subprotocol == "arqonbus.bearer"
    reply = await client.publish("lab", "results", {"n": 1}, id=new_id())
    assert reply["type"] == "ack", reply


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: token(t, key=ROGUE_KEY), "bad signature"),
        (lambda t: token(t, exp=int(time.time()) - 3600), "expired"),
        (lambda t: token(t, aud="elsewhere"), "audience"),
        (lambda t: token("bad.tenant"), "tenant"),
        (lambda t: f"dev:{t}:alice", "malformed token"),
    ],
)
async def test_bad_token_is_401_before_the_upgrade(start_gateway, tenant, jwks_file, make, message):
    gw = await start_gateway(auth="jwt", jwt_jwks_file=jwks_file, jwt_audience="arqonbus")
    bad = make(tenant)
    body = await refused(gw, additional_headers={"Authorization": f"Bearer {bad}"})
    assert message in body["message"]
    assert bad not in body["message"]
    assert not gw.sessions


async def test_missing_token_is_401(start_gateway, jwks_file):
    gw = await start_gateway(auth="jwt", jwt_jwks_file=jwks_file, auth_message_timeout_s=0)
    body = await refused(gw)
    assert "missing token" in body["message"]


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer(jwks_document())
    yield server
    server.close()


async def test_jwks_url(start_gateway, tenant, jwks_server, opened):
    gw = await start_gateway(auth="jwt", jwt_jwks_url=jwks_server.url)
    authenticator = gw.authenticator
    assert isinstance(authenticator, JwtAuthenticator)
    try:
        client = await connect(
            gw, opened, additional_headers={"Authorization": f"Bearer {token(tenant)}"}
        )
        reply = await client.publish("lab", "results", {"n": 1}, id=new_id())
        assert reply["type"] == "ack", reply
        body = await refused(
            gw, additional_headers={"Authorization": f"Bearer {token(tenant, key=ROGUE_KEY)}"}
        )
        assert "bad signature" in body["message"]
    finally:
        authenticator.close()


async def test_a_session_is_closed_4004_when_its_token_expires(
    start_gateway, tenant, jwks_file, opened
):
    gw = await start_gateway(
        auth="jwt", jwt_jwks_file=jwks_file, jwt_audience="arqonbus", jwt_leeway_s=0
    )
    expiring = token(tenant, exp=int(time.time()) + 2)
    lasting = token(tenant, "bob")
    doomed = await connect(gw, opened, additional_headers={"Authorization": f"Bearer {expiring}"})
    other = await connect(gw, opened, additional_headers={"Authorization": f"Bearer {lasting}"})
    connected_at = time.monotonic()
    await asyncio.wait_for(doomed.ws.wait_closed(), 10 * SEC)
    assert doomed.ws.close_code == 4004, doomed.ws.close_code
    assert "token expired" in (doomed.ws.close_reason or "")
    assert time.monotonic() - connected_at < 5
    # The other session, whose token is still valid, goes on.
    reply = await other.publish("lab", "results", {"n": 1}, id=new_id())
    assert reply["type"] == "ack", reply
    # And the expired token no longer opens a session.
    body = await refused(gw, additional_headers={"Authorization": f"Bearer {expiring}"})
    assert "expired" in body["message"]
