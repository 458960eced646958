"""Service commands through the SDK (seed Example 4): load balancing across service instances
on different gateways, no_responders, timeout, handler errors, re-registration on reconnect."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from arqonbus import Client, CommandFailed, CommandRequest, Internal, NoResponders, Timeout
from tests.conftest import gateway_url
from tests.timeouts import SEC

pytestmark = pytest.mark.integration

ROOM, CHANNEL = "services", "database"


def status_handler(name: str, calls: list[str]):  # type: ignore[no-untyped-def]
    async def status(request: CommandRequest) -> dict[str, Any]:
        calls.append(request.caller_request_id)
        return {"service": name, "check": request.parameters.get("check")}

    return status


async def test_commands_are_balanced_across_two_services_on_different_gateways(
    start_gateway, tenant
):
    gw_a, gw_b = await start_gateway(), await start_gateway()
    calls: dict[str, list[str]] = {"db_1": [], "db_2": []}
    async with (
        Client(gateway_url(gw_a), f"dev:{tenant}:db_1") as db_1,
        Client(gateway_url(gw_b), f"dev:{tenant}:db_2") as db_2,
        Client(gateway_url(gw_a), f"dev:{tenant}:api") as api,
    ):
        await db_1.register_handler(ROOM, CHANNEL, "status", status_handler("db_1", calls["db_1"]))
        await db_2.register_handler(ROOM, CHANNEL, "status", status_handler("db_2", calls["db_2"]))
        results = await asyncio.gather(
            *(
                api.command(ROOM, CHANNEL, "status", {"check": "connection_pool"}, timeout=10 * SEC)
                for _ in range(100)
            )
        )
    served = Counter(r["service"] for r in results)
    assert served["db_1"] + served["db_2"] == 100
    # Each command reached exactly one instance, and both took a real share of the load.
    assert len(calls["db_1"]) == served["db_1"] and len(calls["db_2"]) == served["db_2"]
    assert min(served.values()) >= 20, served
    assert len(set(calls["db_1"]) | set(calls["db_2"])) == 100
    print(f"load balance over 100 commands: {dict(served)}")


async def test_no_responders_is_immediate(start_gateway, tenant):
    gw = await start_gateway()
    async with Client(gateway_url(gw), f"dev:{tenant}:api") as api:
        started = time.monotonic()
        with pytest.raises(NoResponders) as info:
            await api.command(ROOM, CHANNEL, "status", timeout=30 * SEC)
        elapsed = time.monotonic() - started
    assert info.value.code == "no_responders"
    assert info.value.retryable is True
    assert info.value.request_id
    # 30 s was allowed: an answer within 5 s is NATS's no-responders status, not a timeout.
    assert elapsed < 5
    print(f"no_responders in {elapsed * 1000:.1f} ms")


async def test_a_slow_handler_times_out(start_gateway, tenant):
    gw = await start_gateway()
    release = asyncio.Event()

    async def slow(request: CommandRequest) -> dict[str, Any]:
        await release.wait()
        return {}

    async with (
        Client(gateway_url(gw), f"dev:{tenant}:db") as db,
        Client(gateway_url(gw), f"dev:{tenant}:api") as api,
    ):
        await db.register_handler(ROOM, CHANNEL, "status", slow)
        with pytest.raises(Timeout) as info:
            await api.command(ROOM, CHANNEL, "status", timeout=0.3 * SEC)
        release.set()
    assert info.value.code == "timeout"


async def test_handler_errors_reach_the_caller_typed(start_gateway, tenant):
    gw = await start_gateway()

    async def status(request: CommandRequest) -> dict[str, Any]:
        if request.parameters.get("check") == "disk":
            raise CommandFailed("unknown_check", "no such check: disk", retryable=False)
        raise RuntimeError("the driver exploded")

    async with (
        Client(gateway_url(gw), f"dev:{tenant}:db") as db,
        Client(gateway_url(gw), f"dev:{tenant}:api") as api,
    ):
        await db.register_handler(ROOM, CHANNEL, "status", status)
        with pytest.raises(CommandFailed) as failed:
            await api.command(ROOM, CHANNEL, "status", {"check": "disk"})
        with pytest.raises(Internal) as crashed:
            await api.command(ROOM, CHANNEL, "status", {"check": "pool"})
    assert (failed.value.code, failed.value.message) == ("unknown_check", "no such check: disk")
    assert failed.value.retryable is False
    assert "RuntimeError" in crashed.value.message
    assert "exploded" not in crashed.value.message  # the handler's internals stay private


async def test_a_handler_is_registered_again_after_its_gateway_goes_away(start_gateway, tenant):
    gw_a, gw_b = await start_gateway(), await start_gateway()
    async with (
        Client([gateway_url(gw_a), gateway_url(gw_b)], f"dev:{tenant}:db", max_backoff=0.3) as db,
        Client(gateway_url(gw_b), f"dev:{tenant}:api") as api,
    ):
        await db.register_handler(ROOM, CHANNEL, "status", status_handler("db", []))
        assert (await api.command(ROOM, CHANNEL, "status"))["service"] == "db"
        await gw_a.drain()  # the handler's gateway goes away; it reconnects to gw_b
        result = await call_until_served(api)
    assert result["service"] == "db"
    assert db.url == gateway_url(gw_b)


async def call_until_served(api: Client) -> dict[str, Any]:
    """Call until a handler answers: no_responders until the handler has re-registered.

    Each attempt is a real round trip through NATS; the loop is bounded in count and time."""
    async with asyncio.timeout(15 * SEC):
        for _ in range(20_000):
            try:
                return await api.command(ROOM, CHANNEL, "status", timeout=5 * SEC)
            except NoResponders:
                continue
    raise AssertionError("the handler never registered again")
