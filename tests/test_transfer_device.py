"""Buffer paths of the KV handoff (hpcserve.transfer.device) without a GPU.

- capability detection: env override parsing, the MPI query in a subprocess (MPICH wheel);
- ``select_path``'s decision table (CUDA caches stubbed by an object with a ``device``);
- every path class's pack → "wire" → unpack logic, run with ``device="cpu"`` and
  ``pin_memory=False`` (and on ``cuda`` too when a GPU is present);
- a real 2-rank ``mpiexec`` exchange forced through ``CudaStagedPath`` / ``CudaAwarePath``
  on CPU tensors (tests/mpi_transfer_cases.py ``paths``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
from capabilities import needs_mpi

torch = pytest.importorskip("torch")

from hpcserve.transfer.base import KVConnectorScheduler, KVGeometry
from hpcserve.transfer.device import (
    ENV_CUDA_AWARE,
    CudaAwarePath,
    CudaStagedPath,
    HostPath,
    env_cuda_aware,
    mpi_cuda_aware,
    select_path,
)
from hpcserve.transfer.packing import BlockMover, StagingPool, blocks_digest

L, BS, H, D, NB = 4, 4, 2, 8, 40
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cache(device, dtype=torch.float32, seed=0, zero=False):
    shape = (L, 2, NB, BS, H, D)
    if zero:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def make_path(kind: str, device: str):
    if kind == "host":
        if device != "cpu":
            pytest.skip("HostPath is for CPU caches")
        return HostPath()
    if kind == "aware":
        return CudaAwarePath(device)
    return CudaStagedPath(device, pin_memory=device != "cpu")


def wire(src_obj, dst_obj) -> None:
    """What MPI does between the objects the two paths hand it (numpy views or tensors)."""
    torch.as_tensor(dst_obj).copy_(torch.as_tensor(src_obj).to(torch.as_tensor(dst_obj).device))


# ------------------------------------------------------------------ capability
@pytest.mark.parametrize(
    "raw, expected",
    [("1", True), ("0", False), (" TRUE ", True), ("no", False), ("on", True), ("", None), ("maybe", None)],
)
def test_env_override_parsing(raw, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="hpcserve.transfer.device"):
        assert env_cuda_aware({ENV_CUDA_AWARE: raw}) is expected
    assert ("ignoring" in caplog.text) == (raw == "maybe")
    assert env_cuda_aware({}) is None


class _ExplodingMPI:
    def __getattr__(self, name):
        raise AssertionError(f"MPI.{name} used despite the env override")


@pytest.mark.parametrize("raw, expected", [("1", True), ("0", False)])
def test_env_override_wins_without_touching_mpi(monkeypatch, raw, expected):
    monkeypatch.setenv(ENV_CUDA_AWARE, raw)
    assert mpi_cuda_aware(_ExplodingMPI()) is expected


def test_unknown_when_mpi_not_initialized_or_broken(monkeypatch):
    monkeypatch.delenv(ENV_CUDA_AWARE, raising=False)
    assert mpi_cuda_aware(SimpleNamespace(Is_initialized=lambda: False, Is_finalized=lambda: False)) is None

    def boom():
        raise RuntimeError("MPI gone")

    assert mpi_cuda_aware(SimpleNamespace(Is_initialized=boom)) is None
    # initialized, but nothing that resolves MPIX_* symbols: unknown, not a crash
    fake = SimpleNamespace(Is_initialized=lambda: True, Is_finalized=lambda: False, __file__="/nonexistent/libx.so")
    assert mpi_cuda_aware(fake) in (None, False)


_PROBE = r"""
import json, os, sys
import mpi4py
mpi4py.rc.initialize = False
from mpi4py import MPI
from hpcserve.transfer import device

def libs():
    return sorted({l.split()[-1] for l in open("/proc/self/maps") if "libmpi" in l})

before = device.mpi_cuda_aware(MPI)
from hpcserve.cluster.comm import init_mpi
init_mpi("multiple")
maps0 = libs()
after = device.mpi_cuda_aware()
found = sorted({n for lib in device._loaded_mpi_libraries(MPI)
                for n in ("MPIX_GPU_query_support", "MPIX_Query_cuda_support") if hasattr(lib, n)})
print(json.dumps({"before": before, "after": after, "found": found, "same_libs": maps0 == libs(),
                  "version": MPI.Get_library_version()}))
