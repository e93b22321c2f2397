"""MpiConnector under a real MPI world: ``$VENV/bin/mpiexec -launcher fork -n 2`` runs the
scripts ``tests/mpi_transfer_*.py`` (and the bench module) with OMP_NUM_THREADS=1."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from capabilities import VENV_MPIEXEC, needs_mpi

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

pytestmark = [
    needs_mpi,
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed"),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def mpirun(args, cwd: Path, flags=(), timeout: float = 90) -> subprocess.CompletedProcess:
    # -launcher fork: local ranks even when the tests run inside a Slurm allocation
    cmd = [str(VENV_MPIEXEC), "-launcher", "fork", *flags, "-n", "2", sys.executable, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd, check=False)


def results(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    dec = json.JSONDecoder()
    return [dec.raw_decode(chunk.strip())[0] for chunk in proc.stdout.split("RESULT ")[1:]]


def test_bytes_identical_concurrent_both_directions(tmp_path):
    res = results(mpirun([TESTS / "mpi_transfer_cases.py", "exact"], tmp_path))
    assert len(res) == 8  # 2 ranks x {fp32, bf16} x {direct, staging}
    seen = set()
    for r in res:
        seen.add((r["rank"], r["dtype"], r["recv_mode"]))
        assert set(r["states"].values()) == {"SUCCESS"} and len(r["states"]) == 8, r
        assert len(r["done"]) == 8
        assert r["exact"] and r["untouched"] and r["digests_match"] and r["in_band_digests"], r
        assert r["zombies"] == 0
        assert max(r["num_groups"]) > 1  # pipelined
    assert len(seen) == 8


def test_failures_are_reported_and_the_connector_recovers(tmp_path):
    res = {r["rank"]: r for r in results(mpirun([TESTS / "mpi_transfer_cases.py", "failures"], tmp_path))}
    snd, rcv = res[0]["cases"], res[1]["cases"]
    assert snd["bad-checksum"]["state"] == "SUCCESS"  # the sender did its part
    assert rcv["bad-checksum"]["state"] == "FAILED" and "meta.checksum" in rcv["bad-checksum"]["error"]
    assert snd["mismatch"]["state"] == "FAILED" and "handshake mismatch" in snd["mismatch"]["error"]
    assert rcv["mismatch"]["state"] == "FAILED" and "peer rank 0 aborted" in rcv["mismatch"]["error"]
    assert snd["aborted"] == {**snd["aborted"], "state": "FAILED", "error": "aborted"}
    assert rcv["aborted"]["state"] == "FAILED" and "peer rank 0 aborted" in rcv["aborted"]["error"]
    orphan = rcv["orphan"]
    assert orphan["state"] == "FAILED" and "timed out after 1 s in BOOTSTRAPPING" in orphan["error"]
    assert 1.0 <= orphan["wall"] < 10
    assert snd["after"]["state"] == rcv["after"]["state"] == "SUCCESS" and rcv["after"]["exact"]


def _peer_death(tmp_path, flags, timeout_s):
    out = tmp_path / "sender.json"
    t_start = time.time()
    proc = mpirun([TESTS / "mpi_transfer_peer_death.py", out, timeout_s], tmp_path, flags=flags, timeout=60)
    t_end = time.time()
    killed = tmp_path / "sender.json.killed"
    assert killed.exists(), f"the receiver never got to kill itself\n{proc.stdout}\n{proc.stderr}"
    after_kill = t_end - float(killed.read_text())
    sender = json.loads(out.read_text()) if out.exists() else None
    return proc, sender, after_kill, t_end - t_start


def test_peer_death_default_launcher_kills_the_world(tmp_path):
    """Default hydra: one rank SIGKILLed -> the launcher kills the others, mpiexec fails."""
    proc, sender, after_kill, _ = _peer_death(tmp_path, flags=(), timeout_s=20)
    assert proc.returncode != 0
    assert after_kill < 15  # well before the sender's own 20 s timeout
    assert sender is None  # rank 0 was killed while its transfer was still pending
    assert "BAD TERMINATION" in proc.stdout + proc.stderr


def test_peer_death_survivor_times_out_or_is_killed(tmp_path):
    """``-disable-auto-cleanup``: the sender survives in most runs (SIGUSR1 handled) and its
    transfer ends FAILED by timeout; in the others hydra kills it shortly after the death
    (see mpi_transfer_peer_death.py). Never a hang, never a SUCCESS."""
    proc, sender, after_kill, _ = _peer_death(tmp_path, flags=("-disable-auto-cleanup",), timeout_s=2)
    assert proc.returncode != 0 and after_kill < 30
    if sender is None:  # killed from outside: well before its own 2 s timeout could fire
        assert after_kill < 2, (after_kill, proc.stdout, proc.stderr)
        return
    assert sender["state"] == "FAILED" and "timed out after 2 s" in sender["error"], sender
    assert 2.0 <= sender["elapsed_s"] < 15
    assert sender["nbytes_done"] < sender["total_nbytes"]
    assert any(e.startswith("SIGUSR1") for e in sender["events"])  # hydra's failure notice


@pytest.mark.parametrize("extra", [(), ("--recv-mode", "staging", "--checksum", "--block-order", "contiguous")])
def test_bench_smoke(tmp_path, extra):
    args = [
        "-m",
        "hpcserve.transfer.bench",
        "--layers",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "16",
        "--block-size",
        "16",
        "--tokens",
        "64,300",
        "--reps",
        "2",
        "--dtype",
        "bfloat16",
        *extra,
    ]
    proc = mpirun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verified"] is True
    assert [r["tokens"] for r in out["results"]] == [64, 300]
    assert out["results"][1]["nbytes"] == 4 * 2 * 19 * 16 * 2 * 16 * 2
    for key in ("handoff_gib_s", "mpi_raw_gib_s", "handoff_ratio"):
        assert out[key] > 0
    assert all(r["handoff_ms"] > 0 for r in out["results"])
