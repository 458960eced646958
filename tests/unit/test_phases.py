"""gateway/http/phases.py: sampled phase timings, on an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from arqonbus_server.gateway.http.phases import MAX_OPEN, PhaseSampler
from tests.timeouts import SEC


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Seen(list[tuple[str, float]]):
    """The observations; ``total`` (the last phase of a sample) sets ``finished``."""

    def __init__(self) -> None:
        super().__init__()
        self.finished = asyncio.Event()

    def __call__(self, phase: str, seconds: float) -> None:
        self.append((phase, round(seconds, 6)))
        if phase == "total":
            self.finished.set()


def sampler(interval_s: float = 0.01) -> tuple[PhaseSampler, Clock, Seen]:
    clock, seen = Clock(), Seen()
    return PhaseSampler(seen, interval_s, clock), clock, seen


def test_at_most_one_read_is_sampled_per_interval():
    phases, _, _ = sampler(0.01)
    due = [phases.read_due(t) for t in (1.0, 1.005, 1.0099, 1.01, 1.011, 1.03)]
    assert due == [True, False, False, True, False, True]
    with pytest.raises(ValueError):
        PhaseSampler(lambda p, s: None, 0)


async def test_every_phase_whether_the_ack_or_the_live_copy_comes_first():
    for ack_first in (True, False):
        phases, clock, seen = sampler()
        clock.now = 10.003
        phases.sent("k", read_at=10.0, taken_at=10.001)  # read 1 ms, handle 2 ms
        first, second = (phases.acked, phases.live) if ack_first else (phases.live, phases.acked)
        clock.now = 10.008
        first("k")
        clock.now = 10.010
        second("k")
        clock.now = 10.012
        async with asyncio.timeout(5 * SEC):  # observed in a later loop callback
            await seen.finished.wait()
        assert phases.open == {}
        ack, live = (5, 7) if ack_first else (7, 5)
        assert sorted(seen) == sorted(
            [
                ("read", 0.001),
                ("handle", 0.002),
                ("store_ack", ack / 1000),
                ("store_to_live", live / 1000),
                ("fanout_write", (12 - (10 if ack_first else 8)) / 1000),
                ("total", 0.012),
            ]
        )


async def test_repeats_and_unknown_keys_observe_nothing():
    phases, _, seen = sampler()
    phases.sent("k", 1.0, 1.0)
    seen.clear()
    phases.acked("k")
    phases.acked("k")  # once only
    phases.acked("other")
    phases.live("other")
    assert [p for p, _ in seen] == ["store_ack"]


def test_open_samples_are_bounded_oldest_dropped_first():
    phases, _, _ = sampler()
    for n in range(MAX_OPEN + 10):  # events with no member here never come back live
        phases.sent(f"k{n}", 1.0, 1.0)
    assert len(phases.open) == MAX_OPEN
    assert next(iter(phases.open)) == "k10"
    phases.sent("k20", 1.0, 1.0)  # a resend starts over, still bounded
    assert len(phases.open) == MAX_OPEN and list(phases.open)[-1] == "k20"
