"""Parity helpers shared by tests/test_parity.py and tests/test_models.py: Hugging Face
transformers as the reference (cached models, logits of one full causal forward, greedy
generate), an engine driver that logs every scheduled row's logits, and the comparison.

Reference logits come from one full causal forward over a request's final token
sequence: by causality, ``logits[start:end]`` of that forward equal what a forward over
``tokens[:end]`` would give, so one HF call per request covers every engine step.
Imports torch at import time: import it from test modules, not from conftest.
"""

from __future__ import annotations

import functools
import random

import torch

# fp32 logits here have std ~4-8 and |max| ~30-40; engine vs HF differ only by
# rounding (paged/chunked attention, fused vs unfused ops, summation order): observed
# max |diff| over all cases is 8.6e-5 (~2e-6 relative). 3e-4 leaves ~3.5x headroom
# and still catches any real bug (wrong rope, mask, window, bias, norm: 1e-2..1e1).
FP32_ATOL = 3e-4

MAX_ERR: dict[str, float] = {}  # case id -> max |engine - HF| logit error (reported at the end)


def record(case: str, err: float) -> None:
    MAX_ERR[case] = max(MAX_ERR.get(case, 0.0), err)


@functools.lru_cache(maxsize=None)
def hf_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def hf_logits(path, token_ids: list[int], dtype: str = "float32") -> torch.Tensor:
    with torch.no_grad():
        return hf_model(str(path), dtype)(torch.tensor([token_ids])).logits[0].float()


def hf_greedy(path, prompt: list[int], n: int, dtype: str = "float32") -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model(str(path), dtype).generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,  # == ignore_eos for n tokens
        )
    return out[0, len(prompt) :].tolist()


def make_prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]  # 0..2 are the special tokens


def make_engine(path, **kw):
    from hpcserve.engine.core import EngineConfig, LLMEngine

    cfg = dict(
        model=str(path),
        dtype="float32",
        block_size=16,
        num_kv_blocks=None,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        enable_prefix_caching=True,
        collect_logits=False,
    )
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def greedy(max_tokens: int):
    from hpcserve.engine.request import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def run(engine, schedule: dict[int, list[tuple[str, list[int], int]]], max_steps: int = 2000):
    """Drive ``engine``; ``schedule[step]`` lists ``(req_id, prompt, max_tokens)`` added
    before that step. Returns (prompts, outputs, logs, num_cached) where ``logs[req_id]``
    is a list of ``(start, end, logits)`` (only with collect_logits) and every logged
    greedy sampling row is checked to agree with the token the engine emitted."""
    prompts: dict[str, list[int]] = {}
    outputs: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    logs: dict[str, list] = {}
    step = 0
    while step <= max(schedule, default=0) or engine.has_unfinished_requests():
        assert step < max_steps, "engine did not finish"
        for req_id, prompt, n in schedule.get(step, []):
            engine.add_request(req_id, prompt, greedy(n))
            prompts[req_id] = list(prompt)
            outputs[req_id] = []
        outs = engine.step()
        for o in outs:
            outputs[o.req_id] = list(o.token_ids)
            cached[o.req_id] = o.num_cached_tokens
        if engine.config.collect_logits:
            for req_id, lg in engine.last_logits.items():
                start, end = engine.last_positions[req_id]
                assert lg.shape == (end - start, engine.model_config.vocab_size), (req_id, lg.shape, start, end)
                logs.setdefault(req_id, []).append((start, end, lg.detach().float().clone()))
        step += 1
    for req_id, out in outputs.items():
        assert len(out) == dict((r, n) for s in schedule.values() for r, _, n in s)[req_id]
    return prompts, outputs, logs, cached


def check_logits(path, prompts, outputs, logs, case: str, atol: float = FP32_ATOL) -> float:
    """Compare every logged engine row with HF; also: rows cover each position exactly
    once per (re)computation, and the last row of a step predicts the emitted token."""
    worst = 0.0
    for req_id, entries in logs.items():
        seq = prompts[req_id] + outputs[req_id]
        ref = hf_logits(path, seq[:-1])  # row p predicts token p+1
        for start, end, lg in entries:
            assert 0 <= start < end <= len(seq) - 1, (req_id, start, end, len(seq))
            err = (lg - ref[start:end]).abs().max().item()
            worst = max(worst, err)
            assert err < atol, f"{case} {req_id} positions [{start},{end}): max |diff| {err:.3e}"
            if end >= len(prompts[req_id]):
                # the row predicting an output token: greedy token == its argmax
                assert int(lg[-1].argmax()) == seq[end], (req_id, end)
        covered = {p for s, e, _ in entries for p in range(s, e)}
        assert covered == set(range(min(covered), len(seq) - 1)), req_id
    record(case, worst)
    return worst
