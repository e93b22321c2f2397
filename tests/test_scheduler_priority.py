"""Scheduler tests, part 3 (no torch): the two scheduling classes. Interactive
(chat, priority 0) requests go ahead of batch (priority 1) ones: in the waiting
queue, in the token budget of every step, and for KV blocks (an interactive
request preempts batch ones by recompute). Uses the fake-runner harness of
test_scheduler.py; ``Driver.step`` also checks the per-step ordering and
preemption rules (``sched_harness.check_step_order``)."""

from __future__ import annotations

import random

import pytest

from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.request import (
    PRIORITY_BATCH,
    PRIORITY_INTERACTIVE,
    Request,
    RequestStatus,
    SamplingParams,
)
from hpcserve.engine.scheduler import Scheduler
from hpcserve.errors import RequestError
from sched_harness import (
    EOS,
    Driver,
    assert_matches_reference,
    check_invariants,
    make,
    mkreq,
    model_fn,
    prompt_of,
    reference,
)

I, B = PRIORITY_INTERACTIVE, PRIORITY_BATCH


def first_sched(d: Driver) -> dict[str, int]:
    first: dict[str, int] = {}
    for k, o in enumerate(d.outputs):
        for s in o.seqs:
            first.setdefault(s.req_id, k)
    return first


def seq_ids(out) -> list[str]:
    return [s.req_id for s in out.seqs]


# ================================================================== request field
def test_priority_field_and_constants():
    assert (PRIORITY_INTERACTIVE, PRIORITY_BATCH) == (0, 1)
    assert Request("a", [1], SamplingParams()).priority == PRIORITY_INTERACTIVE
    assert mkreq("a", [1], priority=B).priority == PRIORITY_BATCH
    assert mkreq("a", [1], priority=-5).priority == -5  # any int
    for bad in (True, 1.0, "1", None):
        with pytest.raises(RequestError) as e:
            Request("a", [1], SamplingParams(), priority=bad)
        assert e.value.field == "priority"


# ================================================================== waiting order
def test_waiting_queue_is_priority_then_fcfs():
    sched, _ = make()
    for rid, p in [("b0", B), ("b1", B), ("i0", I), ("x0", 5), ("b2", B), ("i1", I), ("u0", -1), ("x1", 5)]:
        sched.add_request(mkreq(rid, [1, 2], priority=p))
    assert [r.req_id for r in sched.waiting] == ["u0", "i0", "i1", "b0", "b1", "b2", "x0", "x1"]
    check_invariants(sched)


def test_interactive_added_after_batch_queue_is_admitted_first():
    sched, d = make(num_blocks=64, budget=100, max_seqs=2)
    batch = [mkreq(f"b{k}", prompt_of(6, k), priority=B, max_tokens=5) for k in range(4)]
    inter = [mkreq(f"i{k}", prompt_of(5, 10 + k), priority=I, max_tokens=4) for k in range(2)]
    for r in batch + inter:
        sched.add_request(r)
    assert [r.req_id for r in sched.waiting] == ["i0", "i1", "b0", "b1", "b2", "b3"]
    out = d.step()
    assert seq_ids(out) == ["i0", "i1"]
    d.run()
    assert_matches_reference(d, batch + inter)
    first = first_sched(d)
    assert max(d.finish_step[r.req_id] for r in inter) < min(first[r.req_id] for r in batch)
    assert [first[r.req_id] for r in batch] == sorted(first[r.req_id] for r in batch)  # FCFS within batch
    assert sched.num_preemptions == 0


