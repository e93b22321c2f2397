"""The service through sbatch on the local single-node Slurm (scripts/slurm-local.sh):

- ``hpcserve up --config site-configs/ci-single-node.toml``: a chat streams and a batch completes,
  the clients find the service with ``--config``; ``hpcserve down`` drains it and cancels the
  queued continuation;
- walltime drain: a batch bigger than one short allocation (sized from this machine's measured rate,
  so that it holds on any machine speed); Slurm's ``--signal=B:USR1`` drains the daemon, the queued successor (``--dependency=singleton``) resumes the pending lines, and every
  custom_id is written exactly once; ``hpcserve status`` showed the time left before the drain.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from daemon_harness import chat_line
from slurm_harness import job_state, require_slurm, scancel

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parent.parent
HOLD_S = 240  # seconds of batch work the drain test gives its first allocation (at the measured rate)


def hpcserve(*args: str, timeout: float = 900, check: bool = True, input: str | None = None):
    r = subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True, timeout=timeout,
                       input=input, check=False)
    if check:
        assert r.returncode == 0, f"hpcserve {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def _jobs_named(name: str) -> list[tuple[str, str]]:
    r = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=30,
                       check=False)
    return [tuple(line.split()) for line in r.stdout.splitlines() if line.strip()]


def _custom_ids(status: dict) -> list[str]:
    ids = []
    for key in ("output_file", "error_file"):
        path = status.get(key)
        if path:
            ids += [json.loads(line)["custom_id"] for line in Path(path).read_text().splitlines() if line.strip()]
    return ids


def test_up_chat_batch_down_with_the_ci_site_config(tmp_path):
    require_slurm()
    config = str(ROOT / "site-configs" / "ci-single-node.toml")
    hpcserve("down", "--config", config, check=False, timeout=300)  # a leftover of an earlier run
    try:
        r = hpcserve("up", "--config", config, "--wait", "900")
        assert "hpcserve is up: Slurm job" in r.stdout and "hpcserve chat --config" in r.stdout
        assert "OpenAI API: http://127.0.0.1:" in r.stdout
        ep = json.loads((Path(os.path.expanduser("~/.hpcserve-ci")) / "endpoint.json").read_text())
        req = urllib.request.Request(  # the OpenAI-compatible API of the daemon inside the allocation
            f"http://{ep['http']}/v1/chat/completions", method="POST",
            data=json.dumps({"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}).encode(),
            headers={"Authorization": f"Bearer {ep['token']}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] >= 1
        job = r.stdout.split("Slurm job ")[1].split(",")[0]
        assert job_state(job) == "RUNNING"
        again = hpcserve("up", "--config", config)  # idempotent: reports the running service
        assert "already up" in again.stdout

        chat = hpcserve("chat", "--config", config, "--prompt", "What is the capital of France?",
                        "--max-tokens", "12", "--temperature", "0")
        assert chat.stdout.strip()
        jsonl = tmp_path / "in.jsonl"
        jsonl.write_text("\n".join(chat_line(f"q{i}", f"Say the number {i}.", max_tokens=8) for i in range(6)) + "\n")
        hpcserve("submit", "--config", config, str(jsonl), "--wait", "-o", str(tmp_path / "out.jsonl"))
        out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert sorted(o["custom_id"] for o in out) == [f"q{i}" for i in range(6)]
        status = hpcserve("status", "--config", config).stdout
        assert f"Slurm job {job}" in status and "ends " in status  # time left is shown

        assert any(st == "PENDING" for _, st in _jobs_named("hpcserve-ci"))  # the queued successor
        down = hpcserve("down", "--config", config, timeout=600)
        assert "hpcserve is down" in down.stdout
        assert _jobs_named("hpcserve-ci") == []  # drained job ended, successor cancelled
    finally:
        scancel("--name=hpcserve-ci")


@pytest.mark.timeout(1800)  # two allocations and HOLD_S of work; the usual 900 s is for one
def test_walltime_drain_resumes_in_the_next_allocation(tiny_model_factory, tmp_path):
    require_slurm()
    model = tiny_model_factory("llama", hidden_size=256, num_hidden_layers=4, intermediate_size=512)
    name = f"hpcserve-drain-{int(time.time())}"
    state = tmp_path / "state"
    config = tmp_path / "site.toml"
    config.write_text(f"""
