"""Useful-work credit of engine steps (hpcserve/engine/useful_work.py).

Fabricated steps, vLLM-style: the real scheduler and KV block manager with the fake runner of
``sched_harness`` (no model, no torch), step times and cost-model coefficients chosen by the
test: the scaling bound (a step's credits never exceed its measured time), the high-water mark
across preemption (a recomputed position earns nothing again) and the uncalibrated fallback
(token share). Then the real engine on a tiny random model: every share's credit equals the
definition recomputed from the reported coefficients, step times and the chunk layout."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from sched_harness import FakeRunner, make, mkreq, prompt_of

from hpcserve.engine.request import PRIORITY_BATCH as B
from hpcserve.engine.request import PRIORITY_INTERACTIVE as I
from hpcserve.engine.request import SamplingParams
from hpcserve.engine.step_cost import StepCostModel
from hpcserve.engine.useful_work import claim_fresh, fresh_tokens, step_credits

COEF = (0.01, 0.002, 0.0001)  # a, b, c: seconds, per token, per context token


class CreditingRunner(FakeRunner):
    """The fake runner plus what ``LLMEngine.step`` does around it: claim the fresh tokens right
    after ``schedule`` (``execute`` is called between schedule and update) and credit the step with
    a time given by ``step_time(seqs)``. Records every step's (seqs, fresh, time, credits)."""

    def __init__(self, sched, step_time, coefficients):
        super().__init__(sched.kv.block_size)
        self.sched, self.step_time, self.coefficients = sched, step_time, coefficients
        self.steps: list[tuple[list, list[int], float, list[float]]] = []

    def execute(self, out):
        fresh = claim_fresh(out.seqs, self.sched.requests)
        t = self.step_time(out.seqs)
        self.steps.append((list(out.seqs), fresh, t, step_credits(out.seqs, fresh, t, self.coefficients)))
        return super().execute(out)

    def per_request(self, what: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for seqs, fresh, _, credits in self.steps:
            for s, f, u in zip(seqs, fresh, credits):
                v = {"fresh": f, "computed": s.num_new_tokens, "credit": u}[what]
                out[s.req_id] = out.get(s.req_id, 0) + v
        return out


def model_time(seqs, coef=COEF, factor=1.0) -> float:
    a, b, c = coef
    return factor * (a + sum(b * s.num_new_tokens + c * s.context_len for s in seqs))


def test_fresh_tokens_is_the_part_beyond_the_high_water_mark():
    assert fresh_tokens(0, 16, 0) == 16
    assert fresh_tokens(0, 16, 10) == 6     # recompute of 10 positions, 6 new
    assert fresh_tokens(4, 8, 20) == 0      # entirely recomputed
    assert fresh_tokens(20, 1, 20) == 1     # a decode right at the mark
    assert fresh_tokens(12, 8, 4) == 8      # a prefix-cache hit skipped positions: the chunk is all new


@pytest.mark.parametrize("prefix", [False, True])
def test_recompute_after_preemption_earns_nothing_again(prefix):
    # the scheduler's own preemption scenario: a chat needs b1's blocks, b1 is recomputed later
    sched, d = make(num_blocks=10, budget=64, max_seqs=4, prefix=prefix)
    d.runner = runner = CreditingRunner(sched, model_time, COEF)  # time = the model's prediction: no scaling
    b0 = mkreq("b0", prompt_of(12, 1), priority=B, max_tokens=8, ignore_eos=True)
    b1 = mkreq("b1", prompt_of(12, 2), priority=B, max_tokens=8, ignore_eos=True)
    sched.add_request(b0)
    sched.add_request(b1)
    d.step()
    d.step()
    i = mkreq("i", prompt_of(16, 3), priority=I, max_tokens=4, ignore_eos=True)
    sched.add_request(i)
    assert d.step().preempted_req_ids == ["b1"]
    d.run()
    reqs = {r.req_id: r for r in (b0, b1, i)}
    assert b1.num_preemptions >= 1
    computed, fresh, credit = (runner.per_request(k) for k in ("computed", "fresh", "credit"))
    # every position but the last sampled token is computed at least once and credited exactly once
    for rid, r in reqs.items():
        assert fresh[rid] == r.num_tokens - 1 == r.num_credited_tokens
    assert computed["b1"] > fresh["b1"]  # b1 paid for its recompute in step time ...
    _, b, c = COEF
    for rid, r in reqs.items():  # ... but earns exactly what one uninterrupted pass over its positions earns
        if r.num_preemptions == 0:
            chunks = [(s.num_new_tokens, s.context_len) for seqs, _, _, _ in runner.steps for s in seqs
                      if s.req_id == rid]
            assert credit[rid] == pytest.approx(sum(b * n + c * ctx for n, ctx in chunks))
    # b1's recompute chunk re-covers its prompt and output so far: only the position beyond earns
    recomputed = [(s, f, u) for seqs, fr, _, cr in runner.steps for s, f, u in zip(seqs, fr, cr)
                  if s.req_id == "b1" and f < s.num_new_tokens]
    assert recomputed
    for s, f, u in recomputed:
        assert f <= 1 and u == pytest.approx((b * s.num_new_tokens + c * s.context_len) * f / s.num_new_tokens)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("calibrated", [True, False])
def test_a_steps_credits_never_exceed_its_measured_time(seed, calibrated):
    rng = random.Random(seed)
    coef = COEF if calibrated else None
    # measured times from far below the model's marginal cost to well above it
    factors = [rng.choice([0.05, 0.3, 0.9, 1.0, 2.0, 5.0]) for _ in range(10_000)]
    sched, d = make(num_blocks=24, budget=24, max_seqs=6, prefix=True)
    d.runner = runner = CreditingRunner(sched, lambda seqs: model_time(seqs, factor=factors[len(runner.steps)]), coef)
    for k in range(14):
        sched.add_request(mkreq(f"r{k}", prompt_of(rng.randint(1, 40), seed * 100 + k), priority=rng.choice([I, B]),
                                max_tokens=rng.randint(1, 12), ignore_eos=True))
        for _ in range(rng.randint(0, 3)):
            if sched.num_unfinished:
                d.step()
    d.run()
    _, b, c = COEF
    for seqs, fresh, t, credits in runner.steps:
        assert all(u >= 0 for u in credits)
        assert sum(credits) <= t * (1 + 1e-12)
        n_total = sum(s.num_new_tokens for s in seqs)
        for s, f, u in zip(seqs, fresh, credits):
            if calibrated:  # marginal cost, scaled down only when the step took less than the sum
                cost = b * s.num_new_tokens + c * s.context_len
                scale = min(1.0, t / sum(b * x.num_new_tokens + c * x.context_len for x in seqs))
                want = cost * scale * f / s.num_new_tokens
            else:  # the step's time split by token share
                want = t * f / n_total
            assert u == pytest.approx(want, rel=1e-12, abs=1e-15)
        all_fresh = all(f == s.num_new_tokens for s, f in zip(seqs, fresh))
        if all_fresh and (not calibrated or t <= model_time(seqs) - COEF[0]):
            assert sum(credits) == pytest.approx(t)  # the whole step is useful work
    # over the run: each request's positions credited once
    for rid, f in runner.per_request("fresh").items():
        assert f <= sum(s.num_new_tokens for seqs, _, _, _ in runner.steps for s in seqs if s.req_id == rid)


def test_calibrated_model_without_marginal_terms_falls_back_to_token_share():
    sched, d = make(num_blocks=32, budget=32)
    d.runner = runner = CreditingRunner(sched, lambda seqs: 0.5, (0.5, 0.0, 0.0))
    sched.add_request(mkreq("x", prompt_of(10, 1), max_tokens=3, ignore_eos=True))
    sched.add_request(mkreq("y", prompt_of(6, 2), max_tokens=3, ignore_eos=True))
    d.step()
    (_, _, _, credits), = runner.steps
    assert credits == pytest.approx([0.5 * 10 / 16, 0.5 * 6 / 16])


def test_empty_or_unmeasured_steps_credit_nothing():
    assert step_credits([], [], 0.3, COEF) == []
    sched, _ = make()
    sched.add_request(mkreq("x", prompt_of(5, 1), max_tokens=2))
    out = sched.schedule()
    fresh = claim_fresh(out.seqs, sched.requests)
    assert step_credits(out.seqs, fresh, 0.0, COEF) == [0.0]
    assert claim_fresh(out.seqs, {}) == [0]  # an unknown request gets no fresh tokens


def test_no_torch_import():
    code = "import sys, hpcserve.engine.useful_work, hpcserve.daemon.utilization; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# ------------------------------------------------------------------------------ the real engine
def test_engine_credits_match_the_definition_from_reported_coefficients(tiny_model_factory):
    from hpcserve.engine.core import EngineConfig, LLMEngine

    eng = LLMEngine(EngineConfig(model=str(tiny_model_factory("llama")), block_size=4, num_kv_blocks=256,
                                 max_num_seqs=8, max_model_len=128, max_num_batched_tokens=16,
                                 enable_prefix_caching=False))
    prompts = {"a": list(range(3, 40)), "b": list(range(50, 55)), "c": list(range(60, 81))}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    steps = []

    def run():
        while eng.has_unfinished_requests():
            eng.step()
            steps.append((eng.last_step_shares, eng.last_step_time_s, eng.last_step_coefficients))

    for rid, ids in prompts.items():  # uncalibrated: the first steps split by token share
        eng.add_request(rid, ids, params)
    run()
    eng.calibrate()
    assert eng.cost_model.calibrated
    for rid, ids in prompts.items():
        eng.add_request(rid + "2", ids, params)
    run()
    # a fit without marginal terms (timing noise can give one): token share again
    eng.cost_model = eng.scheduler.cost_model = StepCostModel(coefficients=(0.001, 0.0, 0.0))
    eng.add_request("d", prompts["b"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    run()
    assert any(c is None for _, _, c in steps) and any(c is not None and c[1] > 0 for _, _, c in steps)
    assert steps[-1][2] == (0.001, 0.0, 0.0)

    done: dict[str, int] = {}  # positions computed so far per request (no preemption, no prefix cache)
    total: dict[str, float] = {}
    for shares, t, coef in steps:
        assert 0 < sum(s.useful_s for s in shares) <= t * (1 + 1e-12)
        ctx = {}
        for s in shares:
            ctx[s.req_id] = done.get(s.req_id, 0) + s.num_tokens
        _, b, c = coef or (0.0, 0.0, 0.0)
        cost = {s.req_id: b * s.num_tokens + c * ctx[s.req_id] for s in shares}
        if sum(cost.values()) > 0:  # marginal cost, scaled down to the step's time if it is more
            want = {rid: v * min(1.0, t / sum(cost.values())) for rid, v in cost.items()}
        else:  # not calibrated, or a fit without marginal terms (timing noise): token share
            want = {s.req_id: t * s.num_tokens / sum(x.num_tokens for x in shares) for s in shares}
        assert {s.req_id: s.useful_s for s in shares} == pytest.approx(want, rel=1e-9)
        done.update(ctx)
        for s in shares:
            total[s.req_id] = total.get(s.req_id, 0.0) + s.useful_s
    assert done == {rid: len(prompts[rid[0]]) + 6 - 1 for rid in done if rid != "d"} | {"d": 5 + 3 - 1}
    assert set(total) == {"a", "b", "c", "a2", "b2", "c2", "d"} and all(v > 0 for v in total.values())
