"""Paged attention backends and the per-step metadata they share.

Interface: a backend has
``forward(q, k, v, k_cache, v_cache, meta, scale) -> out``
- ``q``: [T, H, D]; ``k``/``v``: [T, KV, D] for the T tokens of this step, already
  rotated; ``k_cache``/``v_cache``: one layer's paged cache [num_blocks, block_size, KV, D];
- it first writes this step's k/v into the cache at ``meta.slot_mapping``, then
  attends each query over its sequence's cached context (causal; sliding window
  when set) and returns [T, H, D].

Token layout of a step (built by the model runner): the first ``num_decode``
tokens are single-token sequences (decodes, or one-token chunks); after them come
the multi-token chunks, each a contiguous run described by a ``PrefillSpan``.

Backends, chosen by ``get_backend`` on capability and checked against the reference:
- ``torch`` (``TorchAttention``): the reference, CPU and CUDA;
- ``kernels`` (``KernelsAttention``): the project's fused CPU decode kernel
  (``hpcserve/kernels/cpu_ops.c``), fp32, reading K/V through the block table;
- ``deepspeed`` (FastGen blocked flash, CUDA only) plugs in here the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


# Up to this many kv heads, decode attention scores every head against all kv heads and
# masks the foreign pairs (no transpose copies; wasted work grows with the kv head count).
ALL_PAIRS_MAX_KV_HEADS = 4


@dataclass
class PrefillSpan:
    tok_start: int  # rows [tok_start, tok_end) of q/k/v
    tok_end: int
    start_pos: int  # position of the first row; > 0 when earlier tokens are cached
    block_table: torch.Tensor  # [num_blocks_of_seq] long
    mask: torch.Tensor | None  # [n, ctx] bool (True = attend); None = plain causal over fresh k/v


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks] long
    decode_bias: torch.Tensor | None = None  # [num_decode, 1, 1, max_blocks*block_size]: 0 or -inf
    decode_ctx_lens: torch.Tensor | None = None  # [num_decode] int64
    sliding_window: int | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # per-step values a backend derives once, reuses per layer


class TorchAttention:
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_blocks, block_size, num_kv, head_dim = k_cache.shape
        k_flat = k_cache.view(-1, num_kv, head_dim)
        v_flat = v_cache.view(-1, num_kv, head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty(q.shape, dtype=q.dtype)
        gqa = q.shape[1] != num_kv

        nd = meta.num_decode
        if nd:
            # Gather each sequence's blocks (index_select copies whole blocks: much
            # faster than advanced indexing), then batched matmuls per KV group.
            # For one query per sequence this beats SDPA's flash kernel on CPU.
            bt = meta.decode_block_tables.view(-1)
            ctx = meta.decode_block_tables.shape[1] * block_size
            group = q.shape[1] // num_kv
            if q.dtype == torch.float32 and num_kv <= ALL_PAIRS_MAX_KV_HEADS:
                # Scores of every query head against every (position, kv head) pair of its
                # sequence: K as gathered, [nd, ctx*KV, D], needs no transpose copy. Pairs of a
                # head with another group's kv head are masked out by the step's bias (built
                # once per step), so softmax and P@V come out exactly as per-group attention.
                bias = meta.cache.get("decode_gqa_bias")
                if bias is None:
                    heads = q.shape[1]
                    own = torch.arange(heads).div(group, rounding_mode="floor").unsqueeze(1) == torch.arange(num_kv)
                    head_bias = torch.zeros(own.shape, dtype=q.dtype).masked_fill_(~own, float("-inf"))
                    bias = (meta.decode_bias.view(nd, 1, ctx, 1) + head_bias.view(1, heads, 1, num_kv)).view(nd, heads, ctx * num_kv)
                    meta.cache["decode_gqa_bias"] = bias
                kk = k_cache.index_select(0, bt).view(nd, ctx * num_kv, head_dim)
                vv = v_cache.index_select(0, bt).view(nd, ctx * num_kv, head_dim)
                scores = torch.baddbmm(bias, q[:nd], kk.transpose(1, 2), alpha=scale)
                torch.bmm(torch.softmax(scores, dim=-1), vv, out=out[:nd])
            elif q.dtype == torch.float32:  # many kv heads: per-group matmuls (one transpose copy)
                kk = k_cache.index_select(0, bt).view(nd, ctx, num_kv, head_dim).permute(0, 2, 3, 1)
                vv = v_cache.index_select(0, bt).view(nd, ctx, num_kv, head_dim).transpose(1, 2)
                qq = q[:nd].reshape(nd, num_kv, group, head_dim)
                scores = torch.matmul(qq, kk).mul_(scale).add_(meta.decode_bias)
                torch.matmul(torch.softmax(scores, dim=-1), vv, out=out[:nd].view(nd, num_kv, group, head_dim))
            else:  # half precision: SDPA keeps the reference's internal fp32 math
                kk = k_cache.index_select(0, bt).view(nd, ctx, num_kv, head_dim).transpose(1, 2)
                vv = v_cache.index_select(0, bt).view(nd, ctx, num_kv, head_dim).transpose(1, 2)
                o = F.scaled_dot_product_attention(
                    q[:nd].unsqueeze(2), kk, vv,
                    attn_mask=meta.decode_bias.to(q.dtype), scale=scale, enable_gqa=gqa,
                )
                out[:nd] = o.squeeze(2)

        for p in meta.prefills:
            qs = q[p.tok_start : p.tok_end].transpose(0, 1).unsqueeze(0)
            if p.mask is None:
                ks = k[p.tok_start : p.tok_end]
                vs = v[p.tok_start : p.tok_end]
            else:
                n_ctx = p.mask.shape[1]
                ks = k_cache.index_select(0, p.block_table).view(-1, num_kv, head_dim)[:n_ctx]
                vs = v_cache.index_select(0, p.block_table).view(-1, num_kv, head_dim)[:n_ctx]
            o = F.scaled_dot_product_attention(
                qs,
                ks.transpose(0, 1).unsqueeze(0),
                vs.transpose(0, 1).unsqueeze(0),
                attn_mask=p.mask,
                is_causal=p.mask is None,
                scale=scale,
                enable_gqa=gqa,
            )
            out[p.tok_start : p.tok_end] = o.squeeze(0).transpose(0, 1)
        return out


class KernelsAttention(TorchAttention):
    """The project's fused paged decode kernel (``hpcserve/kernels/cpu_ops.c``) for fp32 on
    CPU: reads K/V through the block table with no gathered copy. Prefill chunks and
    other dtypes use the torch reference."""

    name = "kernels"

    def __init__(self) -> None:
        from hpcserve.kernels import cpu_ops

        self.ops = cpu_ops

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        if q.dtype != torch.float32 or not meta.num_decode or q.shape[1] > self.ops.MAX_HEADS:
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        nd = meta.num_decode
        prefill_only = AttentionMetadata(
            slot_mapping=meta.slot_mapping, prefills=meta.prefills, sliding_window=meta.sliding_window
        )
        out = super().forward(q, k, v, k_cache, v_cache, prefill_only, scale)  # writes k/v, runs prefills
        self.ops.paged_decode_attention(
            q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens, scale,
            meta.sliding_window, out=out[:nd],
        )
        return out


def get_backend(name: str = "auto", device: str = "cpu", cpu_kernels: bool = True) -> TorchAttention:
    """Pick an attention backend by capability: ``kernels`` (fused CPU decode) when the
    project's CPU kernels load and ``cpu_kernels`` allows them, else ``torch``.
    ``deepspeed`` (FastGen, CUDA) is not available on CPU."""
    if name == "kernels" and not cpu_kernels:
        raise ValueError("attention backend 'kernels' needs the CPU kernels: set cpu_kernels=True or pick 'torch'")
    if name in ("auto", "kernels") and device == "cpu" and cpu_kernels:
        from hpcserve.kernels import cpu_ops

        if cpu_ops.available():
            return KernelsAttention()
        if name == "kernels":
            raise ValueError("attention backend 'kernels' is not available here (CPU kernels did not load)")
    if name in ("auto", "torch"):
        return TorchAttention()
    raise ValueError(f"attention backend {name!r} is not available here; available: torch, kernels")
