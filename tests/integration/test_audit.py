"""The audit stream end to end: real gateways, real NATS, real clients, the real CLI."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from nats.js.api import DiscardPolicy, StorageType
from websockets.exceptions import InvalidStatus

from arqonbus_server.gateway.admin import cli
from arqonbus_server.gateway.app import Gateway
from arqonbus_server.gateway.state import audit
from arqonbus_server.mesh.local import LocalCluster
from arqonbus_server.shared import apikeys
from tests.conftest import gateway_url
from tests.support import WsClient, jetstream_manager

pytestmark = pytest.mark.integration

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiJhbGljZSIsInRlbmFudCI6ImFjbWUifQ."
    "c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
)
SSN = "123-45-6789"


async def run_cli(
    capsys: pytest.CaptureFixture[str], nats: LocalCluster, *argv: str
) -> tuple[int, str, str]:
    """``arqonbus audit ...`` as a user runs it."""
    return await run_cli_argv(capsys, "audit", "--nats", nats.url_csv, *argv)


async def run_cli_argv(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``arqonbus ARGV`` as a user runs it (its own event loop, in a thread)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def refused_handshake(gateway: Gateway, token: str) -> int:
    """The HTTP status with which the gateway refuses a WebSocket upgrade with ``token``."""
    with pytest.raises(InvalidStatus) as refusal:
        await websockets.connect(
            gateway_url(gateway), additional_headers={"Authorization": f"Bearer {token}"}
        )
    return refusal.value.response.status_code


async def query(
    capsys: pytest.CaptureFixture[str], nats: LocalCluster, tenant: str, *argv: str
) -> list[dict[str, Any]]:
    code, out, err = await run_cli(capsys, nats, "--tenant", tenant, "--json", *argv)
    assert code == 0, err
    return [orjson.loads(line) for line in out.splitlines()]


async def raw_audit_bytes(nats: LocalCluster, gateway: Gateway, tenant: str) -> list[bytes]:
    """Every stored message of the tenant's audit stream, as the NATS servers hold it."""
    name = audit.stream_name(gateway.settings.subject_prefix, tenant)
    async with jetstream_manager(nats) as jsm:
        info = await jsm.stream_info(name)
        return [
            (await jsm.get_msg(name, seq)).data or b""
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]


