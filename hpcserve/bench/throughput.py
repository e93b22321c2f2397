"""Offline throughput benchmark: hpcserve's engine against transformers ``generate``.

``run_throughput(model, num_prompts, input_len, output_len, dtype, baseline, ...)`` times the
same workload on both engines in the same process with the same thread count: every prompt asks
for exactly ``output_len`` new tokens (EOS ignored), greedy. Rules that keep the comparison fair:

- fresh prompts every round: the warm-up and each of the ``repeats`` rounds draw their own random
  prompts (``round_prompts(seed, round)``: token ids from the ordinary vocabulary, no shared
  prefixes); within a round both engines get the same prompts. The engines alternate round by
  round and each one's best round counts, so machine noise hits both alike;
- hpcserve's prefix cache is off unless ``prefix_caching=True``; ``num_cached_tokens`` (the sum of
  ``RequestOutput.num_cached_tokens`` over the measured rounds) says how many prompt tokens it
  did not compute (0 for transformers, which has no prefix cache);
- like-for-like dtypes: the baseline computes in hpcserve's compute dtype on the same weight
  values. On a CPU without native bf16, hpcserve computes a bf16 checkpoint in fp32 (the weights
  keep their bf16 values); transformers then loads the model in bf16 and runs it ``.float()``.
  ``native_baseline=True`` also times transformers in the checkpoint dtype (``baseline_native``,
  not part of the headline ``ratio``).

``tokens_per_s`` counts generated tokens. Returned dict (what ``--json`` prints)::

    {"hpcserve": {"tokens_per_s", "elapsed_s", "runs_s", "checkpoint_dtype", "compute_dtype",
                  "num_cached_tokens", "prefix_caching", "preemptions"},
     "baseline": {"name": "hf", "tokens_per_s", "elapsed_s", "runs_s", "checkpoint_dtype",
                  "compute_dtype", "num_cached_tokens", "attn_implementation"} | None,
     "baseline_native": same as baseline plus "headline": false | None,
     "ratio": hpcserve / baseline | None,
     "greedy_match": fraction of prompts (all rounds) whose tokens equal the baseline's | None,
     "machine": hpcserve.bench.machine.machine_report(...): CPU, flags, hpcserve's engine paths,
     "config": {...}}
"""

from __future__ import annotations

import random
import time

from hpcserve.bench.machine import dtype_name, machine_report, runner_paths

WARMUP_PROMPTS, WARMUP_TOKENS = 4, 4


