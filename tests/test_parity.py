"""Parity of the hpcserve engine (paged KV, chunked prefill, prefix cache, preemption)
against Hugging Face transformers as the reference, on tiny random models (the engine
driver and the comparison are in tests/parity_harness.py).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from parity_harness import (  # noqa: E402
    FP32_ATOL,
    MAX_ERR,
    check_logits,
    hf_greedy,
    hf_logits,
    make_engine,
    make_prompt,
    record,
    run,
)

CASES = [
    pytest.param("llama", True, {}, id="llama-tied"),
    pytest.param("llama", False, {}, id="llama-untied"),
    pytest.param("mistral", True, {}, id="mistral-tied"),
    # sliding window 24 < sequence lengths (up to ~60): exercises windowed attention
    # in prefill chunks and decode (mistral-tied, window None, is llama-equivalent).
    pytest.param("mistral", False, {"sliding_window": 24}, id="mistral-untied-window24"),
    pytest.param("qwen2", True, {}, id="qwen2-tied"),
    pytest.param("qwen2", False, {}, id="qwen2-untied"),
    pytest.param("qwen3", True, {}, id="qwen3-tied"),
    pytest.param("qwen3", False, {}, id="qwen3-untied"),
    pytest.param(
        "llama",
        False,
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        id="llama-rope-llama3",
    ),
    pytest.param("llama", True, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, id="llama-rope-linear"),
    # head_dim set apart from hidden_size / num_attention_heads (64 / 4 = 16), as in real Qwen3:
    # q is 4 x 32 = 128 wide, wider than the residual stream
    pytest.param("llama", False, {"head_dim": 32}, id="llama-head-dim-32"),
    pytest.param("qwen3", True, {"head_dim": 32}, id="qwen3-head-dim-32"),
]

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _report_max_errors():
    yield
    if MAX_ERR:
        print("\nmax |engine - HF| logit error per case:")
        for k, v in sorted(MAX_ERR.items()):
            print(f"  {k:40s} {v:.3e}")


# ---------------------------------------------------------------- logits parity


@pytest.mark.parametrize("family,tie,overrides", CASES)
def test_logits_parity_chunked_mixed_batches(tiny_model_factory, request, family, tie, overrides):
    """Small token budget → prefills are chunked (40 tokens/step) and mixed with
    decodes; prompt lengths cross 16-token block boundaries; requests join late."""
    path = tiny_model_factory(family, tie=tie, **overrides)
    engine = make_engine(path, max_num_batched_tokens=40, collect_logits=True)
    schedule = {
        0: [("a", make_prompt(5, 1), 12), ("b", make_prompt(50, 2), 10)],
        2: [("c", make_prompt(17, 3), 12)],
        4: [("d", make_prompt(33, 4), 10), ("e", make_prompt(16, 5), 6)],
    }
    prompts, outputs, logs, _ = run(engine, schedule)
    assert set(logs) == set(prompts)
    # mixed steps really happened: some request had a multi-row (prefill) entry in a
    # step where another was decoding; "b" (50 tokens) needed >= 2 chunks.
    assert sum(1 for s, e, _ in logs["b"] if e <= 50) >= 2
    check_logits(path, prompts, outputs, logs, request.node.callspec.id)


# ---------------------------------------------------------------- greedy generate


@pytest.mark.parametrize("family,tie,overrides", CASES)
def test_greedy_matches_hf_generate(tiny_model_factory, family, tie, overrides):
    path = tiny_model_factory(family, tie=tie, **overrides)
    engine = make_engine(path)
    ps = {f"p{i}": make_prompt(n, 100 + i) for i, n in enumerate([3, 16, 29, 47])}
    _, outputs, _, _ = run(engine, {0: [(r, p, 64) for r, p in ps.items()]})
    for r, p in ps.items():
        ref = hf_greedy(path, p, 64)
        assert outputs[r] == ref, f"{r}: first mismatch at {next(i for i, (a, b) in enumerate(zip(outputs[r], ref)) if a != b)}"
    assert len({tuple(o) for o in outputs.values()}) == len(ps)


def test_text_prompt_matches_hf(tiny_model_factory):
    from transformers import AutoTokenizer

    path = tiny_model_factory("qwen3", tie=True)
    text = "The old man reads an old book near the lake."
    ids = AutoTokenizer.from_pretrained(path)(text).input_ids
    engine = make_engine(path)
    _, outputs, _, _ = run(engine, {0: [("t", text, 20)]})
    assert outputs["t"] == hf_greedy(path, ids, 20)


# ---------------------------------------------------------------- prefix cache


@pytest.mark.parametrize(
    "family,overrides",
    [pytest.param(f, {}, id=f) for f in FAMILIES]
    # window 24 < the 32 cached tokens: "q" attends to cached blocks only partly inside its window
    + [pytest.param("mistral", {"sliding_window": 24}, id="mistral-window24")],
)
def test_prefix_cache(tiny_model_factory, request, family, overrides):
    path = tiny_model_factory(family, tie=family in ("llama", "qwen3"), **overrides)
    p = make_prompt(40, 7)
    q = p[:32] + make_prompt(9, 8)  # shares exactly two 16-token blocks with p
    sched = {
        0: [("p1", p, 16)],
        30: [("p2", p, 16)],  # after p1 finished: cached-free blocks
        60: [("q", q, 16), ("p3", p, 8)],  # concurrent sharers of in-use/cached blocks
    }
    engine = make_engine(path, collect_logits=True, max_num_batched_tokens=64)
    prompts, outputs, logs, cached = run(engine, sched)
    ref_engine = make_engine(path, enable_prefix_caching=False)
    _, ref_outputs, _, ref_cached = run(ref_engine, sched)

    assert cached["p1"] == 0
    assert cached["p2"] > 0 and cached["p2"] % 16 == 0, cached
    assert cached["q"] == 32, cached
    assert cached["p3"] > 0, cached
    assert all(v == 0 for v in ref_cached.values()), ref_cached
    assert outputs == ref_outputs
    for r in ("p2", "q", "p3"):  # the cached requests started computing after the hit
        assert logs[r][0][0] == cached[r]
    window = overrides.get("sliding_window")
    assert window is None or window < cached["q"]  # part of the cached prefix is outside the window
    check_logits(path, prompts, outputs, logs, f"prefix-{request.node.callspec.id}")
    assert outputs["p1"] == hf_greedy(path, p, 16)


# ---------------------------------------------------------------- preemption


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_recompute(tiny_model_factory, family, prefix_caching):
    path = tiny_model_factory(family, tie=family in ("mistral", "qwen2"))
    # Each request peaks at 20 + 40 = 60 tokens = 4 blocks; 6 usable blocks (+ the
    # runner's scratch block 0) hold ~1.5 such sequences, so running ones get preempted.
    sched = {0: [(f"r{i}", make_prompt(20, 200 + i), 40) for i in range(4)]}
    engine = make_engine(path, num_kv_blocks=7, enable_prefix_caching=prefix_caching, collect_logits=True)
    prompts, outputs, logs, _ = run(engine, sched)
    assert engine.scheduler.num_preemptions > 0
    _, ref_outputs, _, _ = run(make_engine(path), sched)
    assert outputs == ref_outputs
    check_logits(path, prompts, outputs, logs, f"preempt-{family}-{'pc' if prefix_caching else 'nopc'}")


# ---------------------------------------------------------------- bf16


# bf16 error bounds, relative to HF's own bf16 error against fp32 on the same bf16 weights (see test_bf16)
BF16_MEAN_FACTOR = 1.25
BF16_MAX_FACTOR = 1.5


@pytest.mark.parametrize("compute_dtype", ["model", "auto"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_bf16(tiny_model_factory, family, compute_dtype):
    """bf16 checkpoint, prompt prefilled in 3 chunks, then 16 decodes.

    When the engine computes in bf16 (compute_dtype="model", or "auto" on a CPU with native
    bf16), its logits are compared with an fp32 reference: HF in fp32 on the same bf16-valued
    weights. HF's own bf16 logits are the yardstick: the engine's mean and max error against
    the reference may be at most 1.25x and 1.5x HF's. Both are measured on the machine the
    test runs on, so the bound does not depend on how its bf16 kernels round. A direct bound
    on |engine - HF bf16| does: here (AMD, AVX2, bf16 emulated) it is mean 0.0005-0.0012 and
    max 1 ulp (0.125), and the layer-by-layer residual stream of a one-chunk prefill is
    bit-identical to HF's; on an Intel AVX-512/AMX CPU the mean was 0.033 (native bf16
    GEMM/SDPA kernels, whose blocking differs between the engine's shapes (fused q|k|v and
    gate|up, 10-row chunks, single-row decodes over a padded block mask) and HF's).
    Measured here (mean / max |logit error| vs the fp32 reference):
    - qwen3: engine 0.1715 / 1.2948, HF bf16 0.1711 / 1.2948 (ratio 1.00 / 1.00);
    - llama: engine 0.1367 / 1.6169, HF bf16 0.1366 / 1.6169 (ratio 1.00 / 1.00).
    Precision lost in the engine, injected here (teacher-forced, ratios mean / max): RMSNorm
    computed in bf16 1.11 / 1.66 (qwen3), 1.30 / 1.39 (llama); RoPE tables computed in bf16
    1.18 / 1.86 (qwen3), 1.20 / 1.22 (llama); a real bug (wrong rope, mask, norm) errs by
    whole units. The engine-HF gap seen on AMX (mean 0.033, max within 4 ulps = 0.5) stays
    inside the bound even if it added fully to HF's error (0.17 + 0.033 = 1.19x, 1.29 + 0.5 =
    1.39x). Also: top-1 agrees with HF bf16 on >= 90% of positions (a near-tie may flip), and
    the 16 greedy tokens equal HF bf16 generate's (teacher-forced logits above avoid
    cascading divergence).

    compute_dtype="auto" on a CPU without native bf16: the engine upcasts the bf16 weights to
    fp32 once, so it must match HF fp32 on the same weights at FP32_ATOL.
    """
    path = tiny_model_factory(family, tie=True, dtype="bfloat16")
    engine = make_engine(
        path, dtype="bfloat16", compute_dtype=compute_dtype, collect_logits=True, max_num_batched_tokens=10
    )
    p = make_prompt(24, 300)
    prompts, outputs, logs, _ = run(engine, {0: [("x", p, 16)]})
    seq = p + outputs["x"]
    exact = engine.runner.compute_dtype == torch.float32
    if compute_dtype == "model":
        assert not exact
    ref = hf_logits(path, seq[:-1], "float32")  # the bf16 checkpoint's weights, upcast exactly
    got = torch.cat([lg for _, _, lg in logs["x"]])
    assert got.shape == ref.shape
    if exact:
        err = (got - ref).abs().max().item()
        record(f"bf16-{family}-{compute_dtype}", err)
        assert err < FP32_ATOL
        assert outputs["x"] == hf_greedy(path, p, 16)
        return
    hf16 = hf_logits(path, seq[:-1], "bfloat16")
    ours, theirs = (got - ref).abs(), (hf16 - ref).abs()
    record(f"bf16-{family}-{compute_dtype} (vs HF bf16)", (got - hf16).abs().max().item())
    assert theirs.mean().item() > 0.01  # the yardstick really computed in bf16
    assert ours.mean().item() <= BF16_MEAN_FACTOR * theirs.mean().item(), (ours.mean().item(), theirs.mean().item())
    assert ours.max().item() <= BF16_MAX_FACTOR * theirs.max().item(), (ours.max().item(), theirs.max().item())
    agree = (got.argmax(-1) == hf16.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
    assert outputs["x"] == hf_greedy(path, p, 16, "bfloat16")
