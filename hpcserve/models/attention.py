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

Backends: ``TorchAttention`` (the reference; CPU and CUDA) is the only one that
exists today. CUDA-only kernels (DeepSpeed FastGen blocked flash, the project's
own ``kernels/``) plug in here, are chosen by capability, and are checked
against this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
    prefills: list[PrefillSpan] = field(default_factory=list)


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
            kk = k_cache.index_select(0, bt).view(nd, ctx, num_kv, head_dim).permute(0, 2, 3, 1)
            vv = v_cache.index_select(0, bt).view(nd, ctx, num_kv, head_dim).transpose(1, 2)
            if q.dtype == torch.float32:
                qq = q[:nd].view(nd, num_kv, group, head_dim) * scale
                scores = torch.matmul(qq, kk).add_(meta.decode_bias)
                probs = torch.softmax(scores, dim=-1)
                torch.matmul(probs, vv, out=out[:nd].view(nd, num_kv, group, head_dim))
            else:  # half precision: SDPA keeps the reference's internal fp32 math
                o = F.scaled_dot_product_attention(
                    q[:nd].unsqueeze(2), kk.transpose(2, 3), vv,
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


def get_backend(name: str = "auto", device: str = "cpu") -> TorchAttention:
    """Pick an attention backend by capability. Only ``torch`` is available today."""
    if name in ("auto", "torch"):
        return TorchAttention()
    raise ValueError(f"attention backend {name!r} is not available here; available: torch")
