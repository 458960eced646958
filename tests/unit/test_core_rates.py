"""Rate admission in the core (shared/core/rates.py): token buckets with the time passed in."""

from __future__ import annotations

import pytest

from arqonbus_server.shared.core.rates import (
    ConnectionRates,
    FrameMeter,
    RateSpec,
    TokenBucket,
    retry_after_ms,
)


@pytest.mark.parametrize(
    ("wait_s", "expected"), [(0.0, 1), (0.0001, 1), (0.1, 100), (0.1004, 101), (2.5, 2500)]
)
def test_retry_after_ms_rounds_up_to_whole_milliseconds(wait_s: float, expected: int) -> None:
    assert retry_after_ms(wait_s) == expected


def test_a_bucket_refuses_without_taking_and_says_how_long_to_wait() -> None:
    bucket = TokenBucket(2.0, 0.0)
    assert [bucket.take(1.0, 0.0, 10.0, 2.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take(1.0, 0.0, 10.0, 2.0) == pytest.approx(0.1)
    assert bucket.tokens == pytest.approx(0.0)
    assert bucket.take(1.0, 0.1, 10.0, 2.0) == 0.0


def test_a_frame_larger_than_the_burst_needs_a_full_bucket_and_leaves_a_debt() -> None:
    bucket = TokenBucket(100.0, 0.0)
    assert bucket.take(250.0, 0.0, 100.0, 100.0) == 0.0
    assert bucket.tokens == pytest.approx(-150.0)
    assert bucket.take(1.0, 1.0, 100.0, 100.0) == pytest.approx(0.51)


SPECS = [
    (RateSpec(), False, 1.0, 1.0),
    (RateSpec(msgs_per_s=10), True, 20.0, 1.0),
    (RateSpec(msgs_per_s=10, msgs_burst=3), True, 3.0, 1.0),
    (RateSpec(bytes_per_s=1000), True, 1.0, 2000.0),
]


@pytest.mark.parametrize(("spec", "enabled", "msg_burst", "byte_burst"), SPECS)
def test_a_burst_of_zero_is_two_seconds_worth(
    spec: RateSpec, enabled: bool, msg_burst: float, byte_burst: float
) -> None:
    assert (spec.enabled, spec.msg_burst, spec.byte_burst) == (enabled, msg_burst, byte_burst)


def test_a_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="msgs_per_s must be >= 0"):
        RateSpec(msgs_per_s=-1)


def test_a_frame_refused_by_the_principal_gives_the_connection_its_tokens_back() -> None:
    connection = FrameMeter(RateSpec(msgs_per_s=10, msgs_burst=5), 0.0)
    principal = FrameMeter(RateSpec(msgs_per_s=1, msgs_burst=1), 0.0)
    rates = ConnectionRates(connection, principal)
    assert rates.admit_at(10, 0.0) == 0.0
    assert rates.admit_at(10, 0.0) == pytest.approx(1.0)
    usage = rates.report_at(0.0)
    assert usage["connection"]["msg_tokens"] == 4.0  # type: ignore[index]
    assert usage["connection"]["msgs_last_s"] == 1  # type: ignore[index]


def test_an_answer_is_charged_never_refused_and_the_next_frame_waits_for_the_debt() -> None:
    spec = RateSpec(bytes_per_s=1000, bytes_burst=1000)
    rates = ConnectionRates(FrameMeter(spec, 0.0), FrameMeter(RateSpec(), 0.0))
    rates.charge_at(3000, 0.0)
    assert rates.admit_at(100, 0.0) == pytest.approx(2.1)
    assert rates.admit_at(100, 2.1) == 0.0


def test_retune_keeps_at_most_the_new_burst_and_turns_limits_on_and_off() -> None:
    rates = ConnectionRates(FrameMeter(RateSpec(), 0.0), FrameMeter(RateSpec(), 0.0))
    assert all(rates.admit_at(10, 0.0) == 0.0 for _ in range(100))
    rates.retune(RateSpec(msgs_per_s=1, msgs_burst=2), RateSpec())
    assert [rates.admit_at(10, 0.0) for _ in range(3)][2] == pytest.approx(1.0)
    rates.retune(RateSpec(), RateSpec())
    assert rates.admit_at(10, 0.0) == 0.0


def test_release_runs_once() -> None:
    released: list[int] = []
    rates = ConnectionRates(
        FrameMeter(RateSpec(), 0.0), FrameMeter(RateSpec(), 0.0), lambda: released.append(1)
    )
    rates.close()
    rates.close()
    assert released == [1]
