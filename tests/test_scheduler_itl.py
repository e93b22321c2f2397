"""Scheduler tests, part 4 (no torch): the ITL cap on batch work (issue #4). With a
calibrated cost model and ``itl_target_s``, batch-class tokens in a step are capped so
the predicted step time stays within ``min(itl_target_s, interactive-only time x (1 +
batch_step_slowdown))`` while chat is active (``itl_target_s`` otherwise, decodes
exempt), with a one-token floor so batch always progresses.

Cost models here are ``StepCostModel(coefficients=...)`` (fixed, deterministic: the
fake runner never calls ``observe``) or one fed synthetic step times by the test.
``Driver.step`` checks the cap every step (``sched_harness.check_cap``) on top of the
invariants and ordering rules."""

from __future__ import annotations

import random

import pytest
from sched_harness import (
    EOS,
    Driver,
    assert_matches_reference,
    make,
    mkreq,
    model_fn,
    prompt_of,
)

from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.request import PRIORITY_BATCH, PRIORITY_INTERACTIVE, Request, RequestStatus
from hpcserve.engine.scheduler import Scheduler
from hpcserve.engine.step_cost import StepCostModel

I, B = PRIORITY_INTERACTIVE, PRIORITY_BATCH


def fixed(a=1.0, b=0.1, c=0.0) -> StepCostModel:
    return StepCostModel(coefficients=(a, b, c))


def shape(out) -> list[tuple[str, int, int]]:
    return [(s.req_id, s.start_pos, s.num_new_tokens) for s in out.seqs]


PRIO: dict[str, int] = {}  # req_id -> priority of every request made here (finished ones too)


def req(rid, prompt, priority, **kw) -> Request:
    r = mkreq(rid, prompt, priority=priority, **kw)
    PRIO[rid] = priority
    return r


def batch_tokens(out) -> int:
    return sum(s.num_new_tokens for s in out.seqs if PRIO[s.req_id] > I)


def test_constructor_validation():
    kv = KVCacheManager(8, 4)
    with pytest.raises(ValueError):
        Scheduler(kv, 16, 4, itl_target_s=0.0)
    with pytest.raises(ValueError):
        Scheduler(kv, 16, 4, batch_step_slowdown=-0.1)


# ================================================================== no cap: unchanged
def _random_trace(seed: int, **cap_kw) -> list:
    rng = random.Random(seed)
    sched, d = make(num_blocks=14, budget=rng.choice([4, 16]), max_seqs=4, **cap_kw)
    reqs = []
    trace = []
    for k in range(25):
        r = req(
            f"r{k}",
            prompt_of(rng.randrange(1, 20), 10 * seed + k),
            priority=rng.choice([I, B, B]),
            max_tokens=rng.randrange(1, 12),
            ignore_eos=True,
        )
        reqs.append(r)
        sched.add_request(r)
        while rng.random() < 0.6:
            out = d.step()
            trace.append((shape(out), out.preempted_req_ids, sched.last_cap_s, sched.last_cap_hit))
    while sched.num_unfinished:
        out = d.step()
        trace.append((shape(out), out.preempted_req_ids, sched.last_cap_s, sched.last_cap_hit))
    assert_matches_reference(d, reqs)
    return trace


@pytest.mark.parametrize("seed", range(4))
def test_no_cap_without_calibrated_model_and_target(seed):
    base = _random_trace(seed)
    assert all(cap is None and not hit for *_, cap, hit in base)
    assert _random_trace(seed, cost_model=fixed()) == base  # no target
    assert _random_trace(seed, itl_target_s=0.01) == base  # no model
    assert _random_trace(seed, cost_model=StepCostModel(), itl_target_s=0.01) == base  # not calibrated


# ================================================================== chat active
def _decoding(sched: Scheduler, d: Driver, reqs: list[Request]) -> None:
    for r in reqs:
        sched.add_request(r)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
        d.step()


