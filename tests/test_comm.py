"""hpcserve.cluster.comm against a real MPI world (the venv's MPICH ``mpiexec``).

Each MPI test writes a small script to tmp_path and runs it with
``$VENV/bin/mpiexec -launcher fork -n N python script`` (at most 2 ranks, OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from capabilities import VENV_MPIEXEC, needs_mpi

REPO = Path(__file__).resolve().parents[1]



def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_mpi(tmp_path: Path, body: str, n: int = 2, timeout: float = 120, args=()) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    # -launcher fork: local ranks even when the tests run inside a Slurm allocation.
    cmd = [str(VENV_MPIEXEC), "-launcher", "fork", "-n", str(n), sys.executable, str(script), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=tmp_path)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


# --- 1. raw buffer exchange ------------------------------------------------------------

NUMPY_EXCHANGE = """
import numpy as np
from hpcserve.cluster.comm import init_mpi, abort_on_exception, send_buffer, recv_buffer, wait

world = init_mpi()
abort_on_exception(world)
comm, peer = world.comm, 1 - world.rank
n = 8 * 1024 * 1024 // 4  # 8 MiB of float32
mine = (np.arange(n, dtype=np.float32) * (world.rank + 1) + 0.25).reshape(1024, -1)
theirs = np.empty_like(mine)
rreq = recv_buffer(comm, theirs, source=peer, tag=11, world=world)
sreq = send_buffer(comm, mine, dest=peer, tag=11, world=world)
wait(sreq, timeout_s=60, world=world, what="8 MiB send")
wait(rreq, timeout_s=60, world=world, what="8 MiB recv")
expected = (np.arange(n, dtype=np.float32) * (peer + 1) + 0.25).reshape(1024, -1)
assert np.array_equal(theirs, expected), "content mismatch"
print(f"OK rank {world.rank} {theirs.nbytes}")
"""

TORCH_EXCHANGE = """
import torch
from hpcserve.cluster.comm import init_mpi, abort_on_exception, send_buffer, recv_buffer, wait

torch.set_num_threads(1)
world = init_mpi()
abort_on_exception(world)
comm = world.comm
n = 8 * 1024 * 1024 // 4
for tag, dtype in ((21, torch.float32), (22, torch.bfloat16)):
    ref = (torch.arange(n, dtype=torch.float32) % 977 - 300.5).to(dtype).reshape(64, -1)
    if world.rank == 0:
        wait(send_buffer(comm, ref, dest=1, tag=tag, world=world), timeout_s=60, what="torch send")
    else:
        got = torch.empty_like(ref)
        wait(recv_buffer(comm, got, source=0, tag=tag, world=world), timeout_s=60, what="torch recv")
        assert got.dtype == dtype and torch.equal(got, ref), f"{dtype} mismatch"
        print(f"OK {dtype} {got.numel() * got.element_size()}")
"""


@needs_mpi
def test_exchange_numpy_8mib(tmp_path):
    proc = run_mpi(tmp_path, NUMPY_EXCHANGE)
    _check(proc)
    assert f"OK rank 1 {8 * 1024 * 1024}" in proc.stdout
    assert f"OK rank 0 {8 * 1024 * 1024}" in proc.stdout


@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_exchange_torch_cpu_tensors(tmp_path):
    proc = run_mpi(tmp_path, TORCH_EXCHANGE)
    _check(proc)
    assert "OK torch.float32 8388608" in proc.stdout
    assert "OK torch.bfloat16 4194304" in proc.stdout


# --- 2. an exception on one rank takes the world down -----------------------------------

ABORT_SCRIPT = """
import sys, threading, time
from hpcserve.cluster.comm import init_mpi, abort_on_exception

world = init_mpi()
abort_on_exception(world)
mode = sys.argv[1]

def fail():
    raise RuntimeError("boom from rank 1")

if world.rank == 0:
    world.comm.Barrier()          # would hang forever without the abort
    print("rank 0 passed the barrier?!")
elif mode == "main":
    time.sleep(0.5)
    fail()
else:
    t = threading.Thread(target=fail, name="kv-poller")
    t.start(); t.join()
    time.sleep(120)
