"""Content policies kept in NATS KV: ``arqonbus policy set`` reaches every gateway, no restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from arqonbus_server.gateway.admin import cli
from arqonbus_server.mesh.local import LocalCluster
from tests.conftest import gateway_url
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

DENY_SECRET = [{"kind": "deny", "name": "no-secret", "patterns": ["(?i)topsecret"]}]


async def policy_cli(nats: LocalCluster, *argv: str) -> int:
    """``arqonbus policy ARGV --nats URLS`` as a user runs it (its own event loop, a thread)."""
    return await asyncio.to_thread(cli.main, ["policy", *argv, "--nats", nats.url_csv])


def changed(gateway: Any, tenant: str) -> asyncio.Event:
    """Set when the gateway's watched copy of the tenant's policy changes."""
    seen = asyncio.Event()
    gateway.security.policies.on_change(lambda key, _value: key == tenant and seen.set())
    return seen


async def test_stored_rules_apply_on_every_gateway_and_can_be_dropped(
    start_gateway: Any, clients: Any, nats_cluster: LocalCluster, tenant: str, tmp_path: Path
) -> None:
    gw_a, gw_b = await start_gateway(), await start_gateway()
    alice = await clients(gateway_url(gw_b), tenant, "alice")
    assert (await alice.publish("lobby", "chat", {"t": "topsecret"}))["type"] == "ack"

    rules = tmp_path / "rules.json"
    rules.write_bytes(orjson.dumps(DENY_SECRET))
    seen = changed(gw_b, tenant)
    assert await policy_cli(nats_cluster, "set", "--tenant", tenant, str(rules)) == 0
    await asyncio.wait_for(seen.wait(), 10 * SEC)
    refused = await alice.publish("lobby", "chat", {"t": "TopSecret plans"})
    assert refused["payload"]["code"] == "policy_violation", refused
    assert "no-secret" in refused["payload"]["message"]
    assert (await alice.publish("lobby", "chat", {"t": "fine"}))["type"] == "ack"

    # Another tenant on the same gateway is not affected.
    other = await clients(gateway_url(gw_a), tenant + "x", "alice")
    assert (await other.publish("lobby", "chat", {"t": "topsecret"}))["type"] == "ack"

    seen = changed(gw_b, tenant)
    assert await policy_cli(nats_cluster, "delete", "--tenant", tenant) == 0
    await asyncio.wait_for(seen.wait(), 10 * SEC)
    assert (await alice.publish("lobby", "chat", {"t": "topsecret"}))["type"] == "ack"


async def test_stored_rules_replace_the_files_for_that_tenant(
    start_gateway: Any, clients: Any, nats_cluster: LocalCluster, tenant: str, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_bytes(orjson.dumps({"tenants": {tenant: DENY_SECRET}}))
    gateway = await start_gateway(policy_file=str(policy_file))
    alice = await clients(gateway_url(gateway), tenant, "alice")
    assert (await alice.publish("r", "c", {"t": "topsecret"}))["payload"]["code"] == (
        "policy_violation"
    )
    seen = changed(gateway, tenant)
    empty = tmp_path / "none.json"
    empty.write_bytes(b"[]")
    assert await policy_cli(nats_cluster, "set", "--tenant", tenant, str(empty)) == 0
    await asyncio.wait_for(seen.wait(), 10 * SEC)
    assert (await alice.publish("r", "c", {"t": "topsecret"}))["type"] == "ack"


async def test_an_invalid_stored_policy_fails_closed(
    start_gateway: Any, clients: Any, tenant: str
) -> None:
    gateway = await start_gateway()
    alice = await clients(gateway_url(gateway), tenant, "alice")
    seen = changed(gateway, tenant)
    kv = await gateway.broker.key_value(gateway.security.policies.name)
    await kv.put(tenant, b'[{"kind": "nonsense"}]')  # written around the CLI's validation
    await asyncio.wait_for(seen.wait(), 10 * SEC)
    refused = await alice.publish("r", "c", {"t": "anything"})
    assert refused["payload"]["code"] == "internal", refused
    await kv.delete(tenant)


async def test_the_cli_refuses_invalid_rules_before_storing(
    nats_cluster: LocalCluster, tenant: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps([{"kind": "deny", "patterns": ["("]}]))
    assert await policy_cli(nats_cluster, "set", "--tenant", tenant, str(bad)) == 2
    assert "pattern" in capsys.readouterr().err
    assert await policy_cli(nats_cluster, "show", "--tenant", tenant) == 0
    assert "no stored rules" in capsys.readouterr().out


async def test_stored_rules_cannot_import_code_by_object(
    start_gateway: Any, clients: Any, nats_cluster: LocalCluster, tenant: str, tmp_path: Path
) -> None:
    # 'object' would import any module: from KV (writable with a NATS credential) that is
    # code execution on every gateway. The CLI refuses it, and a gateway fails closed.
    marker = tmp_path / "ran"
    rule = {
        "kind": "plugin",
        "object": "logging.config:dictConfig",
        "options": {
            "version": 1,
            "handlers": {"h": {"()": "os.system", "command": f"touch {marker}"}},
        },
    }
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps([rule]))
    assert await policy_cli(nats_cluster, "set", "--tenant", tenant, str(bad)) == 2
    gateway = await start_gateway()
    alice = await clients(gateway_url(gateway), tenant, "alice")
    seen = changed(gateway, tenant)
    kv = await gateway.broker.key_value(gateway.security.policies.name)
    await kv.put(tenant, orjson.dumps([rule]))  # around the CLI
    await asyncio.wait_for(seen.wait(), 10 * SEC)
    refused = await alice.publish("r", "c", {"t": "x"})
    assert refused["payload"]["code"] == "internal", refused
    assert not marker.exists()
    await kv.delete(tenant)
