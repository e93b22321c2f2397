"""The Slurm allocation the daemon runs in, from the ``SLURM_*`` environment and ``squeue``. No torch.

Interface: ``Allocation.from_env(env)`` (None outside a Slurm job) with ``job_id``, ``nodes``
(the raw ``SLURM_JOB_NODELIST`` expanded by ``expand_nodelist``), ``num_tasks``;
``AllocationWatcher(allocation, query=squeue_end_time)`` caches the job's end time, asking
Slurm at most every ``REFRESH_S`` seconds (``squeue -h -j ID -o %e``), and answers
``end_time()`` / ``seconds_left()`` (None when unknown or unlimited).
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


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: list[str]
    num_tasks: int | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Allocation | None:
        env = os.environ if env is None else env
        job = env.get("SLURM_JOB_ID")
        if not job:
            return None
        tasks = env.get("SLURM_NTASKS")
        return cls(job, expand_nodelist(env.get("SLURM_JOB_NODELIST", "")),
                   int(tasks) if tasks and tasks.isdigit() else None)


class AllocationWatcher:
    def __init__(self, allocation: Allocation, query: Callable[[str], float | None] = squeue_end_time,
                 clock: Callable[[], float] = time.time) -> None:
        self.allocation = allocation
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
