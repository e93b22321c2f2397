"""Model runner: owns the weights, the paged KV tensors and the sampler (torch side).

Lifecycle: built once per engine (load weights → allocate KV cache); then
``execute(SchedulerOutput) -> {req_id: SamplerResult}`` once per step. It keeps
only per-request sampling generators between steps, dropped when the scheduler
reports the request finished.

A step's flat token layout puts single-token sequences first (they share one
batched decode attention call), then each multi-token chunk as a contiguous run.
Logits are computed only for rows that sample, unless ``collect_logits`` is set
(tests), in which case every scheduled row's logits are kept in ``last_logits``.

Compute dtype: ``dtype`` is what the checkpoint is served in. On a CPU without
native bf16 arithmetic (no AVX512-BF16/AMX), bf16 GEMMs run several times slower
than fp32, so ``compute_dtype="auto"`` runs such models in fp32 there (weights
are exactly the bf16 values, upcast once at load). ``compute_dtype="model"``
forces the checkpoint dtype.

``cpu_kernels=False`` runs the torch reference path even where the project's C kernels
load (tests of the torch paths; see ``LlamaModel``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hpcserve.engine.sampler import Sampler
from hpcserve.engine.scheduler import SamplerResult, ScheduledSeq, SchedulerOutput
from hpcserve.models.attention import AttentionMetadata, PrefillSpan, get_backend
from hpcserve.models.config import ModelConfig
from hpcserve.models.llama import LlamaModel
from hpcserve.models.loader import load_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - builds without mkldnn
        return False


def choose_compute_dtype(dtype: torch.dtype, device: str, policy: str = "auto") -> torch.dtype:
    if policy == "model" or device != "cpu":
        return dtype
    if policy != "auto":
        raise ValueError(f"compute_dtype must be 'auto' or 'model', got {policy!r}")
    if dtype in (torch.bfloat16, torch.float16) and not has_native_bf16():
        return torch.float32
    return dtype


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        model_dir: Path,
        dtype: str,
        block_size: int,
        num_kv_blocks: int,
        max_model_len: int,
        collect_logits: bool = False,
        compute_dtype: str = "auto",
        attention_backend: str = "auto",
        cpu_kernels: bool = True,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.cfg = model_config
        self.device = "cpu"
        self.dtype = DTYPES[dtype]
        self.compute_dtype = choose_compute_dtype(self.dtype, self.device, compute_dtype)
        weights = load_weights(model_dir, model_config, self.dtype)
        self.model = LlamaModel(
            model_config, weights, self.compute_dtype, max_model_len,
            get_backend(attention_backend, self.device, cpu_kernels), cpu_kernels=cpu_kernels,
        )
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        c = model_config
        self.kv_cache = torch.zeros(
            (c.num_layers, 2, num_kv_blocks, block_size, c.num_kv_heads, c.head_dim), dtype=self.compute_dtype
        )
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.collect_logits = collect_logits
        self.last_logits: dict[str, torch.Tensor] = {}
        self.last_positions: dict[str, tuple[int, int]] = {}

    @staticmethod
    def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elt = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elt

    # ----------------------------------------------------------------- step
    def execute(self, out: SchedulerOutput) -> dict[str, SamplerResult]:
        for req_id in out.finished_req_ids:
            self.generators.pop(req_id, None)
        if not out.seqs:
            return {}
        seqs = sorted(out.seqs, key=lambda s: s.num_new_tokens > 1)  # stable: decodes first
        input_ids, positions, meta, row_ends = self._prepare(seqs)
        hidden = self.model.forward(input_ids, positions, self.kv_cache, meta)

        sample_seqs = [s for s in seqs if s.do_sample]
        if self.collect_logits:
            all_logits = self.model.compute_logits(hidden)
            self.last_logits, self.last_positions = {}, {}
            for s, end in zip(seqs, row_ends):
                self.last_logits[s.req_id] = all_logits[end - s.num_new_tokens : end]
                self.last_positions[s.req_id] = (s.start_pos, s.context_len)
            rows = [end - 1 for s, end in zip(seqs, row_ends) if s.do_sample]
            logits = all_logits[rows]
        else:
            rows = [end - 1 for s, end in zip(seqs, row_ends) if s.do_sample]
            if not rows:
                return {}
            sel = hidden[rows] if len(rows) != hidden.shape[0] else hidden
            logits = self.model.compute_logits(sel)
        if not sample_seqs:
            return {}
        params = [s.sampling_params for s in sample_seqs]
        gens = [self._generator(s) for s in sample_seqs]
        res = self.sampler(logits, params, gens)
        return {
            s.req_id: SamplerResult(tok, lp) for s, tok, lp in zip(sample_seqs, res.token_ids, res.logprobs)
        }

    def _generator(self, s: ScheduledSeq) -> torch.Generator | None:
        seed = s.sampling_params.seed
        if seed is None or s.sampling_params.is_greedy:
            return None
        g = self.generators.get(s.req_id)
        if g is None:
            g = self.generators[s.req_id] = torch.Generator().manual_seed(seed)
        return g

    def _prepare(self, seqs: list[ScheduledSeq]):
        bs = self.block_size
        window = self.cfg.sliding_window
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_ends: list[int] = []
        decode_tables: list[list[int]] = []
        decode_ctx: list[int] = []
        prefills: list[PrefillSpan] = []
        for s in seqs:
            n, start = s.num_new_tokens, s.start_pos
            row0 = len(input_ids)
            input_ids.extend(s.token_ids)
            positions.extend(range(start, start + n))
            bids = s.block_ids
            slots.extend(bids[p // bs] * bs + p % bs for p in range(start, start + n))
            row_ends.append(row0 + n)
            ctx = start + n
            if n == 1:
                decode_tables.append(bids[: -(-ctx // bs)])
                decode_ctx.append(ctx)
                continue
            fresh = start == 0 and (window is None or ctx <= window)
            if fresh:
                mask = None
            else:
                qpos = torch.arange(start, ctx).unsqueeze(1)
                kpos = torch.arange(ctx).unsqueeze(0)
                mask = kpos <= qpos
                if window is not None:
                    mask &= kpos > qpos - window
            prefills.append(
                PrefillSpan(row0, row0 + n, start, torch.tensor(bids[: -(-ctx // bs)], dtype=torch.long), mask)
            )
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long), prefills=prefills, sliding_window=window
        )
        nd = len(decode_ctx)
        if nd:
            max_blocks = max(len(t) for t in decode_tables)
            # pad with block 0: never allocated, stays zero, masked out
            table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables], dtype=torch.long)
            ctx_t = torch.tensor(decode_ctx, dtype=torch.long).unsqueeze(1)
            kpos = torch.arange(max_blocks * bs).unsqueeze(0)
            mask = kpos < ctx_t
            if window is not None:
                mask &= kpos >= ctx_t - window
            meta.num_decode = nd
            meta.decode_block_tables = table
            meta.decode_ctx_lens = ctx_t.view(-1)
            bias = torch.zeros(mask.shape, dtype=self.compute_dtype).masked_fill_(~mask, float("-inf"))
            meta.decode_bias = bias.view(nd, 1, 1, -1)
        return (
            torch.tensor(input_ids, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            meta,
            row_ends,
        )
