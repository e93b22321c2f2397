"""The single-node Slurm of ``scripts/slurm-local.sh`` for tests marked ``slurm``: start it (root
with apt, or already running) or skip with the reason (fail under ``CI=true``: tests/capabilities.py);
submit jobs and wait on them. No torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from capabilities import require

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
_state: dict = {}


def require_slurm() -> None:
    """Make sure the local Slurm takes jobs; skip (fail in CI) with the reason when it cannot."""
    if "reason" in _state:
        require(not _state["reason"], _state["reason"])
        return
    reason = None
    if subprocess.run([str(SCRIPT), "status"], capture_output=True, check=False).returncode != 0:
        if os.geteuid() != 0:
            reason = "slurm tests need a running Slurm, or root to start one (scripts/slurm-local.sh start)"
        elif shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
            reason = "slurm tests need apt-get to install Slurm (or a running Slurm)"
        else:
            r = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900, check=False)
            if r.returncode != 0:
                reason = f"scripts/slurm-local.sh start failed: {r.stderr.strip()[-500:]}"
    _state["reason"] = reason
    require(not reason, reason)


def sbatch(script: Path, *args: str) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True, timeout=60,
                       check=True)
    return r.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30,
                       check=False)
    state = r.stdout.strip()
    if state:
        return state
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30,
                       check=False)
    for tok in r.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return "GONE"


def wait_job_done(job_id: str, timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job_state(job_id)} after {timeout} s")


def steps(job_id: str) -> list[str]:
    r = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i"], capture_output=True, text=True,
                       timeout=30, check=False)
    return [s for s in r.stdout.split() if s.split(".")[-1].isdigit()]


def scancel(*args: str) -> None:
    subprocess.run(["scancel", *args], capture_output=True, timeout=30, check=False)
