"""Where the KV handoff's staging buffers live and what MPI is handed: CPU or CUDA caches.

The MPI connector (:mod:`hpcserve.transfer.mpi`) never touches devices itself; it asks
one *buffer path* object, chosen per cache device from the cache and the MPI library's
capability::

    cuda_aware = mpi_cuda_aware(MPI)        # after MPI init: True / False / None (unknown)
    path = select_path(kv_cache, cuda_aware, host_staging=False)   # logs the choice
    buf = path.acquire(n)                   # staging buffer (1-D uint8 tensor, >= n bytes)
    path.pack(mover, g, buf)                # BlockMover group g → buf, ready for MPI on return
    comm.Isend([path.mpi_buffer(buf, n), MPI.BYTE], ...)   # or Irecv into it
    path.unpack(mover, g, buf)              # buf (received) → the cache's blocks
    path.release(buf)                       # once MPI let go of it
    path.allows_direct                      # False: receive via staging, never a datatype

Paths:

- :class:`HostPath` (CPU cache): CPU staging buffers, MPI gets numpy views. This is the
  code every CPU test and ``hpcserve.transfer.bench`` run.
- :class:`CudaAwarePath` (CUDA cache, CUDA-aware MPI): staging buffers on the cache's
  device; MPI gets the tensor itself (mpi4py reads ``__dlpack__`` /
  ``__cuda_array_interface__``) after the current stream is synchronized, since MPI does
  not order itself after our kernels.
- :class:`CudaStagedPath` (CUDA cache, MPI not (known to be) CUDA-aware, or
  ``host_staging=True``): pack on the device into a scratch buffer, copy into a pinned host
  staging buffer and send that; receive into pinned host, copy to the device, unpack.
  Both copies are synchronous, so the host buffer is free for MPI when they return.

CUDA paths receive in ``"staging"`` mode (no MPI derived datatypes over device memory);
the connector switches automatically (``allows_direct``). Device work is issued on the
current stream of the thread driving the connector and stays stream-ordered: a transfer's
SUCCESS means its unpack kernels are queued on that stream. The CUDA classes take a
``device`` argument so that tests run their logic with ``device="cpu"`` (and
``pin_memory=False``); nothing here needs a GPU to import.

Capability (:func:`mpi_cuda_aware`): env ``HPCSERVE_MPI_CUDA_AWARE`` (``1``/``0``) wins;
else MPICH's ``int MPIX_GPU_query_support(int gpu_type, int *is_supported)`` with
``MPIX_GPU_SUPPORT_CUDA == 0`` (mpi.h), then ``int MPIX_Query_cuda_support(void)`` (Open
MPI's ``mpi-ext.h``; MPICH and MVAPICH export it too), looked up with ctypes in the MPI
library mpi4py already loaded (mpi4py exposes neither). A missing symbol or an error
return means ``None`` (unknown), which selects host staging.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from hpcserve.transfer.packing import BlockMover, StagingPool

__all__ = [
    "ENV_CUDA_AWARE",
    "CudaAwarePath",
    "CudaStagedPath",
    "HostPath",
    "env_cuda_aware",
    "mpi_cuda_aware",
    "select_path",
]

log = logging.getLogger(__name__)

ENV_CUDA_AWARE = "HPCSERVE_MPI_CUDA_AWARE"
MPIX_GPU_SUPPORT_CUDA = 0  # MPICH mpi.h
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# ------------------------------------------------------------------ capability
def env_cuda_aware(environ=None) -> bool | None:
    """The ``HPCSERVE_MPI_CUDA_AWARE`` override: True, False, or None (unset / unparsable)."""
    raw = (os.environ if environ is None else environ).get(ENV_CUDA_AWARE, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value:
        log.warning("ignoring %s=%r (expected 1 or 0)", ENV_CUDA_AWARE, raw)
    return None


def _loaded_mpi_libraries(MPI) -> list[ctypes.CDLL]:
    """Handles on already-loaded code that can resolve MPIX_* symbols; never loads a library."""
    noload = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
    names: list[str | None] = [None]  # the global scope (MPI linked in, or loaded RTLD_GLOBAL)
    ext = getattr(MPI, "__file__", None)  # mpi4py's extension: dlsym searches its deps (libmpi)
    if ext:
        names.append(ext)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip()
                if os.path.basename(path).startswith("libmpi") and ".so" in path and path not in names:
                    names.append(path)
    except OSError:
        pass
    libs = []
    for name in names:
        try:
            libs.append(ctypes.CDLL(name, mode=noload) if name else ctypes.CDLL(None))
        except OSError:
            continue
    return libs


def _query(lib: ctypes.CDLL) -> bool | None:
    try:
        fn = lib.MPIX_GPU_query_support
    except AttributeError:
        pass
    else:
        fn.argtypes, fn.restype = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)], ctypes.c_int
        flag = ctypes.c_int(0)
        if fn(MPIX_GPU_SUPPORT_CUDA, ctypes.byref(flag)) == 0:  # MPI_SUCCESS
            return bool(flag.value)
    try:
        fn = lib.MPIX_Query_cuda_support
    except AttributeError:
        return None
    fn.argtypes, fn.restype = [], ctypes.c_int
    return bool(fn())


def mpi_cuda_aware(MPI=None) -> bool | None:
    """Can MPI send and receive CUDA device buffers? True / False / None (unknown). Call
    after MPI init (before it, or after finalize, only the env override answers)."""
    forced = env_cuda_aware()
    if forced is not None:
        return forced
    try:
        if MPI is None:
            from mpi4py import MPI
        if not MPI.Is_initialized() or MPI.Is_finalized():
            return None
        for lib in _loaded_mpi_libraries(MPI):
            answer = _query(lib)
            if answer is not None:
                return answer
    except Exception:  # detection must never take the connector down
        log.debug("MPI CUDA-awareness query failed", exc_info=True)
    return None


# ---------------------------------------------------------------- buffer paths
class HostPath:
    """CPU cache: CPU staging buffers, MPI gets numpy views (today's CPU behaviour)."""

    name = "host"
    allows_direct = True  # receive straight into the cache through an MPI datatype

    def __init__(self, pool: StagingPool | None = None) -> None:
        self.pool = pool or StagingPool()

    def acquire(self, nbytes: int) -> torch.Tensor:
        return self.pool.acquire(nbytes)

    def release(self, buf: torch.Tensor) -> None:
        self.pool.release(buf)

    def mpi_buffer(self, buf: torch.Tensor, nbytes: int):
        return buf[:nbytes].numpy()

    def pack(self, mover: BlockMover, g: int, buf: torch.Tensor) -> None:
        mover.pack(g, buf)

    def unpack(self, mover: BlockMover, g: int, buf: torch.Tensor) -> None:
        mover.unpack(g, buf)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class CudaAwarePath(HostPath):
    """CUDA cache + CUDA-aware MPI: staging buffers on the device, handed to MPI as tensors."""

    name = "cuda-aware"
    allows_direct = False

    def __init__(self, device, pool: StagingPool | None = None) -> None:
        self.device = torch.device(device)
        super().__init__(pool or StagingPool(device=self.device))

    def mpi_buffer(self, buf: torch.Tensor, nbytes: int):
        _sync(self.device)  # our pack (send) / last unpack from buf (receive) must be done
        return buf[:nbytes]


class CudaStagedPath(HostPath):
    """CUDA cache, MPI not CUDA-aware: device pack/unpack through a scratch buffer, MPI
    sends from / receives into (pinned) host staging buffers."""

    name = "cuda-staged"
    allows_direct = False

    def __init__(self, device, pool: StagingPool | None = None, pin_memory: bool = True) -> None:
        self.device = torch.device(device)
        super().__init__(pool or StagingPool(pin_memory=pin_memory))
        self.device_pool = StagingPool(device=self.device)

    def pack(self, mover: BlockMover, g: int, buf: torch.Tensor) -> None:
        n = mover.group_nbytes[g]
        tmp = self.device_pool.acquire(n)
        mover.pack(g, tmp)
        buf[:n].copy_(tmp[:n])  # device → host, synchronous
        self.device_pool.release(tmp)  # later users are stream-ordered after the copy

    def unpack(self, mover: BlockMover, g: int, buf: torch.Tensor) -> None:
        n = mover.group_nbytes[g]
        tmp = self.device_pool.acquire(n)
        tmp[:n].copy_(buf[:n])  # host → device, synchronous: buf may go back to MPI now
        mover.unpack(g, tmp)
        self.device_pool.release(tmp)


def select_path(
    kv_cache: torch.Tensor, cuda_aware: bool | None, *, host_staging: bool = False, pool: StagingPool | None = None
) -> HostPath:
    """The buffer path for ``kv_cache``'s device. ``cuda_aware``: :func:`mpi_cuda_aware`'s
    answer (None = unknown → host staging); ``host_staging=True`` forces host staging for
    CUDA caches; ``pool``: host staging pool of :class:`HostPath`."""
    dev = kv_cache.device
    if dev.type == "cpu":
        path, why = HostPath(pool), "CPU cache"
    elif dev.type != "cuda":
        raise ValueError(f"no KV transfer buffer path for a cache on {dev}")
    elif host_staging:
        path, why = CudaStagedPath(dev), "host staging forced"
    elif cuda_aware:
        path, why = CudaAwarePath(dev), "MPI is CUDA-aware"
    else:
        why = "MPI is not CUDA-aware" if cuda_aware is False else "MPI CUDA-awareness unknown"
        path = CudaStagedPath(dev)
    recv = "direct or staging receives" if path.allows_direct else "staging receives"
    log.info("KV transfer buffer path for %s: %s (%s; %s)", dev, path.name, why, recv)
    return path
