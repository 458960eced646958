"""Per-tenant limit overrides: the model, its validation and the effective values."""

from __future__ import annotations

import math

import orjson
import pytest

from arqonbus_server.gateway.config import load_settings
from arqonbus_server.gateway.state.limits import RateLimits, TenantConnections
from arqonbus_server.gateway.state.tenant_limits import TenantLimitsTable
from arqonbus_server.shared.core.rates import RateSpec
from arqonbus_server.shared.tenant_limits import FIELDS, TenantLimits, TenantLimitsError


def test_parse_keeps_only_the_given_fields() -> None:
    limits = TenantLimits.parse({"max_connections": 5, "msg_rate_per_conn": 2.5})
    assert limits.max_connections == 5 and limits.msg_rate_per_conn == 2.5
    assert limits.max_stored_bytes is None
    assert limits.as_dict() == {"max_connections": 5, "msg_rate_per_conn": 2.5}
    assert TenantLimits.from_json(limits.to_json()) == limits


def test_zero_is_allowed_and_whole_floats_become_integers() -> None:
    limits = TenantLimits.parse({"max_connections": 0, "max_stored_bytes": 1024.0})
    assert limits.max_connections == 0
    assert limits.max_stored_bytes == 1024 and type(limits.max_stored_bytes) is int


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"max_conections": 1}, "unknown tenant limit 'max_conections'"),
        ({"max_connections": -1}, "max_connections must be between 0"),
        ({"max_connections": 1.5}, "whole number"),
        ({"max_connections": True}, "must be a number"),
        ({"msg_rate_per_conn": "10"}, "must be a number"),
        ({"msg_rate_per_conn": -0.1}, "msg_rate_per_conn must be between 0"),
        ({"bytes_rate_per_conn": math.inf}, "must be between 0"),
        ({"bytes_rate_per_conn": math.nan}, "must be between 0"),
        ({"max_stored_bytes": 2**60}, "must be between 0"),
    ],
)
def test_invalid_records_say_what_is_wrong(doc: object, message: str) -> None:
    with pytest.raises(TenantLimitsError, match=message):
        TenantLimits.parse(doc)


def test_invalid_json_is_refused() -> None:
    with pytest.raises(TenantLimitsError, match="not valid JSON"):
        TenantLimits.from_json(b"{nope")


def test_the_constructor_validates_too() -> None:
    with pytest.raises(TenantLimitsError):
        TenantLimits(max_connections=-3)


def test_merged_replaces_only_the_given_fields() -> None:
    stored = TenantLimits(max_connections=3, msg_rate_per_conn=10)
    merged = stored.merged(TenantLimits(msg_rate_per_conn=20, max_stored_bytes=4096))
    assert merged.as_dict() == {
        "max_connections": 3,
        "msg_rate_per_conn": 20,
        "max_stored_bytes": 4096,
    }


def test_every_field_names_an_existing_setting() -> None:
    settings = load_settings()
    for name, (_, setting) in FIELDS.items():
        assert hasattr(settings, setting), name
    assert set(FIELDS) == set(TenantLimits.__dataclass_fields__)


def test_effective_values_take_the_settings_where_no_override() -> None:
    settings = load_settings(max_connections_per_tenant=7, msg_rate_per_conn=100)
    store = {"a": orjson.dumps({"max_connections": 1, "msg_rate_per_conn": 2})}
    table = TenantLimitsTable(settings, store.get)
    assert table.max_connections("a") == 1 and table.max_connections("b") == 7
    assert table.max_stored_bytes("a") == settings.tenant_max_bytes
    conn, principal = table.rate_specs("a")
    assert conn.msgs_per_s == 2 and conn.bytes_per_s == settings.bytes_rate_per_conn
    assert principal.msgs_per_s == settings.msg_rate_per_principal
    assert table.rate_specs("b")[0].msgs_per_s == 100
    assert table.effective("a")["msg_rate_per_conn"] == 2
    assert table.effective("b")["max_connections"] == 7

    store["a"] = orjson.dumps({"max_connections": 4})  # a changed record is read again
    assert table.max_connections("a") == 4
    del store["a"]
    assert table.max_connections("a") == 7


def test_an_invalid_stored_record_gives_the_settings() -> None:
    settings = load_settings(max_connections_per_tenant=7)
    table = TenantLimitsTable(settings, {"a": b'{"max_connections": -1}'}.get)
    assert table.max_connections("a") == 7


def test_rate_limits_open_meters_with_the_tenants_rates() -> None:
    now = [0.0]
    settings = load_settings(msg_rate_per_conn=0, bytes_rate_per_conn=0)
    store = {"slow": orjson.dumps({"msg_rate_per_conn": 1, "msg_burst_per_conn": 1})}
    rates = RateLimits(RateSpec(), RateSpec(), clock=lambda: now[0])
    rates.tenant_limits = TenantLimitsTable(settings, store.get)
    slow = rates.open("slow", "p")
    free = rates.open("free", "p")
    assert slow.admit(10) == 0.0 and slow.admit(10) > 0  # one frame, then wait
    assert all(free.admit(10) == 0.0 for _ in range(50))

    # A live connection picks up a change.
    store["slow"] = orjson.dumps({"msg_rate_per_conn": 0})
    slow.retune(*rates.specs("slow"))
    assert all(slow.admit(10) == 0.0 for _ in range(50))
    free.retune(RateSpec(1, 1), RateSpec())
    assert free.admit(10) == 0.0 and free.admit(10) > 0


def test_retune_keeps_at_most_the_new_burst() -> None:
    now = [0.0]
    rates = RateLimits(RateSpec(100, 100), RateSpec(), clock=lambda: now[0])
    conn = rates.open("t", "p")
    conn.retune(RateSpec(1, 2), RateSpec())
    assert conn.admit(1) == 0.0 and conn.admit(1) == 0.0 and conn.admit(1) > 0


def test_tenant_connections_take_the_tenants_own_cap() -> None:
    conns = TenantConnections(0)  # the gateway setting: off
    assert conns.try_reserve("a", 0, limit=1)
    conns.claim("a")
    assert not conns.try_reserve("a", 0, limit=1)
    assert conns.try_reserve("a", 0, limit=0)  # an override of 0: off
    assert conns.try_reserve("a")  # no override: the setting (off)