async def test_forbidden_publish_is_audited_once_and_found_by_the_cli(
    start_gateway: Any,
    clients: Any,
    tenant: str,
    nats_cluster: LocalCluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway = await start_gateway()
    reader: WsClient = await clients(gateway_url(gateway), tenant, "viewer:read-only")
    # A client looping on a refused publish: each is refused, one is recorded (10 s window).
    for _ in range(5):
        reply = await reader.publish("lobby", "general", {"text": "hi"})
        assert reply["payload"]["code"] == "forbidden"
    assert await gateway.audit.flush()

    events = await query(capsys, nats_cluster, tenant)
    assert len(events) == 1, events
    event = events[0]
    assert (event["type"], event["tenant"], event["principal"], event["node"]) == (
        "forbidden",
        tenant,
        "viewer",
        "gw0",
    )
    details = event["details"]
    assert (details["permission"], details["room"], details["channel"]) == (
        "publish",
        "lobby",
        "general",
    )
    assert details["method"] == "dev" and "reason" in details
    assert datetime.fromisoformat(event["ts"]) <= datetime.now(UTC)

    # The readable form: one line per event.
    code, out, _ = await run_cli(capsys, nats_cluster, "--tenant", tenant)
    assert code == 0
    [line] = out.splitlines()
    assert "forbidden" in line and "principal=viewer" in line and "channel=general" in line

    # The stream: file storage, replicated like the tenant streams, bounded in age and size.
    async with jetstream_manager(nats_cluster) as jsm:
        info = await jsm.stream_info(audit.stream_name("arq", tenant))
    config = info.config
    assert config.num_replicas == 3
    assert StorageType(config.storage) is StorageType.FILE
    assert config.max_age == gateway.settings.audit_max_age_s == 90 * 86400
    assert config.max_bytes == gateway.settings.audit_max_bytes
    assert DiscardPolicy(config.discard) is DiscardPolicy.OLD
    assert config.subjects == [f"arq.audit.{tenant}.>"]


async def test_policy_block_is_audited_with_its_rule(
    start_gateway: Any,
    clients: Any,
    tenant: str,
    nats_cluster: LocalCluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = tmp_path / "policy.json"
    rules = [{"kind": "deny", "name": "no-ssn", "patterns": [r"\b\d{3}-\d{2}-\d{4}\b"]}]
    policy.write_bytes(orjson.dumps({"tenants": {tenant: rules}}))
    gateway = await start_gateway(policy_file=str(policy))
    alice: WsClient = await clients(gateway_url(gateway), tenant, "alice")
    reply = await alice.publish("lobby", "general", {"text": f"ssn {SSN}"})
    assert reply["payload"]["code"] == "policy_violation"
    assert (await alice.publish("lobby", "general", {"text": "fine"}))["type"] == "ack"
    assert await gateway.audit.flush()

    [event] = await query(capsys, nats_cluster, tenant, "--type", "policy_blocked")
    assert event["principal"] == "alice"
    assert event["details"]["rule"] == "no-ssn"
    assert event["details"]["code"] == "policy_violation"
    assert (event["details"]["room"], event["details"]["channel"]) == ("lobby", "general")
    assert all(
        SSN.encode() not in raw for raw in await raw_audit_bytes(nats_cluster, gateway, tenant)
    )


async def test_auth_failure_with_a_tenant_is_audited(
    start_gateway: Any, tenant: str, nats_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await start_gateway(auth="apikey")
    code, out, err = await run_cli_argv(
        capsys, "keys", "create", "--tenant", tenant, "--name", "ci", "--nats", nats_cluster.url_csv
    )
    assert code == 0, err
    created = apikeys.parse_key(out.strip())
    key_id, other_secret = created.key_id, "A" * len(created.secret)
    # A handshake with the key's id but not its secret: refused, and recorded for the tenant.
    assert await refused_handshake(gateway, apikeys.format_key(key_id, other_secret)) == 401
    # A key id nobody created names no tenant (nothing in it is trusted): not recorded.
    unknown = apikeys.format_key("a" * len(key_id), other_secret)
    assert await refused_handshake(gateway, unknown) == 401
    assert await gateway.audit.flush()

    [event] = await query(capsys, nats_cluster, tenant, "--type", "auth_failed")
    details = event["details"]
    assert (details["credential_id"], details["peer_ip"]) == (key_id, "127.0.0.1")
    assert details["reason"].startswith(f"wrong secret for API key {key_id}")
    assert set(details) == {"credential_id", "reason", "peer_ip"}


async def test_tenants_never_see_each_other(
    start_gateway: Any, clients: Any, nats_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await start_gateway()
    tenant_a, tenant_b = (f"t{n}{id(gateway) % 10**8}" for n in ("a", "b"))
    for tenant, principal in ((tenant_a, "ann"), (tenant_b, "ben")):
        client: WsClient = await clients(gateway_url(gateway), tenant, f"{principal}:read-only")
        assert (await client.publish("lobby", principal, {}))["payload"]["code"] == "forbidden"
    assert await gateway.audit.flush()

    events_a = await query(capsys, nats_cluster, tenant_a)
    events_b = await query(capsys, nats_cluster, tenant_b)
    assert [(e["tenant"], e["principal"]) for e in events_a] == [(tenant_a, "ann")]
    assert [(e["tenant"], e["principal"]) for e in events_b] == [(tenant_b, "ben")]
    assert tenant_b.encode() not in b"".join(await raw_audit_bytes(nats_cluster, gateway, tenant_a))


async def test_no_secret_reaches_the_audit_stream(
    start_gateway: Any, clients: Any, tenant: str, nats_cluster: LocalCluster
) -> None:
    gateway = await start_gateway()
    token = f"dev:{tenant}:mallory:read-only"
    client = await WsClient.open(gateway_url(gateway), token)
    try:
        assert (await client.publish("vault", "keys", {}))["payload"]["code"] == "forbidden"
    finally:
        await client.close()
    # Callers that slip: secrets by field name, and inside free text.
    gateway.audit.record(
        tenant,
        audit.AUTH_FAILED,
        "mallory",
        token=JWT,
        api_key_secret="s3cr3t-value",
        key_hash="argon2id$deadbeef",
        signature="c2lnbmF0dXJl",
        Authorization=f"Bearer {JWT}",
        reason=f"could not verify {JWT}",
        peer_ip="127.0.0.1",
    )
    assert await gateway.audit.flush()

    stored = await raw_audit_bytes(nats_cluster, gateway, tenant)
    assert len(stored) == 2
    for raw in stored:
        for secret in (token, JWT, "eyJ", "s3cr3t-value", "argon2id", "c2lnbmF0dXJl"):
            assert secret.encode() not in raw, raw
    recorded = orjson.loads(stored[1])["details"]
    assert set(recorded) == {"reason", "peer_ip"}
    assert "[jwt redacted]" in recorded["reason"]


async def test_type_filter_and_since_bound(
    start_gateway: Any, tenant: str, nats_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await start_gateway()
    gateway.audit.record(tenant, audit.KEY_CREATED, "cli", key_id="k1")
    gateway.audit.record(tenant, audit.FORBIDDEN, "bob", room="r", channel="c")
    assert await gateway.audit.flush()
    between = datetime.now(UTC)
    gateway.audit.record(tenant, audit.KEY_REVOKED, "cli", key_id="k1")
    assert await gateway.audit.flush()

    everything = await query(capsys, nats_cluster, tenant)
    assert [e["type"] for e in everything] == ["key_created", "forbidden", "key_revoked"]
    keys = await query(
        capsys, nats_cluster, tenant, "--type", "key_created", "--type", "key_revoked"
    )
    assert [e["type"] for e in keys] == ["key_created", "key_revoked"]
    recent = await query(capsys, nats_cluster, tenant, "--since", between.isoformat())
    assert [e["type"] for e in recent] == ["key_revoked"]
    assert await query(capsys, nats_cluster, tenant, "--since", "1h", "--limit", "1") == [
        everything[0]
    ]
    assert await query(capsys, nats_cluster, tenant, "--type", "admin_action") == []


async def test_cli_unknown_tenant_and_bad_input(
    nats_cluster: LocalCluster, tenant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run_cli(capsys, nats_cluster, "--tenant", tenant)
    assert (code, out) == (0, "")
    assert "no events" in err
    code, out, err = await run_cli(capsys, nats_cluster, "--tenant", tenant, "--since", "lately")
    assert code == 2 and out == ""
    assert "--since 'lately' is neither a duration" in err
    code, _, err = await run_cli(capsys, nats_cluster, "--tenant", "a.b")
    assert code == 2 and "not a valid name" in err