[model]
path = "{model}"
[engine]
num-threads = 1
max-num-seqs = 4
kv-cache-gb = 0.1
[daemon]
listen = "127.0.0.1:0"
state-dir = "{state}"
ranks = 2
drain-timeout-s = 5.0
[slurm]
time = "10"
drain-s = 60
continuation = "singleton"
job-name = "{name}"
mpi = "pmi2"
cpus-per-task = 1
mem = "4G"
""")
    try:
        r = hpcserve("up", "--config", str(config), "--wait", "600")
        first = r.stdout.split("Slurm job ")[1].split(",")[0]
        status = hpcserve("status", "--config", str(config)).stdout
        assert f"Slurm job {first}" in status and "ends " in status and "(in " in status  # time left

        def submit(prefix: str, count: int) -> str:
            jsonl = tmp_path / f"{prefix}.jsonl"
            jsonl.write_text("\n".join(chat_line(f"{prefix}{i}", f"item {i}", 256, ignore_eos=True)
                                       for i in range(count)) + "\n")
            return hpcserve("submit", "--config", str(config), str(jsonl)).stdout.strip()

        def batch(batch_id: str) -> dict | None:
            st = hpcserve("status", "--config", str(config), batch_id, "--json", check=False)
            return json.loads(st.stdout) if st.returncode == 0 else None

        def completed(batch_id: str) -> int | None:
            b = batch(batch_id)
            return b and b["request_counts"]["completed"]

        # This machine's rate for such lines, from a warm-up batch (5 waves of the 2 x 4 lines in flight)
        # timed by the store's own stamps (whole seconds: the true time is within d +- 1 s).
        warm_n = 40
        warm = submit("u", warm_n)
        deadline = time.monotonic() + 600
        while ((b := batch(warm)) or {}).get("status") != "completed":
            assert time.monotonic() < deadline, f"warm-up batch not done after 600 s: {b}"
            time.sleep(2)
        assert sorted(_custom_ids(b)) == sorted(f"u{i}" for i in range(warm_n))
        d = b["finalizing_at"] - b["in_progress_at"]
        rate_hi, rate_lo = warm_n / max(d - 1, 0.5), warm_n / (d + 1)
        # The drain comes 30-90 s after the TimeLimit update below (later by slurmctld's signal timer): give
        # the first allocation several times that much work, at the highest rate the stamps allow.
        n = max(64, math.ceil(rate_hi * HOLD_S))
        print(f"warm-up: {warm_n} lines in {d} +- 1 s; the drained batch has {n} lines")
        batch_id = submit("w", n)

        while (completed(batch_id) or 0) < 10:
            time.sleep(1)
        # the walltime comes closer: end the job ~90 s from now, so that --signal=B:USR1@60 fires
        started = subprocess.run(["squeue", "-h", "-j", first, "-o", "%M"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        parts = [int(x) for x in started.split(":")]
        elapsed_s = parts[-1] + 60 * (parts[-2] if len(parts) > 1 else 0) + 3600 * (parts[-3] if len(parts) > 2 else 0)
        subprocess.run(["scontrol", "update", f"JobId={first}", f"TimeLimit={(elapsed_s + 90) // 60 + 1}"], check=True)
        deadline = time.monotonic() + 400
        seen = 0
        while job_state(first) in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
            seen = completed(batch_id) or seen
            time.sleep(2)
        assert 0 < seen < n, (seen, n, d)  # the first allocation drained before the batch was done
        print(f"the first allocation drained after {seen} of {n} lines")
        log = (state / "logs" / f"slurm-{first}.out").read_text()
        assert "SIGUSR1" in log and "the daemon exited with status 0" in log, log[-3000:]
        ep_path = state / "endpoint.json"

        # the successor picks the service up and finishes the batch (at about the measured rate)
        deadline = time.monotonic() + 600 + 2 * (n - seen) / rate_lo
        done = None
        while time.monotonic() < deadline:
            if ep_path.exists():
                ep = json.loads(ep_path.read_text())
                if ep.get("slurm_job_id") not in (None, first):
                    done = batch(batch_id) or done
                    if done and done["status"] == "completed":
                        break
            time.sleep(3)
        assert done is not None and done["status"] == "completed", done
        assert done["request_counts"]["completed"] == n
        ids = _custom_ids(done)
        assert sorted(ids) == sorted(f"w{i}" for i in range(n)) and len(ids) == n  # each exactly once
    finally:
        hpcserve("down", "--config", str(config), check=False, timeout=300)
        scancel(f"--name={name}")
