"""The project's CPU GEMM (``gemm_avx2.c``): build, load, and a ``PackedLinear`` wrapper.

Lifecycle: ``load()`` compiles the C source once per source hash into
``$HPCSERVE_CACHE_DIR/kernels/`` with the system C compiler (``cc -O3 -mavx2 -mfma
-fopenmp``; about a second), then loads it with ctypes. It links ``libgomp.so.1`` by
soname, and torch has already loaded its own copy, so the kernel shares torch's
OpenMP thread pool and thread count. Weights are packed once at model load
(``PackedLinear(weight, bias)``); each call is ``y = packed(x)``.

Selection is by capability: x86-64 with AVX2 and FMA, a C compiler, fp32, and not
disabled by ``HPCSERVE_CPU_GEMM=0``. ``available()`` says why not when it isn't;
callers then fall back to oneDNN/``F.linear``. tests/test_kernels.py checks it
against ``F.linear`` over odd shapes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

NR = 24
_SRC = Path(__file__).with_name("gemm_avx2.c")
_lib: ctypes.CDLL | None = None
_why_not: str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-o", str(tmp_so), str(_SRC)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {_SRC.name} failed: {r.stderr.strip()[:500]}")
        os.replace(tmp_so, out)  # atomic: concurrent builders never load a half-written file


def _load() -> ctypes.CDLL:
    from hpcserve.models.gguf import cache_dir

    digest = hashlib.sha256(_SRC.read_bytes()).hexdigest()[:16]
    so = cache_dir() / "kernels" / f"hpc_gemm_avx2-{digest}.so"
    if not so.is_file():
        _build(so)
    lib = ctypes.CDLL(str(so))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.hpc_pack.argtypes = [ptr, i64, i64, ptr]
    lib.hpc_pack.restype = None
    lib.hpc_linear.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64]
    lib.hpc_linear.restype = None
    return lib


def available() -> tuple[bool, str]:
    """(usable, reason). Builds and loads the kernel on first call."""
    global _lib, _why_not
    if _lib is not None:
        return True, "loaded"
    if _why_not is not None:
        return False, _why_not
    if os.environ.get("HPCSERVE_CPU_GEMM", "1") in ("0", "off", "false"):
        _why_not = "disabled by HPCSERVE_CPU_GEMM"
    elif platform.machine() not in ("x86_64", "AMD64"):
        _why_not = f"not x86-64 ({platform.machine()})"
    elif not {"avx2", "fma"} <= _cpu_flags():
        _why_not = "CPU lacks AVX2/FMA"
    else:
        try:
            _lib = _load()
            return True, "loaded"
        except (OSError, RuntimeError) as exc:
            _why_not = str(exc)
    return False, _why_not


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