def test_new_interactive_goes_ahead_of_running_batch_prefill_and_decodes():
    # b (batch) is admitted first and is still prefilling a long prompt in chunks that
    # would take the whole budget; i (interactive) arrives later.
    sched, d = make(num_blocks=64, budget=8)
    b = mkreq("b", prompt_of(40, 1), priority=B, max_tokens=3)
    sched.add_request(b)
    out = d.step()
    assert [(s.req_id, s.num_new_tokens) for s in out.seqs] == [("b", 8)]
    i = mkreq("i", prompt_of(3, 2), priority=I, max_tokens=6, ignore_eos=True)
    sched.add_request(i)
    out = d.step()  # the new chat request is admitted before b's next chunk
    assert [(s.req_id, s.num_new_tokens) for s in out.seqs] == [("i", 3), ("b", 5)]
    assert sched.running == [b, i]  # admission order: b first...
    for chunk in (7, 7, 7, 6):  # ...but i's decode is served first, every step
        out = d.step()
        assert [(s.req_id, s.num_new_tokens) for s in out.seqs] == [("i", 1), ("b", chunk)]
    assert b.num_computed_tokens == 40 and len(b.output_token_ids) == 1
    assert len(i.output_token_ids) == 5
    d.run()
    assert_matches_reference(d, [b, i])
    assert d.finish_step["i"] == 6  # one token per step from the step it arrived


def test_single_class_keeps_running_first_and_admission_order():
    # same shape as above with both requests batch: the old FCFS behaviour
    sched, d = make(num_blocks=64, budget=8)
    b = mkreq("b", prompt_of(40, 1), priority=B, max_tokens=3)
    sched.add_request(b)
    d.step()
    c = mkreq("c", prompt_of(3, 2), priority=B, max_tokens=6, ignore_eos=True)
    sched.add_request(c)
    for _ in range(4):
        assert [(s.req_id, s.num_new_tokens) for s in d.step().seqs] == [("b", 8)]
    d.run()
    assert_matches_reference(d, [b, c])


# ================================================================== preemption
@pytest.mark.parametrize("prefix", [False, True])
def test_interactive_preempts_batch_when_cache_is_too_small(prefix):
    # 9 usable blocks. b0, b1: 12-token prompts (3 blocks, then 4 when decoding).
    sched, d = make(num_blocks=10, budget=64, max_seqs=4, prefix=prefix)
    b0 = mkreq("b0", prompt_of(12, 1), priority=B, max_tokens=8, ignore_eos=True)
    b1 = mkreq("b1", prompt_of(12, 2), priority=B, max_tokens=8, ignore_eos=True)
    sched.add_request(b0)
    sched.add_request(b1)
    d.step()
    d.step()
    assert sched.kv.num_free_blocks == 1 and sched.num_preemptions == 0
    i = mkreq("i", prompt_of(16, 3), priority=I, max_tokens=4, ignore_eos=True)  # needs 4 blocks
    sched.add_request(i)
    out = d.step()
    assert out.preempted_req_ids == ["b1"]  # the most recently admitted batch request, and only it
    assert seq_ids(out) == ["i", "b0"]
    assert [r.req_id for r in sched.waiting] == ["b1"] and b1.status == RequestStatus.PREEMPTED
    d.run()
    assert_matches_reference(d, [b0, b1, i])  # recompute: outputs as if never preempted
    assert i.num_preemptions == 0 and b1.num_preemptions >= 1
    assert d.finish_step["i"] == 2 + 3  # never delayed: admitted on arrival, one decode per step
    assert sched.kv.num_free_blocks == 9


def test_preemption_victims_least_urgent_then_latest_admitted_just_enough():
    # 9 usable blocks. x (priority 2, admitted first) and b0, b1, b2 (batch) take 2 each.
    sched, d = make(num_blocks=10, budget=64, max_seqs=8, prefix=False)
    x = mkreq("x", prompt_of(7, 1), priority=2, max_tokens=6, ignore_eos=True)
    sched.add_request(x)
    d.step()
    bs = [mkreq(f"b{k}", prompt_of(7, 10 + k), priority=B, max_tokens=6, ignore_eos=True) for k in range(3)]
    for r in bs:
        sched.add_request(r)
    d.step()
    assert sched.running == [x] + bs and sched.kv.num_free_blocks == 1
    i = mkreq("i", prompt_of(20, 3), priority=I, max_tokens=3, ignore_eos=True)  # 5 blocks
    sched.add_request(i)
    out = d.step()
    # x is least urgent although admitted first; then the newest batch one; b0, b1 keep running
    assert out.preempted_req_ids == ["x", "b2"]
    assert seq_ids(out) == ["i", "b0", "b1"]
    assert [r.req_id for r in sched.waiting] == ["b2", "x"]  # front of their own classes
    d.run()
    assert_matches_reference(d, [x, *bs, i])
    assert i.num_preemptions == 0