def test_chat_caps_batch_decodes_and_skipped_ones_keep_their_blocks():
    # a=1, b=0.1, c=0: a chat decode alone is 1.1; with slowdown 0.2 the step may take
    # 1.32, i.e. 2 more tokens: 2 of the 5 batch decodes per step, in admission order
    sched, d = make(num_blocks=200, budget=64, cost_model=fixed(), itl_target_s=5.0, batch_step_slowdown=0.2)
    batch = [req(f"b{k}", prompt_of(6, k), priority=B, max_tokens=40, ignore_eos=True) for k in range(5)]
    _decoding(sched, d, batch)
    chat = req("i", prompt_of(3, 9), priority=I, max_tokens=12, ignore_eos=True)
    sched.add_request(chat)
    d.step()  # chat prefill (3 tokens): base 1.3 -> cap 1.56 -> 2 batch tokens
    assert sched.last_cap_s == pytest.approx(1.56) and batch_tokens(d.outputs[-1]) == 2
    blocks = {r.req_id: list(r.block_ids) for r in batch}
    for _ in range(6):
        before = {r.req_id: r.num_computed_tokens for r in batch}
        out = d.step()
        assert sched.last_cap_s == pytest.approx(1.32) and sched.last_cap_hit
        ids = [s.req_id for s in out.seqs]
        assert ids[0] == "i" and len(ids) == 3 and all(s.num_new_tokens == 1 for s in out.seqs)
        for r in batch:  # skipped ones: still running, same blocks, nothing computed
            assert r.status == RequestStatus.RUNNING
            if r.req_id not in ids:
                assert r.num_computed_tokens == before[r.req_id] and r.block_ids == blocks[r.req_id]
            blocks[r.req_id] = list(r.block_ids)
        assert out.preempted_req_ids == []
    d.run()
    assert_matches_reference(d, batch + [chat])
    assert sched.num_preemptions == 0


def test_cap_is_at_most_the_itl_target():
    # chat prefill of 20 tokens: interactive-only step 3.0, x1.2 = 3.6 > target 3.2
    sched, d = make(num_blocks=200, budget=64, cost_model=fixed(), itl_target_s=3.2)
    batch = [req(f"b{k}", prompt_of(6, k), priority=B, max_tokens=20, ignore_eos=True) for k in range(5)]
    _decoding(sched, d, batch)
    sched.add_request(req("i", prompt_of(20, 9), priority=I, max_tokens=3, ignore_eos=True))
    out = d.step()
    assert sched.last_cap_s == pytest.approx(3.2)
    assert batch_tokens(out) == 2  # 3.0 + 2 * 0.1 <= 3.2
    d.run()


def test_batch_prefill_chunked_under_the_cap():
    # c > 0: the room left for a batch chunk shrinks as its start position grows
    cm = fixed(a=1.0, b=0.1, c=0.01)
    sched, d = make(num_blocks=200, budget=64, cost_model=cm, itl_target_s=10.0, batch_step_slowdown=1.0)
    chat = req("i", prompt_of(4, 1), priority=I, max_tokens=60, ignore_eos=True)
    sched.add_request(chat)
    d.step()
    b = req("b", prompt_of(40, 2), priority=B, max_tokens=3, ignore_eos=True)
    sched.add_request(b)
    chunks = []
    while b.num_computed_tokens < b.num_prompt_tokens:
        out = d.step()
        (s,) = [s for s in out.seqs if s.req_id == "b"]
        chunks.append((s.start_pos, s.num_new_tokens))
        # the chunk is the largest that fits (or the 1-token floor)
        (ci,) = [x for x in out.seqs if x.req_id == "i"]
        cap = min(10.0, cm.predict(1, ci.context_len) * 2)
        assert sched.last_cap_s == pytest.approx(cap)
        fits = cm.max_new_tokens(cap, 1, ci.context_len, s.start_pos, 40 - s.start_pos)
        assert s.num_new_tokens == max(1, fits)
    assert sum(n for _, n in chunks) == 40 and len(chunks) > 3
    assert [p for p, _ in chunks] == [sum(n for _, n in chunks[:k]) for k in range(len(chunks))]
    assert chunks[0][1] > chunks[-1][1]  # later chunks are smaller: more context per token
    assert all(n >= 1 for _, n in chunks)
    d.run()
    assert_matches_reference(d, [chat, b])


