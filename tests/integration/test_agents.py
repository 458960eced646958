"""Ed25519 agent identity end to end: real NATS cluster, two gateways, real clients."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.admin import agents as cli_agents
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.shared import agent_identity as ai
from arqonbus_server.shared import apikeys
from tests.conftest import GatewayFactory, gateway_url
from tests.support import WsClient
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def http_url(gw: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gw.address[1]}{path}"


async def get_nonce(gw: Gateway) -> str:
    def fetch() -> dict[str, Any]:
        with urllib.request.urlopen(http_url(gw, "/auth/nonce"), timeout=10 * SEC) as response:
            assert response.status == 200
            body: dict[str, Any] = json.loads(response.read())
            return body

    body = await asyncio.to_thread(fetch)
    assert body["expires_in_s"] > 0
    nonce: str = body["nonce"]
    return nonce


async def known_everywhere(agent_id: str, *gateways: Gateway, revoked: bool = False) -> None:
    """Wait until every gateway's watched copy has the record (in the wanted state)."""

    def ok(gw: Gateway) -> bool:
        raw = gw.security.agents.get(agent_id)
        return raw is not None and ai.AgentRecord.from_json(raw).revoked == revoked

    for gw in gateways:
        seen = asyncio.Event()
        gw.security.agents.on_change(
            lambda key, value, gw=gw, seen=seen: seen.set() if ok(gw) else None
        )
        if not ok(gw):
            await asyncio.wait_for(seen.wait(), 10 * SEC)


async def cli(gw: Gateway, capsys: pytest.CaptureFixture[str], **fields: Any) -> str:
    """Run ``arqonbus agents ...`` in process against the gateways' NATS; returns stdout."""
    args = argparse.Namespace(**{"nats": None, "grant": [], "role": "member", **fields})
    code = await cli_agents.run(args, gw.settings)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


async def register(
    gw: Gateway, capsys: pytest.CaptureFixture[str], tenant: str, key: Ed25519PrivateKey, **kw: Any
) -> str:
    out = await cli(
        gw,
        capsys,
        agents_command="register",
        tenant=tenant,
        name="bot",
        public_key=ai.public_key_b64(key),
        **kw,
    )
    agent_id = out.strip()
    assert ai.is_agent_id(agent_id)
    return agent_id


async def open_agent(gw: Gateway, token: str, opened: list[WsClient]) -> WsClient:
    client = await WsClient.open(gateway_url(gw), token)
    opened.append(client)
    return client


async def refused(gw: Gateway, token: str) -> str:
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(
            gateway_url(gw), additional_headers={"Authorization": f"Bearer {token}"}
        )
    assert info.value.response.status_code == 401
    body = orjson.loads(info.value.response.body or b"{}")
    message: str = body["message"]
    assert token.rsplit(":", 1)[1] not in message  # never the signature
    return message


@pytest.fixture
async def two(start_gateway: GatewayFactory) -> tuple[Gateway, Gateway]:
    return await start_gateway(auth="dev,agent"), await start_gateway(auth="dev,agent")


async def test_sign_in_and_replay_refused_on_every_gateway(two, tenant, capsys, opened):
    gw_a, gw_b = two
    key = ai.generate_private_key()
    agent_id = await register(gw_a, capsys, tenant, key, role="admin")
    await known_everywhere(agent_id, gw_a, gw_b)

    token = ai.sign_token(key, agent_id, await get_nonce(gw_a))
    await open_agent(gw_a, token, opened)
    [session] = [s for s in gw_a.sessions if s.principal.id == agent_id]
    principal = session.principal
    assert (principal.tenant, principal.role, principal.method) == (tenant, "admin", "agent")
    assert principal.credential_id == agent_id

    # THE SAME signed token, replayed: refused through the other gateway and the same one.
    assert "already used" in await refused(gw_b, token)
    assert "already used" in await refused(gw_a, token)


