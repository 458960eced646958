"""Admission control: the per-address token bucket, its bounded table, the pending cap."""

from __future__ import annotations

import pytest

from arqonbus_server.gateway.http.admission import (
    PendingHandshakes,
    RateLimiter,
    peer_key,
    retry_after_header,
    retry_after_ms,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# (rate/s, burst, [(time offset s, expected wait s or 0.0 for admitted), ...]) for one address
BUCKET_CASES = [
    pytest.param(
        1.0, 2, [(0.0, 0.0), (0.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (1.0, 1.0)], id="r1b2"
    ),
    pytest.param(10.0, 1, [(0.0, 0.0), (0.0, 0.1), (0.05, 0.05), (0.1, 0.0)], id="r10b1"),
    # a refused attempt takes nothing: waiting the announced time is always enough
    pytest.param(2.0, 1, [(0.0, 0.0), (0.1, 0.4), (0.2, 0.3), (0.5, 0.0)], id="refusal-free"),
    # refill is capped at the burst however long the address was quiet
    pytest.param(
        5.0, 3, [(0.0, 0.0), (100.0, 0.0), (100.0, 0.0), (100.0, 0.0), (100.0, 0.2)], id="cap"
    ),
    # the clock going backwards never mints tokens
    pytest.param(1.0, 1, [(5.0, 0.0), (4.0, 1.0), (5.0, 1.0), (6.0, 0.0)], id="backwards"),
]


@pytest.mark.parametrize(("rate", "burst", "steps"), BUCKET_CASES)
def test_token_bucket(rate: float, burst: int, steps: list[tuple[float, float]]) -> None:
    clock = FakeClock()
    start = clock.now
    limiter = RateLimiter(rate, burst, clock=clock)
    for i, (at, expected) in enumerate(steps):
        clock.now = start + at
        assert limiter.take("10.0.0.1") == pytest.approx(expected, abs=1e-9), f"step {i}"


def test_addresses_have_separate_buckets() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    assert limiter.take("127.0.0.1") == 0.0
    assert limiter.take("127.0.0.1") > 0
    assert limiter.take("127.0.0.2") == 0.0
    assert limiter.refused == 1


def test_zero_rate_is_off_and_stores_nothing() -> None:
    limiter = RateLimiter(0, 1, clock=FakeClock())
    assert not limiter.enabled
    assert all(limiter.take(f"10.0.{i // 256}.{i % 256}") == 0.0 for i in range(1000))
    assert len(limiter) == 0


def test_full_buckets_expire() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, 5, clock=clock)  # refills completely in 0.5 s
    for i in range(20):
        limiter.take(f"10.0.0.{i}")
    assert len(limiter) == 20
    clock.now += 0.49
    limiter.take("10.0.1.1")
    assert len(limiter) == 21  # not full yet: kept
    clock.now += 0.02
    limiter.take("10.0.1.2")
    # the first 20 refilled (dropped), the one touched 0.02 s ago is kept, plus the new one
    assert len(limiter) == 2


def test_an_expired_bucket_comes_back_full() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 2, clock=clock)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    clock.now += 2.0  # refilled: 2 tokens again, whether the bucket was dropped or not
    limiter.take("b")
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0


def test_table_is_capped_least_recently_used_first() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 1, max_entries=3, clock=clock)
    for ip in ("a", "b", "c"):
        assert limiter.take(ip) == 0.0
    assert limiter.take("a") > 0  # "a" is now the most recently used
    assert limiter.take("d") == 0.0  # evicts "b"
    assert len(limiter) == 3
    assert limiter.evicted == 1
    assert limiter.take("a") > 0  # "a" kept its empty bucket
    assert limiter.take("c") > 0
    assert limiter.take("b") == 0.0  # "b" was evicted: a fresh bucket


def test_table_stays_bounded_under_many_addresses() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 10, max_entries=1000, clock=clock)
    for i in range(50_000):
        limiter.take(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(limiter) == 1000


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("not-an-ip:", "not-an-ip:"),
        ("", ""),
    ],
)
def test_peer_key(ip: str, key: str) -> None:
    assert peer_key(ip) == key


def test_one_ipv6_network_shares_a_bucket() -> None:
    limiter = RateLimiter(1.0, 1, clock=FakeClock())
    assert limiter.take("2001:db8::1") == 0.0
    assert limiter.take("2001:db8::2") > 0
    assert limiter.take("2001:db8:0:1::1") == 0.0


def test_pending_cap_per_address() -> None:
    told: list[None] = []
    pending = PendingHandshakes(2, lambda: told.append(None))
    assert pending.acquire("10.0.0.1")
    assert pending.acquire("10.0.0.1")
    assert not pending.acquire("10.0.0.1")
    assert pending.acquire("10.0.0.2")  # another address is not affected
    assert pending.refused == 1
    assert len(told) == 1  # each refusal is told (the gateway counts it in a metric)
    pending.release("10.0.0.1")
    assert pending.pending("10.0.0.1") == 1
    assert pending.acquire("10.0.0.1")
    for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        pending.release(ip)
    assert len(pending) == 0  # counters exist only while something is pending


@pytest.mark.parametrize(
    ("wait_s", "header", "ms"),
    [(0.0001, "1", 1), (0.5, "1", 500), (1.0, "1", 1000), (1.2, "2", 1200)],
)
def test_retry_after_values(wait_s: float, header: str, ms: int) -> None:
    assert retry_after_header(wait_s) == header
    assert retry_after_ms(wait_s) == ms


@pytest.mark.parametrize(
    ("rate", "burst", "max_entries"), [(-1.0, 1, 10), (1.0, 0, 10), (1.0, 1, 0)]
)
def test_invalid_limits(rate: float, burst: int, max_entries: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst, max_entries=max_entries)