def test_floor_batch_progresses_when_chat_alone_exceeds_the_target():
    # chat decodes alone predict 1 + 0.1 * 8 = 1.8 > target 1.5: batch gets exactly the
    # one-token floor per step, and still finishes
    sched, d = make(num_blocks=400, budget=64, max_seqs=16, cost_model=fixed(), itl_target_s=1.5)
    batch = [req(f"b{k}", prompt_of(5 + k, k), priority=B, max_tokens=4, ignore_eos=True) for k in range(3)]
    _decoding(sched, d, batch)
    chats = [req(f"i{k}", prompt_of(2, 50 + k), priority=I, max_tokens=200, ignore_eos=True) for k in range(8)]
    for r in chats:
        sched.add_request(r)
    d.step()
    while not all(r.is_finished for r in batch):
        out = d.step()
        assert sched.last_cap_s == pytest.approx(1.5)
        assert batch_tokens(out) == 1
    for r in chats:
        sched.finish_request(r.req_id, RequestStatus.FINISHED_ABORTED)
    assert_matches_reference(d, batch)


def test_chat_preempts_batch_for_kv_with_the_cap():
    # as in test_scheduler_priority: 9 usable blocks, two batch requests hold 8
    for prefix in (False, True):
        sched, d = make(num_blocks=10, budget=64, max_seqs=4, prefix=prefix, cost_model=fixed(), itl_target_s=5.0)
        b0 = req("b0", prompt_of(12, 1), priority=B, max_tokens=8, ignore_eos=True)
        b1 = req("b1", prompt_of(12, 2), priority=B, max_tokens=8, ignore_eos=True)
        sched.add_request(b0)
        sched.add_request(b1)
        d.step()
        d.step()
        i = req("i", prompt_of(16, 3), priority=I, max_tokens=4, ignore_eos=True)
        sched.add_request(i)
        out = d.step()
        assert out.preempted_req_ids == ["b1"]
        assert [s.req_id for s in out.seqs] == ["i", "b0"]  # b0: the batch floor (or what fits)
        d.run()
        assert_matches_reference(d, [b0, b1, i])  # b1 recomputed, finishes once, same output
        assert d.finished["b1"] == 1 and b1.num_preemptions >= 1 and i.num_preemptions == 0
        assert d.finish_step["i"] == 2 + 3


def test_interactive_schedule_unchanged_by_the_cap():
    # plenty of memory: the chat requests' chunks and decodes are the same step for step
    def run(**cap_kw):
        sched, d = make(num_blocks=400, budget=24, max_seqs=16, **cap_kw)
        for k in range(4):
            sched.add_request(req(f"b{k}", prompt_of(30, k), priority=B, max_tokens=30, ignore_eos=True))
        steps = []
        for step in range(200):
            if step % 4 == 1 and step < 60:
                sched.add_request(req(f"i{step}", prompt_of(7, step), priority=I, max_tokens=5, ignore_eos=True))
            if not sched.num_unfinished:
                break
            out = d.step()
            steps.append([x for x in shape(out) if x[0].startswith("i")])
        return steps, sched

    plain, _ = run()
    capped, sched = run(cost_model=fixed(), itl_target_s=2.0)
    n = max(len(plain), len(capped))
    pad = lambda x: x + [[]] * (n - len(x))
    assert pad(plain) == pad(capped)
    assert sched.num_preemptions == 0


# ================================================================== no chat active
def test_no_chat_decodes_exempt_prefill_gets_the_target_on_top():
    # 4 batch decodes (predicted 1.4) are all scheduled; a new batch prompt gets chunks of
    # the target's worth on top of them: cap 1.4 + 2.05, so floor(2.05 / 0.1) = 20 tokens
    sched, d = make(num_blocks=200, budget=64, cost_model=fixed(), itl_target_s=2.05)
    batch = [req(f"b{k}", prompt_of(6, k), priority=B, max_tokens=30, ignore_eos=True) for k in range(4)]
    _decoding(sched, d, batch)
    late = req("late", prompt_of(40, 7), priority=B, max_tokens=3, ignore_eos=True)
    sched.add_request(late)
    out = d.step()
    assert shape(out)[:4] == [(r.req_id, r.num_computed_tokens - 1, 1) for r in batch]
    assert shape(out)[4] == ("late", 0, 20)
    assert sched.last_cap_s == pytest.approx(3.45) and sched.last_cap_hit
    out = d.step()
    assert shape(out)[4] == ("late", 20, 20)
    d.run()
    assert_matches_reference(d, batch + [late])


