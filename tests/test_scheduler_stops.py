"""Scheduler tests, part 2 (no torch): stop conditions, aborts at every stage, and a
randomized property test over arrivals, lengths, block counts and aborts; see
test_scheduler.py for the fake-runner harness they share."""

from __future__ import annotations

import random

import pytest

from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.request import Request, RequestStatus
from hpcserve.engine.scheduler import Scheduler
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

def scripted(tokens: list[int]):
    """Model that emits ``tokens[k]`` as the k-th generated token (by context length)."""

    def fn(ctx):
        k = len(ctx) - fn.prompt_len
        return tokens[k] if k < len(tokens) else 1

    return fn


def run_scripted(prompt_len, tokens, max_model_len=4096, **params):
    fn = scripted(tokens)
    fn.prompt_len = prompt_len
    sched, d = make(max_model_len=max_model_len, fn=fn)
    r = mkreq("a", list(range(prompt_len)), **params)
    sched.add_request(r)
    d.run()
    return r, sched, d


def test_stop_on_eos():
    r, _, _ = run_scripted(5, [3, 4, EOS, 6], max_tokens=10)
    assert r.output_token_ids == [3, 4, EOS]
    assert r.finish_reason == "stop" and r.stop_reason == EOS


def test_ignore_eos_runs_to_max_tokens():
    r, _, _ = run_scripted(5, [3, EOS, 4, EOS, 6], max_tokens=5, ignore_eos=True)
    assert r.output_token_ids == [3, EOS, 4, EOS, 6]
    assert r.finish_reason == "length" and r.stop_reason is None


def test_stop_token_ids():
    r, _, _ = run_scripted(5, [3, 42, 4], max_tokens=10, stop_token_ids=[42])
    assert r.output_token_ids == [3, 42]
    assert r.finish_reason == "stop" and r.stop_reason == 42
    # stop_token_ids apply even with ignore_eos
    r, _, _ = run_scripted(
        5, [EOS, 42, 4], max_tokens=10, stop_token_ids=[42], ignore_eos=True
    )
    assert r.output_token_ids == [EOS, 42] and r.finish_reason == "stop"


def test_max_tokens_length():
    r, _, _ = run_scripted(5, [3] * 20, max_tokens=4)
    assert r.output_token_ids == [3] * 4 and r.finish_reason == "length"
    r, _, _ = run_scripted(5, [3] * 20, max_tokens=1)
    assert r.output_token_ids == [3] and r.finish_reason == "length"


def test_max_model_len():
    r, _, _ = run_scripted(5, [3] * 20, max_model_len=9, max_tokens=100)
    assert (
        r.num_tokens == 9
        and len(r.output_token_ids) == 4
        and r.finish_reason == "length"
    )


def test_eos_on_last_allowed_token_is_stop():
    r, _, _ = run_scripted(5, [3, EOS], max_tokens=2)
    assert r.finish_reason == "stop"


# ================================================================== finish / abort
def test_abort_waiting_request():
    sched, d = make(budget=4, max_seqs=1)
    a, b = (
        mkreq("a", prompt_of(3, 1), max_tokens=5),
        mkreq("b", prompt_of(3, 2), max_tokens=5),
    )
    sched.add_request(a)
    sched.add_request(b)
    d.step()
    assert b in sched.waiting
    got = sched.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert got is b and b.finish_reason == "abort" and b.block_ids == []
    assert b not in sched.waiting and "b" not in sched.requests
    assert (
        sched.finish_request("b", RequestStatus.FINISHED_ABORTED) is None
    )  # only once
    out = d.step()
    assert out.finished_req_ids == ["b"]
    assert all(s.req_id != "b" for s in out.seqs)
    out = d.step()
    assert out.finished_req_ids == []
    d.run()
    assert_matches_reference(d, [a])


def test_abort_running_request_frees_blocks():
    sched, d = make(num_blocks=20, budget=64)
    a, b = (
        mkreq("a", prompt_of(9, 1), max_tokens=50),
        mkreq("b", prompt_of(5, 2), max_tokens=5),
    )
    sched.add_request(a)
    sched.add_request(b)
    d.step()
    d.step()
    assert a.status == RequestStatus.RUNNING and a.block_ids
    free_before = sched.kv.num_free_blocks
    n_a = len(a.block_ids)
    assert sched.finish_request("a", RequestStatus.FINISHED_ABORTED) is a
    assert a.block_ids == [] and a not in sched.running
    assert sched.kv.num_free_blocks == free_before + n_a
    check_invariants(sched)
    out = d.step()
    assert out.finished_req_ids == ["a"] and all(s.req_id != "a" for s in out.seqs)
    d.run()
    assert a.finish_reason == "abort"
    assert_matches_reference(d, [b])
    assert d.runner.finished_seen.count("a") == 1


