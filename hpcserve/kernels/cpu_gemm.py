"""The project's CPU GEMM (``gemm_avx2.c``): build, load, and a ``PackedLinear`` wrapper.

Lifecycle: ``available()`` builds and loads the library once (``build.load``; it
shares torch's OpenMP pool). Weights are packed once at model load
(``PackedLinear(weight, bias)``); each call is ``y = packed(x)``.

Selection is by capability (see ``build``): x86-64 with AVX2 and FMA, a C compiler,
fp32, and not disabled by ``HPCSERVE_CPU_KERNELS=0``. ``available()`` says why not when it isn't;
callers then fall back to oneDNN/``F.linear``. tests/test_kernels.py checks it
against ``F.linear`` over odd shapes.
"""

from __future__ import annotations

import ctypes

import torch

from hpcserve.kernels import build

NR = 24
_lib: ctypes.CDLL | None = None
_why_not: str | None = None


def available() -> tuple[bool, str]:
    """(usable, reason). Builds and loads the kernel on first call."""
    global _lib, _why_not
    if _lib is not None:
        return True, "loaded"
    if _why_not is not None:
        return False, _why_not
    lib, reason = build.load("gemm_avx2")
    if lib is None:
        _why_not = reason
        return False, reason
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.hpc_pack.argtypes = [ptr, i64, i64, ptr]
    lib.hpc_pack.restype = None
    lib.hpc_linear.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64]
    lib.hpc_linear.restype = None
    _lib = lib
    return True, "loaded"


class PackedLinear:
    """``y = x @ weight.T + bias`` for fp32 CPU tensors, weight packed once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        ok, why = available()
        if not ok:
            raise RuntimeError(f"CPU GEMM kernel unavailable: {why}")
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError("PackedLinear takes a 2-D float32 weight")
        weight = weight.contiguous()
        self.n, self.k = weight.shape
        panels = -(-self.n // NR)
        self.packed = torch.empty(panels * self.k * NR, dtype=torch.float32)
        _lib.hpc_pack(weight.data_ptr(), self.n, self.k, self.packed.data_ptr())
        self.bias = None
        if bias is not None:
            self.bias = torch.zeros(panels * NR, dtype=torch.float32)
            self.bias[: self.n] = bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"expected float32 [M, {self.k}], got {x.dtype} {tuple(x.shape)}")
        if x.stride(1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        y = torch.empty((m, self.n), dtype=torch.float32)
        if m:
            _lib.hpc_linear(
                x.data_ptr(), m, self.k, x.stride(0), self.packed.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(), self.n, y.data_ptr(), self.n,
            )
        return y