def test_growth_preempts_least_urgent_not_most_recent():
    # admission order i0, b, i1; 5 usable blocks, all in use when i1 needs its second block
    sched, d = make(num_blocks=6, budget=64, max_seqs=4, prefix=False)
    i0 = mkreq("i0", prompt_of(4, 1), priority=I, max_tokens=6, ignore_eos=True)
    b = mkreq("b", prompt_of(4, 2), priority=B, max_tokens=6, ignore_eos=True)
    i1 = mkreq("i1", prompt_of(4, 3), priority=I, max_tokens=6, ignore_eos=True)
    for r in (i0, b, i1):
        sched.add_request(r)
        d.step()
    assert sched.running == [i0, b, i1] and sched.kv.num_free_blocks == 0
    out = d.step()
    # old rule (most recent) would have preempted i1 itself; now the batch request goes
    assert out.preempted_req_ids == ["b"]
    assert seq_ids(out) == ["i0", "i1"]
    d.run()
    assert_matches_reference(d, [i0, b, i1])
    assert i0.num_preemptions == i1.num_preemptions == 0


def test_batch_growth_never_preempts_interactive_already_served():
    # admission order b, i; 4 usable blocks. When b needs a block, i (served first in the
    # step) is not a candidate: b preempts itself.
    sched, d = make(num_blocks=5, budget=64, max_seqs=4, prefix=False)
    b = mkreq("b", prompt_of(8, 1), priority=B, max_tokens=8, ignore_eos=True)
    sched.add_request(b)
    d.step()
    i = mkreq("i", prompt_of(4, 2), priority=I, max_tokens=8, ignore_eos=True)
    sched.add_request(i)
    d.run()
    assert_matches_reference(d, [b, i])
    assert sched.num_preemptions > 0
    assert i.num_preemptions == 0 and b.num_preemptions == sched.num_preemptions
    assert all(o.preempted_req_ids in ([], ["b"]) for o in d.outputs)


def test_less_urgent_or_equal_waiting_request_never_preempts():
    # an interactive request fills the cache; a waiting batch one (and an equally urgent
    # interactive one) must wait for it instead of preempting it
    for p in (B, I):
        sched, d = make(num_blocks=7, budget=64, max_seqs=4, prefix=False)
        i = mkreq("i", prompt_of(18, 1), priority=I, max_tokens=6, ignore_eos=True)  # up to 6 blocks
        sched.add_request(i)
        d.step()
        w = mkreq("w", prompt_of(9, 2), priority=p, max_tokens=3, ignore_eos=True)  # 3 blocks
        sched.add_request(w)
        d.run()
        assert sched.num_preemptions == 0
        assert first_sched(d)["w"] > d.finish_step["i"]
        assert_matches_reference(d, [i, w])


