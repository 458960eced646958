"""One scale for every timeout in the tests, as websockets' ``MS``.

A test waits on the event it expects, bounded by ``N * SEC``. A slow machine stretches every
bound at once with ``ARQONBUS_TEST_TIMEOUT_FACTOR`` (e.g. 3); no test sleeps to synchronize.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

SEC = float(os.environ.get("ARQONBUS_TEST_TIMEOUT_FACTOR", "1"))
POLL_S = 0.05  # how often eventually() looks again
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """The first truthy value of ``check()``, re-checked until ``timeout`` (seconds, already
    scaled by SEC). Only for conditions that no event announces: a stored message aging out,
    an HTTP endpoint turning ready, a counter read by a scrape. Fails naming ``what``."""
    try:
        async with asyncio.timeout(timeout):
            # Nothing announces these conditions, so the one poll of the tests lives here.
            while not (value := await check()):  # noqa: ASYNC110
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout:g} s") from None
    return value
