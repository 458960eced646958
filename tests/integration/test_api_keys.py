"""API keys end to end: the ``arqonbus keys`` CLI, real gateways and a real NATS cluster.

Keys are created, listed and revoked through the CLI entry point (``arqonbus_server.gateway.admin.cli.main``,
in a thread, as a shell would run it); clients sign in with them over WebSocket.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.admin.cli import main as cli_main
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.auth.chain import ChainAuthenticator
from arqonbus_server.gateway.auth.keys import ApiKeyAuthenticator
from arqonbus_server.gateway.config import load_settings
from arqonbus_server.mesh.kv import KEYS, bucket_name
from arqonbus_server.mesh.local import LocalCluster, free_port
from arqonbus_server.shared import apikeys
from arqonbus_server.shared.errors import CloseCode
from tests.conftest import GatewayFactory, gateway_url
from tests.support import WsClient, new_id
from tests.timeouts import SEC


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``arqonbus <argv>`` in a thread; (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def create_key(
    capsys: pytest.CaptureFixture[str],
    nats: LocalCluster,
    tenant: str,
    name: str,
    role: str = "member",
    *grants: str,
) -> str:
    argv = ["keys", "create", "--tenant", tenant, "--name", name, "--role", role]
    for grant in grants:
        argv += ["--grant", grant]
    code, out, err = await cli(capsys, *argv, "--nats", nats.url_csv)
    assert code == 0, err
    key = out.strip()
    parsed = apikeys.parse_key(key)  # stdout is exactly the key
    assert parsed.key_id in err and "only this once" in err
    return key


async def refused(gw: Gateway, token: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(gateway_url(gw), additional_headers=headers)
    response = info.value.response
    assert response.status_code == 401, response.body
    body: dict[str, Any] = orjson.loads(response.body or b"{}")
    assert body["error"] == "unauthorized"
    return body


@pytest.fixture
async def opened() -> Any:
    clients: list[WsClient] = []

    async def open_(gw: Gateway, token: str) -> WsClient:
        client = await WsClient.open(gateway_url(gw), token)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.close()


async def test_a_created_key_signs_in_publishes_and_subscribes(
    start_gateway: GatewayFactory, nats_cluster: LocalCluster, tenant: str, capsys, opened
) -> None:
    gw = await start_gateway(auth="apikey")
    assert isinstance(gw.authenticator, ApiKeyAuthenticator)
    writer_key = await create_key(capsys, nats_cluster, tenant, "ingest", "member")
    reader_key = await create_key(capsys, nats_cluster, tenant, "dashboard", "read-only")
    writer, reader = await opened(gw, writer_key), await opened(gw, reader_key)
    await reader.join("lab", "results")  # asserts success
    reply = await writer.publish("lab", "results", {"n": 1}, id=new_id())
    assert reply["type"] == "ack", reply
    events = await reader.wait_events(1, "lab", "results")
    assert events[0]["from"] == "ingest"  # the key's name is its principal id
    # The role is enforced: a read-only key may not publish.
    denied = await reader.publish("lab", "results", {"n": 2}, id=new_id())
    assert denied["type"] == "error" and denied["payload"]["code"] == "forbidden", denied
    session = next(s for s in gw.sessions if s.principal.id == "ingest")
    assert session.principal.method == "apikey"
    assert session.principal.credential_id == apikeys.parse_key(writer_key).key_id
    assert session.principal.tenant == tenant


async def test_grants_add_to_the_role(
    start_gateway: GatewayFactory, nats_cluster: LocalCluster, tenant: str, capsys, opened
) -> None:
    gw = await start_gateway(auth="apikey")
    key = await create_key(capsys, nats_cluster, tenant, "sensor", "read-only", "lab:raw:publish")
    client = await opened(gw, key)
    allowed = await client.publish("lab", "raw", {"n": 1}, id=new_id())
    assert allowed["type"] == "ack", allowed
    denied = await client.publish("lab", "results", {"n": 1}, id=new_id())
    assert denied["payload"]["code"] == "forbidden", denied


def _wrong_secret(key: str) -> str:
    last = key[-1]
    return key[:-1] + ("A" if last != "A" else "B")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_wrong_secret, "wrong secret"),
        (lambda key: "arqk_zzzzzzzzzzzz_" + apikeys.parse_key(key).secret, "unknown API key"),
        (lambda key: key[:-3], "malformed API key"),
        (lambda key: "arqk_nonsense", "malformed API key"),
    ],
    ids=["wrong-secret", "unknown-id", "truncated", "malformed"],
)
async def test_a_bad_key_is_401_and_the_message_never_holds_the_secret(
    start_gateway: GatewayFactory, nats_cluster: LocalCluster, tenant: str, capsys, make, message
) -> None:
    gw = await start_gateway(auth="apikey")
    key = await create_key(capsys, nats_cluster, tenant, "ingest")
    bad = make(key)
    body = await refused(gw, bad)
    assert message in body["message"], body
    secret = apikeys.parse_key(key).secret
    assert secret[:20] not in body["message"] and bad not in body["message"]
    assert not gw.sessions


async def test_a_chain_gateway_takes_keys_jwts_and_dev_tokens(
    start_gateway: GatewayFactory, nats_cluster: LocalCluster, tenant: str, capsys, opened
) -> None:
    gw = await start_gateway(auth="jwt,apikey,dev", jwt_secret="s" * 32, jwt_algorithms="HS256")
    assert isinstance(gw.authenticator, ChainAuthenticator)
    key = await create_key(capsys, nats_cluster, tenant, "ingest")
    by_key = await opened(gw, key)
    by_dev = await opened(gw, f"dev:{tenant}:alice")
    await by_dev.join("lab", "results")
    reply = await by_key.publish("lab", "results", {"n": 1}, id=new_id())
    assert reply["type"] == "ack", reply
    assert (await by_dev.wait_events(1, "lab", "results"))[0]["from"] == "ingest"
    body = await refused(gw, _wrong_secret(key))
    assert "wrong secret" in body["message"]


async def test_keys_list_shows_keys_but_never_secrets_or_hashes(
    start_gateway: GatewayFactory, nats_cluster: LocalCluster, tenant: str, capsys
) -> None:
    first = await create_key(capsys, nats_cluster, tenant, "ingest", "member", "lab:*:history")
    second = await create_key(capsys, nats_cluster, tenant, "dashboard", "read-only")
    first_id, second_id = apikeys.parse_key(first).key_id, apikeys.parse_key(second).key_id
    code, out, err = await cli(
        capsys, "keys", "revoke", "--tenant", tenant, second_id, "--nats", nats_cluster.url_csv
    )
    assert code == 0, err
    code, out, err = await cli(
        capsys, "keys", "list", "--tenant", tenant, "--nats", nats_cluster.url_csv
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "ROLE", "GRANTS", "CREATED", "REVOKED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[first_id][1:4] == ["ingest", "member", "lab:*:history"]
    assert rows[first_id][5] == "-"
    assert rows[second_id][1:3] == ["dashboard", "read-only"] and rows[second_id][5] != "-"
    for key in (first, second):
        parsed = apikeys.parse_key(key)
        assert parsed.secret not in out + err
        assert apikeys.hash_secret(parsed.secret) not in out + err


async def test_cli_exit_codes(nats_cluster: LocalCluster, tenant: str, capsys) -> None:
    nats = ["--nats", nats_cluster.url_csv]
    base = ["keys", "create", "--tenant", tenant, "--name", "ingest"]
    for argv, problem in (
        ([*base, "--role", "root"], "unknown role"),
        ([*base, "--grant", "lab:publish"], "expected 3 parts"),
        (["keys", "create", "--tenant", "bad.tenant", "--name", "x"], "not a valid name"),
        (["keys", "revoke", "--tenant", tenant, "abcdefghijkl"], "no API key abcdefghijkl"),
        (["keys", "revoke", "--tenant", tenant, "nope"], "is not a key id"),
    ):
        code, out, err = await cli(capsys, *argv, *nats)
        assert code == 2, (argv, out, err)
        assert problem in err, err
    # Nothing listens on this port: NATS unreachable is exit code 1, but bad input is
    # still 2 (checked before connecting).
    dead = f"nats://127.0.0.1:{free_port()}"
    code, out, err = await cli(capsys, *base, "--role", "root", "--nats", dead)
    assert code == 2 and "unknown role" in err, (out, err)
    code, out, err = await cli(capsys, "keys", "list", "--tenant", tenant, "--nats", dead)
    assert code == 1, (out, err)
    assert "--nats" in err


async def _closed_at(client: WsClient) -> float:
    await client.closed.wait()
    return asyncio.get_running_loop().time()


async def test_a_revoke_closes_the_keys_sessions_on_every_gateway_within_a_second(
    start_gateway: GatewayFactory, nats_cluster: LocalCluster, tenant: str, capsys, opened
) -> None:
    gw_a, gw_b = await start_gateway(auth="apikey"), await start_gateway(auth="apikey")
    key = await create_key(capsys, nats_cluster, tenant, "ingest")
    other = await create_key(capsys, nats_cluster, tenant, "other")
    key_id = apikeys.parse_key(key).key_id
    on_a, on_b = await opened(gw_a, key), await opened(gw_b, key)
    bystander = await opened(gw_a, other)  # another key's session stays open
    closes = [asyncio.create_task(_closed_at(c)) for c in (on_a, on_b)]
    loop = asyncio.get_running_loop()

    started = loop.time()
    code, out, err = await cli(
        capsys, "keys", "revoke", "--tenant", tenant, key_id, "--nats", nats_cluster.url_csv
    )
    returned = loop.time()
    assert code == 0, err
    assert key_id in out and key not in out + err
    closed = await asyncio.wait_for(asyncio.gather(*closes), 5 * SEC)

    latencies = [at - returned for at in closed]
    print(
        f"\nrevoke: CLI took {returned - started:.3f}s; sessions closed "
        + ", ".join(f"{at - started:.3f}s after it started ({at - returned:+.3f}s after it returned)"
                    for at in closed)
    )  # fmt: skip
    assert all(lat < 1.0 for lat in latencies), latencies
    assert on_a.close_code == on_b.close_code == CloseCode.CREDENTIAL_REVOKED == 4500
    assert not bystander.closed.is_set()
    reply = await bystander.publish("lab", "results", {"n": 1}, id=new_id())
    assert reply["type"] == "ack", reply
    for gw in (gw_a, gw_b):
        body = await refused(gw, key)
        assert "revoked" in body["message"] and key_id in body["message"]


async def test_deleting_a_key_record_also_closes_its_sessions(
    start_gateway: GatewayFactory, nats_cluster: LocalCluster, tenant: str, capsys, opened
) -> None:
    gw = await start_gateway(auth="apikey")
    key = await create_key(capsys, nats_cluster, tenant, "ingest")
    key_id = apikeys.parse_key(key).key_id
    client = await opened(gw, key)
    kv = await gw.broker.key_value(bucket_name(gw.settings.subject_prefix, KEYS))
    await kv.delete(apikeys.kv_key(tenant, key_id))
    await asyncio.wait_for(client.closed.wait(), 5 * SEC)
    assert client.close_code == CloseCode.CREDENTIAL_REVOKED
    body = await refused(gw, key)
    assert "unknown API key" in body["message"]


async def test_a_key_is_503_while_the_key_store_cannot_be_read(tenant: str) -> None:
    """No NATS: the KEYS bucket never loads, so a key cannot be checked (retry elsewhere)."""
    settings = load_settings(
        nats=f"nats://127.0.0.1:{free_port()}", listen="127.0.0.1:0", auth="apikey"
    )
    gw = Gateway(settings)
    await gw.start()
    try:
        key, _ = apikeys.new_record(tenant, "ingest", "member")
        with pytest.raises(InvalidStatus) as info:
            await websockets.connect(
                gateway_url(gw), additional_headers={"Authorization": f"Bearer {key}"}
            )
        response = info.value.response
        assert response.status_code == 503, response.body
        body = orjson.loads(response.body or b"{}")
        # The gateway (or, behind it, the API-key check) says to retry: nothing is refused.
        assert "retry" in body["message"], body
        assert apikeys.parse_key(key).secret not in body["message"]
    finally:
        await gw.close()
