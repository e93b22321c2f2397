"""Disaggregated prefill/decode through the real daemon: 2 worker ranks under the venv's mpiexec
with roles prefill:1,decode:1, KV handed off over MPI, gRPC over loopback.

- parity: 20 prompts of varied length (10 chat streams, 10 batch lines) give the same greedy
  output as a colocated daemon, every one of them went prefill → decode, and in the checksum
  debug mode every KV byte sent was received (digests verified, byte counts equal);
- a cancelled stream frees the KV blocks on both replicas;
- a stalled prefill rank: the decode side's receive times out and it computes the prompt
  itself (the request still finishes once, with the same tokens);
- SIGKILL of the decode rank while a receive is posted: every request completes or errors
  clearly, and the batch has each custom_id exactly once after the relaunch.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from daemon_harness import Daemon, chat_line, reap_all, worker_rank_pids

from hpcserve.api.v1 import serving_pb2 as pb

pytestmark = pytest.mark.slow

DISAGG = ("--roles", "prefill:1,decode:1")


@pytest.fixture(autouse=True, scope="module")
def _reap_daemons():
    yield
    reap_all()


def _config(tmp_path: Path, name: str, text: str) -> tuple[str, str]:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return ("--config", str(path))


def _complete(d: Daemon, ids: list[int], max_tokens: int, timeout: float = 300, **kw):
    """Greedy completion of token ids: (token ids, last chunk)."""
    req = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling_params=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True), **kw)
    toks, last = [], None
    for ch in d.stub.Complete(req, metadata=d.md, timeout=timeout):
        toks += list(ch.token_ids)
        last = ch
    return toks, last


def _results(batch: pb.Batch) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in (batch.output_file, batch.error_file):
        if path:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        assert rec["custom_id"] not in out, f"{rec['custom_id']} written twice"
                        out[rec["custom_id"]] = rec
    return out


def _answer(rec: dict) -> tuple:
    body = rec["response"]["body"]
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


def _rank_pid(daemon: Daemon, rank: int) -> int:
    for pid in worker_rank_pids(daemon.proc.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker process with PMI_RANK={rank}")


def _replica(info: pb.ServerInfo, role) -> pb.ReplicaInfo:
    return next(r for r in info.replicas if r.role == role)


def _run_workload(d: Daemon, chats: list[str], lines: list[str]) -> tuple[dict, dict, list]:
    batch = d.submit("\n".join(lines).encode())
    chat_out, metrics = {}, []
    for i, text in enumerate(chats):
        toks, last = [], None
        for ch in d.chat(text, max_tokens=12 + i):
            toks += list(ch.token_ids)
            last = ch
        chat_out[i] = toks
        metrics.append(last.metrics)
    b = d.wait_batch(batch.id, timeout=600)
    assert b.status == pb.BATCH_STATUS_COMPLETED, d.log_tail()
    return chat_out, {cid: _answer(rec) for cid, rec in _results(b).items()}, metrics


def test_parity_20_prompts_and_checksums(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    rng = random.Random(5)
    words = "the of a river mountain blue seven quickly under paper light north green".split()
    sizes = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89]  # words; the chat template adds ~10 tokens
    chats = [" ".join(rng.choice(words) for _ in range(n)) for n in sizes]
    lines = [chat_line(f"line-{i}", " ".join(rng.choice(words) for _ in range(n)), max_tokens=6 + i)
             for i, n in enumerate(reversed(sizes))]

    colo = Daemon(tmp_path / "colo", model, ranks=2).start()
    try:
        ref_chat, ref_batch, ref_metrics = _run_workload(colo, chats, lines)
    finally:
        assert colo.stop() == 0
    assert not any(m.disaggregated for m in ref_metrics)

    cfg = _config(tmp_path, "disagg", "[disagg]\nroles = \"prefill:1,decode:1\"\nkv-checksum = true\n")
    dis = Daemon(tmp_path / "dis", model, ranks=2, extra_args=cfg).start()
    try:
        info = dis.info()
        assert sorted(r.role for r in info.replicas) == [pb.REPLICA_ROLE_PREFILL, pb.REPLICA_ROLE_DECODE]
        got_chat, got_batch, metrics = _run_workload(dis, chats, lines)
        assert got_chat == ref_chat
        assert got_batch == ref_batch and len(got_batch) == 10
        pre, dec = _replica(info, pb.REPLICA_ROLE_PREFILL), _replica(info, pb.REPLICA_ROLE_DECODE)
        for m in metrics:  # every chat went prefill → decode over MPI
            assert m.disaggregated and not m.kv_handoff_failed, m
            assert (m.prefill_replica_id, m.decode_replica_id) == (pre.replica_id, dec.replica_id)
            assert m.kv_handoff_bytes > 0 and m.kv_handoff_s > 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # counters arrive with the next load reports
            info = dis.info()
            pk, dk = _replica(info, pb.REPLICA_ROLE_PREFILL).kv, _replica(info, pb.REPLICA_ROLE_DECODE).kv
            if pk.num_sent == 20 and dk.num_received == 20:
                break
            time.sleep(0.3)
        assert (pk.num_sent, dk.num_received, pk.num_failed, dk.num_failed) == (20, 20, 0, 0)
        assert dk.num_checksum_verified == 20  # debug mode: every group's digest matched
        assert pk.bytes_sent == dk.bytes_received > 0  # every byte sent was received
        assert sum(m.kv_handoff_bytes for m in metrics) < dk.bytes_received  # the batch lines moved the rest
    finally:
        assert dis.stop() == 0


def test_cancelled_stream_frees_blocks_on_both_replicas(tiny_model_factory, tmp_path):
    d = Daemon(tmp_path / "state", tiny_model_factory("llama"), ranks=2, extra_args=DISAGG).start()
    try:
        deadline = time.monotonic() + 10
        while not all(r.num_free_kv_blocks for r in d.info().replicas) and time.monotonic() < deadline:
            time.sleep(0.1)  # the first load reports
        idle = {r.replica_id: r.num_free_kv_blocks for r in d.info().replicas}
        call = d.stub.Complete(pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=list(range(3, 200))),
                                                    sampling_params=pb.SamplingParams(max_tokens=300, temperature=0,
                                                                                      ignore_eos=True)),
                               metadata=d.md, timeout=120)
        n = 0
        for ch in call:
            n += len(ch.token_ids)
            if n >= 5:
                call.cancel()
                break
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = d.info()
            if all(r.num_free_kv_blocks == idle[r.replica_id] and r.num_running == 0 for r in info.replicas):
                break
            time.sleep(0.2)
        assert {r.replica_id: r.num_free_kv_blocks for r in info.replicas} == idle
        toks, last = _complete(d, list(range(3, 40)), 4)  # still serving
        assert len(toks) == 4 and last.metrics.disaggregated
    finally:
        assert d.stop() == 0


# Wide enough that a long prefill takes a noticeable time on one core.
BIG = dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
           intermediate_size=1024, max_position_embeddings=2048)


def _long_prompts(n: int, seed: int, lo: int = 600, hi: int = 1200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def _idle_free_blocks(d: Daemon) -> dict[int, int]:
    _wait(lambda: all(r.num_free_kv_blocks for r in d.info().replicas), 30, "the first load reports")
    return {r.role: r.num_free_kv_blocks for r in d.info().replicas}


def _stall_posted_receives(d: Daemon, pre_pid: int, dec_pid: int, idle: dict[int, int]) -> None:
    """Leave the decode rank with receives posted that no sender will serve, deterministically:
    with the decode rank frozen (SIGSTOP), the prefill rank finishes the prompts it was given and holds
    their KV (its free blocks stay below idle), since no StartKvSend can come; then freeze the prefill
    rank and thaw the decode rank, which posts the receives. Returns once the decode replica reports
    them; the prefill rank is left stopped. The caller has already sent work (with ``dec_pid`` stopped)."""
    def prefill_holding() -> bool:
        p = _replica(d.info(), pb.REPLICA_ROLE_PREFILL)
        return p.num_running == 0 and p.num_waiting == 0 and p.num_free_kv_blocks < idle[pb.REPLICA_ROLE_PREFILL]

    _wait(prefill_holding, 300, "the prefill replica holds finished prompts")
    time.sleep(0.5)  # its last ready events reach the daemon, which forwards them to the frozen decode rank
    os.kill(pre_pid, signal.SIGSTOP)
    os.kill(dec_pid, signal.SIGCONT)
    _wait(lambda: _replica(d.info(), pb.REPLICA_ROLE_DECODE).kv.num_active > 0, 60,
          "the decode replica posts its receives")


def _stream_all(d: Daemon, prompts: list[list[int]], max_tokens: int, results: dict) -> list[threading.Thread]:
    def one(i, ids):
        try:
            results[i] = _complete(d, ids, max_tokens)
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    return threads


def test_stalled_prefill_rank_falls_back_to_colocated(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama", **BIG)
    prompts = _long_prompts(6, seed=1, lo=200, hi=600)
    cfg = _config(tmp_path, "site", "[disagg]\nroles = \"prefill:1,decode:1\"\ntransfer-timeout-s = 2.0\n")
    d = Daemon(tmp_path / "state", model, ranks=2, extra_args=cfg).start()
    try:
        idle = _idle_free_blocks(d)
        ref = [_complete(d, p, 6)[0] for p in prompts[:2]]  # references (handed off normally)
        pre_pid, dec_pid = _rank_pid(d, 0), _rank_pid(d, 1)
        os.kill(dec_pid, signal.SIGSTOP)
        results: dict = {}
        threads = _stream_all(d, prompts, 6, results)
        try:
            _stall_posted_receives(d, pre_pid, dec_pid, idle)
            time.sleep(3.5)  # > transfer-timeout-s: the receives fail, the decode rank computes the prompts
        finally:
            os.kill(dec_pid, signal.SIGCONT)
            os.kill(pre_pid, signal.SIGCONT)
        for t in threads:
            t.join(timeout=300)
        assert all(not isinstance(r, Exception) for r in results.values()), results
        assert [results[i][0] for i in range(2)] == ref  # the same tokens, computed on the decode rank
        assert all(len(results[i][0]) == 6 for i in range(len(prompts)))
        failed = [i for i, (_, last) in results.items() if last.metrics.kv_handoff_failed]
        assert failed, "no request fell back to a local prefill"
        _wait(lambda: _replica(d.info(), pb.REPLICA_ROLE_DECODE).kv.num_fallbacks >= len(failed), 10,
              "the fallbacks are counted")
        assert _replica(d.info(), pb.REPLICA_ROLE_DECODE).kv.num_failed >= len(failed)
        assert d.info().num_worker_restarts == 0
        _wait(lambda: _replica(d.info(), pb.REPLICA_ROLE_PREFILL).num_free_kv_blocks == idle[pb.REPLICA_ROLE_PREFILL],
              30, "the prefill rank released the prompts nobody received")
        toks, last = _complete(d, prompts[0], 6)  # the pair still hands off afterwards
        assert toks == ref[0] and last.metrics.disaggregated and not last.metrics.kv_handoff_failed
    finally:
        assert d.stop() == 0


def test_sigkill_decode_rank_mid_transfer(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama", **BIG)
    cfg = _config(tmp_path, "site", "[disagg]\nroles = \"prefill:1,decode:1\"\n")
    d = Daemon(tmp_path / "state", model, ranks=2, extra_args=cfg).start()
    try:
        idle = _idle_free_blocks(d)
        pre_pid, dec_pid = _rank_pid(d, 0), _rank_pid(d, 1)
        os.kill(dec_pid, signal.SIGSTOP)
        rng = random.Random(3)
        words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
        lines = [chat_line(f"id-{i}", " ".join(rng.choice(words) for _ in range(rng.randint(20, 120))),
                           max_tokens=4) for i in range(24)]
        batch = d.submit("\n".join(lines).encode())
        results: dict = {}
        threads = _stream_all(d, _long_prompts(3, seed=2, lo=100, hi=300), 40, results)
        try:
            _stall_posted_receives(d, pre_pid, dec_pid, idle)
            os.kill(dec_pid, signal.SIGKILL)  # the decode rank dies with receives posted
        finally:
            os.kill(pre_pid, signal.SIGCONT)
        assert d.batch(batch.id).request_counts.completed < 24  # mid-batch
        for t in threads:
            t.join(timeout=300)
        for r in results.values():  # every chat failed clearly (or finished, had it been decoded)
            if isinstance(r, grpc.RpcError):
                assert r.code() == grpc.StatusCode.UNAVAILABLE and "retry" in r.details(), r
            else:
                assert len(r[0]) == 40
        assert any(isinstance(r, grpc.RpcError) for r in results.values())
        info = d.wait_ready(timeout=300, min_restarts=1)
        assert info.num_worker_restarts >= 1 and _rank_pid(d, 1) != dec_pid
        b = d.wait_batch(batch.id, timeout=900)
        assert b.status == pb.BATCH_STATUS_COMPLETED, d.log_tail()
        got = _results(b)  # raises if a custom_id was written twice
        assert sorted(got) == sorted(f"id-{i}" for i in range(24))  # each exactly once
        assert all(rec["error"] is None for rec in got.values()), [r["error"] for r in got.values() if r["error"]]
        toks, last = _complete(d, list(range(3, 60)), 5)  # the relaunched pair serves again
        assert len(toks) == 5 and last.metrics.disaggregated
    finally:
        d.stop()


def test_roles_must_match_ranks(tiny_model_factory, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "hpcserve", "serve", "--model", str(tiny_model_factory("llama")),
                        "--ranks", "3", "--roles", "prefill:1,decode:1", "--state-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0
    assert "disagg.roles" in r.stderr and "daemon.ranks is 3" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "hpcserve", "serve", "--model", str(tiny_model_factory("llama")),
                        "--roles", "prefill:2", "--state-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "needs both prefill and decode" in r.stderr and "Traceback" not in r.stderr
