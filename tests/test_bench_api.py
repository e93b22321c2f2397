"""``hpcserve bench api`` on a tiny random model: both front ends measured on one real daemon,
identical greedy text per request pair, every request exactly max_tokens long."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_api_runs_both_front_ends(tiny_model_factory):
    model = tiny_model_factory("llama")
    out = subprocess.run([sys.executable, "-m", "hpcserve", "bench", "api", "--model", str(model), "--requests", "4",
                          "--concurrency", "3", "--max-tokens", "6", "--rounds", "1", "--json"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["parity"] == {"identical": 4, "pairs": 4}
    for k in ("grpc", "http"):
        assert res[k]["tokens_per_request"] == 6
        assert res[k]["ttft_p50_s"] > 0 and res[k]["latency_p50_s"] >= res[k]["ttft_p50_s"]
        assert res[k]["concurrent_tokens_per_s"] > 0
    assert res["ratio_http_over_grpc"]["latency_p50_s"] == pytest.approx(
        res["http"]["latency_p50_s"] / res["grpc"]["latency_p50_s"])


def test_format_table_shows_ratios():
    from hpcserve.bench.api import format_table

    side = {"ttft_p50_s": 0.1, "latency_p50_s": 1.0, "tokens_per_request": 32, "concurrent_tokens_per_s": 100.0}
    res = {"concurrency": 8, "grpc": side, "http": {**side, "ttft_p50_s": 0.2},
           "ratio_http_over_grpc": {"ttft_p50_s": 2.0, "latency_p50_s": 1.0, "concurrent_tokens_per_s": 1.0},
           "parity": {"identical": 3, "pairs": 4}}
    table = format_table(res)
    assert "2.000" in table and "3/4 request pairs" in table