async def test_a_nonce_from_one_gateway_works_on_another_once(two, tenant, capsys, opened):
    gw_a, gw_b = two
    key = ai.generate_private_key()
    agent_id = await register(gw_a, capsys, tenant, key)
    await known_everywhere(agent_id, gw_a, gw_b)
    nonce = await get_nonce(gw_a)
    await open_agent(gw_b, ai.sign_token(key, agent_id, nonce), opened)
    # A new signature (another timestamp) over the used nonce is refused too.
    assert "already used" in await refused(
        gw_a, ai.sign_token(key, agent_id, nonce, int(time.time()) - 1)
    )


async def test_concurrent_replays_only_one_wins(two, tenant, capsys, opened):
    gw_a, gw_b = two
    key = ai.generate_private_key()
    agent_id = await register(gw_a, capsys, tenant, key)
    await known_everywhere(agent_id, gw_a, gw_b)
    token = ai.sign_token(key, agent_id, await get_nonce(gw_b))

    async def attempt(gw: Gateway) -> bool:
        try:
            await open_agent(gw, token, opened)
        except InvalidStatus as exc:
            assert exc.response.status_code == 401
            return False
        return True

    results = await asyncio.gather(*(attempt(gw) for gw in (gw_a, gw_b) * 3))
    assert results.count(True) == 1


async def test_bad_tokens_are_refused(two, tenant, capsys):
    gw_a, _ = two
    key = ai.generate_private_key()
    agent_id = await register(gw_a, capsys, tenant, key)
    await known_everywhere(agent_id, gw_a)
    # Timestamps more than 30 s off either way (the default skew). 33, not 31: the token's
    # whole seconds and the time the check runs may differ by up to 2 s.
    for off in (-33, 33):
        stamp = int(time.time()) + off
        message = await refused(gw_a, ai.sign_token(key, agent_id, await get_nonce(gw_a), stamp))
        assert "off the gateway's clock" in message
    # Wrong key.
    rogue = ai.generate_private_key()
    assert "bad signature" in await refused(
        gw_a, ai.sign_token(rogue, agent_id, await get_nonce(gw_a))
    )
    # Unknown agent.
    assert "unknown agent" in await refused(
        gw_a, ai.sign_token(key, ai.new_agent_id(), await get_nonce(gw_a))
    )
    # A nonce no gateway issued.
    assert "nonce unknown" in await refused(gw_a, ai.sign_token(key, agent_id, ai.new_nonce()))
    # A failed attempt does not burn the nonce: the right signature still works once.
    nonce = await get_nonce(gw_a)
    await refused(gw_a, ai.sign_token(rogue, agent_id, nonce))
    client = await WsClient.open(gateway_url(gw_a), ai.sign_token(key, agent_id, nonce))
    await client.close()


async def test_revoke_closes_sessions_on_every_gateway(two, tenant, capsys, opened):
    gw_a, gw_b = two
    key = ai.generate_private_key()
    agent_id = await register(gw_a, capsys, tenant, key)
    other_id = await register(gw_a, capsys, tenant, ai.generate_private_key())
    await known_everywhere(agent_id, gw_a, gw_b)
    on_a = await open_agent(gw_a, ai.sign_token(key, agent_id, await get_nonce(gw_a)), opened)
    on_b = await open_agent(gw_b, ai.sign_token(key, agent_id, await get_nonce(gw_b)), opened)
    bystander = await WsClient.connect(gateway_url(gw_a), tenant, "human")
    opened.append(bystander)

    assert await cli(gw_a, capsys, agents_command="revoke", tenant=tenant, agent_id=agent_id)
    for client in (on_a, on_b):
        await asyncio.wait_for(client.closed.wait(), 10 * SEC)
        assert client.close_code == 4500
    assert not bystander.closed.is_set()
    await known_everywhere(agent_id, gw_a, gw_b, revoked=True)
    assert "revoked" in await refused(gw_b, ai.sign_token(key, agent_id, await get_nonce(gw_b)))

    listing = await cli(gw_a, capsys, agents_command="list", tenant=tenant)
    lines = {line.split()[0]: line for line in listing.splitlines()}
    assert "revoked" in lines[agent_id] and "active" in lines[other_id]


