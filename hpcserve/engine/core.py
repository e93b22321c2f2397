"""LLMEngine: one replica's engine loop, schedule → run → postprocess.

Lifecycle: ``LLMEngine(EngineConfig)`` resolves the model (``demo``, a ``.gguf``, or
an HF directory), loads the tokenizer and weights and sizes the KV cache. Callers
then ``add_request`` / ``abort_request`` at any time and call ``step()`` until
``has_unfinished_requests()`` is False. Each ``step()``::

    sched_out = scheduler.schedule()            # token budget → chunks and decodes
    sampled   = runner.execute(sched_out)       # forward over the paged KV cache, sample
    events    = scheduler.update_from_output(sched_out, sampled)
    outputs   = detokenize, apply stop strings, build RequestOutput deltas

The engine is single-threaded: the serving daemon (later issues) drives it from
one event loop per role. After each ``step()``, ``last_step_shares`` lists a ``StepShare``
(``req_id``, ``num_tokens`` computed for it, ``useful_s``: its useful-work credit in seconds,
``engine/useful_work.py``) for every request that step scheduled, and ``last_step_time_s`` /
``last_step_coefficients`` the measured time and cost-model coefficients the credits used,
and ``last_token_time`` the wall-clock (unix) time at which its tokens were sampled: the server's
TTFT/ITL come from it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from hpcserve.engine.detok import IncrementalDetokenizer
from hpcserve.engine.frontend import Frontend
from hpcserve.engine.kv_cache import KVCacheManager
from hpcserve.engine.outputs import RequestOutput
from hpcserve.engine.request import PRIORITY_INTERACTIVE, Request, RequestStatus, SamplingParams
from hpcserve.engine.scheduler import Scheduler
from hpcserve.engine.step_cost import StepCostModel
from hpcserve.engine.useful_work import claim_fresh, step_credits
from hpcserve.errors import ModelError, RequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepShare:
    """The work one step did for one request: ``num_tokens`` computed for it (the prefill chunk's
    length, or 1 for a decode) and ``useful_s``, its useful-work credit (seconds of the step)."""

    req_id: str
    num_tokens: int
    useful_s: float


@dataclass
class EngineConfig:
    model: str = "demo"
    dtype: str = "float32"  # float32 | bfloat16 (checkpoint/serving dtype)
    compute_dtype: str = "auto"  # auto | model  (see model_runner)
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: from kv_cache_gb
    kv_cache_gb: float = 2.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: min(model's max positions, 8192)
    enable_prefix_caching: bool = True
    collect_logits: bool = False  # tests: keep logits of every scheduled row
    num_threads: int | None = None  # torch intra-op threads (default: torch's choice)
    attention_backend: str = "auto"
    cpu_kernels: bool = True  # False: no C kernels (packed GEMM, fused ops), the torch reference path
    # ITL cap on batch work (see hpcserve.engine.scheduler): None disables it
    itl_target_s: float | None = None
    batch_step_slowdown: float = 0.2  # with chat active, batch may slow a step by this fraction


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        import torch

        from hpcserve.engine.model_runner import DTYPES, ModelRunner, choose_compute_dtype
        from hpcserve.models.config import load_model_config
        from hpcserve.models.loader import resolve_model

        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.dtype not in DTYPES:
            raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
        self.model_dir = resolve_model(config.model)
        self.model_name = "demo" if config.model == "demo" else os.path.basename(os.path.normpath(str(config.model)))
        self.model_config = mc = load_model_config(self.model_dir)
        self.max_model_len = min(config.max_model_len or min(mc.max_position_embeddings, 8192), mc.max_position_embeddings)
        self.frontend = Frontend.load(self.model_dir, mc, self.max_model_len, self.model_name)
        self.tokenizer = self.frontend.tokenizer
        self.eos_token_ids = self.frontend.eos_token_ids
        bs = config.block_size
        compute = choose_compute_dtype(DTYPES[config.dtype], "cpu", config.compute_dtype)
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            per_block = ModelRunner.kv_bytes_per_block(mc, bs, compute)
            by_memory = int(config.kv_cache_gb * 2**30) // per_block
            by_need = config.max_num_seqs * -(-self.max_model_len // bs) + 1
            num_blocks = max(2, min(by_memory, by_need))
        if (num_blocks - 1) * bs < self.max_model_len:
            # One request must always fit, or it would preempt itself forever.
            fit = (num_blocks - 1) * bs
            log.warning("KV cache holds %d tokens: max_model_len lowered from %d", fit, self.max_model_len)
            self.max_model_len = fit
        self.runner = ModelRunner(
            mc, self.model_dir, config.dtype, bs, num_blocks, self.max_model_len,
            collect_logits=config.collect_logits, compute_dtype=config.compute_dtype,
            attention_backend=config.attention_backend, cpu_kernels=config.cpu_kernels,
        )
        self.frontend.max_model_len = self.max_model_len
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching)
        self.cost_model = StepCostModel()  # step wall time, learned from every step
        self.scheduler = Scheduler(
            self.kv, config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len,
            cost_model=self.cost_model, itl_target_s=config.itl_target_s,
            batch_step_slowdown=config.batch_step_slowdown,
        )
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._sent: dict[str, tuple[int, int]] = {}  # req_id -> (tokens sent, logprobs sent)
        self._aborted: list[Request] = []
        self.handoff = None  # KVHandoff (engine/handoff.py) on prefill/decode replicas: attach_handoff()
        # a StepShare per request the last step() scheduled (usage accounting: the step's time is
        # split by num_tokens; useful_s is the request's useful-work credit)
        self.last_step_shares: list[StepShare] = []
        self.last_step_time_s = 0.0  # measured time of the last step (schedule .. update)
        self.last_step_coefficients: tuple[float, float, float] | None = None  # cost model the credits used
        self.last_token_time = 0.0  # unix time at which the last step's tokens were sampled

    def attach_handoff(self, connector, rank: int, target_group_bytes: int = 2 << 20):
        """Make this replica a producer and/or consumer of KV handoffs over ``connector``
        (a ``hpcserve.transfer.KVConnectorWorker``); the model polls it between layers so
        transfers progress during compute."""
        from hpcserve.engine.handoff import KVHandoff
        from hpcserve.transfer.packing import geometry_of

        self.handoff = KVHandoff(self, connector, geometry_of(self.runner.kv_cache), rank,
                                 target_group_bytes=target_group_bytes)
        handoff = self.handoff

        def progress() -> None:
            if connector.num_active:
                connector.poll()

        self.runner.model.layer_hook = progress
        return handoff

    # ------------------------------------------------------------ test hooks
    @property
    def last_logits(self):
        return self.runner.last_logits

    @property
    def last_positions(self):
        return self.runner.last_positions

    # ------------------------------------------------------------- requests
    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.frontend.apply_chat_template(messages)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.frontend.tokenize(prompt)

    def add_request(self, req_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = PRIORITY_INTERACTIVE, prefill_only: bool = False,
                    cache_salt: str = "") -> Request:
        """Queue a request. ``priority``: ``PRIORITY_INTERACTIVE`` (0) runs ahead of
        ``PRIORITY_BATCH`` (1) in every step; see the scheduler. ``prefill_only`` (a prefill
        replica, needs ``attach_handoff``): compute the prompt, keep its KV for a handoff and
        produce no output unless it is aborted. ``cache_salt``: the prefix-cache namespace (see
        ``kv_cache``; "" = shared)."""
        req = self._new_request(req_id, prompt, params, priority, cache_salt)
        if prefill_only:
            if self.handoff is None:
                raise RequestError("prefill_only needs a KV handoff connector on this replica", code="server_error")
            req.sampling_params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            self.handoff.add_prefill_only(req_id)
        self.scheduler.add_request(req)
        return req

    def add_remote_request(self, req_id: str, prompt: list[int], params: SamplingParams, priority: int,
                           src_rank: int, src_block_ids: list[int], num_tokens: int,
                           num_cached_tokens: int = 0, cache_salt: str = "") -> Request:
        """Queue a request whose first ``num_tokens`` prompt tokens' KV arrives from the prefill
        replica at ``src_rank`` (its blocks ``src_block_ids``); see ``engine/handoff.py``."""
        if self.handoff is None:
            raise RequestError("remote_prefill needs a KV handoff connector on this replica", code="server_error")
        req = self._new_request(req_id, prompt, params, priority, cache_salt)
        req.num_cached_tokens = num_cached_tokens
        self.handoff.add_remote(req, src_rank, src_block_ids, num_tokens)
        return req

    def _new_request(self, req_id: str, prompt: str | list[int], params: SamplingParams, priority: int,
                     cache_salt: str = "") -> Request:
        if req_id in self.scheduler.requests or (self.handoff is not None and self.handoff.owns(req_id)):
            raise RequestError(f"request id {req_id!r} is already in use", field="req_id")
        params.validate()
        ids = self.tokenize(prompt)
        self.frontend.check_length(len(ids), params)
        req = Request(req_id, ids, params, self.eos_token_ids, priority=priority, cache_salt=cache_salt)
        self._detok[req_id] = IncrementalDetokenizer(self.tokenizer, ids, stop=params.stop)
        self._sent[req_id] = (0, 0)
        return req

    def abort_request(self, req_id: str) -> bool:
        req = self.handoff.abort(req_id) if self.handoff is not None else None
        if req is None:
            req = self.scheduler.finish_request(req_id, RequestStatus.FINISHED_ABORTED)
        if req is None:
            return False
        self._aborted.append(req)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._aborted)

    def has_handoff_work(self) -> bool:
        """KV transfers, held prompt blocks or queued receives that need ``handoff.poll()``."""
        return self.handoff is not None and self.handoff.has_pending_work

    # ----------------------------------------------------------------- step
    def calibrate(self, prompt_lens: tuple[int, ...] = (8, 64, 256), num_decodes: int = 8) -> None:
        """Warm up and calibrate the step-time model before serving: a few throw-away requests
        with prompts of different lengths (one prefill step each, then decodes together), so the
        ITL cap works from the first real request. Leaves the engine empty and the prefix cache
        clear. A no-op while requests are queued."""
        if self.has_unfinished_requests():
            return
        limit = min(self.config.max_num_batched_tokens, self.max_model_len - num_decodes - 1)
        vocab = self.model_config.vocab_size
        params = SamplingParams(max_tokens=num_decodes, temperature=0, ignore_eos=True)
        for i, n in enumerate(sorted({max(1, min(n, limit)) for n in prompt_lens})):
            ids = [(7 + 31 * j + i) % vocab for j in range(n)]
            self.add_request(f"__calibrate-{i}", ids, params)
            self.step()  # the prefill alone: one observation per size
        while self.has_unfinished_requests():
            self.step()
        self.kv.reset_prefix_cache()

    def step(self) -> list[RequestOutput]:
        outputs = [self._output(r, "") for r in self._aborted]
        self._aborted = []
        t0 = time.perf_counter()
        sched_out = self.scheduler.schedule()
        seqs = sched_out.seqs
        fresh = claim_fresh(seqs, self.scheduler.requests)  # before update_from_output forgets finished ones
        sampled = self.runner.execute(sched_out)
        events = self.scheduler.update_from_output(sched_out, sampled)
        self.last_token_time = time.time()  # when this step's tokens were sampled (unix s; clients compare)
        self.last_step_shares, self.last_step_time_s = [], 0.0
        if seqs:
            dt = time.perf_counter() - t0
            coef = self.last_step_coefficients = self.cost_model.coefficients  # the model this step was built with
            credits = step_credits(seqs, fresh, dt, coef)
            self.last_step_shares = [StepShare(s.req_id, s.num_new_tokens, u) for s, u in zip(seqs, credits)]
            self.last_step_time_s = dt
            self.cost_model.observe(sched_out.num_batched_tokens, sum(s.context_len for s in seqs), dt)
        for req, _ in events:
            if self.handoff is not None and self.handoff.is_held(req.req_id):
                self._detok.pop(req.req_id, None)  # prefill-only: its KV is the output
                self._sent.pop(req.req_id, None)
                continue
            detok = self._detok[req.req_id]
            delta = detok.add_tokens(req.output_token_ids[self._sent[req.req_id][0] :])
            if detok.stop_hit is not None and not req.is_finished:
                self.scheduler.finish_request(req.req_id, RequestStatus.FINISHED_STOPPED)
                req.stop_reason = detok.stop_hit
            elif req.is_finished and detok.stop_hit is None:
                delta += detok.finish()
            outputs.append(self._output(req, delta))
        return outputs

    def _output(self, req: Request, delta: str) -> RequestOutput:
        n_tok, n_lp = self._sent[req.req_id]
        detok = self._detok[req.req_id]
        out = RequestOutput(
            req_id=req.req_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=detok.text,
            new_token_ids=req.output_token_ids[n_tok:],
            new_text=delta,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_cached_tokens=req.num_cached_tokens,
            logprobs=list(req.output_logprobs) if req.sampling_params.logprobs is not None else None,
            new_logprobs=req.output_logprobs[n_lp:],
        )
        if req.is_finished:
            self._detok.pop(req.req_id, None)
            self._sent.pop(req.req_id, None)
        else:
            self._sent[req.req_id] = (len(req.output_token_ids), len(req.output_logprobs))
        return out
