"""Step scheduler: one token budget per step for chunked prefill and decode. No torch.

Queues: ``waiting`` (new and preempted requests, FCFS; preempted go to the front)
and ``running`` (requests holding KV blocks, in admission order).

One engine step is::

    out = scheduler.schedule()                 # which tokens of which requests to compute
    sampled = runner.execute(out)              # model forward + sampling (torch side)
    events = scheduler.update_from_output(out, sampled)   # advance, append tokens, stop checks

``schedule`` first serves running requests (a decode needs 1 token; an unfinished
prefill continues with a chunk), then admits waiting ones while the budget
(``max_num_batched_tokens``), ``max_num_seqs`` and free blocks allow. When a
running request needs a block and none is free, the most recently admitted
running request is preempted *by recompute*: its blocks are freed, its
``num_computed_tokens`` reset, and it returns to the front of ``waiting``; its
output so far is kept and recomputed as part of its prompt (the prefix cache
usually makes this cheap).

Stop conditions decided here are token-level: EOS (unless ``ignore_eos``),
``stop_token_ids``, ``max_tokens``, and the model length. Stop *strings* need text,
so the engine calls ``finish_request`` when the detokenizer reports one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.request import Request, RequestStatus, SamplingParams, TokenLogprob


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


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        max_model_len: int = 4096,
    ) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_since_step: list[str] = []

    # ------------------------------------------------------------- admission
    def add_request(self, req: Request) -> None:
        if req.req_id in self.requests:
            raise ValueError(f"duplicate req_id {req.req_id!r}")
        self.requests[req.req_id] = req
        self.waiting.append(req)

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
        self.kv.free(req)
        self._finished_since_step.append(req_id)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_since_step)
        self._finished_since_step = []
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []

        # 1. running requests: decodes and continuing prefill chunks
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_req_ids.append(victim.req_id)
                if victim is req:
                    break
            else:
                scheduled.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted; nothing after it is left to schedule

        # 2. waiting requests, unless we just had to preempt (memory is tight)
        while self.waiting and budget > 0 and not out.preempted_req_ids:
            if len(self.running) >= self.max_num_seqs:
                break
            req = self.waiting[0]
            cached_ids, num_cached = self.kv.find_cached_prefix(req)
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate(req, num_new, cached_ids):
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append((req, num_new))
            budget -= num_new

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

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

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
