"""Which machine a benchmark ran on and which engine paths ran: shared by ``bench throughput``,
``bench mixed`` and ``bench disagg`` (their ``config.machine`` in JSON and a few printed lines).

Interface::

    cpu_info() -> {"model_name", "logical_cpus", "flags": {flag: bool | None}}
    engine_paths(compute_dtype, attention_backend="auto") -> {"gemm", "fused_cpu_ops", "attention"}
        what an engine built here with that compute dtype uses (the daemons' ranks run on this
        machine with the same environment, so this is what they run)
    runner_paths(runner) -> the same, read off a built ``ModelRunner`` (what did run)
    machine_report(paths=None, **dtypes) -> {"cpu": ..., "torch", "torch_threads", "native_bf16",
                                             "paths": ..., **dtypes}
    describe(report) -> list[str]        human-readable lines for the benchmarks' reports

Flags (``CPU_FLAGS``) come from ``/proc/cpuinfo`` (Linux); elsewhere they are None (unknown).
GEMM paths follow ``hpcserve.models.llama.make_linear``: ``packed_avx2`` (the project's kernel,
``hpcserve.kernels.cpu_gemm``), ``onednn``, ``f_linear``. ``fused_cpu_ops``: the fused residual
add + RMSNorm / RoPE ops of ``hpcserve/kernels/cpu_ops.c`` (fp32 compute only). ``attention``: the
backend's name (``hpcserve.models.attention.get_backend``). Importing this module imports no torch;
the functions do.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU's model name, logical CPU count and the ``CPU_FLAGS`` (None: unknown here)."""
    text = _cpuinfo_text() if cpuinfo is None else cpuinfo
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "model_name": fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "flags": {f: (f in flags) if flags else None for f in CPU_FLAGS},
    }


def engine_paths(compute_dtype, attention_backend: str = "auto") -> dict:
    """The paths an engine built here computing in ``compute_dtype`` (torch dtype or its name) takes."""
    import torch

    from hpcserve.kernels import cpu_ops
    from hpcserve.models.attention import get_backend
    from hpcserve.models.llama import gemm_path

    dt = getattr(torch, compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
    try:
        attn = get_backend(attention_backend, "cpu").name
    except ValueError as exc:
        attn = f"unavailable ({exc})"
    return {"gemm": gemm_path(dt, "cpu"), "fused_cpu_ops": dt == torch.float32 and cpu_ops.available(),
            "attention": attn}


def runner_paths(runner) -> dict:
    """The paths of a built ``hpcserve.engine.model_runner.ModelRunner``."""
    from hpcserve.models.llama import gemm_path

    return {"gemm": gemm_path(runner.compute_dtype, runner.device), "fused_cpu_ops": runner.model.ops is not None,
            "attention": runner.model.attn.name}


def dtype_name(dtype) -> str:
    """``torch.float32`` -> ``"float32"``; strings pass through."""
    return str(dtype).replace("torch.", "")


def machine_report(paths: Mapping | None = None, **extra) -> dict:
    """CPU, torch, native bf16 support and (if given) the engine paths; ``extra`` keys are added
    as they are (e.g. ``checkpoint_dtype``, ``compute_dtype``)."""
    import torch

    from hpcserve.engine.model_runner import has_native_bf16

    return {"cpu": cpu_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "native_bf16": has_native_bf16(), **({"paths": dict(paths)} if paths is not None else {}), **extra}


def _flags_text(flags: Mapping) -> str:
    if all(v is None for v in flags.values()):
        return "flags unknown"
    return " ".join(f"{k}{'+' if v else '-'}" for k, v in flags.items())


def describe(report: Mapping) -> list[str]:
    """Two or three lines: CPU and flags; torch and bf16; the engine paths."""
    cpu = report.get("cpu") or {}
    lines = [(f"cpu: {cpu.get('model_name')} ({cpu.get('logical_cpus')} logical CPUs; "
              f"{_flags_text(cpu.get('flags') or {})})"),
             (f"torch {report.get('torch')}, {report.get('torch_threads')} threads in this process, native bf16: "
              f"{'yes' if report.get('native_bf16') else 'no'}")]
    if report.get("checkpoint_dtype"):
        lines.append(f"daemon dtype: {report['checkpoint_dtype']} checkpoint, computed in {report.get('compute_dtype')}")
    p = report.get("paths")
    if p:
        lines.append(f"engine paths: GEMM {p.get('gemm')}, fused CPU ops {'on' if p.get('fused_cpu_ops') else 'off'}, "
                     f"attention {p.get('attention')}")
    return lines