def round_prompts(seed: int, round_: int | str, num_prompts: int, input_len: int, vocab_size: int) -> list[list[int]]:
    """The prompts of one round (``"warmup"`` or 0, 1, ...): token ids uniform in
    [min(1000, vocab/4), vocab), from a generator seeded with (seed, round)."""
    rng = random.Random(f"hpcserve-bench-throughput-{seed}-{round_}")
    lo = min(1000, vocab_size // 4)
    return [[rng.randrange(lo, vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def _run_hpcserve(engine, prompts: list[list[int]], output_len: int, tag: str) -> tuple[float, list[list[int]], int]:
    """(elapsed s, output token ids per prompt, prompt tokens served from the prefix cache)."""
    from hpcserve.engine.request import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.req_id] = out
    elapsed = time.perf_counter() - t0
    outs = [done[f"{tag}-{i}"] for i in range(len(prompts))]
    return elapsed, [o.token_ids for o in outs], sum(o.num_cached_tokens for o in outs)


def _run_hf(model, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding needed
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
        elapsed = time.perf_counter() - t0
    return elapsed, out[:, ids.shape[1] :].tolist()


def _load_hf(model_dir: str, checkpoint_dtype, compute_dtype, native: bool, say):
    """(baseline in the compute dtype, baseline in the checkpoint dtype or None). Both hold the
    checkpoint's values in ``checkpoint_dtype`` (bf16-valued weights computed in fp32)."""
    import copy

    from transformers import AutoModelForCausalLM

    say(f"loading transformers baseline ({dtype_name(checkpoint_dtype)} weights, computing in "
        f"{dtype_name(compute_dtype)})")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=checkpoint_dtype).eval()
    extra = None
    if compute_dtype != checkpoint_dtype:
        if native:
            extra = copy.deepcopy(hf)
        hf = hf.to(compute_dtype)
    return hf, extra


def _baseline_entry(times: list[float], n_tokens: int, checkpoint_dtype, model) -> dict:
    return {"name": "hf", "tokens_per_s": n_tokens / min(times), "elapsed_s": min(times), "runs_s": times,
            "checkpoint_dtype": dtype_name(checkpoint_dtype), "compute_dtype": dtype_name(model.dtype),
            "num_cached_tokens": 0,  # transformers generate has no cross-request prefix cache
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def run_throughput(
    model: str,
    num_prompts: int = 32,
    input_len: int = 32,
    output_len: int = 64,
    dtype: str = "float32",
    baseline: str | None = "hf",
    num_threads: int | None = None,
    max_num_batched_tokens: int = 2048,
    seed: int = 0,
    repeats: int = 1,
    prefix_caching: bool = False,
    native_baseline: bool = False,
    progress=None,
) -> dict:
    import torch

    from hpcserve.engine.core import EngineConfig, LLMEngine

    say = progress or (lambda msg: None)
    if baseline is not None and baseline != "hf":
        raise ValueError(f"unknown baseline {baseline!r}; available: hf")
    if num_threads:
        torch.set_num_threads(num_threads)
    say(f"loading hpcserve engine (prefix cache {'on' if prefix_caching else 'off'})")
    engine = LLMEngine(
        EngineConfig(
            model=model,
            dtype=dtype,
            max_num_seqs=max(num_prompts, 1),
            max_num_batched_tokens=max(max_num_batched_tokens, input_len),
            max_model_len=input_len + output_len + 16,
            enable_prefix_caching=prefix_caching,
        )
    )
    vocab = engine.model_config.vocab_size
    checkpoint_dtype, compute_dtype = getattr(torch, dtype), engine.runner.compute_dtype
    hf = hf_native = None
    if baseline == "hf":
        hf, hf_native = _load_hf(str(engine.model_dir), checkpoint_dtype, compute_dtype, native_baseline, say)
    baselines = [m for m in (hf, hf_native) if m is not None]

    say("warming up (prompts of their own)")
    warm = round_prompts(seed, "warmup", min(WARMUP_PROMPTS, num_prompts), input_len, vocab)
    _run_hpcserve(engine, warm, WARMUP_TOKENS, "warmup")
    for m in baselines:
        _run_hf(m, warm, WARMUP_TOKENS)
    # Alternate the engines so machine noise hits both alike; report each one's best run.
    ours_s: list[float] = []
    base_s: list[list[float]] = [[] for _ in baselines]
    cached = matches = 0
    eos = set(engine.eos_token_ids)

    def before_eos(t: list[int]) -> list[int]:
        return next((t[:i] for i, x in enumerate(t) if x in eos), t)

    for r in range(repeats):
        prompts = round_prompts(seed, r, num_prompts, input_len, vocab)
        say(f"run {r + 1}/{repeats}: hpcserve, {num_prompts} new prompts x {input_len} in, {output_len} out")
        elapsed, ours, n_cached = _run_hpcserve(engine, prompts, output_len, f"bench{r}")
        ours_s.append(elapsed)
        cached += n_cached
        for i, m in enumerate(baselines):
            say(f"run {r + 1}/{repeats}: transformers generate ({dtype_name(m.dtype)})")
            hf_elapsed, theirs = _run_hf(m, prompts, output_len)
            base_s[i].append(hf_elapsed)
            if i == 0:
                # generate's min_new_tokens masks EOS (it then picks the runner-up) while ignore_eos
                # keeps the argmax, so compare the tokens before our first EOS
                matches += sum(before_eos(a) == b[: len(before_eos(a))] for a, b in zip(ours, theirs))
    n_tokens = num_prompts * output_len
    result: dict = {
        "hpcserve": {
            "tokens_per_s": n_tokens / min(ours_s),
            "elapsed_s": min(ours_s),
            "runs_s": ours_s,
            "checkpoint_dtype": dtype,
            "compute_dtype": dtype_name(compute_dtype),
            "num_cached_tokens": cached,
            "prefix_caching": engine.kv.enable_prefix_caching,
            "preemptions": engine.scheduler.num_preemptions,
        },
        "baseline": None,
        "baseline_native": None,
        "ratio": None,
        "greedy_match": None,
        "machine": machine_report(paths=runner_paths(engine.runner)),
        "config": {
            "model": model,
            "num_prompts": num_prompts,
            "input_len": input_len,
            "output_len": output_len,
            "repeats": repeats,
            "seed": seed,
            "prefix_caching": prefix_caching,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    if hf is not None:
        result["baseline"] = _baseline_entry(base_s[0], n_tokens, checkpoint_dtype, hf)
        result["ratio"] = result["hpcserve"]["tokens_per_s"] / result["baseline"]["tokens_per_s"]
        result["greedy_match"] = matches / max(1, num_prompts * repeats)
    if hf_native is not None:
        result["baseline_native"] = {**_baseline_entry(base_s[1], n_tokens, checkpoint_dtype, hf_native),
                                     "headline": False}
    return result
