"""mesh.ports.publish_in_task: the awaiting path of Broker.publish_then."""

from __future__ import annotations

import asyncio

import pytest

from arqonbus_server.mesh.ports import BrokerUnavailable, PublishResult, publish_in_task
from tests.timeouts import SEC, eventually


async def test_the_result_or_the_error_is_handed_over_once_later() -> None:
    got: list[object] = []

    async def stored() -> PublishResult:
        return PublishResult(7, False)

    async def refused() -> PublishResult:
        raise ValueError("ttl_s must be at least 1 second, not 0")

    publish_in_task(stored(), got.append)
    publish_in_task(refused(), got.append)
    assert got == []  # never from within the call

    async def both() -> bool:
        return len(got) == 2

    await eventually(both, 3 * SEC, "both handed over")
    assert got[0] == PublishResult(7, False)
    assert isinstance(got[1], ValueError)


async def test_a_stopped_publish_is_unavailable_and_a_failing_callback_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[object] = []
    started = asyncio.Event()

    async def never() -> PublishResult:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    publish_in_task(never(), got.append)
    await asyncio.wait_for(started.wait(), 3 * SEC)
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task() and "settle" in repr(task.get_coro()):
            task.cancel()

    async def handed_over() -> bool:
        return bool(got)

    await eventually(handed_over, 3 * SEC, "the stopped publish handed over")
    assert isinstance(got[0], BrokerUnavailable)

    def broken(outcome: object) -> None:
        raise RuntimeError("a caller's bug")

    async def stored() -> PublishResult:
        return PublishResult(1, False)

    publish_in_task(stored(), broken)

    async def logged() -> bool:
        return "a publish's callback failed" in caplog.text

    await eventually(logged, 3 * SEC, "the failing callback logged")
