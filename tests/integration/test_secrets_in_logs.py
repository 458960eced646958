"""No credential reaches a log line: API keys, agent tokens and signatures, room keys.

One gateway accepts API keys, agents and dev tokens. Every path that handles a secret runs
once with it right and once wrong (sign-in, replay, refresh_token, a private room's key), with
all loggers at DEBUG; then no secret may appear in any record.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.admin.cli import main as cli_main
from arqonbus_server.shared import agent_identity as ai
from arqonbus_server.shared.apikeys import parse_key
from tests.conftest import GatewayFactory, gateway_url
from tests.support import WsClient
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

ROOM_KEY = "room-secret-4f1d9c"


async def refused(url: str, token: str) -> None:
    with pytest.raises(InvalidStatus):
        await websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"})


async def test_no_secret_is_ever_logged(
    start_gateway: GatewayFactory,
    opened: list[WsClient],
    tenant: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(auth="apikey,agent,dev")
    url = gateway_url(gw)
    secrets: list[str] = [ROOM_KEY]

    # An API key: created, used, used with a wrong secret, refreshed into.
    argv = ["keys", "create", "--tenant", tenant, "--name", "svc", "--nats", gw.settings.nats]
    assert await asyncio.to_thread(cli_main, argv) == 0
    key = capsys.readouterr().out.strip()
    # The secret may itself hold "_" (URL-safe base64): split it as the gateway does.
    parsed = parse_key(key)
    secrets += [key, parsed.secret]
    await gw.security.wait_ready(gw.security.keys)
    seen = asyncio.Event()
    gw.security.keys.on_change(lambda _k, _v: seen.set())
    if not any(v for _k, v in gw.security.keys.items() if parsed.key_id.encode() in v):
        await asyncio.wait_for(seen.wait(), 10 * SEC)
    service = await WsClient.open(url, key)
    opened.append(service)
    await refused(url, key[:-4] + "AAAA")

    # An agent: registered, signed in, the token replayed, a forged signature.
    owner = await WsClient.open(url, f"dev:{tenant}:owner")
    opened.append(owner)
    private = ai.generate_private_key()
    reply = await owner.command(
        "lab", "ctl", "register_agent", {"public_key": ai.public_key_b64(private), "name": "b"}
    )
    agent_id = reply["payload"]["result"]["agent_id"]
    token_nonce = await _nonce(gw)
    token = ai.sign_token(private, agent_id, token_nonce)
    secrets += [token, token.rsplit(":", 1)[1]]
    agent = await WsClient.open(url, token)
    opened.append(agent)
    await refused(url, token)  # replayed
    forged = ai.sign_token(ai.generate_private_key(), agent_id, await _nonce(gw))
    secrets.append(forged.rsplit(":", 1)[1])
    await refused(url, forged)

    # refresh_token with a good and a bad token.
    good = await service.command("r", "c", "refresh_token", {"token": key})
    assert good["payload"]["status"] == "success", good
    bad = await service.command("r", "c", "refresh_token", {"token": key[:-4] + "BBBB"})
    assert bad["payload"]["status"] == "error"

    # A private room's key: set, then joins with a wrong and the right key.
    room_seen = asyncio.Event()
    gw.security.rooms.on_change(lambda k, _v: k == f"{tenant}.vault" and room_seen.set())
    configured = await owner.command(
        "vault", "ctl", "room_configure", {"private": True, "key": ROOM_KEY}
    )
    assert configured["payload"]["status"] == "success", configured
    await asyncio.wait_for(room_seen.wait(), 10 * SEC)  # the gateway's watched copy has it
    member = await WsClient.open(url, f"dev:{tenant}:member:member")
    opened.append(member)
    wrong = await member.command("vault", "c", "join_channel", {"room_key": ROOM_KEY[::-1]})
    assert wrong["payload"]["error"]["code"] == "room_key_required"
    right = await member.command("vault", "c", "join_channel", {"room_key": ROOM_KEY})
    assert right["payload"]["status"] == "success", right

    # The test's own raw clients ("websockets.client") log their frames; the product's
    # loggers, the gateway's websockets logger included, must not.
    records = [r for r in caplog.records if r.name != "websockets.client"]
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in records)
    assert any(r.name.startswith("arqonbus") for r in records)  # the capture works
    leaked = [s for s in secrets if s in logged]
    where = {r.name for r in records for s in secrets if s in r.getMessage()}
    assert not leaked, (where, leaked)


async def _nonce(gw: Any) -> str:
    from arqonbus_server.gateway.auth.agent import issue_nonce

    return await issue_nonce(gw.security)
