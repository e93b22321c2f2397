"""Offline throughput benchmark: hpcserve's engine against transformers ``generate``.

``run_throughput(model, num_prompts, input_len, output_len, dtype, baseline, ...)`` builds
random prompts (seeded token ids from the ordinary vocabulary, no shared prefixes),
warms each engine up on a short run, then times the full workload: every prompt
asks for exactly ``output_len`` new tokens (EOS ignored), greedy. Both engines run
in the same process with the same thread count, alternating for ``repeats`` rounds;
each engine's best round counts, so machine noise hits both alike. ``tokens_per_s`` counts generated tokens.

Returned dict (what ``--json`` prints)::

    {"hpcserve": {"tokens_per_s", "elapsed_s", "compute_dtype", ...},
     "baseline": {"name": "hf", "tokens_per_s", "elapsed_s"} | None,
     "ratio": hpcserve / baseline | None,
     "greedy_match": fraction of prompts whose tokens equal the baseline's (before EOS) | None,
     "config": {...}}
"""

from __future__ import annotations

import time


def _prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lo = min(1000, vocab_size // 4)
    return torch.randint(lo, vocab_size, (num_prompts, input_len), generator=g).tolist()


def _run_hpcserve(engine, prompts: list[list[int]], output_len: int, tag: str) -> tuple[float, list[list[int]]]:
    from hpcserve.engine.request import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.req_id] = out.token_ids
    elapsed = time.perf_counter() - t0
    return elapsed, [done[f"{tag}-{i}"] for i in range(len(prompts))]


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
    progress=None,
) -> dict:
    import torch

    from hpcserve.engine.core import EngineConfig, LLMEngine

    say = progress or (lambda msg: None)
    if num_threads:
        torch.set_num_threads(num_threads)
    say("loading hpcserve engine")
    engine = LLMEngine(
        EngineConfig(
            model=model,
            dtype=dtype,
            max_num_seqs=max(num_prompts, 1),
            max_num_batched_tokens=max(max_num_batched_tokens, input_len),
            max_model_len=input_len + output_len + 16,
        )
    )
    prompts = _prompts(num_prompts, input_len, engine.model_config.vocab_size, seed)
    hf = None
    if baseline == "hf":
        from transformers import AutoModelForCausalLM

        say("loading transformers baseline")
        hf = AutoModelForCausalLM.from_pretrained(str(engine.model_dir), dtype=getattr(torch, dtype)).eval()
    elif baseline is not None:
        raise ValueError(f"unknown baseline {baseline!r}; available: hf")

    say("warming up")
    _run_hpcserve(engine, prompts[: min(4, num_prompts)], 4, "warmup")
    if hf is not None:
        _run_hf(hf, prompts[: min(4, num_prompts)], 4)
    # Alternate the engines so machine noise hits both alike; report each one's best run.
    ours_s: list[float] = []
    hf_s: list[float] = []
    for r in range(repeats):
        say(f"run {r + 1}/{repeats}: hpcserve, {num_prompts} prompts x {input_len} in, {output_len} out")
        elapsed, ours = _run_hpcserve(engine, prompts, output_len, f"bench{r}")
        ours_s.append(elapsed)
        if hf is not None:
            say(f"run {r + 1}/{repeats}: transformers generate")
            hf_elapsed, theirs = _run_hf(hf, prompts, output_len)
            hf_s.append(hf_elapsed)
    n_tokens = num_prompts * output_len
    result: dict = {
        "hpcserve": {
            "tokens_per_s": n_tokens / min(ours_s),
            "elapsed_s": min(ours_s),
            "runs_s": ours_s,
            "dtype": dtype,
            "compute_dtype": str(engine.runner.compute_dtype).replace("torch.", ""),
            "preemptions": engine.scheduler.num_preemptions,
        },
        "baseline": None,
        "ratio": None,
        "greedy_match": None,
        "config": {
            "model": model,
            "num_prompts": num_prompts,
            "input_len": input_len,
            "output_len": output_len,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    if hf is not None:
        hf_tps = n_tokens / min(hf_s)
        result["baseline"] = {"name": "hf", "tokens_per_s": hf_tps, "elapsed_s": min(hf_s), "runs_s": hf_s, "dtype": dtype}
        result["ratio"] = result["hpcserve"]["tokens_per_s"] / hf_tps
        # generate's min_new_tokens masks EOS (it then picks the runner-up) while ignore_eos
        # keeps the argmax, so compare the tokens before our first EOS
        eos = set(engine.eos_token_ids)

        def before_eos(t: list[int]) -> list[int]:
            return next((t[:i] for i, x in enumerate(t) if x in eos), t)

        matches = sum(before_eos(a) == b[: len(before_eos(a))] for a, b in zip(ours, theirs))
        result["greedy_match"] = matches / max(1, num_prompts)
    return result