def test_no_chat_prefill_advances_while_decodes_fit():
    # decodes 1.4, target 0.75: cap min(1.4 + 0.75, max(1.5, 2a = 2.0)) = 2.0, so a waiting
    # prompt gets prefill every step: the running set never drains for lack of it
    sched, d = make(num_blocks=200, budget=64, cost_model=fixed(), itl_target_s=0.75)
    batch = [req(f"b{k}", prompt_of(6, k), priority=B, max_tokens=12, ignore_eos=True) for k in range(4)]
    _decoding(sched, d, batch)
    late = req("late", prompt_of(12, 7), priority=B, max_tokens=3, ignore_eos=True)
    sched.add_request(late)
    out = d.step()
    assert shape(out)[:4] == [(r.req_id, r.num_computed_tokens - 1, 1) for r in batch]
    assert shape(out)[4][0] == "late" and shape(out)[4][2] >= 1
    assert sched.last_cap_s == pytest.approx(2.0)
    d.run()
    assert_matches_reference(d, batch + [late])


def test_no_chat_step_is_bounded_decodes_take_turns():
    # a=0.5, b=0.1: 8 decodes (1.3) exceed the bound max(2 x 0.52, 2 x 0.5) = 1.04, so
    # 5 decodes fit per step (1.0) and the 8 take turns; all finish as the reference
    sched, d = make(num_blocks=200, budget=64, cost_model=fixed(a=0.5), itl_target_s=0.52)
    batch = [req(f"b{k}", prompt_of(6, k), priority=B, max_tokens=8, ignore_eos=True) for k in range(8)]
    _decoding(sched, d, batch)
    for _ in range(40):
        left = sum(not r.is_finished for r in batch)
        if not left:
            break
        out = d.step()
        assert len(out.seqs) == min(5, left) and sched.last_cap_s == pytest.approx(1.04)
    assert all(r.is_finished for r in batch)
    d.run()
    assert_matches_reference(d, batch)


# ================================================================== randomized
class Clock:
    """Feeds a StepCostModel the 'measured' time of each step from hidden true costs."""

    def __init__(self, model: StepCostModel, coef, rng: random.Random):
        self.model, self.coef, self.rng = model, coef, rng

    def __call__(self, out) -> None:
        if out.seqs:
            n = out.num_batched_tokens
            ctx = sum(s.context_len for s in out.seqs)
            a, b, c = self.coef
            self.model.observe(n, ctx, (a + b * n + c * ctx) * (1 + 0.05 * self.rng.random()))


