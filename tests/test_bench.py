"""The throughput benchmark's plumbing (numbers are not asserted: wall-clock is noise here)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_throughput_json_against_hf(tiny_model_factory):
    path = tiny_model_factory("llama")
    r = subprocess.run(
        [sys.executable, "-c", "from hpcserve.cli import main; main()", "bench", "throughput", "--model", str(path),
         "--num-prompts", "4", "--input-len", "8", "--output-len", "8", "--baseline", "hf", "--threads", "1",
         "--repeats", "2", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) >= {"hpcserve", "baseline", "ratio", "greedy_match", "config"}
    assert res["baseline"]["name"] == "hf"
    assert len(res["hpcserve"]["runs_s"]) == 2 and len(res["baseline"]["runs_s"]) == 2
    assert res["ratio"] == res["hpcserve"]["tokens_per_s"] / res["baseline"]["tokens_per_s"]
    assert res["greedy_match"] == 1.0  # same greedy tokens as transformers on every prompt
