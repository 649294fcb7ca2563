"""Percentiles, leg summaries and text comparison (bench/stats.py)."""

from __future__ import annotations

import math

import pytest

from bench.stats import LegResult, RequestRecord, percentile, summarize, texts_equal


def test_percentile_interpolates_between_order_statistics():
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.95) == pytest.approx(3.85)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0
    assert percentile([7.0], 0.95) == 7.0
    assert percentile(list(range(101)), 0.95) == pytest.approx(95.0)


def test_percentile_empty_and_missing_values():
    assert math.isnan(percentile([], 0.5))
    assert math.isnan(percentile([None, math.nan], 0.5))
    assert percentile([None, 2.0, math.nan, 4.0], 0.5) == pytest.approx(3.0)


def test_percentile_refuses_q_outside_0_1():
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], 95)


def _leg(system="server", records=None, wall=2.0):
    records = records or [
        RequestRecord(200, 1.0, 0.2, 32, "a"),
        RequestRecord(200, 2.0, 0.4, 10, "b"),  # early stop
        RequestRecord(500, 0.1, error="HTTP 500: boom"),
    ]
    return LegResult(system, records, wall, 0.5, max_new_tokens=32, extra={"engine": {"x": 1}})


def test_summarize_counts_tokens_of_finished_requests_only():
    s = summarize(_leg())
    assert s["requests"] == 3 and s["failed_requests"] == 1 and s["errors"] == ["HTTP 500: boom"]
    assert s["completion_tokens"] == 42
    assert s["tokens_per_s"] == pytest.approx(21.0)
    assert s["requests_per_s"] == pytest.approx(1.0)
    assert s["early_stops"] == 1
    assert s["latency_p50_s"] == pytest.approx(1.5)
    assert s["ttft_p50_s"] == pytest.approx(0.3)
    assert s["load_avg_1min_at_start"] == 0.5 and s["engine"] == {"x": 1}


def test_texts_equal_compares_requests_both_finished():
    a = _leg()
    b = _leg("vllm", [RequestRecord(200, 1, None, 1, "a"), RequestRecord(200, 1, None, 1, "B"),
                      RequestRecord(200, 1, None, 1, "c")])
    assert texts_equal(b, a) == (1, 2)
