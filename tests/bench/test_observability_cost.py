"""The observability-cost section's pieces: the OTLP sink counts what a real exporter sends,
and the report flags a run whose tracing exported nothing."""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from bench.otlpsink import OtlpSink
from bench.report import observability_problems, observability_table
from bench.run import observability_envs


def test_sink_counts_exported_spans() -> None:
    sink = OtlpSink()
    try:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sink.endpoint)))
        tracer = provider.get_tracer("bench-test")
        for i in range(1200):  # more than one export batch (512)
            with tracer.start_as_current_span(f"span {i}"):
                pass
        assert provider.force_flush(10_000)
        provider.shutdown()
        counts = sink.counts()
    finally:
        sink.close()
    assert counts["spans"] == 1200, counts
    assert counts["requests"] >= 3, counts
    assert counts["bad"] == 0, counts


def test_tracing_config_exports_to_the_sink_with_sampling_one() -> None:
    envs = observability_envs("http://127.0.0.1:1/v1/traces")
    assert list(envs) == ["metrics-off", "metrics-on", "metrics-tracing"]
    assert envs["metrics-off"] == {"ARQONBUS_METRICS": "false"}
    assert envs["metrics-on"] == {}
    traced = envs["metrics-tracing"]
    assert traced["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://127.0.0.1:1/v1/traces"
    assert traced["OTEL_TRACES_SAMPLER"] == "always_on"


def _section(spans: int, off_status: int = 404) -> dict[str, Any]:
    def conf(status: int, rate: float) -> dict[str, Any]:
        return {
            "env": {},
            "metrics_http_status": status,
            "fanout": {
                "deliveries": 1000,
                "deliveries_s": rate,
                "missing": 0,
                "cpu_us_per_delivery": 2.0,
            },
            "ingest": {"acked_s": 5000.0},
        }

    return {
        "configs": {
            "metrics-off": conf(off_status, 100_000.0),
            "metrics-on": conf(200, 95_000.0),
            "metrics-tracing": conf(200, 50_000.0),
        },
        "spans_received": spans,
        "export_requests": 3 if spans else 0,
        "bad_export_requests": 0,
        "traced_events": 1000,
        "spans_per_event": spans / 1000,
    }


def test_report_flags_a_run_that_exported_nothing() -> None:
    assert observability_problems(_section(3000)) == []
    assert any("no span" in p for p in observability_problems(_section(0)))
    assert any("/metrics" in p for p in observability_problems(_section(3000, off_status=200)))
    assert observability_problems(None) == ["observability cost: section missing"]


def test_table_has_ratios_to_metrics_off() -> None:
    text = observability_table(_section(3000))
    assert (
        "| metrics on (default) | 95,000 | 2.00 | 5,000 | 0.95\u00d7 | 1.00\u00d7 | 1.00\u00d7 |"
        in text
    )
    assert "3,000 in 3 export requests, 3.00 per traced event" in text