def test_no_preemption_when_even_all_batch_would_not_make_room():
    # 10 usable blocks. i (interactive) holds ~6, b (batch) ~2; j needs 8: preempting b
    # would not be enough, so b is left alone until i finishes.
    sched, d = make(num_blocks=11, budget=64, max_seqs=4, prefix=False)
    i = mkreq("i", prompt_of(20, 1), priority=I, max_tokens=4, ignore_eos=True)
    b = mkreq("b", prompt_of(4, 2), priority=B, max_tokens=12, ignore_eos=True)
    sched.add_request(i)
    sched.add_request(b)
    d.step()
    j = mkreq("j", prompt_of(30, 3), priority=I, max_tokens=3, ignore_eos=True)
    sched.add_request(j)
    while not i.is_finished:
        out = d.step()
        assert out.preempted_req_ids == [] and "j" not in seq_ids(out)
    out = d.step()  # now j fits by preempting b
    assert "j" in seq_ids(out)
    assert out.preempted_req_ids == (["b"] if b.status == RequestStatus.PREEMPTED else [])
    d.run()
    assert_matches_reference(d, [i, b, j])
    assert i.num_preemptions == j.num_preemptions == 0


def test_interactive_preempts_batch_for_a_seat():
    sched, d = make(num_blocks=64, budget=64, max_seqs=2)
    b0 = mkreq("b0", prompt_of(5, 1), priority=B, max_tokens=10, ignore_eos=True)
    b1 = mkreq("b1", prompt_of(5, 2), priority=B, max_tokens=10, ignore_eos=True)
    sched.add_request(b0)
    sched.add_request(b1)
    d.step()
    i = mkreq("i", prompt_of(5, 3), priority=I, max_tokens=3, ignore_eos=True)
    sched.add_request(i)
    out = d.step()
    assert out.preempted_req_ids == ["b1"] and seq_ids(out) == ["i", "b0"]
    d.run()
    assert_matches_reference(d, [b0, b1, i])


def test_no_admission_after_growth_preemption_even_interactive():
    # i0 (interactive) grows and preempts b; the waiting interactive j is not admitted in
    # that step (memory is tight), but in the next one
    sched, d = make(num_blocks=5, budget=64, max_seqs=4, prefix=False)
    i0 = mkreq("i0", prompt_of(8, 1), priority=I, max_tokens=6, ignore_eos=True)
    b = mkreq("b", prompt_of(8, 2), priority=B, max_tokens=6, ignore_eos=True)
    sched.add_request(i0)
    sched.add_request(b)
    d.step()  # 2 blocks each, 0 free; both need a 3rd block next step
    j = mkreq("j", prompt_of(2, 3), priority=I, max_tokens=2, ignore_eos=True)
    sched.add_request(j)
    out = d.step()
    assert out.preempted_req_ids == ["b"] and seq_ids(out) == ["i0"]
    assert [r.req_id for r in sched.waiting] == ["j", "b"]
    assert seq_ids(d.step())[:2] == ["i0", "j"]
    d.run()
    assert_matches_reference(d, [i0, b, j])


# ================================================================== progress
def test_batch_progresses_while_interactive_load_leaves_room():
    sched, d = make(num_blocks=200, budget=24, max_seqs=8)
    batch = [mkreq(f"b{k}", prompt_of(20, k), priority=B, max_tokens=12, ignore_eos=True) for k in range(6)]
    for r in batch:
        sched.add_request(r)
    inter: list[tuple[Request, int]] = []
    for step in range(300):
        if step % 3 == 0 and step < 120:
            r = mkreq(f"i{step}", prompt_of(6, 100 + step), priority=I, max_tokens=4, ignore_eos=True)
            sched.add_request(r)
            inter.append((r, d.step_no))
        if not sched.num_unfinished:
            break
        d.step()
    assert not sched.num_unfinished
    first = first_sched(d)
    for r, arrived in inter:  # chat: whole prompt and first token in the arrival step
        assert first[r.req_id] == arrived
        (s,) = [s for s in d.outputs[arrived].seqs if s.req_id == r.req_id]
        assert s.start_pos == 0 and s.do_sample
    # batch keeps going meanwhile: every batch request finished while chat was arriving
    assert max(d.finish_step[r.req_id] for r in batch) < 120
    assert sched.num_preemptions == 0
    assert_matches_reference(d, batch + [r for r, _ in inter])


