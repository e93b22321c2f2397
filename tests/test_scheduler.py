"""Scheduler unit tests, no torch. The test plays the model runner (vLLM style):
``FakeRunner`` keeps a fake paged KV store, writes every scheduled token into the
slot its block table names, and "samples" a token that is a deterministic function
of the context it reads back through the block table. Any scheduling or block
bookkeeping error (wrong chunk, wrong positions, reused or shared-and-overwritten
blocks, wrong prefix-cache hit) changes what the fake model sees, so its output no
longer matches a reference computed from the true token sequence."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.request import RequestStatus
from hpcserve.engine.scheduler import Scheduler
from sched_harness import (
    BS,
    assert_matches_reference,
    make,
    mkreq,
    prompt_of,
)

@pytest.mark.parametrize(
    "modules",
    [
        "hpcserve.engine.scheduler, hpcserve.engine.kv_cache",
        "hpcserve.engine.request, hpcserve.engine.outputs, hpcserve.engine.detok",
        "hpcserve.batch.openai_format",
        "hpcserve",
    ],
)
def test_no_torch_import(modules):
    code = f"import {modules}, sys; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr


# ================================================================== basics
def test_single_request_matches_reference():
    sched, d = make()
    r = mkreq("a", prompt_of(10, 1), max_tokens=7)
    sched.add_request(r)
    d.run()
    assert_matches_reference(d, [r])
    assert r.finish_reason == "length" and len(r.output_token_ids) == 7
    assert sched.kv.num_free_blocks == sched.kv.num_blocks - 1
    assert sched.requests == {} and sched.running == [] and not sched.waiting


def test_duplicate_req_id_rejected():
    sched, _ = make()
    sched.add_request(mkreq("a", [1]))
    with pytest.raises(ValueError):
        sched.add_request(mkreq("a", [2]))


def test_invalid_limits_rejected():
    with pytest.raises(ValueError):
        Scheduler(KVCacheManager(4, BS), 0, 1)
    with pytest.raises(ValueError):
        Scheduler(KVCacheManager(4, BS), 1, 0)


def test_empty_schedule():
    sched, _ = make()
    out = sched.schedule()
    assert out.is_empty and out.num_batched_tokens == 0


# ================================================================== budget / chunking
def test_token_budget_respected_every_step():
    sched, d = make(num_blocks=200, budget=13, max_seqs=6)
    reqs = [
        mkreq(f"r{i}", prompt_of(5 + 7 * i, i), max_tokens=4 + i) for i in range(10)
    ]
    for r in reqs:
        sched.add_request(r)
    d.run()
    assert all(o.num_batched_tokens <= 13 for o in d.outputs)
    assert max(o.num_batched_tokens for o in d.outputs) == 13  # budget actually used
    assert_matches_reference(d, reqs)


def test_chunked_prefill_covers_prompt_and_samples_only_at_the_end():
    sched, d = make(budget=16)
    prompt = prompt_of(50, 3)
    r = mkreq("a", prompt, max_tokens=3)
    sched.add_request(r)
    chunks = []
    while r.num_computed_tokens < 50 or not r.output_token_ids:
        out = d.step()
        (s,) = out.seqs
        chunks.append(s)
    assert [len(c.token_ids) for c in chunks] == [16, 16, 16, 2]
    assert [c.start_pos for c in chunks] == [0, 16, 32, 48]
    assert [c.do_sample for c in chunks] == [False, False, False, True]
    assert [t for c in chunks for t in c.token_ids] == prompt
    assert [len(c.block_ids) for c in chunks] == [4, 8, 12, 13]
    assert len(r.output_token_ids) == 1  # sampled only on the last chunk
    # then decodes: one token each, do_sample
    out = d.step()
    assert [(s.start_pos, s.num_new_tokens, s.do_sample) for s in out.seqs] == [
        (50, 1, True)
    ]
    d.run()
    assert_matches_reference(d, [r])


def test_chunk_ending_exactly_at_prompt_end_samples():
    sched, d = make(budget=8)
    r = mkreq("a", prompt_of(16, 4), max_tokens=2)
    sched.add_request(r)
    o1, o2 = d.step(), d.step()
    assert [s.do_sample for s in o1.seqs + o2.seqs] == [False, True]
    d.run()
    assert_matches_reference(d, [r])


def test_decodes_scheduled_before_new_prefills():
    sched, d = make(budget=10, max_seqs=8)
    a, b = (
        mkreq("a", prompt_of(3, 1), max_tokens=20),
        mkreq("b", prompt_of(4, 2), max_tokens=20),
    )
    sched.add_request(a)
    sched.add_request(b)
    d.step()  # both prefills fit (7 tokens)
    assert len(a.output_token_ids) == len(b.output_token_ids) == 1
    c = mkreq("c", prompt_of(30, 3), max_tokens=2)
    sched.add_request(c)
    for _ in range(3):
        out = d.step()
        assert [s.req_id for s in out.seqs] == ["a", "b", "c"]
        assert [s.num_new_tokens for s in out.seqs[:2]] == [1, 1]
        assert out.seqs[2].num_new_tokens == 8  # the prefill gets what the decodes left
        assert out.num_batched_tokens == 10
    d.run()
    assert_matches_reference(d, [a, b, c])


def test_max_num_seqs_respected():
    sched, d = make(budget=100, max_seqs=2)
    reqs = [mkreq(f"r{i}", prompt_of(4, i), max_tokens=3 + i) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    out = d.step()
    assert [s.req_id for s in out.seqs] == ["r0", "r1"]
    d.run()
    assert max(len(o.seqs) for o in d.outputs) == 2
    assert_matches_reference(d, reqs)
    # r2 is admitted only after r0 (the shortest) finishes
    first_r2 = next(
        i for i, o in enumerate(d.outputs) if any(s.req_id == "r2" for s in o.seqs)
    )
    assert first_r2 == d.finish_step["r0"] + 1


def test_fcfs_admission_no_skip_ahead():
    # 9 usable blocks. r0 takes 6, r1 needs 5 (does not fit), r2 needs 1 (would fit).
    sched, d = make(num_blocks=10, budget=100, max_seqs=8)
    r0 = mkreq("r0", prompt_of(24, 0), max_tokens=2)
    r1 = mkreq("r1", prompt_of(20, 1), max_tokens=2)
    r2 = mkreq("r2", prompt_of(2, 2), max_tokens=2)
    for r in (r0, r1, r2):
        sched.add_request(r)
    out = d.step()
    assert [s.req_id for s in out.seqs] == ["r0"]
    assert [r.req_id for r in sched.waiting] == ["r1", "r2"]
    d.run()
    order = sorted(d.finish_step, key=d.finish_step.get)
    first_sched = {}
    for i, o in enumerate(d.outputs):
        for s in o.seqs:
            first_sched.setdefault(s.req_id, i)
    assert first_sched["r0"] < first_sched["r1"] <= first_sched["r2"]
    assert order[0] == "r0"
    assert_matches_reference(d, [r0, r1, r2])


# ================================================================== preemption
def test_preemption_of_most_recent_and_recompute_without_prefix_cache():
    # 5 usable blocks: a and b each take 2 for a 7-token prompt (+1 decode); growth preempts b.
    sched, d = make(num_blocks=6, budget=64, max_seqs=4, prefix=False)
    a = mkreq("a", prompt_of(7, 1), max_tokens=8)
    b = mkreq("b", prompt_of(7, 2), max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    pre = None
    while pre is None:
        out = d.step()
        if out.preempted_req_ids:
            pre = out
    assert pre.preempted_req_ids == ["b"]
    assert (
        b.status == RequestStatus.PREEMPTED
        and b.block_ids == []
        and b.num_computed_tokens == 0
    )
    assert sched.waiting[0] is b and b not in sched.running
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert [s.req_id for s in pre.seqs] == [
        "a"
    ]  # no admission in a step that preempted
    n_out_at_preempt = len(b.output_token_ids)
    assert n_out_at_preempt >= 1
    # resume: the recompute chunk re-covers prompt + outputs so far, from position 0
    resumed = None
    while resumed is None:
        out = d.step()
        resumed = next((s for s in out.seqs if s.req_id == "b"), None)
    assert resumed.start_pos == 0
    assert (
        resumed.token_ids == b.prompt_token_ids + b.output_token_ids[:n_out_at_preempt]
    )
    assert resumed.do_sample
    # the model saw, at the first sample after resuming, exactly the context it would have
    ctxs = d.runner.seen_ctx["b"]
    assert (
        ctxs[n_out_at_preempt]
        == b.prompt_token_ids + b.output_token_ids[:n_out_at_preempt]
    )
    d.run()
    assert_matches_reference(d, [a, b])
    assert len(b.output_token_ids) == 8 and d.finished["b"] == 1
    assert "b" in d.runner.preempted_seen
    assert sched.kv.num_free_blocks == 5


def test_preemption_resume_uses_prefix_cache():
    sched, d = make(num_blocks=6, budget=64, max_seqs=4, prefix=True)
    a = mkreq("a", prompt_of(7, 1), max_tokens=8)
    b = mkreq("b", prompt_of(9, 2), max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    while not sched.num_preemptions:
        d.step()
    assert b.status == RequestStatus.PREEMPTED
    n = len(b.output_token_ids)
    resumed = None
    while resumed is None:
        out = d.step()
        resumed = next((s for s in out.seqs if s.req_id == "b"), None)
    assert (
        resumed.start_pos % BS == 0 and resumed.start_pos >= BS
    )  # resumed from the cache
    assert (
        resumed.token_ids
        == (b.prompt_token_ids + b.output_token_ids[:n])[resumed.start_pos :]
    )
    d.run()
    assert_matches_reference(d, [a, b])


def test_shared_prefix_hits_cache_and_shares_blocks():
    sched, d = make(num_blocks=40, budget=64)
    system = prompt_of(10, 7)
    a = mkreq("a", system + [1, 2], max_tokens=10)
    sched.add_request(a)
    d.step()
    b = mkreq("b", system + [3], max_tokens=10)
    c = mkreq("c", system[:6] + [5, 5, 5, 5, 5], max_tokens=3)
    sched.add_request(b)
    sched.add_request(c)
    out = d.step()
    sb = next(s for s in out.seqs if s.req_id == "b")
    sc = next(s for s in out.seqs if s.req_id == "c")
    assert (
        b.num_cached_tokens == 8
        and sb.start_pos == 8
        and sb.token_ids == (system + [3])[8:]
    )
    assert sb.block_ids[:2] == a.block_ids[:2]
    assert (
        c.num_cached_tokens == 4
        and sc.start_pos == 4
        and sc.block_ids[0] == a.block_ids[0]
    )
    assert all(sched.kv.ref_cnt[x] == 2 for x in a.block_ids[1:2])
    assert sched.kv.ref_cnt[a.block_ids[0]] == 3
    d.run()
    assert_matches_reference(d, [a, b, c])
    assert a.num_cached_tokens == 0


def test_prefix_caching_disabled_recomputes_everything():
    sched, d = make(num_blocks=40, budget=64, prefix=False)
    system = prompt_of(10, 7)
    a = mkreq("a", system + [1, 2], max_tokens=4)
    sched.add_request(a)
    d.run()
    b = mkreq("b", system + [3], max_tokens=4)
    sched.add_request(b)
    out = d.step()
    assert out.seqs[0].start_pos == 0 and b.num_cached_tokens == 0
    d.run()
    assert_matches_reference(d, [a, b])


def test_preempted_request_finishes_exactly_once_with_max_tokens():
    # Tight memory, many long decodes: lots of preemptions.
    sched, d = make(num_blocks=12, budget=32, max_seqs=6)
    reqs = [
        mkreq(f"r{i}", prompt_of(6 + i, i), max_tokens=20, ignore_eos=True)
        for i in range(6)
    ]
    for r in reqs:
        sched.add_request(r)
    d.run()
    assert sched.num_preemptions > 0
    assert any(r.num_preemptions for r in reqs)
    assert_matches_reference(d, reqs)
    for r in reqs:
        assert len(r.output_token_ids) == 20 and r.finish_reason == "length"
    d.runner.execute(sched.schedule())  # deliver the last finished ids
    assert sorted(d.runner.finished_seen) == sorted(r.req_id for r in reqs)
    assert sched.kv.num_free_blocks == 11


def test_running_request_preempts_itself_when_it_is_the_newest():
    # a (older) is decoding; b (newest) needs a block and none is free: b preempts itself
    # 4 usable blocks = 16 tokens: each request alone fits (8 prompt + 8 out, last KV never written)
    sched, d = make(num_blocks=5, budget=64, max_seqs=4, prefix=False)
    a = mkreq("a", prompt_of(8, 1), max_tokens=8, ignore_eos=True)
    b = mkreq("b", prompt_of(8, 2), max_tokens=8, ignore_eos=True)
    sched.add_request(a)
    sched.add_request(b)
    d.run()
    assert sched.num_preemptions > 0
    assert_matches_reference(d, [a, b])
    assert b.num_preemptions >= 1 and a.num_preemptions == 0


def test_multiple_preemptions_keep_fcfs_order_in_waiting():
    # 7 usable blocks = 28 tokens: one request (4 + 24) fits alone
    sched, d = make(num_blocks=8, budget=64, max_seqs=8, prefix=False)
    reqs = [
        mkreq(f"r{i}", prompt_of(4, i), max_tokens=24, ignore_eos=True)
        for i in range(4)
    ]
    for r in reqs:
        sched.add_request(r)
    while True:
        d.step()
        if sum(r.status == RequestStatus.PREEMPTED for r in sched.waiting) >= 2:
            break
        if not sched.num_unfinished:
            pytest.fail("no double preemption")
    ws = [r.req_id for r in sched.waiting]
    assert ws == sorted(ws)  # older first, regardless of preemption order
    d.run()
    assert_matches_reference(d, reqs)


def test_no_starvation_with_steady_arrivals():
    sched, d = make(num_blocks=24, budget=24, max_seqs=4)
    early = []
    for i in range(400):
        r = mkreq(
            f"r{i:04d}",
            prompt_of(5 + i % 9, i),
            t=float(i),
            max_tokens=6 + i % 7,
            ignore_eos=True,
        )
        sched.add_request(r)
        if i < 20:
            early.append(r)
        d.step()
        if all(x.is_finished for x in early) and i > 40:
            break
    assert all(x.is_finished for x in early), [x for x in early if not x.is_finished]
    assert sched.num_unfinished > 0  # arrivals were still outpacing the engine
    # admission stays FCFS: finish order tracks arrival order within the concurrency window
    for j, x in enumerate(early):
        assert d.finish_step[x.req_id] <= 10 * (j + 1) + 20


# ================================================================== stop conditions
