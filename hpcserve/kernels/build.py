"""Build and load the project's C kernels (one shared library per source file).

Lifecycle: ``load(name)`` compiles ``hpcserve/kernels/<name>.c`` once per source hash
into ``$HPCSERVE_CACHE_DIR/kernels/`` with the system C compiler (``cc -O3 -mavx2
-mfma -fopenmp``; about a second), then loads it with ctypes and caches the handle.
The library links ``libgomp.so.1`` by soname; torch has already loaded its own copy,
so kernels share torch's OpenMP thread pool and thread count.

``load`` returns ``(lib, None)`` or ``(None, reason)``. Capability: x86-64 with AVX2
and FMA, a C compiler, and not disabled by ``HPCSERVE_CPU_KERNELS=0``.
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

_HERE = Path(__file__).parent
_loaded: dict[str, tuple[ctypes.CDLL | None, str | None]] = {}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _why_not() -> str | None:
    if os.environ.get("HPCSERVE_CPU_KERNELS", "1").lower() in ("0", "off", "false", "no"):
        return "disabled by HPCSERVE_CPU_KERNELS"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not x86-64 ({platform.machine()})"
    if not {"avx2", "fma"} <= _cpu_flags():
        return "CPU lacks AVX2/FMA"
    return None


def _compile(src: Path, out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-o", str(tmp_so), str(src), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {src.name} failed: {r.stderr.strip()[:500]}")
        os.replace(tmp_so, out)  # atomic: concurrent builders never load a half-written file


def load(name: str) -> tuple[ctypes.CDLL | None, str | None]:
    if name in _loaded:
        return _loaded[name]
    reason = _why_not()
    lib = None
    if reason is None:
        from hpcserve.models.gguf import cache_dir

        src = _HERE / f"{name}.c"
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
        so = cache_dir() / "kernels" / f"{name}-{digest}.so"
        try:
            if not so.is_file():
                _compile(src, so)
            lib = ctypes.CDLL(str(so))
        except (OSError, RuntimeError) as exc:
            reason = str(exc)
    _loaded[name] = (lib, reason)
    return lib, reason
