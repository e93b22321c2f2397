"""``hpcserve serve --slurm`` inside a real sbatch job on the local single-node Slurm
(scripts/slurm-local.sh): workers start as an srun step of the job (MPICH wheel under
``--mpi=pmi2``), chat and batch work, GetServerInfo shows the allocation and its time left, a
killed worker step is relaunched inside the same allocation, and SIGUSR1 drains with exit 0."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc
import pytest
from daemon_harness import chat_line
from slurm_harness import require_slurm, sbatch, scancel, steps, wait_job_done

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

JOB = """#!/bin/bash
#SBATCH --job-name=hpcserve-test
#SBATCH --ntasks=2
#SBATCH --time=15
#SBATCH --output={state}/slurm-%j.out
{python} -m hpcserve serve --slurm --model {model} --listen 127.0.0.1:0 --state-dir {state} --config {config} &
pid=$!
trap 'kill -USR1 $pid' USR1
trap 'kill -TERM $pid' TERM
while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done
exit $rc
"""


class Service:
    def __init__(self, state: Path) -> None:
        ep = json.loads((state / "endpoint.json").read_text())
        self.channel = grpc.insecure_channel(ep["address"])
        self.stub = serving_pb2_grpc.ServingStub(self.channel)
        self.md = [("authorization", f"Bearer {ep['token']}")]

    def info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.md, timeout=30)


def _start(tmp_path: Path, model: Path) -> tuple[str, Path, Service]:
    require_slurm()
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "site.toml"
    config.write_text('[engine]\nnum-threads = 1\nmax-num-seqs = 8\n[slurm]\nmpi = "pmi2"\ndrain-s = 60\n')
    script = tmp_path / "serve.sbatch"
    script.write_text(JOB.format(state=state, python=sys.executable, model=model, config=config))
    job = sbatch(script)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            svc = Service(state)
            if svc.info().is_ready:
                return job, state, svc
        except (OSError, ValueError, grpc.RpcError):
            pass
        time.sleep(0.5)
    scancel(job)
    log = next(state.glob("slurm-*.out"), None)
    raise AssertionError(f"service not ready: {log.read_text()[-3000:] if log else 'no job log'}")


def _read_ids(batch: pb.Batch) -> list[str]:
    ids = []
    for path in (batch.output_file, batch.error_file):
        if path:
            ids += [json.loads(line)["custom_id"] for line in Path(path).read_text().splitlines() if line.strip()]
    return ids


def test_serve_slurm_step_relaunch_and_usr1_drain(tiny_model_factory, tmp_path):
    job, state, svc = _start(tmp_path, tiny_model_factory("llama"))
    try:
        info = svc.info()
        assert info.allocation.job_id == job and info.allocation.seconds_left > 0
        assert info.num_ranks == 2 and len(info.replicas) == 2
        toks = []
        for ch in svc.stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hello slurm")],
                                               sampling_params=pb.SamplingParams(max_tokens=8, temperature=0)),
                                metadata=svc.md, timeout=120):
            toks += list(ch.token_ids)
        assert len(toks) == 8

        lines = "\n".join(chat_line(f"k{i}", f"line {i} " * 30, max_tokens=32) for i in range(40)).encode()
        batch = svc.stub.SubmitBatch(pb.SubmitBatchRequest(input_jsonl=lines), metadata=svc.md, timeout=60)
        while svc.stub.GetBatch(pb.GetBatchRequest(batch_id=batch.id), metadata=svc.md,
                                timeout=30).request_counts.completed < 5:
            time.sleep(0.2)
        worker_steps = steps(job)
        assert worker_steps, "no srun step for the workers"
        scancel("--signal=KILL", worker_steps[0])  # kill the worker step; the daemon relaunches it
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            info = svc.info()
            if info.num_worker_restarts >= 1 and info.is_ready:
                break
            time.sleep(0.5)
        assert info.num_worker_restarts >= 1 and info.is_ready
        assert steps(job) and steps(job)[0] != worker_steps[0]  # a new step in the same allocation
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            b = svc.stub.GetBatch(pb.GetBatchRequest(batch_id=batch.id), metadata=svc.md, timeout=30)
            if b.status == pb.BATCH_STATUS_COMPLETED:
                break
            time.sleep(0.5)
        ids = _read_ids(b)
        assert sorted(ids) == sorted(f"k{i}" for i in range(40))  # each exactly once

        scancel("-b", "--signal=USR1", job)  # what sbatch --signal=B:USR1@N delivers
        assert wait_job_done(job, timeout=180) == "COMPLETED"
        log = next(state.glob("slurm-*.out")).read_text()
        assert "SIGUSR1" in log and "stopped" in log
        assert not (state / "endpoint.json").exists()
    finally:
        svc.channel.close()
        scancel(job)
