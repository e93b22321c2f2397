"""The Llama-family forward pass (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Plain functional torch, no ``nn.Module`` per layer: the step is one Python loop over
layers with fused projections (q|k|v in one matmul, gate|up in one), which keeps
per-step overhead low on CPU. Numerics follow the reference implementation: RMSNorm
in float32, RoPE tables computed in float32 then cast.

Interface:
- ``LlamaModel(cfg, weights, dtype, max_positions, attn, cpu_kernels=True)``; ``weights`` are
  HF-named tensors (see ``loader.load_weights``); they are fused and the originals dropped.
  ``cpu_kernels=False`` keeps the project's C kernels (packed GEMM, fused ops) out: the torch
  reference path, as with ``HPCSERVE_CPU_KERNELS=0`` but per model.
- ``forward(input_ids [T], positions [T], kv_cache, meta) -> hidden [T, hidden]`` where
  ``kv_cache`` is [layers, 2, num_blocks, block_size, kv_heads, head_dim].
- ``compute_logits(hidden [N, hidden]) -> [N, vocab]`` (float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hpcserve.models.attention import AttentionMetadata, TorchAttention
from hpcserve.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    kind = rs.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_len = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, device: str = "cpu", kernels: bool = True):
    """A callable ``x -> x @ weight.T + bias``, with the fastest GEMM this machine has.

    Chosen by capability, measured here (AMD EPYC, AVX2, 2 cores), decode batch of 32:
    1. the project's packed AVX2 kernel (``hpcserve/kernels``): ~2x oneDNN on decode-sized
       GEMMs and ~1.4x on prefill-sized ones;
    2. oneDNN's matmul, which parallelizes small-M GEMMs where MKL's sgemm mostly
       runs on one core (1.3-1.6x MKL per decode step);
    3. ``F.linear`` (CUDA, other dtypes).
    ``kernels=False`` skips the first.
    """
    path = gemm_path(weight.dtype, device, kernels)
    if path == "packed_avx2":
        from hpcserve.kernels import cpu_gemm

        return cpu_gemm.PackedLinear(weight, bias)
    if path == "onednn":
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return lambda x: F.linear(x, weight, bias)


def gemm_path(dtype: torch.dtype, device: str = "cpu", kernels: bool = True) -> str:
    """Which GEMM ``make_linear`` uses for weights of ``dtype`` on ``device``: ``"packed_avx2"``
    (the project's kernel, unless ``kernels`` is False), ``"onednn"`` or ``"f_linear"``."""
    if device == "cpu" and dtype == torch.float32:
        from hpcserve.kernels import cpu_gemm

        if kernels and cpu_gemm.available()[0]:
            return "packed_avx2"
        if torch.backends.mkldnn.is_available():
            return "onednn"
    return "f_linear"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class _Layer:
    __slots__ = ("in_norm", "post_norm", "qkv", "o", "gate_up", "down", "q_norm", "k_norm")


class LlamaModel:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        max_positions: int,
        attn: TorchAttention | None = None,
        cpu_kernels: bool = True,
    ) -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.attn = attn or TorchAttention()
        self.scale = cfg.head_dim ** -0.5
        w = weights

        def linear(weight: torch.Tensor, bias: torch.Tensor | None):
            return make_linear(weight, bias, kernels=cpu_kernels)

        def take(name: str) -> torch.Tensor | None:
            t = w.pop(name, None)
            return None if t is None else t.to(dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        lm = take("lm_head.weight")
        self.lm_head = linear(self.embed if (cfg.tie_word_embeddings or lm is None) else lm, None)
        self.norm = take("model.norm.weight")
        self.layers: list[_Layer] = []
        self.layer_hook = None  # called after each layer's attention (KV handoff progress), if set
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            L = _Layer()
            L.in_norm = take(p + "input_layernorm.weight")
            L.post_norm = take(p + "post_attention_layernorm.weight")
            L.qkv = linear(
                torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
                torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) if cfg.qkv_bias else None,
            )
            L.o = linear(take(p + "self_attn.o_proj.weight"), take(p + "self_attn.o_proj.bias") if cfg.o_bias else None)
            L.gate_up = linear(
                torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                torch.cat([take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")]) if cfg.mlp_bias else None,
            )
            L.down = linear(take(p + "mlp.down_proj.weight"), take(p + "mlp.down_proj.bias") if cfg.mlp_bias else None)
            L.q_norm = take(p + "self_attn.q_norm.weight") if cfg.qk_norm else None
            L.k_norm = take(p + "self_attn.k_norm.weight") if cfg.qk_norm else None
            self.layers.append(L)

        self.ops = None  # fused CPU ops (hpcserve/kernels/cpu_ops.c) for fp32 on CPU
        if dtype == torch.float32 and cpu_kernels:
            from hpcserve.kernels import cpu_ops

            self.ops = cpu_ops if cpu_ops.available() else None

        inv_freq = rope_inv_freq(cfg)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(dtype)
        sin = emb.sin()
        half = cfg.head_dim // 2
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): fold the sign into the table
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([x2, x1], dim=-1)
        if x.dtype == torch.float32:
            return torch.addcmul(x * cos, rotated, sin_signed)
        return x * cos + rotated * sin_signed  # the reference's rounding order in bf16/fp16

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if self.ops is not None:
            return self._forward_fused(input_ids, positions, kv_cache, meta)
        cfg = self.cfg
        T = input_ids.shape[0]
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.q_size, cfg.kv_size
        eps = cfg.rms_norm_eps
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin_signed.index_select(0, positions).unsqueeze(1)
        x = F.embedding(input_ids, self.embed)
        for i, L in enumerate(self.layers):
            h = rms_norm(x, L.in_norm, eps)
            qkv = L.qkv(h)
            v = qkv[:, q_size + kv_size :].view(T, KV, D)
            if L.q_norm is None:  # rotate q and k heads in one go
                qk = self._rope(qkv[:, : q_size + kv_size].view(T, H + KV, D), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
            else:
                q = self._rope(rms_norm(qkv[:, :q_size].view(T, H, D), L.q_norm, eps), cos, sin)
                k = self._rope(rms_norm(qkv[:, q_size : q_size + kv_size].view(T, KV, D), L.k_norm, eps), cos, sin)
            o = self.attn.forward(q, k, v, kv_cache[i, 0], kv_cache[i, 1], meta, self.scale)
            if self.layer_hook is not None:
                self.layer_hook()
            x = x + L.o(o.view(T, q_size))
            h = rms_norm(x, L.post_norm, eps)
            gu = L.gate_up(h)
            g, u = gu.chunk(2, dim=-1)
            x = x + L.down(F.silu(g, inplace=True).mul_(u))
        return rms_norm(x, self.norm, eps)

    def _forward_fused(self, input_ids, positions, kv_cache, meta) -> torch.Tensor:
        """Same math as ``forward`` with fused CPU ops: each residual add is folded into
        the RMSNorm that follows it, and RoPE rotates q and k in place in the qkv buffer."""
        cfg, ops = self.cfg, self.ops
        T = input_ids.shape[0]
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, eps = cfg.q_size, cfg.rms_norm_eps
        if cfg.qk_norm:  # q/k are normed before RoPE: rotate the normed copies with torch
            cos = self.cos.index_select(0, positions).unsqueeze(1)
            sin = self.sin_signed.index_select(0, positions).unsqueeze(1)
        x = F.embedding(input_ids, self.embed)
        h = ops.add_rms_norm(x, None, self.layers[0].in_norm, eps)
        for i, L in enumerate(self.layers):
            qkv = L.qkv(h)
            heads = qkv.view(T, H + 2 * KV, D)
            v = heads[:, H + KV :]
            if L.q_norm is None:
                ops.rope_(heads, H + KV, self.cos, self.sin_signed, positions)
                q, k = heads[:, :H], heads[:, H : H + KV]
            else:
                q = self._rope(rms_norm(heads[:, :H], L.q_norm, eps), cos, sin)
                k = self._rope(rms_norm(heads[:, H : H + KV], L.k_norm, eps), cos, sin)
            o = self.attn.forward(q, k, v, kv_cache[i, 0], kv_cache[i, 1], meta, self.scale)
            if self.layer_hook is not None:
                self.layer_hook()
            h = ops.add_rms_norm(x, L.o(o.view(T, q_size)), L.post_norm, eps)
            nxt = self.layers[i + 1].in_norm if i + 1 < len(self.layers) else self.norm
            h = ops.add_rms_norm(x, L.down(ops.silu_mul(L.gate_up(h))), nxt, eps)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