# ================================================================== randomized
class CheckedScheduler(Scheduler):
    """Fails if a waiting head preempted requests and then still did not fit."""

    def _admit_head(self, req, budget, done):
        num_new, victims = super()._admit_head(req, budget, done)
        assert not (victims and num_new is None), (req, victims)
        return num_new, victims


@pytest.mark.parametrize("seed", range(12))
def test_randomized_mixed_priorities(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    max_model_len = rng.choice([32, 48, 64])
    need = -(-max_model_len // bs)
    num_blocks = need + 1 + rng.randrange(0, need)  # a single max-length request always fits
    prefix = rng.random() < 0.75
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=prefix)
    sched = CheckedScheduler(kv, rng.choice([3, 8, 16, 64]), rng.choice([1, 2, 4, 16]), max_model_len)
    eos_fn = lambda ctx: EOS if model_fn(ctx) % 23 == 0 else model_fn(ctx)
    d = Driver(sched, eos_fn)
    systems = [prompt_of(rng.randrange(1, 20), 1000 * seed + k) for k in range(3)]
    prios = rng.choice([[I, B], [I, B, B, B], [-1, I, B, 2]])
    reqs: list[Request] = []
    aborted: set[str] = set()
    step = 0
    while len(reqs) < 40 or sched.num_unfinished:
        step += 1
        assert step < 20000
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 4])):
            if len(reqs) >= 40:
                break
            if rng.random() < 0.5:
                prompt = rng.choice(systems) + prompt_of(rng.randrange(0, 10), rng.random())
            else:
                prompt = prompt_of(rng.randrange(1, 30), rng.random())
            prompt = prompt[: max_model_len - 1] or [1]
            params = {
                "max_tokens": rng.randrange(1, max_model_len - len(prompt) + 1),
                "ignore_eos": rng.random() < 0.3,
            }
            r = mkreq(f"s{seed}-{len(reqs)}", prompt, t=float(step), priority=rng.choice(prios), **params)
            reqs.append(r)
            sched.add_request(r)
        if sched.requests and rng.random() < 0.02:
            victim = rng.choice(sorted(sched.requests))
            assert sched.finish_request(victim, RequestStatus.FINISHED_ABORTED) is not None
            aborted.add(victim)
            check_invariants(sched)
        d.step()
    assert kv.num_free_blocks == num_blocks - 1
    for r in reqs:
        assert r.is_finished
        if r.req_id in aborted:
            want, _ = reference(r.prompt_token_ids, r.sampling_params, max_model_len=max_model_len, fn=eos_fn)
            assert r.output_token_ids == want[: len(r.output_token_ids)]
        else:
            assert_matches_reference(d, [r])
    d.runner.execute(sched.schedule())
    assert sorted(d.runner.finished_seen) == sorted(r.req_id for r in reqs)


def test_mixed_load_interactive_admissions_preempt_batch():
    # tight memory, one arrival per step, random class: chat arrivals do preempt batch
    # requests (and only batch ones), and all outputs still match the reference
    hits = 0
    for seed in range(8):
        rng = random.Random(seed)
        sched, d = make(num_blocks=12, budget=16, max_seqs=4)
        reqs: list[Request] = []
        prio: dict[str, int] = {}
        for k in range(30):
            r = mkreq(
                f"r{k}",
                prompt_of(rng.randrange(2, 14), 50 * seed + k),
                priority=rng.choice([I, B]),
                max_tokens=rng.randrange(1, 16),
                ignore_eos=True,
            )
            reqs.append(r)
            prio[r.req_id] = r.priority
            sched.add_request(r)
            before = {x.req_id for x in sched.running}
            out = d.step()
            admitted = [s for s in seq_ids(out) if s not in before]
            if out.preempted_req_ids and admitted:
                hits += 1
                assert all(prio[v] == B for v in out.preempted_req_ids)
                assert all(prio[a] == I for a in admitted)
        d.run()
        assert_matches_reference(d, reqs)
    assert hits > 0
