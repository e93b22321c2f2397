"""Fused fp32 CPU ops for the decode hot path (``cpu_ops.c``), as torch-tensor functions.

Interface (each has a torch reference it is tested against in tests/test_kernels.py):
- ``add_rms_norm(x, delta, weight, eps) -> out``: ``x += delta`` in place (if given),
  then RMSNorm of ``x``;
- ``rope_(x, heads, cos, sin_signed, positions)``: rotate the first ``heads`` heads of
  every row of ``x`` [T, *, D] in place;
- ``silu_mul(gate_up) -> silu(gate) * up``;
- ``paged_decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale, window) -> out``.

``ops()`` returns this module's functions when the library loads (see ``build``),
else ``None``; callers then use torch.
"""

from __future__ import annotations

import ctypes

import torch

from hpcserve.kernels import build

_lib: ctypes.CDLL | None = None
MAX_HEADS = 256  # query heads the C kernel handles (MAX_HEADS in cpu_ops.c)


def _setup() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        lib, _ = build.load("cpu_ops")
        if lib is None:
            return None
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        lib.hpc_add_rms_norm.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, f32]
        lib.hpc_rope.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr]
        lib.hpc_silu_mul.argtypes = [ptr, i64, i64, i64, ptr]
        lib.hpc_paged_decode_attn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, i64, ptr]
        for f in (lib.hpc_add_rms_norm, lib.hpc_rope, lib.hpc_silu_mul, lib.hpc_paged_decode_attn):
            f.restype = None
        _lib = lib
    return _lib


def available() -> bool:
    return _setup() is not None


def _require() -> ctypes.CDLL:
    lib = _lib or _setup()
    if lib is None:
        raise RuntimeError(f"CPU kernels unavailable: {build.load('cpu_ops')[1]}")
    return lib


def _check(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"{name}: expected a float32 CPU tensor, got {t.dtype} on {t.device}")


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check(x, "x")
    if not x.is_contiguous() or x.dim() != 2:
        raise ValueError("x must be a contiguous [rows, hidden] tensor")
    rows, h = x.shape
    ld = 0
    if delta is not None:
        _check(delta, "delta")
        if delta.shape != x.shape or delta.stride(1) != 1:
            raise ValueError("delta must match x with contiguous rows")
        ld = delta.stride(0)
    out = torch.empty_like(x)
    _require().hpc_add_rms_norm(
        x.data_ptr(), None if delta is None else delta.data_ptr(), weight.contiguous().data_ptr(),
        out.data_ptr(), rows, h, ld, eps,
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` = [rows, 2 * inter] (gate first)."""
    _check(gate_up, "gate_up")
    rows, two_inter = gate_up.shape
    if two_inter % 2 or gate_up.stride(1) != 1:
        raise ValueError("silu_mul: expected [rows, 2*inter] with contiguous rows")
    out = torch.empty((rows, two_inter // 2), dtype=torch.float32)
    _require().hpc_silu_mul(gate_up.data_ptr(), rows, two_inter // 2, gate_up.stride(0), out.data_ptr())
    return out


def rope_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor) -> None:
    """``x``: [T, ...] whose row r holds heads of size D = cos.shape[1] from offset 0."""
    _check(x, "x")
    d = cos.shape[1]
    if x.stride(-1) != 1 or positions.dtype != torch.int64 or not (cos.is_contiguous() and sin_signed.is_contiguous()):
        raise ValueError("rope_: x needs unit last stride, positions int64, tables contiguous")
    positions = positions.contiguous()
    _require().hpc_rope(x.data_ptr(), x.shape[0], x.stride(0), heads, d, cos.data_ptr(), sin_signed.data_ptr(), positions.data_ptr())


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [nd, H, D] (rows may be strided); caches: [blocks, block_size, KV, D] contiguous."""
    _check(q, "q")
    nd, heads, d = q.shape
    num_blocks, block_size, kv_heads, d2 = k_cache.shape
    if d2 != d or heads % kv_heads or q.stride(2) != 1 or q.stride(1) != d:
        raise ValueError("paged_decode_attention: shape/stride mismatch")
    if heads > MAX_HEADS:
        raise ValueError(f"paged_decode_attention: at most {MAX_HEADS} query heads")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_decode_attention: caches must be contiguous")
    bt = block_tables.contiguous()
    lens = ctx_lens.contiguous()
    if out is None:
        out = torch.empty((nd, heads, d), dtype=torch.float32)
    _require().hpc_paged_decode_attn(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), bt.data_ptr(), bt.shape[1],
        lens.data_ptr(), nd, heads, kv_heads, d, block_size, scale, window or 0, out.data_ptr(),
    )
    return out