@pytest.mark.parametrize("seed", range(10))
def test_randomized_with_cap_no_starvation(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    max_model_len = rng.choice([32, 48, 64])
    need = -(-max_model_len // bs)
    num_blocks = need + 1 + rng.randrange(0, 2 * need)
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=rng.random() < 0.75)
    coef = (1.0, 0.1, rng.choice([0.0, 0.005]))
    learn = seed % 2 == 1  # odd seeds: the model starts uncalibrated and learns online
    cm = StepCostModel(min_samples=8) if learn else StepCostModel(coefficients=coef)
    target = rng.choice([1.3, 2.0, 4.0])
    budget = rng.choice([8, 16, 64])
    sched = Scheduler(
        kv,
        budget,
        rng.choice([2, 4, 16]),
        max_model_len,
        cost_model=cm,
        itl_target_s=target,
        batch_step_slowdown=rng.choice([0.0, 0.2, 1.0]),
    )
    eos_fn = lambda ctx: EOS if model_fn(ctx) % 23 == 0 else model_fn(ctx)
    d = Driver(sched, eos_fn)
    clock = Clock(cm, coef, rng)
    reqs: list[Request] = []
    capped = 0
    step = 0
    while len(reqs) < 40 or sched.num_unfinished:
        step += 1
        assert step < 20000
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
            if len(reqs) >= 40:
                break
            prompt = prompt_of(rng.randrange(1, 30), rng.random())[: max_model_len - 1]
            r = req(
                f"s{seed}-{len(reqs)}",
                prompt,
                priority=rng.choice([I, B, B, 2]),
                max_tokens=rng.randrange(1, max_model_len - len(prompt) + 1),
                ignore_eos=rng.random() < 0.3,
            )
            reqs.append(r)
            sched.add_request(r)
        batch_running = [r for r in sched.running if r.priority > I]
        out = d.step()  # checks invariants, order and the cap
        clock(out)
        inter_tokens = out.num_batched_tokens - batch_tokens(out) if out.seqs else 0
        capped += sched.last_cap_s is not None
        # no starvation: running batch work progresses in every step (unless the budget
        # went to interactive work, or memory got tight and a preemption happened)
        if batch_running and inter_tokens < budget and not out.preempted_req_ids:
            assert batch_tokens(out) >= 1, (step, shape(out))
    assert capped > 0
    assert kv.num_free_blocks == num_blocks - 1
    for r in reqs:  # every request finished once, with the reference output
        assert_matches_reference(d, [r])
    if learn:
        assert cm.calibrated


def test_randomized_cap_binds():
    # the randomized test above is not vacuous: over its seeds, the cap cuts batch work
    hits = 0
    for seed in range(4):
        rng = random.Random(seed)
        sched, d = make(num_blocks=100, budget=32, max_seqs=8, cost_model=fixed(), itl_target_s=2.0)
        reqs = []
        for k in range(30):
            r = req(
                f"r{k}",
                prompt_of(rng.randrange(2, 20), 50 * seed + k),
                priority=rng.choice([I, B]),
                max_tokens=rng.randrange(1, 16),
                ignore_eos=True,
            )
            reqs.append(r)
            sched.add_request(r)
            d.step()
            hits += sched.last_cap_hit
        d.run()
        assert_matches_reference(d, reqs)
    assert hits > 10


def test_chat_prefill_is_chunked_next_to_chat_decodes():
    # one chat decoding (1 token); a new 60-token chat prompt: 1.0 + 0.1 * (1 + n) <= 3.05 -> n = 19
    sched, d = make(num_blocks=200, budget=64, cost_model=fixed(), itl_target_s=3.05)
    first = req("c0", prompt_of(6, 1), priority=I, max_tokens=20, ignore_eos=True)
    _decoding(sched, d, [first])
    late = req("c1", prompt_of(60, 2), priority=I, max_tokens=3, ignore_eos=True)
    sched.add_request(late)
    out = d.step()
    assert ("c1", 0, 19) in shape(out) and any(x[0] == "c0" for x in shape(out))
    out = d.step()
    assert ("c1", 19, 19) in shape(out)
    d.run()
    assert_matches_reference(d, [first, late])


def test_chat_prefill_alone_is_not_chunked_and_never_below_the_minimum():
    sched, d = make(num_blocks=200, budget=64, cost_model=fixed(), itl_target_s=0.5)
    alone = req("c0", prompt_of(60, 1), priority=I, max_tokens=2, ignore_eos=True)
    sched.add_request(alone)
    assert shape(d.step()) == [("c0", 0, 60)]  # nobody to stall
    d.run()
    sched2, d2 = make(num_blocks=200, budget=64, cost_model=fixed(), itl_target_s=0.5)
    first = req("c0", prompt_of(6, 1), priority=I, max_tokens=20, ignore_eos=True)
    _decoding(sched2, d2, [first])
    sched2.add_request(req("c1", prompt_of(60, 2), priority=I, max_tokens=3, ignore_eos=True))
    assert ("c1", 0, 16) in shape(d2.step())  # the target leaves no room: the minimum chunk
