"""The throughput benchmark's plumbing and fairness rules (numbers are not asserted: wall-clock is noise
here): fresh prompts per round, prefix cache off by default, like-for-like compute dtypes."""

from __future__ import annotations

import json
import subprocess
import sys

from hpcserve.bench import machine
from hpcserve.bench.throughput import _run_hpcserve, round_prompts


def _bench(path, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", "from hpcserve.cli import main; main()", "bench", "throughput", "--model", str(path),
         "--num-prompts", "4", "--output-len", "8", "--threads", "1", "--repeats", "2", "--json", *args],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check_machine(res: dict) -> None:
    m = res["machine"]
    assert set(m["cpu"]["flags"]) == set(machine.CPU_FLAGS)
    assert m["cpu"]["model_name"]
    assert m["paths"]["gemm"] in ("packed_avx2", "onednn", "f_linear")
    assert m["paths"]["attention"] in ("kernels", "torch")
    # fused CPU ops exist for fp32 compute only
    assert m["paths"]["fused_cpu_ops"] in ((True, False) if res["hpcserve"]["compute_dtype"] == "float32" else (False,))


def test_bench_throughput_json_against_hf(tiny_model_factory):
    res = _bench(tiny_model_factory("llama"), "--input-len", "8", "--baseline", "hf")
    assert set(res) >= {"hpcserve", "baseline", "baseline_native", "ratio", "greedy_match", "machine", "config"}
    h, b = res["hpcserve"], res["baseline"]
    assert b["name"] == "hf" and res["baseline_native"] is None
    assert len(h["runs_s"]) == 2 and len(b["runs_s"]) == 2
    assert res["ratio"] == h["tokens_per_s"] / b["tokens_per_s"]
    assert res["greedy_match"] == 1.0  # same greedy tokens as transformers on every prompt of every round
    # defaults: no prefix cache, nothing served from one on either side
    assert h["prefix_caching"] is False and res["config"]["prefix_caching"] is False
    assert h["num_cached_tokens"] == 0 and b["num_cached_tokens"] == 0
    assert h["checkpoint_dtype"] == b["checkpoint_dtype"] == "float32"
    assert h["compute_dtype"] == b["compute_dtype"] == "float32"
    _check_machine(res)


def test_bench_throughput_prefix_caching_flag_and_bf16_like_for_like(tiny_model_factory):
    # 40-token prompts fill two 16-token blocks: with the cache on, a prompt seen before would be served
    # from it. Every round draws new prompts, so nothing is, even with --prefix-caching.
    res = _bench(tiny_model_factory("llama"), "--input-len", "40", "--dtype", "bfloat16", "--baseline", "hf",
                 "--prefix-caching")
    h, b = res["hpcserve"], res["baseline"]
    assert h["prefix_caching"] is True and res["config"]["prefix_caching"] is True
    assert h["num_cached_tokens"] == 0 and b["num_cached_tokens"] == 0
    assert h["checkpoint_dtype"] == b["checkpoint_dtype"] == "bfloat16"
    # the baseline computes in whatever hpcserve computes in here (fp32 on CPUs without native bf16)
    assert b["compute_dtype"] == h["compute_dtype"] == ("bfloat16" if res["machine"]["native_bf16"] else "float32")
    _check_machine(res)


def test_rounds_get_fresh_prompts_and_reuse_would_be_counted(tiny_model_factory):
    from hpcserve.engine.core import EngineConfig, LLMEngine

    a0, a1, warm = (round_prompts(3, r, 4, 40, 256) for r in (0, 1, "warmup"))
    assert a0 == round_prompts(3, 0, 4, 40, 256)                     # seeded by (seed, round)
    assert a0 != round_prompts(4, 0, 4, 40, 256)
    assert {tuple(p[:16]) for p in a0}.isdisjoint(tuple(p[:16]) for p in a1 + warm)  # no first block shared
    assert all(len(p) == 40 and all(64 <= t < 256 for t in p) for p in a0)
    # the counter the benchmark reports does see reuse: the same prompts twice on a caching engine
    engine = LLMEngine(EngineConfig(model=str(tiny_model_factory("llama")), max_model_len=64,
                                    enable_prefix_caching=True))
    assert _run_hpcserve(engine, a0, 2, "first")[2] == 0
    assert _run_hpcserve(engine, a1, 2, "fresh")[2] == 0
    assert _run_hpcserve(engine, a0, 2, "again")[2] == 4 * 32  # two full blocks of each prompt


def test_cpu_info_parses_flags():
    text = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_tile\n\nprocessor\t: 1\n"
    info = machine.cpu_info(text)
    assert info["model_name"] == "Some CPU"
    assert info["flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": False, "amx_bf16": False,
                             "amx_tile": True}
    assert set(machine.cpu_info("")["flags"].values()) == {None}  # unknown, not "absent"
    lines = machine.describe({"cpu": info, "torch": "x", "torch_threads": 1, "native_bf16": False,
                              "paths": {"gemm": "onednn", "fused_cpu_ops": False, "attention": "torch"}})
    assert "avx512_bf16-" in lines[0] and "GEMM onednn" in lines[2] and "fused CPU ops off" in lines[2]
