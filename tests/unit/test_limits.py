"""Rate limits and connection quotas (gateway/state/limits.py): pure, with an injected clock."""

from __future__ import annotations

import pytest

from arqonbus_server.gateway.config import load_settings
from arqonbus_server.gateway.http.admission import TokenBucket, retry_after_ms
from arqonbus_server.gateway.state.limits import (
    ConnectionReports,
    FrameMeter,
    RateLimits,
    RateSpec,
    TenantConnections,
    rate_specs,
    report_key,
    welcome_limits,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the bucket ---------------------------------------------------------------------------


def test_bucket_takes_until_empty_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket(3.0, 0.0)
    assert [bucket.take(1.0, 0.0, 10.0, 3.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take(1.0, 0.0, 10.0, 3.0)
    assert wait == pytest.approx(0.1)  # one token at 10/s
    assert bucket.tokens == pytest.approx(0.0)  # a refusal takes nothing
    assert bucket.take(1.0, 0.05, 10.0, 3.0) == pytest.approx(0.05)  # half refilled
    assert bucket.take(1.0, 0.1, 10.0, 3.0) == 0.0  # exactly the advertised wait later


def test_bucket_refills_to_burst_only() -> None:
    bucket = TokenBucket(0.0, 0.0)
    bucket.take(0.0, 100.0, 10.0, 5.0)
    assert bucket.tokens == 5.0


def test_amount_above_burst_needs_a_full_bucket_and_leaves_debt() -> None:
    bucket = TokenBucket(100.0, 0.0)
    assert bucket.take(250.0, 0.0, 100.0, 100.0) == 0.0
    assert bucket.tokens == -150.0
    # Debt first, then a full bucket's worth: 1.5 s + 1 s at 100/s.
    assert bucket.take(250.0, 0.0, 100.0, 100.0) == pytest.approx(2.5)


@pytest.mark.parametrize(("wait_s", "ms"), [(0.0001, 1), (0.1, 100), (0.1234, 124), (2.0, 2000)])
def test_retry_after_ms_rounds_up(wait_s: float, ms: int) -> None:
    assert retry_after_ms(wait_s) == ms


# -- meters of a scope ----------------------------------------------------------------------


def test_messages_limit_refuses_and_recovers_after_retry_after() -> None:
    meter = FrameMeter(RateSpec(msgs_per_s=100, msgs_burst=5), 0.0)
    assert all(meter.take(10, 0.0) == 0.0 for _ in range(5))
    wait = meter.take(10, 0.0)
    assert wait == pytest.approx(0.01)
    assert meter.take(10, 0.0 + wait) == 0.0


def test_bytes_limit_refuses_without_taking_the_message_token() -> None:
    meter = FrameMeter(RateSpec(msgs_per_s=100, msgs_burst=10, bytes_per_s=1000), 0.0)
    assert meter.take(1500, 0.0) == 0.0  # byte burst defaults to 2 s = 2000
    wait = meter.take(1000, 0.0)
    assert wait == pytest.approx(0.5)  # 500 left, needs 1000 at 1000/s
    assert meter.usage(0.0)["msg_tokens"] == 9  # only the admitted frame took a token


def test_off_scope_admits_everything_but_counts_usage() -> None:
    meter = FrameMeter(RateSpec(), 0.0)
    for _ in range(10_000):
        assert meter.take(1 << 20, 0.0) == 0.0
    usage = meter.usage(0.5)
    assert usage["msgs_last_s"] == 10_000 and "msg_tokens" not in usage


def test_usage_is_the_last_second_sliding() -> None:
    meter = FrameMeter(RateSpec(msgs_per_s=1000), 0.0)
    for _ in range(10):
        meter.take(100, 0.2)
    assert meter.usage(0.2) == {"msgs_last_s": 10, "bytes_last_s": 1000, "msg_tokens": 1990}
    assert meter.usage(0.5)["msg_tokens"] == 2000  # refilled at 1000/s
    # Half-way through the next window, half of the previous one still counts.
    assert meter.usage(1.5)["msgs_last_s"] == 5
    meter.take(100, 1.6)  # rolls the window: the previous one had 10
    assert meter.usage(1.6)["msgs_last_s"] == round(1 + 10 * 0.4)
    assert meter.usage(5.0)["msgs_last_s"] == 0


def test_charge_is_never_refused_but_makes_the_next_frame_wait() -> None:
    meter = FrameMeter(RateSpec(bytes_per_s=1000, bytes_burst=1000), 0.0)
    meter.charge(3000, 0.0)
    assert meter.take(10, 0.0) == pytest.approx(2.01)


# -- connection and principal scopes ------------------------------------------------------------


def test_principal_bucket_is_shared_by_its_connections_only() -> None:
    clock = Clock()
    limits = RateLimits(RateSpec(), RateSpec(msgs_per_s=10, msgs_burst=4), clock)
    a1, a2 = limits.open("t", "alice"), limits.open("t", "alice")
    bob = limits.open("t", "bob")
    other_tenant = limits.open("u", "alice")
    assert [a1.admit(10), a2.admit(10), a1.admit(10), a2.admit(10)] == [0.0] * 4
    assert a1.admit(10) > 0 and a2.admit(10) > 0
    assert bob.admit(10) == 0.0 and other_tenant.admit(10) == 0.0
    assert a1.report()["principal"]["connections_on_gateway"] == 2  # type: ignore[index]
    a1.close()
    a1.close()  # idempotent
    assert a2.report()["principal"]["connections_on_gateway"] == 1  # type: ignore[index]
    a2.close()
    bob.close()
    other_tenant.close()
    assert len(limits) == 0  # nothing kept for principals without connections


def test_refused_by_principal_gives_the_connection_tokens_back() -> None:
    clock = Clock()
    limits = RateLimits(
        RateSpec(msgs_per_s=100, msgs_burst=100), RateSpec(msgs_per_s=1, msgs_burst=1), clock
    )
    conn = limits.open("t", "p")
    assert conn.admit(10) == 0.0
    assert conn.admit(10) == pytest.approx(1.0)
    report = conn.report()["connection"]
    assert report["msg_tokens"] == 99 and report["msgs_last_s"] == 1  # type: ignore[index]


def test_settings_resolve_bursts_and_welcome_shows_them() -> None:
    settings = load_settings(msg_rate_per_conn=50, msg_burst_per_conn=0, bytes_rate_per_conn=0)
    conn, principal = rate_specs(settings)
    assert conn.msg_burst == 100 and not principal.enabled
    welcome = welcome_limits(settings)
    assert welcome["msg_rate_per_conn"] == 50 and welcome["msg_burst_per_conn"] == 100
    assert welcome["bytes_rate_per_conn"] == 0 and welcome["msg_rate_per_principal"] == 0


def test_rate_spec_refuses_negative_values() -> None:
    with pytest.raises(ValueError, match="msgs_per_s"):
        RateSpec(msgs_per_s=-1)


# -- connections per tenant -------------------------------------------------------------------


def test_tenant_cap_counts_live_and_reserved_and_other_gateways() -> None:
    clock = Clock()
    conns = TenantConnections(3, reserve_s=10.0, clock=clock)
    assert conns.try_reserve("t") and conns.try_reserve("t")
    assert conns.try_reserve("t", others=1) is False  # 2 reserved + 1 elsewhere
    conns.claim("t")
    assert conns.count("t") == 2  # one live, one still reserved
    assert conns.try_reserve("t")
    assert not conns.try_reserve("t")
    assert conns.try_reserve("u")  # another tenant is unaffected
    clock.now += 11  # the unclaimed reservations lapse (their upgrades failed)
    assert conns.count("t") == 1
    conns.release("t")
    assert conns.count("t") == 0 and conns.refused == 2


def test_tenant_cap_off_admits_but_still_counts_live() -> None:
    conns = TenantConnections(0)
    assert all(conns.try_reserve("t") for _ in range(100))
    conns.claim("t")
    assert conns.count("t") == 1


def test_reports_of_other_gateways_count_until_they_go_stale() -> None:
    clock = Clock()
    reports = ConnectionReports("me", max_age_s=6.0, clock=clock)
    reports.update("me", {"t": 100})  # our own report is never counted twice
    reports.update("gw1", {"t": 2, "u": 1})
    reports.update("gw2", {"t": 3, "bad": "x"})  # type: ignore[dict-item]
    assert reports.others("t") == 5 and reports.others("bad") == 0
    clock.now += 4
    reports.update("gw2", {"t": 1})
    assert reports.others("t") == 3
    clock.now += 3  # gw1 stopped reporting 7 s ago
    assert reports.others("t") == 1
    reports.update("gw2", None)  # deleted (the gateway closed)
    assert reports.others("t") == 0


def test_report_key_is_a_valid_kv_key() -> None:
    assert report_key("host.example-1:8765/a b") == "host_example-1_8765_a_b"
