"""The audit log's pure parts: redaction, truncation, --since, the throttle, the bounded queue."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from arqonbus_server.gateway.state import audit
from arqonbus_server.gateway.state.audit import (
    MAX_STRING,
    AuditLog,
    AuditThrottle,
    make_event,
    parse_since,
    redact,
    rule_name,
    scrub_text,
)
from arqonbus_server.mesh.audit import JetStreamAuditSink
from arqonbus_server.mesh.jetstream import JetStreamBroker
from arqonbus_server.mesh.streams import StreamPolicy
from arqonbus_server.shared.subjects import SubjectScheme
from tests.timeouts import SEC

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiJhbGljZSIsInRlbmFudCI6ImFjbWUifQ."
    "c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
)


def test_secret_looking_keys_are_dropped_at_any_depth() -> None:
    details = {
        "token": "t1",
        "api_TOKEN": "t2",
        "client_secret": "s",
        "Password": "p",
        "key_hash": "h",
        "signature": "sig",
        "private_key": "pk",
        "Authorization": "Bearer x",
        "key_id": "k123",
        "nested": {"refresh_token": "r", "room": "lobby", "deeper": {"secret": "s2", "n": 1}},
        "items": [{"password": "p2", "ok": True}],
    }
    clean = redact(details)
    assert clean == {
        "key_id": "k123",
        "nested": {"room": "lobby", "deeper": {"n": 1}},
        "items": [{"ok": True}],
    }
    text = orjson.dumps(clean).decode()
    for secret in ("t1", "t2", '"s"', '"p"', '"h"', "sig", "pk", "Bearer", "s2", "p2"):
        assert secret not in text


def test_credentials_inside_values_are_replaced() -> None:
    reason = f"bad token {JWT} from Bearer abc.def and arqk_0123456789ab_SECRETPART, ed25519:AAAA"
    text = scrub_text(reason)
    assert JWT not in text and "eyJ" not in text
    assert "SECRETPART" not in text and "abc.def" not in text and "AAAA" not in text
    assert "[jwt redacted]" in text and "arqk_[redacted]" in text


def test_long_strings_are_truncated_and_structures_bounded() -> None:
    clean = redact(
        {"reason": "x" * 5000, "many": list(range(100)), "deep": {"a": {"b": {"c": {"d": 1}}}}}
    )
    assert len(clean["reason"]) == MAX_STRING and clean["reason"].endswith("[truncated]")
    assert len(clean["many"]) == audit.MAX_ITEMS
    assert clean["deep"] == {"a": {"b": {"c": "[nested too deep]"}}}
    wide = redact({f"k{i}": i for i in range(100)})
    assert len(wide) == audit.MAX_DETAILS + 1 and "_more" in wide


def test_event_shape() -> None:
    now = datetime(2025, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)
    event = make_event("acme", "forbidden", "alice", "gw1", {"room": "r", "token": JWT}, now)
    assert event["ts"] == "2025-01-31T12:00:00.123Z"
    assert (event["type"], event["tenant"], event["principal"], event["node"]) == (
        "forbidden",
        "acme",
        "alice",
        "gw1",
    )
    assert event["details"] == {"room": "r"}
    assert len(event["id"]) == 32


def test_names_keep_audit_streams_apart_from_tenant_streams() -> None:
    scheme = SubjectScheme("arq")
    # Tenant "audit_x" and the audit stream of tenant "x" never share a name.
    assert audit.stream_name("arq", "x") != scheme.stream_name("audit_x")
    assert audit.stream_name("arq", "x") != scheme.stream_name("-audit_x".lstrip("-"))
    assert audit.stream_name("arq", "x") == "arq-audit_x"
    assert audit.subject("arq", "x", "forbidden") == "arq.audit.x.forbidden"
    assert not audit.tenant_filter("arq", "x").startswith(scheme.tenant_ingest_filter("x")[:-1])


@pytest.mark.parametrize(
    ("text", "delta"),
    [("30s", 30), ("30m", 1800), ("1h", 3600), ("2d", 2 * 86400), ("1w", 7 * 86400), (" 5M ", 300)],
)
def test_since_durations(text: str, delta: int) -> None:
    now = datetime(2025, 6, 1, tzinfo=UTC)
    assert parse_since(text, now) == now - timedelta(seconds=delta)


def test_since_iso_times() -> None:
    assert parse_since("2025-01-31T12:00:00Z") == datetime(2025, 1, 31, 12, tzinfo=UTC)
    assert parse_since("2025-01-31T12:00:00") == datetime(2025, 1, 31, 12, tzinfo=UTC)
    assert parse_since("2025-01-31T14:00:00+02:00") == datetime(2025, 1, 31, 12, tzinfo=UTC)
    assert parse_since("2025-01-31") == datetime(2025, 1, 31, tzinfo=UTC)


@pytest.mark.parametrize("text", ["", "yesterday", "1y", "-1h", "1.5h", "h", "2025-13-01"])
def test_bad_since_says_what_to_use(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration \(30s, 30m, 1h, 2d, 1w\).*ISO 8601"):
        parse_since(text)


def test_rule_name_from_policy_messages() -> None:
    assert rule_name("the payload matches deny rule 'no-ssn'") == "no-ssn"
    assert rule_name("field 'payload.qty' fails 'minimum' in the schema of rule \"it's\"") == "it's"
    assert rule_name("custom message without a name") == ""


def test_throttle_one_record_per_key_per_window_with_repeat_count() -> None:
    now = [0.0]
    throttle = AuditThrottle(window_s=10.0, per_window=100, clock=lambda: now[0])
    assert throttle.check(("publish", "r", "c")) == 0
    for _ in range(50):
        assert throttle.check(("publish", "r", "c")) is None
    assert throttle.check(("publish", "r", "other")) == 0  # another key is its own
    now[0] = 10.0
    assert throttle.check(("publish", "r", "c")) == 50
    assert throttle.check(("publish", "r", "c")) is None


def test_throttle_caps_distinct_keys_per_window() -> None:
    now = [0.0]
    throttle = AuditThrottle(window_s=10.0, per_window=5, max_keys=8, clock=lambda: now[0])
    recorded = [throttle.check(("publish", "r", f"c{i}")) for i in range(1000)]
    assert sum(r is not None for r in recorded) == 5
    assert throttle.take_overflow() == 995 and throttle.take_overflow() == 0
    now[0] = 10.0
    assert throttle.check(("publish", "r", "new")) == 0


def _unconnected_sink() -> JetStreamAuditSink:
    # A real sink on a broker that is never connected: record() must not need NATS.
    return JetStreamAuditSink(
        JetStreamBroker(["nats://127.0.0.1:1"], SubjectScheme("arq"), StreamPolicy())
    )


async def test_bounded_queue_drops_and_counts() -> None:
    log = AuditLog(_unconnected_sink(), "gw", queue_max=100)
    for i in range(250):
        log.record("acme", audit.FORBIDDEN, "alice", n=i)
    assert log.stats() == {"written": 0, "dropped": 150, "queued": 100}


async def test_record_never_raises_and_drops_invalid_names() -> None:
    log = AuditLog(_unconnected_sink(), "gw")
    log.record("bad tenant!", audit.FORBIDDEN)
    log.record("acme", "no.dots")
    log.record("acme", audit.FORBIDDEN, "alice", weird=object(), when=datetime.now(UTC))
    assert log.dropped == 2 and log.stats()["queued"] == 1


async def test_close_gives_up_after_its_timeout_without_nats() -> None:
    log = AuditLog(_unconnected_sink(), "gw")
    log.start()
    for _ in range(3):
        log.record("acme", audit.AUTH_FAILED, reason="x")
    started = time.monotonic()
    await log.close(timeout=0.3 * SEC)
    assert time.monotonic() - started < 2.0
    assert log.written == 0 and log.dropped == 3


async def test_without_broker_events_only_go_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog(None, "gw")
    with caplog.at_level("INFO", logger="arqonbus.gateway.audit"):
        log.record("acme", audit.AUTH_FAILED, "bob", token=JWT, reason=f"bad {JWT}")
    assert "auth_failed" in caplog.text and JWT not in caplog.text
