"""Cross-tenant attempts through every command and parameter: nothing crosses.

A tenant's owner (the most a credential can be within its own tenant) sends every
built-in command (read from shared.commands, so a new command is covered the day it is
added), a service call and an event, each with every parameter we can think of that
could name another tenant: ``tenant`` fields in the envelope and in the parameters, the
victim's room and channel names, a victim's token for ``refresh_token``, principals to
ban. The tenant comes only from the credential: the victim must see none of it, and the
attacker must see none of the victim's data.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import orjson
import pytest

from arqonbus_server.shared import commands
from tests.conftest import gateway_url
from tests.support import Message, WsClient, new_id

pytestmark = pytest.mark.integration


def parameter_variants(victim: str) -> list[dict[str, Any]]:
    return [
        {},
        {"tenant": victim},
        {"tenant": victim, "room": "r", "channel": "c", "since_seq": 0, "limit": 10},
        {"tenant": victim, "principal": "alice", "duration_s": 60, "reason": "x"},
        {"token": f"dev:{victim}:alice"},
        {"token": f"dev:{victim}:mallory:owner", "tenant": victim},
        {"command": "svc", "tenant": victim},
        {"private": True, "invite_only": True, "key": "k" * 12, "tenant": victim},
        {"public_key": "A" * 43, "name": "a", "tenant": victim},
    ]


def envelope_variants(victim: str) -> list[dict[str, Any]]:
    # Extra top-level fields may be refused (invalid_envelope); either way nothing crosses.
    return [
        {"room": "r", "channel": "c"},
        {"room": "r", "channel": "c", "tenant": victim},
        {"room": "r", "channel": "c", "from": f"alice@{victim}"},
        {"room": f"{victim}.r", "channel": "c"},
        {"room": "*", "channel": ">"},
    ]


async def exchange(client: WsClient, frame: Message) -> Message:
    """Send one frame and wait for the reply that names its id."""
    start = len(client.received)
    await client.send(frame)
    return await client.reply_to(frame["id"], start=start)


async def test_no_command_or_parameter_reaches_another_tenant(
    start_gateway: Any, clients: Any, tenant: str
) -> None:
    victim, attacker = tenant, tenant + "x"
    secret = f"victim-secret-{uuid.uuid4().hex}"
    loud = f"attacker-mark-{uuid.uuid4().hex}"
    gw_v, gw_a = await start_gateway(), await start_gateway()

    # The victim: a subscriber with history, and a handler for "svc", in room r / channel c.
    alice: WsClient = await clients(gateway_url(gw_v), victim, "alice")
    await alice.join("r", "c", since_seq=0)
    acked = await alice.publish("r", "c", {"secret": secret}, id="v-1")
    assert acked["type"] == "ack", acked
    handler: WsClient = await clients(gateway_url(gw_v), victim, "svc-handler")
    registered = await handler.command("r", "c", "register_handler", {"command": "svc"})
    assert registered["payload"]["status"] == "success", registered

    # The attacker, on the other gateway and on the victim's own gateway.
    far: WsClient = await clients(gateway_url(gw_a), attacker, "mallory")
    near: WsClient = await clients(gateway_url(gw_v), attacker, "mallory")
    names = [*commands.BUILTIN_COMMANDS, "svc"]
    sent = 0
    for mallory in (far, near):
        for envelope, parameters in itertools.product(
            envelope_variants(victim), parameter_variants(victim)
        ):
            for name in names:
                frame = {
                    "version": "1.0",
                    "id": new_id("x"),
                    "type": "command",
                    **envelope,
                    "payload": {"command": name, "parameters": parameters, "timeout_ms": 300},
                }
                await exchange(mallory, frame)
                sent += 1
            event = {
                "version": "1.0",
                "id": new_id("e"),
                "type": "event",
                **envelope,
                "payload": {"mark": loud, **parameters},
            }
            await exchange(mallory, event)
            sent += 1
    assert sent > 2 * len(names) * 40

    # The victim saw nothing of the attacker's, and its handler was never called.
    for victim_client in (alice, handler):
        assert loud.encode() not in b"".join(orjson.dumps(m) for m in victim_client.received)
    assert handler.deliveries() == []
    # The attacker saw nothing of the victim's.
    for mallory in (far, near):
        seen = b"".join(orjson.dumps(m) for m in mallory.received)
        assert secret.encode() not in seen and b"v-1" not in seen

    # The victim is untouched: alice can still join, publish and read her history; the
    # attacker's history of "r"/"c" is its own only; refresh_token never changed tenants.
    assert (await alice.publish("r", "c", {"n": 2}, id="v-2"))["type"] == "ack"
    rejoin = await alice.command("r", "c", "join_channel", {"since_seq": 0})
    assert rejoin["payload"]["status"] == "success", rejoin
    history = await alice.command("r", "c", "history", {"since_seq": 0})
    assert [e["id"] for e in history["payload"]["result"]["events"]] == ["v-1", "v-2"]
    theirs = await far.command("r", "c", "history", {"since_seq": 0, "limit": 1000})
    for event in theirs["payload"]["result"]["events"]:
        assert event["payload"]["mark"] == loud
        assert secret not in orjson.dumps(event).decode()
    # The victim's handler still serves the victim (and only the victim's call reached it).
    call_id = await alice.send_command("r", "c", "svc", {}, timeout_ms=5000)
    delivery = await handler.next_delivery()
    await handler.answer(delivery, {"ok": True})
    answered = await alice.reply_to(call_id)
    assert answered["payload"]["status"] == "success", answered
    assert len(handler.deliveries()) == 1
