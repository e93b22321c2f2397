"""Crash tests with real processes: SIGKILL the daemon mid-batch (three times, at different
points, restarting it each time), and SIGKILL one worker rank mid-batch while a chat streams.
Each custom_id must end up exactly once across the output and error files."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading

import grpc
import pytest
from daemon_harness import Daemon, chat_line, kill_tree, reap_all, wait_gone, worker_rank_pids

from hpcserve.api.v1 import serving_pb2 as pb

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _reap_daemons():
    yield
    reap_all()  # a failed test may leave its daemon running


def _custom_ids(batch: pb.Batch) -> list[str]:
    ids = []
    for path in (batch.output_file, batch.error_file):
        if path:
            with open(path, encoding="utf-8") as f:
                ids += [json.loads(line)["custom_id"] for line in f if line.strip()]
    return ids


def _small_batches_config(tmp_path):
    """Few sequences per replica, so a batch progresses in waves and a kill lands mid-batch."""
    path = tmp_path / "site.toml"
    path.write_text("[engine]\nmax-num-seqs = 4\n")
    return ("--config", str(path))


def test_sigkill_daemon_three_times_mid_batch(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    state = tmp_path / "state"
    n = 120
    data = "\n".join(chat_line(f"k{i}", f"question number {i}", 48, ignore_eos=True) for i in range(n)).encode()
    args = _small_batches_config(tmp_path)
    d = Daemon(state, model, extra_args=args).start()
    batch_id = d.submit(data).id
    done_before = 0
    for k in (1, 2, 3):
        # kill once the batch made progress past k/4 of the lines: three different points
        b = d.wait_batch(batch_id, until=lambda b, k=k: b.request_counts.completed >= k * n // 4)
        assert b.status == pb.BATCH_STATUS_IN_PROGRESS, "the batch finished before the kill point"
        assert b.request_counts.completed >= done_before
        done_before = b.request_counts.completed
        workers = worker_rank_pids(d.proc.pid)
        d.kill(signal.SIGKILL)
        # the orphaned workers notice the lost link and exit by themselves
        assert wait_gone(workers, 60) == [], "worker ranks outlived the killed daemon"
        d = Daemon(state, model, extra_args=args).start()
    try:
        b = d.wait_batch(batch_id)
        assert b.status == pb.BATCH_STATUS_COMPLETED, b
        ids = _custom_ids(b)
        counts = collections.Counter(ids)
        assert sorted(counts) == sorted(f"k{i}" for i in range(n))
        assert max(counts.values()) == 1, [c for c, v in counts.items() if v > 1]
        assert b.request_counts.completed + b.request_counts.failed == n
    finally:
        assert d.stop() == 0, d.log_tail()


def test_sigkill_one_worker_rank_mid_batch(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    d = Daemon(tmp_path / "state", model, extra_args=_small_batches_config(tmp_path)).start()
    try:
        n = 60
        batch_id = d.submit("\n".join(chat_line(f"w{i}", f"item {i}", 48, ignore_eos=True)
                                      for i in range(n)).encode()).id
        d.wait_batch(batch_id, until=lambda b: b.request_counts.completed >= 5)

        got_tokens = threading.Event()
        outcome: dict = {}

        def stream():
            try:
                for chunk in d.chat("tell me a long story", max_tokens=300, ignore_eos=True):
                    if chunk.token_ids:
                        got_tokens.set()
                outcome["finished"] = True
            except grpc.RpcError as exc:
                outcome["code"], outcome["details"] = exc.code(), exc.details()
            got_tokens.set()

        t = threading.Thread(target=stream)
        t.start()
        assert got_tokens.wait(60)
        ranks = worker_rank_pids(d.proc.pid)
        assert len(ranks) == 2, ranks
        for pid in ranks:  # freeze both first, so the chat cannot finish before the failure is seen
            os.kill(pid, signal.SIGSTOP)
        os.kill(ranks[1], signal.SIGKILL)  # the daemon kills the frozen rank 0 with the failed launch
        t.join(60)
        assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE, outcome
        assert "relaunching" in outcome["details"] and "retry" in outcome["details"]

        info = d.wait_ready(min_restarts=1)
        assert info.num_worker_restarts >= 1
        new_ranks = worker_rank_pids(d.proc.pid)
        assert len(new_ranks) == 2 and not set(new_ranks) & set(ranks)
        chunks = list(d.chat("are you back?", max_tokens=8))
        assert chunks[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)

        b = d.wait_batch(batch_id)
        assert b.status == pb.BATCH_STATUS_COMPLETED, b
        counts = collections.Counter(_custom_ids(b))
        assert sorted(counts) == sorted(f"w{i}" for i in range(n))
        assert max(counts.values()) == 1
    finally:
        code = d.stop()
        kill_tree(d.proc.pid)
    assert code == 0, d.log_tail()


def test_cli_chat_retries_across_a_worker_relaunch(tiny_model_factory, tmp_path):
    """`hpcserve chat` whose answer is cut by a worker-step failure (UNAVAILABLE) retries with
    backoff and prints the whole answer once the step is back."""
    import subprocess
    import sys
    import time

    model = tiny_model_factory("llama", hidden_size=256, num_hidden_layers=4, intermediate_size=512)
    d = Daemon(tmp_path / "state", model).start()
    try:
        cli = subprocess.Popen([sys.executable, "-m", "hpcserve", "chat", "--prompt", "tell me a long story",
                                "--max-tokens", "450", "--state-dir", str(d.state_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(r.num_running for r in d.info().replicas):
            time.sleep(0.05)
        ranks = worker_rank_pids(d.proc.pid)
        os.kill(ranks[0], signal.SIGKILL)
        out, err = cli.communicate(timeout=300)
        assert cli.returncode == 0, err
        assert "retrying in" in err and "relaunching" in err  # the cut answer was asked again
        assert d.wait_ready(min_restarts=1).num_worker_restarts >= 1
        assert len(out.strip()) > 0
    finally:
        code = d.stop()
        kill_tree(d.proc.pid)
    assert code == 0, d.log_tail()