def test_abort_between_schedule_and_update():
    sched, d = make()
    a, b = (
        mkreq("a", prompt_of(5, 1), max_tokens=5),
        mkreq("b", prompt_of(5, 2), max_tokens=5),
    )
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sampled = d.runner.execute(out)
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    events = sched.update_from_output(out, sampled)
    assert [r.req_id for r, _ in events] == ["b"]
    assert a.output_token_ids == [] and a.block_ids == []
    check_invariants(sched)
    assert sched.schedule().finished_req_ids == ["a"]


def test_abort_preempted_request():
    sched, d = make(num_blocks=6, budget=64, prefix=False)
    a = mkreq("a", prompt_of(7, 1), max_tokens=8, ignore_eos=True)
    b = mkreq("b", prompt_of(7, 2), max_tokens=8, ignore_eos=True)
    sched.add_request(a)
    sched.add_request(b)
    while not sched.num_preemptions:
        d.step()
    assert b.status == RequestStatus.PREEMPTED
    assert sched.finish_request("b", RequestStatus.FINISHED_ABORTED) is b
    assert b not in sched.waiting
    check_invariants(sched)
    out = d.step()
    assert "b" in out.finished_req_ids
    d.run()
    assert_matches_reference(d, [a])


def test_finish_request_stop_string_from_running():
    # the engine finishes a running request when the detokenizer sees a stop string
    sched, d = make()
    a = mkreq("a", prompt_of(5, 1), max_tokens=50)
    sched.add_request(a)
    d.step()
    d.step()
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert a.finish_reason == "stop" and sched.num_unfinished == 0
    assert sched.kv.num_free_blocks == sched.kv.num_blocks - 1
    assert sched.schedule().finished_req_ids == ["a"]


# ================================================================== randomized
@pytest.mark.parametrize("seed", range(20))
def test_randomized_property(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    max_model_len = rng.choice([32, 48, 64])
    need = -(-max_model_len // bs)
    num_blocks = (
        need + 1 + rng.randrange(0, need)
    )  # a single max-length request always fits
    prefix = rng.random() < 0.75
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=prefix)
    sched = Scheduler(
        kv, rng.choice([1, 3, 8, 16, 64]), rng.choice([1, 2, 4, 16]), max_model_len
    )
    eos_fn = lambda ctx: EOS if model_fn(ctx) % 23 == 0 else model_fn(ctx)
    d = Driver(sched, eos_fn)
    system_prompts = [
        prompt_of(rng.randrange(1, 20), 1000 * seed + k) for k in range(3)
    ]
    reqs: list[Request] = []
    aborted: set[str] = set()
    n_total = 40
    step = 0
    while len(reqs) < n_total or sched.num_unfinished:
        step += 1
        assert step < 20000
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 4])):
            if len(reqs) >= n_total:
                break
            if rng.random() < 0.5:
                prompt = rng.choice(system_prompts) + prompt_of(
                    rng.randrange(0, 10), rng.random()
                )
            else:
                prompt = prompt_of(rng.randrange(1, 30), rng.random())
            prompt = prompt[: max_model_len - 1] or [1]
            max_tokens = rng.randrange(1, max_model_len - len(prompt) + 1)
            params = {"max_tokens": max_tokens, "ignore_eos": rng.random() < 0.3}
            if rng.random() < 0.2:
                params["stop_token_ids"] = [rng.randrange(900)]
            r = mkreq(f"s{seed}-{len(reqs)}", prompt, t=float(step), **params)
            reqs.append(r)
            sched.add_request(r)
        if sched.requests and rng.random() < 0.02:
            victim = rng.choice(sorted(sched.requests))
            assert (
                sched.finish_request(victim, RequestStatus.FINISHED_ABORTED) is not None
            )
            aborted.add(victim)
            check_invariants(sched)
        d.step()
    assert kv.num_free_blocks == num_blocks - 1
    for r in reqs:
        assert r.is_finished
        if r.req_id in aborted:
            assert r.finish_reason == "abort" and r.req_id not in d.finished
            want, _ = reference(
                r.prompt_token_ids,
                r.sampling_params,
                max_model_len=max_model_len,
                fn=eos_fn,
            )
            assert r.output_token_ids == want[: len(r.output_token_ids)]
        else:
            assert_matches_reference(d, [r])
    d.runner.execute(sched.schedule())  # deliver the last finished ids
    assert sorted(d.runner.finished_seen) == sorted(r.req_id for r in reqs)
