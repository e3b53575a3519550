"""`miaotui bench serve` against a real server: every request completes with the asked length,
and the report's numbers are consistent with each other."""

from __future__ import annotations

import asyncio
import math

import pytest

from miaotui.bench.serve import run_load

pytestmark = pytest.mark.embedded


def test_load_generator_reports_consistent_numbers(embedded_server, embedded_tokenizer):
    from miaotui.bench.throughput import make_prompts

    prompts = make_prompts(embedded_tokenizer, 6, 16)
    assert all(len(p) == 16 for p in prompts)
    report = asyncio.run(run_load(embedded_server.base_url, None, prompts, 8, concurrency=3, api_key=None))
    assert report.completed == 6 and report.failed == 0
    assert report.output_tok_s == pytest.approx(6 * 8 / report.duration_s)
    assert report.request_throughput == pytest.approx(6 / report.duration_s)
    assert 0 < report.ttft_p50_ms <= report.ttft_p99_ms < report.duration_s * 1000
    assert 0 < report.tpot_p50_ms <= report.tpot_p99_ms and 0 < report.itl_p50_ms <= report.itl_p99_ms
    assert not math.isnan(report.itl_p99_ms)


def test_failed_requests_are_counted_not_fatal(embedded_server):
    report = asyncio.run(run_load(embedded_server.base_url, "no-such-model", [[1, 2, 3]] * 2, 4,
                                  concurrency=2, api_key=None))
    assert report.completed == 0 and report.failed == 2
