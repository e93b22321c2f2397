"""End-to-end: the real daemon (``hpcserve serve``) with 2 worker ranks under the venv's
mpiexec, a tiny random model, gRPC over loopback and the SQLite batch store.

Covers: chat and batch served at once (chat tokens == the engine's greedy output), a
malformed JSONL corpus, a client that disconnects mid-stream (KV blocks freed, seen through
server info), and graceful SIGTERM. Crash tests live in test_daemon_crash.py."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from daemon_harness import Daemon, chat_line, reap_all

from hpcserve.api.v1 import serving_pb2 as pb

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _reap_daemons():
    yield
    reap_all()  # a failed test may leave its daemon running


@pytest.fixture(scope="module")
def daemon(tiny_model_factory, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon") / "state", tiny_model_factory("llama")).start()
    yield d
    assert d.stop() == 0, d.log_tail()


def _reference_greedy(model_dir, content: str, max_tokens: int) -> list[int]:
    from hpcserve.engine.core import EngineConfig, LLMEngine
    from hpcserve.engine.request import SamplingParams

    eng = LLMEngine(EngineConfig(model=str(model_dir), num_threads=1))
    ids = eng.apply_chat_template([{"role": "user", "content": content}])
    eng.add_request("ref", ids, SamplingParams(max_tokens=max_tokens, temperature=0))
    out = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o.token_ids
    return out


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_chat_and_batch_at_once(daemon, tiny_model_factory):
    n = 24
    batch = daemon.submit("\n".join(chat_line(f"c{i}", f"tell me about {i}", 24) for i in range(n)).encode())
    prompt = "Once upon a time"
    # the chat below streams while the batch's lines are queued or running on the replicas
    tokens, text, last = [], [], None
    for chunk in daemon.chat(prompt, max_tokens=32):
        tokens += chunk.token_ids
        text.append(chunk.text)
        last = chunk
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert last.usage.completion_tokens == len(tokens) and last.usage.prompt_tokens > 0
    assert tokens == _reference_greedy(tiny_model_factory("llama"), prompt, 32)

    b = daemon.wait_batch(batch.id)
    assert b.status == pb.BATCH_STATUS_COMPLETED, b
    assert b.request_counts.completed == n and b.request_counts.failed == 0
    rows = _read_jsonl(b.output_file)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"c{i}" for i in range(n))
    assert all(r["response"]["body"]["usage"]["completion_tokens"] >= 1 for r in rows)
    assert b.usage.output_tokens == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in rows)


def test_malformed_corpus_gets_per_line_errors(daemon):
    too_long = " ".join(["word"] * 700)  # the tiny model's context is 512 tokens
    lines = [
        chat_line("ok1", "hello", 8),
        b"{not json",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}),
        chat_line("dup", "first", 8),
        chat_line("dup", "second", 8),
        json.dumps({"custom_id": "badurl", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
        chat_line("badparam", "hi", 8, top_p=7),
        chat_line("toolong", too_long, 8),
        b"\xff\xfe{\"custom_id\": \"bin\"}",
        chat_line("ok2", "bye", 8),
    ]
    data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n"
    b = daemon.wait_batch(daemon.submit(data).id)
    assert b.status == pb.BATCH_STATUS_COMPLETED, b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (10, 3, 7)
    outs = {r["custom_id"] for r in _read_jsonl(b.output_file)}
    assert outs == {"ok1", "ok2", "dup"}
    errs = {r["error"]["line"]: r["error"]["code"] for r in _read_jsonl(b.error_file)}
    assert errs == {2: "invalid_json", 3: "missing_field", 5: "duplicate_custom_id", 6: "invalid_url",
                    7: "invalid_request", 8: "context_length_exceeded", 9: "invalid_json"}

    empty = daemon.submit(b"")
    assert empty.status == pb.BATCH_STATUS_FAILED
    assert empty.errors and empty.errors[0].code == "empty_file"


def _free_blocks(d: Daemon) -> list[int]:
    return [r.num_free_kv_blocks for r in d.info().replicas]


def test_disconnect_frees_kv_blocks(daemon):
    deadline = time.monotonic() + 60
    total = [r.num_kv_blocks - 1 for r in daemon.info().replicas]  # block 0 is the runner's scratch
    while _free_blocks(daemon) != total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _free_blocks(daemon) == total
    call = daemon.chat("a long story please", max_tokens=400, ignore_eos=True)
    it = iter(call)
    for _ in range(5):
        next(it)
    busy = _free_blocks(daemon)
    deadline = time.monotonic() + 10
    while busy == total and time.monotonic() < deadline:  # load reports come every 0.25 s
        time.sleep(0.1)
        busy = _free_blocks(daemon)
    assert busy != total, "the stream's blocks never showed up in server info"
    call.cancel()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while _free_blocks(daemon) != total and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _free_blocks(daemon) == total
    info = daemon.info()
    assert all(r.num_running == 0 and r.num_waiting == 0 for r in info.replicas)


def test_bad_requests_get_clear_statuses(daemon):
    with pytest.raises(grpc.RpcError) as e:
        list(daemon.chat("x", max_tokens=0))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.value.details()
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="wizard", content="x")])
    with pytest.raises(grpc.RpcError) as e:
        list(daemon.stub.Chat(req, metadata=daemon.md))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(daemon.chat("word " * 600, max_tokens=8))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        daemon.stub.GetServerInfo(pb.GetServerInfoRequest())  # no token
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # the daemon is still healthy after all that
    assert sum(len(c.token_ids) for c in daemon.chat("still there?", max_tokens=4)) >= 1


def test_sigterm_finishes_chat_and_checkpoints_batch(tiny_model_factory, tmp_path):
    d = Daemon(tmp_path / "state", tiny_model_factory("llama")).start()
    n = 40
    b = d.submit("\n".join(chat_line(f"s{i}", f"q{i}", 48) for i in range(n)).encode())
    d.wait_batch(b.id, until=lambda x: x.request_counts.completed >= 1)
    call = d.chat("keep talking", max_tokens=40, ignore_eos=True)
    it = iter(call)
    first = next(it)
    d.proc.send_signal(15)
    rest = list(it)
    chunks = [first, *rest]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 40
    assert d.proc.wait(timeout=120) == 0, d.log_tail()
    assert not (tmp_path / "state" / "endpoint.json").exists()
    d.close_channel()

    d2 = Daemon(tmp_path / "state", tiny_model_factory("llama")).start()
    try:
        done = d2.wait_batch(b.id)
        assert done.status == pb.BATCH_STATUS_COMPLETED
        ids = [r["custom_id"] for r in _read_jsonl(done.output_file)]
        assert sorted(ids) == sorted(f"s{i}" for i in range(n))
    finally:
        assert d2.stop() == 0


def test_health_and_reflection(daemon):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(daemon.address) as ch:  # neither needs the token
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "hpcserve.api.v1.Serving"):
            for _ in range(50):  # health follows readiness within its 0.2 s tracking period
                res = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                if res.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.1)
            assert res.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=10))
        names = {s.name for s in reply.list_services_response.service}
        assert {"hpcserve.api.v1.Serving", "grpc.health.v1.Health"} <= names


def _cli(daemon, *args, timeout=300):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HPCSERVE_STATE_DIR": str(daemon.state_dir)}
    env.pop("HPCSERVE_ENDPOINT", None)
    return subprocess.run([sys.executable, "-m", "hpcserve", *args], check=False, capture_output=True, text=True,
                          env=env,
                          timeout=timeout)


def test_cli_against_the_daemon(daemon, tiny_model_factory, tmp_path):
    r = _cli(daemon, "chat", "--prompt", "Once upon a time", "--max-tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_factory("llama")))
    want = tok.decode(_reference_greedy(tiny_model_factory("llama"), "Once upon a time", 12))
    assert r.stdout.rstrip("\n") == want

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(chat_line(f"x{i}", f"hello {i}", 6) + "\n" for i in range(6)) + "{oops\n")
    r = _cli(daemon, "submit", str(inp))
    assert r.returncode == 0, r.stderr
    batch_id = r.stdout.strip()
    assert batch_id.startswith("batch_")
    daemon.wait_batch(batch_id)
    r = _cli(daemon, "status", batch_id, "--json")
    obj = json.loads(r.stdout)
    assert obj["id"] == batch_id and obj["status"] == "completed"
    assert obj["request_counts"] == {"total": 7, "completed": 6, "failed": 1}
    assert obj["output_file"] and obj["error_file"] and obj["created_at"] and obj["completed_at"]
    r = _cli(daemon, "results", batch_id, "-o", str(tmp_path / "out.jsonl"), "--errors", str(tmp_path / "err.jsonl"))
    assert r.returncode == 0, r.stderr
    assert len(_read_jsonl(tmp_path / "out.jsonl")) == 6 and len(_read_jsonl(tmp_path / "err.jsonl")) == 1
    r = _cli(daemon, "cancel", "batch_doesnotexist")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli(daemon, "status")
    assert r.returncode == 0 and "ready" in r.stdout and batch_id[:16] in r.stdout


def test_complete_abort_stop_and_logprobs(daemon, tiny_model_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_factory("llama")))
    ids = tok.encode("Once upon a time")
    # token-id prompt and text prompt give the same greedy continuation
    by_ids = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=ids),
                                  sampling_params=pb.SamplingParams(max_tokens=10, temperature=0, logprobs=2))
    by_text = pb.CompletionRequest(prompt_text="Once upon a time",
                                   sampling_params=pb.SamplingParams(max_tokens=10, temperature=0))
    a = list(daemon.stub.Complete(by_ids, metadata=daemon.md, timeout=60))
    b = list(daemon.stub.Complete(by_text, metadata=daemon.md, timeout=60))
    toks_a = [t for c in a for t in c.token_ids]
    assert toks_a == [t for c in b for t in c.token_ids] and len(toks_a) >= 1
    lps = [lp for c in a for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == toks_a
    assert all(len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob and lp.logprob <= 0 for lp in lps)
    assert "".join(c.text for c in a) == tok.decode(toks_a)

    # a stop string cuts the text and ends the stream with STOP
    text = "".join(c.text for c in b)
    if len(text) > 3:
        stop = text[2:4]
        req = pb.CompletionRequest(prompt_text="Once upon a time", sampling_params=pb.SamplingParams(
            max_tokens=10, temperature=0, stop=[stop]))
        chunks = list(daemon.stub.Complete(req, metadata=daemon.md, timeout=60))
        assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
        assert "".join(c.text for c in chunks) == text[:text.index(stop)]

    # Abort by request id ends the stream with ABORT
    req = pb.CompletionRequest(prompt_text="abc", request_id="abort-me", sampling_params=pb.SamplingParams(
        max_tokens=400, temperature=0, ignore_eos=True))
    call = daemon.stub.Complete(req, metadata=daemon.md, timeout=60)
    first = next(iter(call))
    assert first.request_id == "abort-me"
    assert daemon.stub.Abort(pb.AbortRequest(request_id="abort-me"), metadata=daemon.md).is_aborted
    rest = list(call)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert not daemon.stub.Abort(pb.AbortRequest(request_id="abort-me"), metadata=daemon.md).is_aborted
    bad = pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=[10**6]))
    with pytest.raises(grpc.RpcError) as e:
        list(daemon.stub.Complete(bad, metadata=daemon.md))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in e.value.details()


def test_dedicated_split_routes_chat_and_batch_apart(tiny_model_factory, tmp_path):
    cfg = tmp_path / "split.toml"
    cfg.write_text("[daemon]\ndedicated-chat-replicas = 1\nbatch-watermark = 3\n")
    d = Daemon(tmp_path / "state", tiny_model_factory("llama"), extra_args=("--config", str(cfg))).start()
    try:
        b = d.submit("\n".join(chat_line(f"p{i}", f"line {i}", 12) for i in range(12)).encode())
        for i in range(3):
            assert sum(len(c.token_ids) for c in d.chat(f"chat {i}", max_tokens=6)) >= 1
        assert d.wait_batch(b.id).status == pb.BATCH_STATUS_COMPLETED
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # counters arrive with the next load report
            r0, r1 = d.info().replicas
            if r0.num_output_tokens_interactive and r1.num_output_tokens_batch >= 12:
                break
            time.sleep(0.2)
        assert r0.is_chat_only and r1.is_batch_only
        assert r0.num_output_tokens_interactive >= 3 and r0.num_output_tokens_batch == 0
        assert r1.num_output_tokens_batch >= 12 and r1.num_output_tokens_interactive == 0
        assert r1.busy_time_s > 0 and r1.num_steps > 0
    finally:
        assert d.stop() == 0


def test_second_daemon_on_a_taken_port_or_state_dir_fails_clearly(daemon, tiny_model_factory, tmp_path):
    import subprocess
    import sys

    model = str(tiny_model_factory("llama"))
    for args, want in (
        (["--listen", daemon.address, "--state-dir", str(tmp_path / "other")], "cannot listen on"),
        (["--listen", "127.0.0.1:0", "--state-dir", str(daemon.state_dir)], "in use by another hpcserve process"),
    ):
        r = subprocess.run([sys.executable, "-m", "hpcserve", "serve", "--model", model, *args], capture_output=True,
                           text=True, timeout=120, check=False)
        assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert daemon.info().is_ready  # the running daemon is unaffected
