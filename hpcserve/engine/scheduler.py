"""Step scheduler: one token budget per step for chunked prefill and decode. No torch.

Queues: ``waiting`` (new and preempted requests) and ``running`` (requests holding
KV blocks, in admission order).

Scheduling classes: every request has a ``priority`` (an int, lower is more
urgent; ``PRIORITY_INTERACTIVE = 0`` for chat, ``PRIORITY_BATCH = 1`` for batch
jobs, see ``hpcserve.engine.request``). With a single class everything below is
plain FCFS.

- ``waiting`` is ordered by priority, then FCFS within a priority. A preempted
  request goes to the *front of its own class* (never ahead of more urgent
  waiting requests).
- Each step serves running requests in priority order (stable: admission order
  within a class), so an interactive decode gets budget before a batch prefill
  chunk. The waiting head is admitted as soon as it is strictly more urgent than
  the next running request to serve, else after all running ones; so a new chat
  request also gets budget before running batch requests.

One engine step is::

    out = scheduler.schedule()                 # which tokens of which requests to compute
    sampled = runner.execute(out)              # model forward + sampling (torch side)
    events = scheduler.update_from_output(out, sampled)   # advance, append tokens, stop checks

``schedule`` serves running requests (a decode needs 1 token; an unfinished
prefill continues with a chunk) and admits waiting ones while the budget
(``max_num_batched_tokens``), ``max_num_seqs`` and free blocks allow; admission
is strictly in ``waiting`` order (a head that does not fit blocks those behind it).

Preemption is *by recompute*: the victim's blocks are freed, its
``num_computed_tokens`` reset, and it returns to the front of its class in
``waiting``; its output so far is kept and recomputed as part of its prompt (the
prefix cache usually makes this cheap). A request already scheduled in the
current step is never preempted (its blocks are in the step output). Two causes:

- A running request needs a block and none is free: the victim is the least
  urgent request among the running ones not yet scheduled in this step (the
  requester included), the most recently admitted among those. After such a
  preemption no request is admitted in that step (memory is tight).
- The waiting head cannot get blocks (or a ``max_num_seqs`` slot) and running,
  not-yet-scheduled requests of a strictly less urgent class exist (a chat
  request while batch requests run): those are preempted, least urgent and most
  recently admitted first, just until the head fits; if even all of them would
  not make room, none is preempted. Later admissions in that step must be
  strictly more urgent than every victim, so a victim is never re-admitted in
  the step that preempted it, and a request never causes the preemption of an
  equally or more urgent one.

In every step, the preempted requests are thus a suffix of the running ones in
(priority, admission) order, and every request admitted in a step is strictly
more urgent than every request preempted in it.

ITL cap (issue #4): with a ``cost_model`` (``StepCostModel``, calibrated) and an
``itl_target_s``, batch-class work (priority > ``PRIORITY_INTERACTIVE``) is capped
in predicted step seconds, so chat keeps its inter-token latency; interactive work
is scheduled first exactly as above. The cap is fixed at the step's first
batch-class item, when all interactive work of the step is known (T tokens):

- chat active (an interactive request running or waiting): the step may take
  ``min(itl_target_s, predict(interactive work) * (1 + batch_step_slowdown))``
  (just ``itl_target_s`` if no interactive token was scheduled). Batch decodes
  and prefill chunks are taken in serving order while they fit; a prefill chunk
  is cut to what fits (any size >= 1); a request that does not fit is skipped.
- no chat: the step may take ``min(predict(all batch decodes) + itl_target_s,
  max(NO_CHAT_STEP_TARGETS * itl_target_s, 2 * the fixed step cost))``. While all decodes fit they are all
  scheduled (decode batching is where the throughput is) and prefill chunks get the
  rest, so prefill always advances (a cap of the decodes alone would starve it and
  the running set would drain). If the decodes alone exceed the bound, they take
  turns in serving order (oldest first). Either way a chat request that arrives
  meanwhile waits at most about ``NO_CHAT_STEP_TARGETS`` ITL targets.
- chat prefill next to chat decodes: an interactive prefill chunk is cut so the step
  stays within ``itl_target_s`` (never below ``MIN_CHAT_PREFILL_CHUNK`` tokens) while
  another interactive request is decoding, so a new prompt does not stall running
  streams (Sarathi-style chunked prefill); with no other chat decoding it is not cut.
- floor: if batch work is runnable, at least one batch token (the first batch
  item in serving order) is scheduled in every step, whatever the cap, so batch
  never starves. The step's token budget and ``max_num_seqs`` still apply.

A skipped request stays running with its blocks (it is not preempted; runners keep
no per-step state for it). ``last_cap_s`` / ``last_cap_hit`` record the last step's
cap and whether it cut batch work. Without a cost model or target, or before the
model is calibrated, nothing is capped.

KV handoff (disaggregated prefill/decode, ``hpcserve.engine.handoff``): ``keep_blocks(req)``
may keep a finished request's blocks for a transfer still reading them; ``add_prefilled``
queues a request that already holds the blocks of its handed-off prompt KV (admitted like
any waiting request, computing only the rest); ``make_room`` preempts less urgent requests
so a handoff can land.

Stop conditions decided here are token-level: EOS (unless ``ignore_eos``),
``stop_token_ids``, ``max_tokens``, and the model length. Stop *strings* need text,
so the engine calls ``finish_request`` when the detokenizer reports one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.request import PRIORITY_INTERACTIVE, Request, RequestStatus, SamplingParams, TokenLogprob
from hpcserve.engine.step_budget import BatchCap
from hpcserve.engine.step_cost import StepCostModel


@dataclass
class ScheduledSeq:
    """The part of one request computed in this step. Self-contained (no Request ref)
    so it can be sent to another process as-is."""

    req_id: str
    token_ids: list[int]  # tokens at positions [start_pos, start_pos + len)
    start_pos: int
    block_ids: list[int]
    do_sample: bool  # the chunk reaches the last known token: sample the next one
    sampling_params: SamplingParams

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # since the last step: drop runner state

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SamplerResult:
    """What the runner returns per sampled request."""

    token_id: int
    logprob: TokenLogprob | None = None


MIN_CHAT_PREFILL_CHUNK = 16  # tokens: an interactive prefill chunk is never cut below this


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        max_model_len: int = 4096,
        cost_model: StepCostModel | None = None,
        itl_target_s: float | None = None,
        batch_step_slowdown: float = 0.2,
    ) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if itl_target_s is not None and not itl_target_s > 0:
            raise ValueError(f"itl_target_s must be > 0, got {itl_target_s!r}")
        if not batch_step_slowdown >= 0:
            raise ValueError(f"batch_step_slowdown must be >= 0, got {batch_step_slowdown!r}")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_since_step: list[str] = []
        self.cost_model = cost_model
        self.itl_target_s = itl_target_s
        self.batch_step_slowdown = batch_step_slowdown
        self._cap: BatchCap | None = None  # this step's batch cap, while schedule() runs
        self.last_cap_s: float | None = None  # cap applied to the last step's batch work (logs, tests)
        self.last_cap_hit = False  # the last step left batch work out because of the cap
        # KV handoff (engine/handoff.py): True = a transfer still reads the finished request's
        # blocks; the hook's owner frees them later
        self.keep_blocks: Callable[[Request], bool] | None = None

    # ------------------------------------------------------------- admission
    def add_request(self, req: Request) -> None:
        if req.req_id in self.requests:
            raise ValueError(f"duplicate req_id {req.req_id!r}")
        self.requests[req.req_id] = req
        self._enqueue(req, front_of_class=False)

    def _enqueue(self, req: Request, front_of_class: bool) -> None:
        """Insert into ``waiting`` (ordered by priority, FCFS within a priority): at the
        back of ``req``'s class, or at its front (a preempted request). O(n), and O(1)
        when there is a single class."""
        w = self.waiting
        p = req.priority
        if front_of_class:
            i = 0
            while i < len(w) and w[i].priority < p:
                i += 1
        else:
            i = len(w)
            while i > 0 and w[i - 1].priority > p:
                i -= 1
        w.insert(i, req)

    def finish_request(self, req_id: str, status: RequestStatus) -> Request | None:
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        req.status = status
        if self.keep_blocks is None or not self.keep_blocks(req):
            self.kv.free(req)
        self._finished_since_step.append(req_id)
        return req

    def add_prefilled(self, req: Request) -> None:
        """Queue a request that already holds blocks with the KV of its first
        ``num_computed_tokens`` tokens (handed off from a prefill replica): it is admitted like
        any waiting request (priority, FCFS) and computes only the rest."""
        if req.req_id in self.requests:
            raise ValueError(f"duplicate req_id {req.req_id!r}")
        self.requests[req.req_id] = req
        self._enqueue(req, front_of_class=False)

    def make_room(self, num_blocks: int, priority: int) -> bool:
        """Preempt running requests of a strictly less urgent class (least urgent, most recently
        admitted first) until ``num_blocks`` blocks are free; True if they are. Used before a
        KV handoff into this replica; never called inside ``schedule()``."""
        for v in sorted((r for r in reversed(self.running) if r.priority > priority), key=lambda r: -r.priority):
            if self.kv.num_free_blocks >= num_blocks:
                break
            self._preempt(v)
        return self.kv.num_free_blocks >= num_blocks

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_since_step)
        self._finished_since_step = []
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        done: set[str] = set()  # req_ids scheduled in this step: never preempted
        # running requests in serving order: priority, then admission (sorted is stable)
        order = sorted(self.running, key=lambda r: r.priority)
        i = 0
        admit = True  # False once the waiting head did not fit, or after a growth preemption
        victim_floor: int | None = None  # most urgent priority preempted for a waiting head
        cap = self._cap = self._new_cap()  # None: no ITL cap in this step

        while budget > 0:
            while i < len(order) and order[i].status != RequestStatus.RUNNING:
                i += 1  # preempted earlier in this step
            nxt = order[i] if i < len(order) else None
            head = self.waiting[0] if admit and self.waiting else None
            if head is not None and victim_floor is not None and head.priority >= victim_floor:
                head = None  # must be strictly more urgent than this step's victims
                admit = False

            if head is not None and (nxt is None or head.priority < nxt.priority):
                # admit the waiting head before the next running request
                if cap is not None and head.priority > PRIORITY_INTERACTIVE and cap.cap is None:
                    cap.open(order[i:])
                num_new, victims = self._admit_head(head, budget, done)
                out.preempted_req_ids += [v.req_id for v in victims]
                if victims:
                    floor = min(v.priority for v in victims)
                    victim_floor = floor if victim_floor is None else min(victim_floor, floor)
                if not num_new:  # None: no room; 0: over this step's batch cap
                    admit = False  # FCFS: nothing behind the head is admitted either
                    continue
                scheduled.append((head, num_new))
                done.add(head.req_id)
                budget -= num_new
                if cap is not None:
                    cap.add(head, head.num_computed_tokens, num_new)
                continue

            if nxt is None:
                break
            # serve a running request: decode, or the next chunk of its prefill
            i += 1
            req = nxt
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if req.priority <= PRIORITY_INTERACTIVE:
                num_new = self._chat_prefill_chunk(req, req.num_computed_tokens, num_new, cap, done)
            if cap is not None and req.priority > PRIORITY_INTERACTIVE:
                if cap.cap is None:
                    cap.open(order[i - 1 :])
                num_new = cap.limit(
                    req.num_computed_tokens, num_new, decode=req.num_tokens - req.num_computed_tokens == 1
                )
                if num_new == 0:
                    continue  # over the cap: stays running with its blocks, not computed in this step
            while not self.kv.allocate(req, num_new):
                victim = self._growth_victim(done)
                self._preempt(victim)
                out.preempted_req_ids.append(victim.req_id)
                admit = False  # memory is tight: no admissions in this step
                if victim is req:
                    break
            else:
                if cap is not None:
                    cap.add(req, req.num_computed_tokens, num_new)
                scheduled.append((req, num_new))
                done.add(req.req_id)
                budget -= num_new

        self._cap = None
        self.last_cap_s, self.last_cap_hit = (None, False) if cap is None else (cap.cap, cap.hit)
        for req, num_new in scheduled:
            start = req.num_computed_tokens
            end = start + num_new
            n_prompt = req.num_prompt_tokens
            if end <= n_prompt:
                tokens = req.prompt_token_ids[start:end]
            else:
                tokens = (req.prompt_token_ids[start:] if start < n_prompt else []) + req.output_token_ids[
                    max(0, start - n_prompt) : end - n_prompt
                ]
            out.seqs.append(
                ScheduledSeq(
                    req_id=req.req_id,
                    token_ids=tokens,
                    start_pos=start,
                    block_ids=list(req.block_ids),
                    do_sample=end == req.num_tokens,
                    sampling_params=req.sampling_params,
                )
            )
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _new_cap(self) -> BatchCap | None:
        m, target = self.cost_model, self.itl_target_s
        if m is None or target is None or m.coefficients is None:
            return None
        chat = any(r.priority <= PRIORITY_INTERACTIVE for r in self.running) or bool(
            self.waiting and self.waiting[0].priority <= PRIORITY_INTERACTIVE
        )
        return BatchCap(m, target, self.batch_step_slowdown, chat)

    def _chat_prefill_chunk(self, req: Request, start: int, want: int, cap: BatchCap | None, done: set[str]) -> int:
        """An interactive prefill next to other chats' decodes is chunked so the step stays within
        the ITL target (at least ``MIN_CHAT_PREFILL_CHUNK`` tokens), so a new prompt does not stall
        the streams already running; with no other chat decoding it is not cut."""
        if cap is None or want <= MIN_CHAT_PREFILL_CHUNK:
            return want
        others = [r for r in self.running if r is not req and r.priority <= PRIORITY_INTERACTIVE
                  and r.num_tokens - r.num_computed_tokens == 1]
        if not others:
            return want
        pending = [r for r in others if r.req_id not in done]  # decodes still to come in this step
        n = cap.model.max_new_tokens(cap.target, cap.tokens + len(pending),
                                     cap.context + sum(r.num_tokens for r in pending), start, want)
        return min(want, max(n, MIN_CHAT_PREFILL_CHUNK))

    def _growth_victim(self, done: set[str]) -> Request:
        """Least urgent running request not yet scheduled in this step, the most recently
        admitted among those. The requester itself is a candidate, so there always is one."""
        victim = None
        for r in reversed(self.running):
            if r.req_id not in done and (victim is None or r.priority > victim.priority):
                victim = r
        assert victim is not None
        return victim

    def _admit_head(self, req: Request, budget: int, done: set[str]) -> tuple[int | None, list[Request]]:
        """Give the waiting head blocks and a seat, preempting running requests of a
        strictly less urgent class if that makes it fit. Returns its chunk size (None if
        it cannot be admitted in this step) and the requests it preempted."""
        # candidates: least urgent first, most recently admitted first within a class
        candidates = sorted(
            (r for r in reversed(self.running) if r.req_id not in done and r.priority > req.priority),
            key=lambda r: -r.priority,
        )
        if len(self.running) >= self.max_num_seqs and not candidates:
            return None, []
        prefilled = bool(req.block_ids)  # KV handed off from a prefill replica (add_prefilled)
        cached_ids, num_cached = ([], req.num_computed_tokens) if prefilled else self.kv.find_cached_prefix(req)
        num_new = min(req.num_tokens - num_cached, budget)
        if req.priority <= PRIORITY_INTERACTIVE:
            num_new = self._chat_prefill_chunk(req, num_cached, num_new, self._cap, done)
        if self._cap is not None and req.priority > PRIORITY_INTERACTIVE:
            num_new = self._cap.limit(num_cached, num_new, decode=False)
            if num_new == 0:
                return 0, []
        victims: list[Request] = []
        if len(self.running) >= self.max_num_seqs or not self.kv.allocate(req, num_new, cached_ids):
            victims = self._victims_to_fit(req, num_new, cached_ids, candidates)
            if not victims:
                return None, []
            for v in victims:
                self._preempt(v)
            if not self.kv.allocate(req, num_new, cached_ids):  # cannot happen: _victims_to_fit counted
                return None, victims
        self.waiting.popleft()
        if req.status == RequestStatus.WAITING and not prefilled:
            req.num_cached_tokens = num_cached
        req.num_computed_tokens = num_cached
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return num_new, victims

    def _victims_to_fit(
        self, req: Request, num_new: int, cached_ids: list[int], candidates: list[Request]
    ) -> list[Request]:
        """Shortest prefix of ``candidates`` whose preemption gives ``req`` a seat and the
        blocks ``kv.allocate(req, num_new, cached_ids)`` needs; [] if none does.

        Mirrors ``KVCacheManager.allocate``'s count: a block returns to the free list
        when its last holder lets go; a cached block ``req`` reuses must be taken back
        from the free list if nobody else holds it."""
        kv = self.kv
        bs = kv.block_size
        if req.block_ids:  # prefilled: holds its blocks already
            n_new = kv.blocks_needed(req, num_new)
        else:
            n_new = max(0, -(-(len(cached_ids) * bs + num_new) // bs) - len(cached_ids))
        reused = set(cached_ids)
        need = n_new + sum(1 for b in cached_ids if kv.ref_cnt[b] == 0)
        free = kv.num_free_blocks
        seats = self.max_num_seqs - len(self.running)
        drops: dict[int, int] = {}
        for k, v in enumerate(candidates, 1):
            seats += 1
            for b in v.block_ids:
                drops[b] = drops.get(b, 0) + 1
                if drops[b] == kv.ref_cnt[b]:  # v was its last holder
                    free += 1
                    if b in reused:
                        need += 1
            if seats > 0 and need <= free:
                return candidates[:k]
        return []

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req, front_of_class=True)

    # ---------------------------------------------------------------- update
    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, SamplerResult]
    ) -> list[tuple[Request, list[int]]]:
        """Advance computed counts, append sampled tokens, apply token-level stops.

        Returns ``(request, new_token_ids)`` for every request that got a token or
        finished. Finished requests have already released their blocks.
        """
        events: list[tuple[Request, list[int]]] = []
        for seq in out.seqs:
            req = self.requests.get(seq.req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted meanwhile
            req.num_computed_tokens += seq.num_new_tokens
            self.kv.commit_computed(req)
            if not seq.do_sample:
                continue
            res = sampled[seq.req_id]
            req.output_token_ids.append(res.token_id)
            if res.logprob is not None:
                req.output_logprobs.append(res.logprob)
            status = self._check_stop(req, res.token_id)
            if status is not None:
                self.finish_request(req.req_id, status)
            events.append((req, [res.token_id]))
        return events

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.sampling_params
        if not p.ignore_eos and token in req.eos_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if token in p.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
