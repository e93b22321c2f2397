"""mpi4py helpers shared by every rank of a worker world.

Interface::

    world = init_mpi(required="multiple")   # -> World(rank, size, hostname, thread_level,
                                             #          is_multithreaded, lock, comm)
    abort_on_exception(world)                # uncaught exception -> tagged traceback + Abort(1)
    req = send_buffer(comm, buf, dest, tag, world=world)     # nonblocking, raw bytes
    req = recv_buffer(comm, buf, source, tag, world=world)   # nonblocking, into buf
    wait(req, timeout_s=30.0, world=world, what="kv blocks from rank 1")

- ``world.lock`` is a real :class:`threading.Lock` when MPI provides less than
  ``THREAD_MULTIPLE`` and a no-op context manager otherwise. Hold it around every MPI call
  made from a thread (``send_buffer``/``recv_buffer``/``wait`` do so when given ``world``).
  Under ``THREAD_FUNNELED``/``SINGLE`` a lock is not enough: only the main thread may call MPI.
- ``wait`` polls ``request.Test()`` with exponential backoff, so a waiting thread never sits
  inside a blocking MPI call holding the lock; on timeout it raises :class:`TimeoutError`
  and leaves the request active (the caller may ``Cancel()`` it; the buffer stays in use).
- Buffers are numpy arrays, CPU torch tensors (via DLPack) or any writable/readable
  buffer-protocol object. They must be C-contiguous and are sent as bytes (any dtype,
  including bfloat16); never pickled. Keep them alive and untouched until the request is done.

mpi4py is imported lazily inside the functions: importing this module needs no MPI library.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

__all__ = [
    "THREAD_LEVELS",
    "World",
    "abort_on_exception",
    "format_tagged_exception",
    "init_mpi",
    "recv_buffer",
    "send_buffer",
    "wait",
]

# MPI thread levels in increasing order; index == MPI.THREAD_* value in MPICH and Open MPI,
# but names are mapped through mpi4py constants at runtime, never assumed.
THREAD_LEVELS = ("single", "funneled", "serialized", "multiple")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    hostname: str
    thread_level: str  # provided level: one of THREAD_LEVELS
    is_multithreaded: bool  # provided level is THREAD_MULTIPLE
    lock: Any  # threading.Lock below MULTIPLE, contextlib.nullcontext() otherwise
    comm: Any = None  # MPI.COMM_WORLD

    @property
    def tag(self) -> str:
        return f"[rank {self.rank}@{self.hostname}] "


def _level_names(MPI) -> dict[int, str]:
    return {
        MPI.THREAD_SINGLE: "single",
        MPI.THREAD_FUNNELED: "funneled",
        MPI.THREAD_SERIALIZED: "serialized",
        MPI.THREAD_MULTIPLE: "multiple",
    }


def init_mpi(required: str = "multiple") -> World:
    """Initialize MPI (if not already) asking for thread level ``required`` and describe the
    world. The *provided* level (``MPI.Query_thread()``) decides ``lock``."""
    required = required.lower().removeprefix("thread_")
    if required not in THREAD_LEVELS:
        raise ValueError(f"thread level {required!r} not in {THREAD_LEVELS}")
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:  # rc only matters before the first MPI import
        mpi4py.rc.thread_level = required
    from mpi4py import MPI

    if not MPI.Is_initialized():
        MPI.Init_thread(_thread_const(MPI, required))
    provided = MPI.Query_thread()
    name = _level_names(MPI).get(provided, str(provided))
    is_multi = provided == MPI.THREAD_MULTIPLE
    comm = MPI.COMM_WORLD
    return World(
        rank=comm.Get_rank(),
        size=comm.Get_size(),
        hostname=MPI.Get_processor_name(),
        thread_level=name,
        is_multithreaded=is_multi,
        lock=contextlib.nullcontext() if is_multi else threading.Lock(),
        comm=comm,
    )


def _thread_const(MPI, name: str) -> int:
    return getattr(MPI, f"THREAD_{name.upper()}")


def format_tagged_exception(exc_type, exc_value, exc_tb, prefix: str) -> str:
    """The traceback as text with every line prefixed by ``prefix``."""
    text = "".join(traceback.format_exception(exc_type, exc_value, exc_tb))
    return "".join(prefix + line + "\n" for line in text.rstrip("\n").split("\n"))


def abort_on_exception(world: World, exit_code: int = 1, drain_s: float = 0.2) -> None:
    """Make an uncaught exception on this rank (main thread or any thread) write a
    rank/host-tagged traceback to stderr and ``MPI.COMM_WORLD.Abort(exit_code)``, so the
    other ranks do not hang in a collective. Abort does not take ``world.lock``: the thread
    holding it may be the one that is stuck. ``drain_s``: pause between writing and aborting
    so the launcher's I/O forwarder can pass the traceback on (without it, mpiexec.hydra
    dropped the whole stderr of the aborting rank in about 1 run in 40 here)."""
    prefix = world.tag

    def _report_and_abort(exc_type, exc_value, exc_tb, where: str = "") -> None:
        try:
            head = f"{prefix}uncaught exception{where}; aborting MPI world\n"
            sys.stderr.write(head + format_tagged_exception(exc_type, exc_value, exc_tb, prefix))
            sys.stderr.flush()
            time.sleep(drain_s)
        finally:
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(exit_code)

    def _excepthook(exc_type, exc_value, exc_tb) -> None:
        _report_and_abort(exc_type, exc_value, exc_tb)

    def _thread_excepthook(args) -> None:
        if args.exc_type is SystemExit:  # same as threading's default: silent
            return
        name = getattr(args.thread, "name", "?")
        _report_and_abort(args.exc_type, args.exc_value, args.exc_traceback, f" in thread {name!r}")

    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


def wait(
    request,
    timeout_s: float | None = None,
    min_sleep: float = 1e-5,
    max_sleep: float = 5e-3,
    *,
    world: World | None = None,
    what: str | None = None,
):
    """Poll ``request.Test()`` (under ``world.lock`` if given) with exponential backoff from
    ``min_sleep`` to ``max_sleep`` seconds until it completes; return the request.
    Raise :class:`TimeoutError` naming ``what`` after ``timeout_s`` seconds."""
    lock = world.lock if world is not None else contextlib.nullcontext()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    sleep = min_sleep
    while True:
        with lock:
            done = request.Test()
        if done:
            return request
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            desc = what or repr(request)
            rank = f" on rank {world.rank}@{world.hostname}" if world is not None else ""
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {desc}{rank}")
        pause = sleep if deadline is None else min(sleep, max(deadline - now, 0.0))
        time.sleep(pause)
        sleep = min(sleep * 2, max_sleep)


def _as_bytes(buf, writable: bool):
    """A contiguous byte view of ``buf`` (no copy), for raw MPI transfer."""
    mod = type(buf).__module__
    if mod.startswith("torch"):
        if buf.device.type != "cpu":
            raise ValueError(f"send/recv_buffer needs a CPU tensor, got device {buf.device}")
        if not buf.is_contiguous():
            raise ValueError("send/recv_buffer needs a contiguous tensor (a copy would not be sent/filled)")
        return buf.reshape(-1).view(_torch_uint8())
    if mod.startswith("numpy"):
        if not buf.flags.c_contiguous:
            raise ValueError("send/recv_buffer needs a C-contiguous array (a copy would not be sent/filled)")
        if writable and not buf.flags.writeable:
            raise ValueError("recv_buffer needs a writable array")
        return buf.reshape(-1).view("u1")
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("send/recv_buffer needs a C-contiguous buffer")
    if writable and view.readonly:
        raise ValueError("recv_buffer needs a writable buffer")
    return view.cast("B")


def _torch_uint8():
    import torch  # only reached when a torch tensor was passed, so torch is loaded

    return torch.uint8


def _message(MPI, buf, writable: bool):
    raw = _as_bytes(buf, writable)
    return [raw, MPI.BYTE]


def send_buffer(comm, buf, dest: int, tag: int = 0, *, world: World | None = None):
    """Nonblocking raw send of a contiguous buffer; returns the request (pass to :func:`wait`)."""
    from mpi4py import MPI

    msg = _message(MPI, buf, writable=False)
    with world.lock if world is not None else contextlib.nullcontext():
        return comm.Isend(msg, dest=dest, tag=tag)


def recv_buffer(comm, buf, source: int, tag: int = 0, *, world: World | None = None):
    """Nonblocking raw receive into a contiguous buffer; returns the request.
    ``buf`` must be at least as large (in bytes) as the matching send."""
    from mpi4py import MPI

    msg = _message(MPI, buf, writable=True)
    with world.lock if world is not None else contextlib.nullcontext():
        return comm.Irecv(msg, source=source, tag=tag)