async def test_the_cli_as_a_command(two, tenant, tmp_path, opened):
    gw_a, gw_b = two
    env = {**os.environ, "ARQONBUS_NATS": gw_a.settings.nats}

    async def arqonbus(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arqonbus_server.gateway", "agents", *argv, cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60 * SEC)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    pem = tmp_path / "agent.pem"
    code, public_key, _ = await arqonbus("keygen", "--out", str(pem))
    assert code == 0 and oct(pem.stat().st_mode & 0o777) == "0o600"
    code, out, err = await arqonbus(
        "register", "--tenant", tenant, "--name", "cli-bot", "--public-key", public_key.strip()
    )
    assert code == 0, err
    agent_id = out.strip()
    # The same key again: refused (one registration per key per tenant).
    code, _, err = await arqonbus(
        "register", "--tenant", tenant, "--name", "again", "--public-key", public_key.strip()
    )
    assert code == 2 and "already registered" in err
    await known_everywhere(agent_id, gw_b)
    key = ai.load_private_key(pem.read_bytes())
    await open_agent(gw_b, ai.sign_token(key, agent_id, await get_nonce(gw_b)), opened)
    code, out, _ = await arqonbus("list", "--tenant", tenant)
    assert code == 0 and agent_id in out and "cli-bot" in out
    code, out, _ = await arqonbus("revoke", "--tenant", "someone-else", agent_id)
    assert code == 2


async def test_register_agent_command(two, tenant, opened):
    gw_a, gw_b = two
    admin = await WsClient.open(gateway_url(gw_a), f"dev:{tenant}:boss:admin")
    member = await WsClient.open(gateway_url(gw_a), f"dev:{tenant}:m:member")
    opened += [admin, member]
    key = ai.generate_private_key()
    params = {"public_key": ai.public_key_b64(key), "name": "cmd-bot", "tenant": "other"}

    reply = await member.command("r", "c", "register_agent", params)
    assert reply["payload"]["error"]["code"] == "forbidden"
    reply = await admin.command("r", "c", "register_agent", {**params, "role": "owner"})
    assert reply["payload"]["error"]["code"] == "invalid_parameters"

    reply = await admin.command("r", "c", "register_agent", params)
    result = reply["payload"]["result"]
    assert (result["tenant"], result["role"], result["name"]) == (tenant, "member", "cmd-bot")
    agent_id = result["agent_id"]
    await known_everywhere(agent_id, gw_a, gw_b)
    reply = await admin.command("r", "c", "register_agent", params)
    assert reply["payload"]["error"]["code"] == "invalid_parameters"
    assert "already registered" in reply["payload"]["error"]["message"]

    await open_agent(gw_b, ai.sign_token(key, agent_id, await get_nonce(gw_a)), opened)
    [session] = [s for s in gw_b.sessions if s.principal.id == agent_id]
    assert session.principal.tenant == tenant  # the caller's tenant, whatever was asked


async def test_nonce_endpoint_is_rate_limited(start_gateway):
    gw = await start_gateway(auth="dev,agent", conn_rate_per_ip=0.001, conn_burst_per_ip=1)
    await get_nonce(gw)

    def fetch() -> int:
        try:
            urllib.request.urlopen(http_url(gw, "/auth/nonce"), timeout=10 * SEC)
        except urllib.error.HTTPError as exc:
            return exc.code
        return 200

    assert await asyncio.to_thread(fetch) == 429


async def test_a_room_admin_cannot_register_a_tenant_wide_agent(
    start_gateway, nats_cluster, tenant, capsys, opened
):
    from tests.integration.test_api_keys import create_key

    gw = await start_gateway(auth="apikey,agent,dev")
    # Admin of room "lobby" only (a grant), read-only elsewhere.
    key = await create_key(
        capsys, nats_cluster, tenant, "lobby-admin", "read-only", "lobby:*:admin"
    )
    seen = asyncio.Event()
    gw.security.keys.on_change(lambda _k, _v: seen.set())
    if apikeys.parse_key(key).key_id not in "".join(k for k, _ in gw.security.keys.items()):
        await asyncio.wait_for(seen.wait(), 10 * SEC)
    room_admin = await WsClient.open(gateway_url(gw), key)
    opened.append(room_admin)
    params = {"public_key": ai.public_key_b64(ai.generate_private_key()), "name": "x"}
    for role in ("admin", "member", "read-only"):
        reply = await room_admin.command("lobby", "ops", "register_agent", {**params, "role": role})
        assert reply["payload"]["error"]["code"] == "forbidden", reply
    # A tenant admin may register up to admin; only an owner registers an owner.
    admin = await WsClient.open(gateway_url(gw), f"dev:{tenant}:boss:admin")
    opened.append(admin)
    reply = await admin.command("lobby", "ops", "register_agent", {**params, "role": "owner"})
    assert reply["payload"]["error"]["code"] == "invalid_parameters", reply
    reply = await admin.command("lobby", "ops", "register_agent", {**params, "role": "admin"})
    assert reply["payload"]["status"] == "success", reply


async def test_cli_registration_and_revocation_are_audited(
    two, nats_cluster, tenant, capsys, opened
):
    from tests.integration.test_audit import query

    gw_a, _ = two
    key = ai.generate_private_key()
    agent_id = await register(gw_a, capsys, tenant, key)
    await cli(gw_a, capsys, agents_command="revoke", tenant=tenant, agent_id=agent_id)
    events = await query(
        capsys, nats_cluster, tenant, "--type", "agent_registered", "--type", "agent_revoked"
    )
    assert [(e["type"], e["details"]["agent_id"]) for e in events] == [
        ("agent_registered", agent_id),
        ("agent_revoked", agent_id),
    ]
    assert ai.public_key_b64(key) not in str(events)  # identifiers only


async def test_concurrent_registrations_of_one_key_one_wins_the_rest_invalid_parameters(
    start_gateway, nats_cluster, tenant, opened, caplog
):
    """Six admins on two gateways (on two NATS servers) register the same new key at once,
    several rounds: exactly one gets the agent, every other one invalid_parameters (never
    unavailable), and no gateway logs a store failure."""
    caplog.set_level("WARNING", logger="arqonbus")
    # Each gateway on its own NATS server: at least one of them is not the KV stream's
    # leader, where a read right after a refused create can miss the winner's write.
    gw_a = await start_gateway(auth="dev,agent", nats=nats_cluster.urls[0])
    gw_b = await start_gateway(auth="dev,agent", nats=nats_cluster.urls[1])
    admins = []
    for i in range(6):
        gw = (gw_a, gw_b)[i % 2]
        admins.append(await WsClient.open(gateway_url(gw), f"dev:{tenant}:boss{i}:admin"))
    opened += admins

    for round_ in range(8):
        params = {"public_key": ai.public_key_b64(ai.generate_private_key()), "name": "racer"}
        ids = await asyncio.gather(
            *(a.send_command("ops", "agents", "register_agent", params) for a in admins)
        )
        replies = [await a.reply_to(i) for a, i in zip(admins, ids, strict=True)]
        won = [r for r in replies if r["payload"]["status"] == "success"]
        lost = [r["payload"]["error"] for r in replies if r["payload"]["status"] != "success"]
        assert len(won) == 1, (round_, replies)
        assert [e["code"] for e in lost] == ["invalid_parameters"] * 5, (round_, lost)
        assert all("already registered" in e["message"] for e in lost), lost
        assert not any(e["retryable"] for e in lost), lost
    failures = [r.getMessage() for r in caplog.records if "could not store agent" in r.getMessage()]
    assert failures == []