"""


@needs_mpi
@pytest.mark.parametrize("mode", ["main", "thread"])
def test_exception_aborts_world(tmp_path, mode):
    proc = run_mpi(tmp_path, ABORT_SCRIPT, timeout=60, args=(mode,))
    assert proc.returncode != 0
    assert "passed the barrier" not in proc.stdout
    tagged = [line for line in proc.stderr.splitlines() if line.startswith("[rank 1@")]
    assert any("RuntimeError: boom from rank 1" in line for line in tagged), proc.stderr
    assert any("Traceback (most recent call last)" in line for line in tagged), proc.stderr
    assert any("in fail" in line for line in tagged), proc.stderr
    if mode == "thread":
        assert any("kv-poller" in line for line in tagged), proc.stderr


# --- 3. wait() times out ----------------------------------------------------------------

TIMEOUT_SCRIPT = """
import numpy as np
from hpcserve.cluster.comm import init_mpi, recv_buffer, wait

world = init_mpi()
buf = np.zeros(16, dtype=np.float32)
req = recv_buffer(world.comm, buf, source=0, tag=99, world=world)
try:
    wait(req, timeout_s=0.3, world=world, what="kv blocks for req-7")
except TimeoutError as e:
    print("TIMEOUT", e)
    req.Cancel(); req.Wait()
else:
    raise SystemExit("no timeout")
"""


@needs_mpi
def test_wait_times_out(tmp_path):
    proc = run_mpi(tmp_path, TIMEOUT_SCRIPT, n=1)
    _check(proc)
    assert "TIMEOUT timed out after 0.3 s waiting for kv blocks for req-7 on rank 0@" in proc.stdout


# --- 4. thread level and lock -----------------------------------------------------------

LEVEL_SCRIPT = """
import json, sys, threading
from hpcserve.cluster.comm import init_mpi

world = init_mpi(required=sys.argv[1])
from mpi4py import MPI
names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
         MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
print(json.dumps({
    "rank": world.rank, "size": world.size, "hostname": world.hostname,
    "thread_level": world.thread_level, "queried": names[MPI.Query_thread()],
    "is_multithreaded": world.is_multithreaded,
    "lock_is_real": isinstance(world.lock, type(threading.Lock())),
}))
"""


@needs_mpi
@pytest.mark.parametrize("required", ["multiple", "serialized"])
def test_init_mpi_thread_level_and_lock(tmp_path, required):
    proc = run_mpi(tmp_path, LEVEL_SCRIPT, n=1, args=(required,))
    _check(proc)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["rank"] == 0 and info["size"] == 1 and info["hostname"]
    assert info["thread_level"] == info["queried"]
    assert info["is_multithreaded"] == (info["thread_level"] == "multiple")
    assert info["lock_is_real"] == (not info["is_multithreaded"])
    if required == "serialized":  # MPI may provide more than asked, never less here
        assert info["thread_level"] in ("serialized", "multiple")


# --- 5. no MPI at import; pure-Python parts ---------------------------------------------


def test_import_does_not_need_mpi4py():
    code = (
        "import sys, hpcserve.cluster, hpcserve.cluster.comm as c; "
        "bad = [m for m in ('mpi4py', 'torch', 'numpy') if m in sys.modules]; "
        "assert not bad, bad; print('clean')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, env=_env()
    )
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr


class _FakeRequest:
    def __init__(self, done_after: int, lock=None):
        self.calls, self.done_after, self.lock = 0, done_after, lock

    def Test(self):
        if self.lock is not None:
            assert self.lock.locked(), "Test() called without world.lock"
        self.calls += 1
        return self.calls >= self.done_after


def test_wait_polls_under_lock_without_mpi():
    from hpcserve.cluster.comm import World, wait

    lock = threading.Lock()
    world = World(rank=3, size=4, hostname="n1", thread_level="serialized", is_multithreaded=False, lock=lock)
    req = _FakeRequest(done_after=5, lock=lock)
    assert wait(req, timeout_s=10, world=world) is req and req.calls == 5
    with pytest.raises(TimeoutError, match="waiting for never on rank 3@n1"):
        wait(_FakeRequest(done_after=10**9), timeout_s=0.05, world=world, what="never")


def test_tagged_traceback_and_buffer_checks():
    np = pytest.importorskip("numpy")
    from hpcserve.cluster.comm import _as_bytes, format_tagged_exception

    try:
        raise ValueError("x")
    except ValueError as e:
        text = format_tagged_exception(type(e), e, e.__traceback__, "[rank 2@h] ")
    assert all(line.startswith("[rank 2@h] ") for line in text.splitlines())
    assert text.splitlines()[-1] == "[rank 2@h] ValueError: x"

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert _as_bytes(a, writable=True).nbytes == 48
    with pytest.raises(ValueError, match="contiguous"):
        _as_bytes(a[:, :2], writable=False)
    ro = a.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _as_bytes(ro, writable=True)
    assert _as_bytes(b"abcd", writable=False).nbytes == 4
