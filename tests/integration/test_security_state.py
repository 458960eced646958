"""The security state every gateway shares: KV buckets with watched in-memory copies."""

from __future__ import annotations

import asyncio

from tests.conftest import GatewayFactory
from tests.timeouts import SEC


async def _changed(gateway_bucket: object, key: str, expected: bytes | None) -> asyncio.Event:
    seen = asyncio.Event()

    def on_change(changed: str, value: bytes | None) -> None:
        if changed == key and value == expected:
            seen.set()

    gateway_bucket.on_change(on_change)  # type: ignore[attr-defined]
    return seen


async def test_a_change_on_one_gateway_reaches_the_others_copy(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gw_a, gw_b = await start_gateway(), await start_gateway()
    for gw in (gw_a, gw_b):
        assert await gw.security.wait_ready(gw.security.rooms, 10)
    key = f"{tenant}.lobby"
    put_seen = await _changed(gw_b.security.rooms, key, b'{"v":1}')
    kv = await gw_a.broker.key_value(gw_a.security.rooms.name)
    await kv.put(key, b'{"v":1}')
    await asyncio.wait_for(put_seen.wait(), 5 * SEC)
    assert gw_b.security.rooms.get(key) == b'{"v":1}'

    deleted = await _changed(gw_b.security.rooms, key, None)
    await kv.delete(key)
    await asyncio.wait_for(deleted.wait(), 5 * SEC)
    assert gw_b.security.rooms.get(key) is None


async def test_a_restarted_watch_reloads_and_reports_what_changed_meanwhile(
    start_gateway: GatewayFactory, tenant: str
) -> None:
    gw = await start_gateway()
    bucket = gw.security.keys
    assert await gw.security.wait_ready(bucket, 10)
    kv = await gw.broker.key_value(bucket.name)
    key = f"{tenant}.k1"
    seen = await _changed(bucket, key, b"x")
    bucket.restart()
    await kv.put(key, b"x")
    await asyncio.wait_for(seen.wait(), 5 * SEC)
    assert bucket.get(key) == b"x"


async def test_watches_reload_when_jetstream_answers_again_after_failed_checks(
    start_gateway: GatewayFactory,
) -> None:
    # A watch may stall silently while JetStream is away: the first good check after failed
    # ones reloads every bucket (test_a_restarted_watch_... shows what a reload reports).
    gw = await start_gateway(health_interval_s=600)  # only this test's checks run
    reloads: list[int] = []
    gw.security.restart = lambda: reloads.append(1)  # type: ignore[method-assign]
    await gw.apply_health_check(healthy=True, link_ok=True)
    assert reloads == []  # steady health: nothing to do
    await gw.apply_health_check(healthy=False, link_ok=True)
    assert reloads == []
    assert gw.failed_checks == 1
    await gw.apply_health_check(healthy=True, link_ok=True)
    assert reloads == [1]
    await gw.apply_health_check(healthy=True, link_ok=True)
    assert reloads == [1]
