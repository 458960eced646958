"""The metrics shell: bounded label cardinality, the no-op twin, frame and close labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from arqonbus_server.gateway.http.metrics import (
    NO_METRICS,
    OTHER,
    BatchCounts,
    PrometheusMetrics,
    close_label,
    metrics_from,
    sent_type,
)
from arqonbus_server.mesh.batch import AtomicPublishDisabled, BatchDuplicate
from arqonbus_server.mesh.ingest import IngestStats, refusal_reason
from arqonbus_server.shared.core import effects as fx
from arqonbus_server.shared.envelope import encode_ack, encode_error, encode_welcome
from arqonbus_server.shared.errors import MESSAGE_RATE_LIMITED, ArqonError
from arqonbus_server.shared.settings import settings_from

# Label names any metric may carry: none names a room or a channel.
ALLOWED_LABELS = {"type", "code", "duplicate", "kind", "outcome", "method", "scope", "event"}
ALLOWED_LABELS |= {"operation", "bucket", "le", "tenant", "reason"}


def label_values(metrics: PrometheusMetrics, label: str) -> set[str]:
    text = metrics.render().decode()
    return {
        s.labels[label]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if label in s.labels
    }


def busy(metrics: PrometheusMetrics, tenants: int) -> None:
    for n in range(tenants):
        metrics.publish_acked(0.001, f"tenant{n}")
        metrics.publish_refused("forbidden", f"tenant{n}")


def test_tenant_label_is_off_by_default() -> None:
    metrics = metrics_from(settings_from({}))
    assert isinstance(metrics, PrometheusMetrics)
    busy(metrics, 20)
    assert label_values(metrics, "tenant") == set()
    assert 'tenant="' not in metrics.render().decode()


def test_tenants_beyond_the_cap_are_counted_as_other() -> None:
    settings = settings_from(
        {"ARQONBUS_METRICS_TENANT_LABELS": "true", "ARQONBUS_METRICS_MAX_TENANTS": "3"}
    )
    metrics = metrics_from(settings)
    assert isinstance(metrics, PrometheusMetrics)
    busy(metrics, 10)
    assert label_values(metrics, "tenant") == {"tenant0", "tenant1", "tenant2", OTHER}
    text = metrics.render().decode()
    assert 'arqonbus_publishes_acked_total{duplicate="false",tenant="other"} 7.0' in text
    assert 'arqonbus_publishes_refused_total{code="forbidden",tenant="tenant1"} 1.0' in text


def test_no_metric_has_a_room_or_channel_label() -> None:
    metrics = PrometheusMetrics(tenant_labels=True, max_tenants=5)
    metrics.observe(lambda: 1, lambda: 1, lambda: 1, lambda: (1, 1))
    busy(metrics, 3)
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)


def test_close_codes_outside_the_protocol_become_other() -> None:
    metrics = PrometheusMetrics()
    for code in (1000, 4001, 3000, 3999, 4999, None):
        metrics.connection_opened()
        metrics.connection_closed(code)
    assert label_values(metrics, "code") == {"1000", "4001", "none", OTHER}
    assert close_label(4321) == OTHER
    assert "arqonbus_slow_consumer_closes_total 1.0" in metrics.render().decode()


def test_sent_types_come_from_a_fixed_set() -> None:
    assert sent_type(encode_ack("id", "r", "c", 1, False)) == "ack"
    assert sent_type(encode_welcome("s", "n", {})) == "welcome"
    assert sent_type(b'{"version":"1.0","id":"x","type":"event"}') == "event"
    assert sent_type(b'{"version":"1.0","type":"surprise"}') == OTHER


def test_refusals_of_events_are_counted_by_code_and_rate_limits_apart() -> None:
    metrics = PrometheusMetrics()
    limited = encode_error(ArqonError(MESSAGE_RATE_LIMITED, "retry", "e1"))
    metrics.frame_handled("event", "t", [fx.Send(limited)])
    metrics.frame_handled("command", "t", [fx.Send(limited)])
    text = metrics.render().decode()
    assert 'arqonbus_publishes_refused_total{code="rate_limited"} 1.0' in text
    assert 'arqonbus_rate_limited_total{scope="message"} 2.0' in text


def test_metrics_off_is_the_no_op_twin() -> None:
    metrics = metrics_from(settings_from({"ARQONBUS_METRICS": "false"}))
    assert metrics is NO_METRICS and not metrics.enabled
    metrics.publish_acked(0.1, "t")
    assert metrics.render() == b""


def test_each_gateway_has_its_own_registry() -> None:
    first, second = PrometheusMetrics(), PrometheusMetrics()
    first.publish_acked(0.01, "t")
    assert "arqonbus_publish_ack_latency_seconds_count 1.0" in first.render().decode()
    assert "arqonbus_publish_ack_latency_seconds_count 0.0" in second.render().decode()


def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    metrics = PrometheusMetrics()
    for latency in (0.005, 0.005, 0.02, 99.0):
        metrics.publish_acked(latency, "t")
    text = metrics.render().decode()
    name = "arqonbus_publish_ack_latency_seconds"
    assert f'{name}_bucket{{le="0.005"}} 2.0' in text
    assert f'{name}_bucket{{le="0.025"}} 3.0' in text
    assert f'{name}_bucket{{le="10.0"}} 3.0' in text
    assert f'{name}_bucket{{le="+Inf"}} 4.0' in text
    assert f"{name}_count 4.0" in text
    assert f"{name}_sum 99.03" in text


def test_malformed_trace_fields_are_counted_on_metrics() -> None:
    from arqonbus_server.gateway.tracing import counters

    def scraped() -> float:
        text = PrometheusMetrics().render().decode()
        [family] = [
            f
            for f in text_string_to_metric_families(text)
            if f.name == "arqonbus_trace_fields_malformed"
        ]
        return float(family.samples[0].value)

    before = scraped()
    counters.malformed_trace_fields += 2
    try:
        assert scraped() == before + 2
    finally:
        counters.malformed_trace_fields -= 2


def test_publish_batching_is_read_at_each_scrape() -> None:
    metrics = PrometheusMetrics()
    stats = IngestStats()
    metrics.observe_batches(lambda: BatchCounts(stats.batches, stats.events, stats.alone,
                                                stats.refusals))  # fmt: skip
    text = metrics.render().decode()
    assert "arqonbus_publish_batches_total 0.0" in text
    stats.batches, stats.events, stats.alone = 3, 1200, 40
    stats.refusals.update({refusal_reason(BatchDuplicate(10201, "dup")): 2})
    stats.refusals[refusal_reason(AtomicPublishDisabled(10174, "off"))] = 1
    text = metrics.render().decode()
    assert "arqonbus_publish_batches_total 3.0" in text
    assert "arqonbus_publish_batched_events_total 1200.0" in text
    assert "arqonbus_publish_unbatched_events_total 40.0" in text
    assert 'arqonbus_publish_batch_refusals_total{reason="duplicate"} 2.0' in text
    assert 'arqonbus_publish_batch_refusals_total{reason="atomic_publish_disabled"} 1.0' in text
