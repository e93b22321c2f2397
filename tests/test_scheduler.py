"""Scheduler unit tests, no torch. The test plays the model runner (vLLM style):
``FakeRunner`` keeps a fake paged KV store, writes every scheduled token into the
slot its block table names, and "samples" a token that is a deterministic function
of the context it reads back through the block table. Any scheduling or block
bookkeeping error (wrong chunk, wrong positions, reused or shared-and-overwritten
blocks, wrong prefix-cache hit) changes what the fake model sees, so its output no
longer matches a reference computed from the true token sequence."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.request import Request, RequestStatus, SamplingParams
from hpcserve.engine.scheduler import SamplerResult, Scheduler, SchedulerOutput

EOS = 999
BS = 4


# ------------------------------------------------------------------ the "model"
def model_fn(ctx: list[int]) -> int:
    """Deterministic next token: a polynomial hash of the full context, in [0, 900)."""
    h = 7
    for t in ctx:
        h = (h * 1000003 + t + 1) % 2_147_483_647
    return h % 900


class FakeRunner:
    def __init__(self, block_size: int, fn=model_fn):
        self.bs = block_size
        self.fn = fn
        self.kv: dict[int, list] = {}  # block id -> slots of (token, position)
        self.seen_ctx: dict[str, list[list[int]]] = {}  # contexts at each sample
        self.finished_seen: list[str] = []
        self.preempted_seen: list[str] = []

    def execute(self, out: SchedulerOutput) -> dict[str, SamplerResult]:
        self.finished_seen += out.finished_req_ids
        self.preempted_seen += out.preempted_req_ids
        bs = self.bs
        for s in (
            out.seqs
        ):  # write all KV first, then read: catches cross-request clobbering
            assert 0 not in s.block_ids
            assert len(s.block_ids) * bs >= s.context_len
            assert len(s.block_ids) == -(-s.context_len // bs)  # no over-allocation
            for k, t in enumerate(s.token_ids):
                p = s.start_pos + k
                self.kv.setdefault(s.block_ids[p // bs], [None] * bs)[p % bs] = (t, p)
        res = {}
        for s in out.seqs:
            if not s.do_sample:
                continue
            ctx = []
            for p in range(s.context_len):
                slot = self.kv[s.block_ids[p // bs]][p % bs]
                assert slot is not None and slot[1] == p, (s.req_id, p, slot)
                ctx.append(slot[0])
            self.seen_ctx.setdefault(s.req_id, []).append(ctx)
            res[s.req_id] = SamplerResult(self.fn(ctx))
        return res


def reference(
    prompt, params: SamplingParams, eos=(EOS,), max_model_len=10**9, fn=model_fn
):
    out: list[int] = []
    while True:
        t = fn(prompt + out)
        out.append(t)
        if (not params.ignore_eos and t in eos) or t in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_tokens or len(prompt) + len(out) >= max_model_len:
            return out, "length"


def mkreq(rid, prompt, t=0.0, **kw) -> Request:
    return Request(
        rid, list(prompt), SamplingParams(**kw), eos_token_ids=(EOS,), arrival_time=t
    )


def prompt_of(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(900) for _ in range(n)]


# ---------------------------------------------------------------- invariants
def check_invariants(sched: Scheduler, out: SchedulerOutput | None = None) -> None:
    kv = sched.kv
    bs = kv.block_size
    owners: dict[int, list[tuple[Request, int]]] = {}
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert len(set(r.block_ids)) == len(r.block_ids)
        for i, b in enumerate(r.block_ids):
            owners.setdefault(b, []).append((r, i))
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.block_ids == [] and r.num_computed_tokens == 0
    assert 0 not in owners and 0 not in kv._free
    for b in range(1, kv.num_blocks):
        own = owners.get(b, [])
        assert kv.ref_cnt[b] == len(own), (b, kv.ref_cnt[b], own)
        assert (kv.ref_cnt[b] == 0) == (b in kv._free)
        if (
            len(own) > 1
        ):  # only a shared, hashed (full, cached) prefix block may be shared
            assert kv.block_hash[b] is not None
            assert len({i for _, i in own}) == 1  # at the same prefix position
            assert all(
                (i + 1) * bs <= r.num_computed_tokens for r, i in own
            )  # full, computed
    used = sum(1 for b in range(1, kv.num_blocks) if kv.ref_cnt[b] > 0)
    assert kv.num_free_blocks + used == kv.num_blocks - 1
    for h, b in kv.cached.items():
        assert kv.block_hash[b] == h
    # free queue: never-cached blocks are always reused before cached ones
    hashed = [kv.block_hash[b] is not None for b in kv._free]
    assert hashed == sorted(hashed)
    assert len(sched.running) <= sched.max_num_seqs
    ids = set(sched.requests)
    assert ids == {r.req_id for r in sched.running} | {r.req_id for r in sched.waiting}
    assert len(sched.running) + len(sched.waiting) == len(ids)
    if out is not None:
        n = sum(s.num_new_tokens for s in out.seqs)
        assert n == out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(out.seqs) <= sched.max_num_seqs
        assert len({s.req_id for s in out.seqs}) == len(out.seqs)
        for s in out.seqs:
            r = sched.requests[s.req_id]
            assert s.num_new_tokens >= 1
            assert s.start_pos == r.num_computed_tokens
            assert s.token_ids == r.all_token_ids[s.start_pos : s.context_len]
            assert s.do_sample == (s.context_len == r.num_tokens)
            assert s.block_ids == r.block_ids


class Driver:
    """Runs the schedule → fake model → update loop and records everything."""

    def __init__(self, sched: Scheduler, fn=model_fn):
        self.sched = sched
        self.runner = FakeRunner(sched.kv.block_size, fn)
        self.fn = fn
        self.finished: dict[str, int] = {}  # req_id -> times seen finishing
        self.outputs: list[SchedulerOutput] = []
        self.step_no = 0
        self.finish_step: dict[str, int] = {}

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        check_invariants(self.sched, out)
        self.outputs.append(out)
        sampled = self.runner.execute(out)
        assert set(sampled) == {s.req_id for s in out.seqs if s.do_sample}
        for req, toks in self.sched.update_from_output(out, sampled):
            assert len(toks) == 1 and req.output_token_ids[-1] == toks[0]
            if req.is_finished:
                self.finished[req.req_id] = self.finished.get(req.req_id, 0) + 1
                self.finish_step[req.req_id] = self.step_no
                assert req.block_ids == []
        check_invariants(self.sched)
        self.step_no += 1
        return out

    def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.sched.num_unfinished:
                return
            self.step()
        raise AssertionError(
            f"not finished after {max_steps} steps: {self.sched.running} {self.sched.waiting}"
        )


def make(
    num_blocks=64, budget=16, max_seqs=8, max_model_len=4096, prefix=True, fn=model_fn
):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=prefix)
    sched = Scheduler(kv, budget, max_seqs, max_model_len)
    return sched, Driver(sched, fn)


def assert_matches_reference(d: Driver, reqs: list[Request]) -> None:
    for r in reqs:
        want, reason = reference(
            r.prompt_token_ids,
            r.sampling_params,
            max_model_len=d.sched.max_model_len,
            fn=d.fn,
        )
        assert r.output_token_ids == want, r.req_id
        assert r.finish_reason == reason, r.req_id
        assert d.finished[r.req_id] == 1, r.req_id


# ================================================================== torch-free
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
