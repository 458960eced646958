"""bench/phases.py: phase quantiles from two scrapes of the gateway's histogram."""

from __future__ import annotations

import math

import pytest

from bench.phases import add, delta, quantile, summary

INF = math.inf


def test_quantiles_interpolate_inside_the_bucket_like_histogram_quantile():
    # 10 observations: 4 at or below 1 ms, 5 more up to 2 ms, 1 above 10 ms.
    buckets = [(0.001, 4.0), (0.002, 9.0), (0.01, 9.0), (INF, 10.0)]
    assert quantile(buckets, 0.4) == pytest.approx(0.001)
    assert quantile(buckets, 0.5) == pytest.approx(0.0012)  # 1 of the 5 in (1, 2] ms
    assert quantile(buckets, 0.99) == pytest.approx(0.01)  # +Inf: the highest finite bound
    assert math.isnan(quantile([(0.001, 0.0), (INF, 0.0)], 0.5))


def test_a_run_is_the_difference_of_two_scrapes_and_runs_add_up():
    before = {"read": [(0.001, 5.0), (INF, 6.0)]}
    after = {"read": [(0.001, 7.0), (INF, 10.0)], "total": [(0.001, 1.0), (INF, 1.0)]}
    run = delta(after, before)
    assert run == {"read": [(0.001, 2.0), (INF, 4.0)], "total": [(0.001, 1.0), (INF, 1.0)]}
    both = add(run, run)
    assert both["read"] == [(0.001, 4.0), (INF, 8.0)]
    out = summary(both)
    assert out["read"]["count"] == 8 and out["handle"]["count"] == 0
    assert math.isnan(out["handle"]["p50_ms"])
    assert out["total"]["p50_ms"] == pytest.approx(0.5)