"""


@needs_mpi
def test_mpi_cuda_aware_under_the_real_mpi_library():
    from test_transfer_mpi import _env

    env = _env()
    env.pop(ENV_CUDA_AWARE, None)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] is None  # before MPI_Init: unknown
    assert out["after"] in (True, False, None)
    assert out["same_libs"]  # the lookup loaded nothing new
    if "MPICH" in out["version"]:
        assert "MPIX_GPU_query_support" in out["found"]
        assert isinstance(out["after"], bool)
        if not torch.cuda.is_available():
            assert out["after"] is False  # a CPU-only node: no CUDA support at runtime


# ---------------------------------------------------------------- select_path
def test_select_path_cpu_cache_is_host_path(caplog):
    pool = StagingPool()
    with caplog.at_level(logging.INFO, logger="hpcserve.transfer.device"):
        for cuda_aware in (True, False, None):
            path = select_path(cache("cpu"), cuda_aware, host_staging=cuda_aware is None, pool=pool)
            assert type(path) is HostPath and path.pool is pool and path.allows_direct
    assert "buffer path for cpu: host (CPU cache" in caplog.text


@pytest.mark.parametrize(
    "cuda_aware, host_staging, cls, why",
    [
        (True, False, CudaAwarePath, "MPI is CUDA-aware"),
        (True, True, CudaStagedPath, "host staging forced"),
        (False, False, CudaStagedPath, "MPI is not CUDA-aware"),
        (None, False, CudaStagedPath, "MPI CUDA-awareness unknown"),
    ],
)
def test_select_path_cuda_decisions(cuda_aware, host_staging, cls, why, caplog):
    stub = SimpleNamespace(device=torch.device("cuda", 1))  # paths allocate lazily: no GPU needed
    with caplog.at_level(logging.INFO, logger="hpcserve.transfer.device"):
        path = select_path(stub, cuda_aware, host_staging=host_staging)
    assert type(path) is cls and path.device == stub.device and not path.allows_direct
    assert f"cuda:1: {path.name} ({why}; staging receives)" in caplog.text
    if cls is CudaStagedPath:
        assert path.pool.device.type == "cpu" and path.pool.pin_memory and path.device_pool.device == stub.device
    else:
        assert path.pool.device == stub.device


def test_select_path_rejects_other_devices():
    with pytest.raises(ValueError, match="no KV transfer buffer path"):
        select_path(torch.empty(L, 2, 1, BS, H, D, device="meta"), True)


# ------------------------------------------------------------ path classes
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("send_kind", ["host", "aware", "staged"])
@pytest.mark.parametrize("recv_kind", ["host", "aware", "staged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paths_round_trip(device, send_kind, recv_kind, dtype):
    src, dst = cache(device, dtype, seed=1), cache(device, dtype, zero=True)
    geo = KVGeometry(L, H, D, BS, str(dtype).removeprefix("torch."))
    sched = KVConnectorScheduler(geo, rank=1, role="consumer", layers_per_group=1)
    meta = sched.build_meta("r", 50, [3, 9, 4, 20, 7, 30, 31, 32, 33, 2, 5, 6, 8], list(range(10, 23)), peer=0)
    out, inn = (
        BlockMover(src, meta.src_block_ids, meta.layer_groups),
        BlockMover(dst, meta.dst_block_ids, meta.layer_groups),
    )
    sp, rp = make_path(send_kind, device), make_path(recv_kind, device)
    for g in range(meta.num_groups):
        n = meta.group_nbytes[g]
        sbuf, rbuf = sp.acquire(n), rp.acquire(n)
        sp.pack(out, g, sbuf)
        wire(sp.mpi_buffer(sbuf, n), rp.mpi_buffer(rbuf, n))
        rp.unpack(inn, g, rbuf)
        sp.release(sbuf)
        rp.release(rbuf)
    assert torch.equal(src[:, :, meta.src_block_ids], dst[:, :, meta.dst_block_ids])
    others = [b for b in range(NB) if b not in meta.dst_block_ids]
    assert not dst[:, :, others].any()
    assert blocks_digest(src, meta.src_block_ids, meta.layer_groups) == blocks_digest(
        dst, meta.dst_block_ids, meta.layer_groups
    )
    for p in (sp, rp):  # pools reuse their buffers across groups of one size
        assert p.pool.num_allocated <= 2
        if isinstance(p, CudaStagedPath):
            assert p.device_pool.num_allocated == 1


@pytest.mark.parametrize("device", DEVICES)
def test_what_mpi_is_handed(device):
    n = 1000
    if device == "cpu":
        host = HostPath()
        buf = host.acquire(n)
        view = host.mpi_buffer(buf, n)
        assert type(view).__module__ == "numpy" and view.ctypes.data == buf.data_ptr() and view.nbytes == n
    aware = CudaAwarePath(device)
    buf = aware.acquire(n)
    obj = aware.mpi_buffer(buf, n)
    assert isinstance(obj, torch.Tensor) and obj.device == buf.device and obj.data_ptr() == buf.data_ptr()
    assert obj.numel() == n and buf.device.type == device
    staged = CudaStagedPath(device, pin_memory=device != "cpu")
    buf = staged.acquire(n)
    view = staged.mpi_buffer(buf, n)  # MPI only ever sees host memory
    assert type(view).__module__ == "numpy" and buf.device.type == "cpu"
    assert buf.is_pinned() == (device != "cpu")


def test_staged_pack_goes_through_device_scratch():
    """pack: mover → device scratch → host buffer; unpack: host buffer → scratch → mover."""
    src = cache("cpu", seed=2)
    mover = BlockMover(src, [5, 1, 7], [(0, 2), (2, L)])
    path = CudaStagedPath("cpu", pin_memory=False)
    n = mover.group_nbytes[0]
    seen = []
    real_acquire = path.device_pool.acquire
    path.device_pool.acquire = lambda k: seen.append(k) or real_acquire(k)
    host = path.acquire(n)
    path.pack(mover, 0, host)
    ref = torch.empty(n, dtype=torch.uint8)
    mover.pack(0, ref)
    assert torch.equal(host[:n], ref) and seen == [n]
    scratch = path.device_pool._free[0][2]
    assert scratch.data_ptr() != host.data_ptr()  # a separate buffer was used, then returned
    dst = cache("cpu", zero=True)
    path.unpack(BlockMover(dst, [2, 3, 4], [(0, 2), (2, L)]), 0, host)
    assert seen == [n, n] and torch.equal(dst[:2, :, [2, 3, 4]], src[:2, :, [5, 1, 7]])


def test_staging_pool_device_options():
    pool = StagingPool(align=1024, device="cpu")
    assert pool.device == torch.device("cpu") and not pool.pin_memory
    assert not pool.acquire(10).is_pinned()
    meta_pool = StagingPool(device="meta")
    assert meta_pool.acquire(10).device.type == "meta"
    if torch.cuda.is_available():
        assert StagingPool(pin_memory=True).acquire(10).is_pinned()


# ------------------------------------------------------------ real MPI, 2 ranks
@needs_mpi
def test_forced_paths_over_real_mpi_are_byte_exact(tmp_path):
    from test_transfer_mpi import TESTS, mpirun, results

    res = results(mpirun([TESTS / "mpi_transfer_cases.py", "paths"], tmp_path))
    caps = [r for r in res if r["case"] == "capability"]
    assert len(caps) == 2 and all(r["cuda_aware"] in (True, False, None) for r in caps)
    runs = [r for r in res if r["case"] != "capability"]
    assert sorted((r["case"], r["dtype"], r["rank"]) for r in runs) == sorted(
        (c, d, rank)
        for c, d in (("staged", "float32"), ("staged", "bfloat16"), ("aware", "float32"), ("mixed", "float32"))
        for rank in (0, 1)
    )
    for r in runs:
        assert r["states"] == ["SUCCESS"] and r["done"] == 8, r
        assert r["exact"] and r["untouched"] and r["digests_match"] and r["in_band_digests"], r
        assert r["zombies"] == 0
        expected = {"staged": "cuda-staged", "aware": "cuda-aware"}.get(r["case"])
        if r["case"] == "mixed":
            expected = "host" if r["rank"] == 0 else "cuda-staged"
        assert r["path"] == expected, r
        if r["calls"] is not None:  # forced paths: every group went through them
            assert r["calls"]["pack"] == r["groups_sent"] > 8
            assert r["calls"]["unpack"] == r["groups_received"] > 8  # staging receives, not direct
            assert r["calls"]["mpi_buffer"] == r["groups_sent"] + r["groups_received"]
        if r["path"] == "cuda-staged":
            assert r["device_scratch"] >= 1
