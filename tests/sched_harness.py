"""Harness for the scheduler tests: a fake runner over a fake paged KV store, the
reference it is checked against, and invariants checked after every step (state
invariants, plus per-step ordering and preemption rules of the priority classes,
which reduce to plain FCFS with a single class, and the ITL cap on batch work when
the scheduler has one). No torch."""

from __future__ import annotations

import random

from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.request import PRIORITY_INTERACTIVE, Request, RequestStatus, SamplingParams
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


def mkreq(rid, prompt, t=0.0, priority=0, **kw) -> Request:
    return Request(
        rid,
        list(prompt),
        SamplingParams(**kw),
        eos_token_ids=(EOS,),
        arrival_time=t,
        priority=priority,
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
    prios = [r.priority for r in sched.waiting]
    assert prios == sorted(prios), prios  # waiting: by priority (then FCFS)
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


def check_step_order(
    sched: Scheduler,
    run0: list[Request],
    wait0: list[Request],
    out: SchedulerOutput,
) -> None:
    """Rules of one ``schedule()`` call, given ``running``/``waiting`` before it."""
    ids = [s.req_id for s in out.seqs]
    pre = out.preempted_req_ids
    assert len(set(pre)) == len(pre)
    assert not set(pre) & set(ids), "a request scheduled in this step was preempted"
    # serving order of the running requests: priority, then admission
    served = sorted(run0, key=lambda r: r.priority)  # stable
    rank = {r.req_id: k for k, r in enumerate(served)}
    # victims: running before the step, and a suffix of the serving order (least
    # urgent first, most recently admitted first within a class)
    assert set(pre) <= set(rank), (pre, list(rank))
    assert {r.req_id for r in served[len(served) - len(pre) :]} == set(pre), (
        pre,
        [(r.req_id, r.priority) for r in served],
    )
    for r in run0:
        if r.req_id in pre:
            assert r.status == RequestStatus.PREEMPTED and r in sched.waiting
    # admissions: a prefix of the waiting order, strictly more urgent than every victim
    admitted = [i for i in ids if i not in rank]
    assert admitted == [r.req_id for r in wait0[: len(admitted)]], (admitted, wait0)
    prio = {r.req_id: r.priority for r in run0 + wait0}
    if pre and admitted:
        assert max(prio[a] for a in admitted) < min(prio[v] for v in pre)
    # step order: by priority; within a priority running requests (admission order)
    # before admitted ones (waiting order)
    wrank = {r.req_id: k for k, r in enumerate(wait0)}
    key = {
        i: (prio[i], 0, rank[i]) if i in rank else (prio[i], 1, wrank[i]) for i in ids
    }
    assert ids == sorted(ids, key=key.get), [(i, key[i]) for i in ids]
    # a running request is left out only when the budget ran out, or (batch-class
    # requests only) when the step's ITL cap cut batch work
    left = [r.req_id for r in run0 if r.req_id not in ids and r.req_id not in pre]
    if left and out.num_batched_tokens < sched.max_num_batched_tokens:
        assert sched.last_cap_hit, left
        assert all(prio[x] > PRIORITY_INTERACTIVE for x in left), left


def check_cap(sched: Scheduler, out: SchedulerOutput) -> None:
    """The ITL cap of one step (``sched.last_cap_s``, None if not applied): the step's
    predicted time is within it unless at most the 1-token batch floor was scheduled; in
    chat mode it is at most the target and the interactive-only time x (1 + slowdown)."""
    cm = sched.cost_model
    cap = sched.last_cap_s
    if cap is None:
        return
    prio = {s.req_id: sched.requests[s.req_id].priority for s in out.seqs}
    inter = [s for s in out.seqs if prio[s.req_id] <= PRIORITY_INTERACTIVE]
    n_batch = sum(s.num_new_tokens for s in out.seqs if prio[s.req_id] > PRIORITY_INTERACTIVE)
    chat = any(r.priority <= PRIORITY_INTERACTIVE for r in list(sched.running) + list(sched.waiting)) or inter
    pred = cm.predict(out.num_batched_tokens, sum(s.context_len for s in out.seqs))
    # (with no batch token, the interactive work alone may exceed the cap)
    assert pred <= cap + 1e-12 or n_batch <= 1, (pred, cap, n_batch)
    if chat and inter:
        base = cm.predict(sum(s.num_new_tokens for s in inter), sum(s.context_len for s in inter))
        assert cap <= min(sched.itl_target_s, base * (1 + sched.batch_step_slowdown)) + 1e-12
    elif chat:
        assert cap <= sched.itl_target_s + 1e-12
    else:
        assert cap >= sched.itl_target_s


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
        run0, wait0 = list(self.sched.running), list(self.sched.waiting)
        out = self.sched.schedule()
        check_invariants(self.sched, out)
        check_step_order(self.sched, run0, wait0, out)
        check_cap(self.sched, out)
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
    num_blocks=64, budget=16, max_seqs=8, max_model_len=4096, prefix=True, fn=model_fn, **cap_kw
):
    """``cap_kw``: the scheduler's ITL-cap arguments (cost_model, itl_target_s,
    batch_step_slowdown)."""
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=prefix)
    sched = Scheduler(kv, budget, max_seqs, max_model_len, **cap_kw)
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
