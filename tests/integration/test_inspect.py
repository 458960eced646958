"""Content policies end to end: a real gateway with policy_file, real NATS, raw WebSocket clients.

Passes once gateway/ws/session.py calls shared.inspect in _start_publish (see the issue-6 report).
Move to tests/integration/test_inspect.py then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from arqonbus.errors import InvalidPayload, PolicyViolation, error_from_wire
from arqonbus_server.shared.errors import CATALOGUE
from tests.conftest import gateway_url
from tests.support import Message, WsClient, new_id

pytestmark = pytest.mark.integration

SECRET = "123-45-6789"
ORDER_SCHEMA = {
    "type": "object",
    "required": ["qty"],
    "properties": {"qty": {"type": "integer", "minimum": 1}},
}


def write_policy(path: Path, tenant: str) -> str:
    rules: list[dict[str, Any]] = [
        {"kind": "deny", "name": "no-ssn", "patterns": [r"\b\d{3}-\d{2}-\d{4}\b"]},
        {"kind": "schema", "name": "orders", "channels": ["orders"], "schema": ORDER_SCHEMA},
        {"kind": "redact", "name": "cards", "fields": ["card.number"], "patterns": [r"\b\d{16}\b"]},
        {"kind": "tag", "name": "pii", "tag": "pii", "patterns": ["(?i)passport"]},
    ]
    path.write_bytes(orjson.dumps({"tenants": {tenant: rules}}))
    return str(path)


def assert_refused(reply: Message, code: str, request_id: str) -> None:
    assert reply["type"] == "error", reply
    payload = reply["payload"]
    assert (payload["code"], payload["request_id"]) == (code, request_id), reply
    assert payload["retryable"] is CATALOGUE[code].retryable is False
    assert SECRET not in payload["message"], reply


async def test_policy_refuses_redacts_and_tags_before_storing(
    start_gateway: Any, clients: Any, tenant: str, tmp_path: Path
) -> None:
    gateway = await start_gateway(policy_file=write_policy(tmp_path / "policy.json", tenant))
    url = gateway_url(gateway)
    alice: WsClient = await clients(url, tenant, "alice")
    bob: WsClient = await clients(url, tenant, "bob")
    for channel in ("general", "orders"):
        await bob.join("lobby", channel)

    denied = new_id()
    reply = await alice.publish("lobby", "general", {"text": f"ssn {SECRET}"}, id=denied)
    assert_refused(reply, "policy_violation", denied)
    assert "no-ssn" in reply["payload"]["message"]
    assert isinstance(error_from_wire(reply["payload"], denied), PolicyViolation)

    invalid = new_id()
    reply = await alice.publish("lobby", "orders", {"qty": 0}, id=invalid)
    assert_refused(reply, "invalid_payload", invalid)
    assert "payload.qty" in reply["payload"]["message"]
    assert isinstance(error_from_wire(reply["payload"]), InvalidPayload)

    card = {"card": {"number": "4111111111111111", "brand": "visa"}, "note": "4111111111111111"}
    assert (await alice.publish("lobby", "general", card))["type"] == "ack"
    tagged = {"text": "my passport number is X"}
    # A client cannot set tags itself: the gateway builds the stored envelope.
    assert (await alice.publish("lobby", "general", tagged, tags=["forged"]))["type"] == "ack"
    plain = {"text": "hello", "tags": "payload fields are the sender's"}
    assert (await alice.publish("lobby", "general", plain, tags=["forged"]))["type"] == "ack"
    assert (await alice.publish("lobby", "orders", {"qty": 2}))["type"] == "ack"

    live = await bob.wait_events(3, "lobby", "general")
    assert [e["payload"] for e in live] == [
        {"card": {"number": "[redacted]", "brand": "visa"}, "note": "[redacted]"},
        tagged,
        plain,
    ]
    assert [e.get("tags") for e in live] == [None, ["pii"], None]
    assert [e["payload"] for e in await bob.wait_events(1, "lobby", "orders")] == [{"qty": 2}]

    # What is stored is what was delivered: redacted, tagged, and nothing refused.
    page = await bob.command("lobby", "general", "history", {"since_seq": 0})
    stored = page["payload"]["result"]["events"]
    assert [(e["payload"], e.get("tags")) for e in stored] == [
        (e["payload"], e.get("tags")) for e in live
    ]
    assert b"4111111111111111" not in orjson.dumps(stored)


async def test_a_tenant_without_rules_is_not_inspected(
    start_gateway: Any, clients: Any, tenant: str, tmp_path: Path
) -> None:
    gateway = await start_gateway(policy_file=write_policy(tmp_path / "policy.json", tenant))
    other: WsClient = await clients(gateway_url(gateway), tenant + "x", "carol")
    await other.join("lobby", "orders")
    assert (await other.publish("lobby", "orders", {"text": SECRET}))["type"] == "ack"
    [delivered] = await other.wait_events(1, "lobby", "orders")
    assert delivered["payload"] == {"text": SECRET} and "tags" not in delivered
