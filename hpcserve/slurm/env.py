"""The Slurm allocation the daemon runs in, from the ``SLURM_*`` environment and ``squeue``. No torch.

Interface: ``Allocation.from_env(env)`` (None outside a Slurm job) with ``job_id``, ``nodes``
(the raw ``SLURM_JOB_NODELIST`` expanded by ``expand_nodelist``), ``num_tasks``, ``gpus_per_node``;
``AllocationWatcher(allocation, query=None)`` caches the job's end time, asking Slurm at most
every ``REFRESH_S`` seconds, and answers ``end_time()`` / ``seconds_left()`` (None when unknown
or unlimited).

Backends (``end_time_backend()``): the CLI one, ``squeue -h -j ID -o %e``, is the default and
the tested one. ``pyslurm`` is used only when it imports, which it does only at sites whose
pyslurm was built against their Slurm version (pyslurm refuses to build otherwise); any error
from it falls back to squeue for that query.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

REFRESH_S = 60.0


def expand_nodelist(nodelist: str) -> list[str]:
    """``"gpu[01-03,07],login1"`` → ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]`` (zero padding kept)."""
    out: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            out.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not hi:
                out.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            out += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
    return out


def parse_end_time(text: str) -> float | None:
    """``squeue -o %e`` output (local time like ``2026-11-22T10:00:00``) → unix seconds; None for
    ``Unknown``, ``N/A``, ``NONE`` or anything unparsable."""
    text = text.strip()
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def squeue_end_time(job_id: str) -> float | None:
    exe = shutil.which("squeue")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=10,
                           check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_end_time(r.stdout.splitlines()[0]) if r.returncode == 0 and r.stdout.strip() else None


def pyslurm_end_time(job_id: str, pyslurm=None) -> float | None:
    """The job's end time through pyslurm (>= 23: ``pyslurm.Job.load``; older: ``pyslurm.job()``);
    falls back to ``squeue_end_time`` on any error."""
    try:
        if pyslurm is None:
            import pyslurm
        if hasattr(pyslurm, "Job") and hasattr(pyslurm.Job, "load"):
            end = pyslurm.Job.load(int(job_id)).end_time
        else:
            end = pyslurm.job().find_id(str(job_id))[0]["end_time"]
        end = float(end.timestamp() if hasattr(end, "timestamp") else end)
        return end if end > 0 else None
    except Exception:  # noqa: BLE001 - version skew, job gone, daemon unreachable: use the CLI
        return squeue_end_time(job_id)


def end_time_backend() -> tuple[str, Callable[[str], float | None]]:
    """("pyslurm", query) when pyslurm imports, else ("squeue", squeue_end_time)."""
    try:
        import pyslurm  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a pyslurm built for another Slurm failing to load
        return "squeue", squeue_end_time
    return "pyslurm", pyslurm_end_time


def _int(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs of this job per node: ``SLURM_GPUS_ON_NODE``, else the count in ``SLURM_GPUS_PER_NODE``
    (``"4"`` or ``"a100:4"``), else the ids in ``SLURM_JOB_GPUS`` (``"0,1,2,3"``)."""
    n = _int(env.get("SLURM_GPUS_ON_NODE"))
    if n is None and env.get("SLURM_GPUS_PER_NODE"):
        n = _int(env["SLURM_GPUS_PER_NODE"].rsplit(":", 1)[-1])
    if n is None and env.get("SLURM_JOB_GPUS"):
        n = len([g for g in env["SLURM_JOB_GPUS"].split(",") if g.strip()])
    return n


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: list[str]
    num_tasks: int | None
    gpus_per_node: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Allocation | None:
        env = os.environ if env is None else env
        job = env.get("SLURM_JOB_ID")
        if not job:
            return None
        return cls(job, expand_nodelist(env.get("SLURM_JOB_NODELIST", "")), _int(env.get("SLURM_NTASKS")),
                   _gpus_per_node(env))


class AllocationWatcher:
    def __init__(self, allocation: Allocation, query: Callable[[str], float | None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.allocation = allocation
        if query is None:
            self.backend, query = end_time_backend()
        else:
            self.backend = getattr(query, "__name__", "custom")
        self._query = query
        self._clock = clock
        self._end: float | None = None
        self._asked_at: float | None = None

    def end_time(self) -> float | None:
        now = self._clock()
        if self._asked_at is None or now - self._asked_at >= REFRESH_S:
            self._end = self._query(self.allocation.job_id)
            self._asked_at = now
        return self._end

    def seconds_left(self) -> float | None:
        end = self.end_time()
        return None if end is None else max(0.0, end - self._clock())
