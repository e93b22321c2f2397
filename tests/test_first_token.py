"""Real first-token times: nothing of a stream reaches the client before its first token exists.

A raw SSE client (http.client, no SDK) and a gRPC client send a ~1,500-token chat prompt to the real
daemon (1 worker rank, a tiny random model with a 2k context). Each notes its own receive time of
the first chunk and compares it with the server's own first-token timestamp (the engine's clock,
in the last chunk's timings / metrics): the first chunk may never arrive before the first token was
sampled. No wall-clock thresholds: only the order of two timestamps taken on one machine.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest
from daemon_harness import Daemon, reap_all

from hpcserve.api.v1 import serving_pb2 as pb

pytestmark = pytest.mark.slow

PROMPT_TOKENS = 1500


@pytest.fixture(scope="module")
def daemon(tiny_model_factory, tmp_path_factory):
    from transformers import AutoTokenizer

    model = tiny_model_factory("llama", hidden_size=128, num_hidden_layers=4, intermediate_size=256,
                               max_position_embeddings=2048)
    tok = AutoTokenizer.from_pretrained(str(model))

    def num_tokens(words: list[str]) -> int:
        text = tok.apply_chat_template([{"role": "user", "content": " ".join(words)}], add_generation_prompt=True,
                                       tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    words = []
    while num_tokens(words) < PROMPT_TOKENS:
        words += "the old man reads an old book near the lake".split() * 10
    root = tmp_path_factory.mktemp("first-token")
    d = Daemon(root / "state", model, ranks=1, extra_args=("--http", "127.0.0.1:0")).start()
    ep = json.loads((root / "state" / "endpoint.json").read_text())
    yield d, ep, " ".join(words)
    assert d.stop() == 0, d.log_tail()
    reap_all()


def _sse(ep: dict, body: dict) -> tuple[float, list[dict]]:
    """POST a streamed request; the receive time (unix s) of the first event with choices, and every event."""
    host, port = ep["http"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {ep['token']}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    first, events = None, []
    while line := resp.readline():
        if not line.startswith(b"data: "):
            continue
        now = time.time()
        payload = line[len(b"data: "):].strip()
        if payload == b"[DONE]":
            break
        ev = json.loads(payload)
        if first is None and ev.get("choices"):
            first = now
        events.append(ev)
    conn.close()
    assert first is not None
    return first, events


def test_sse_first_chunk_comes_with_the_first_token(daemon):
    d, ep, text = daemon
    first_seen, events = _sse(ep, {"model": d.info().model, "messages": [{"role": "user", "content": text}],
                                   "max_tokens": 8, "temperature": 0, "stream": True,
                                   "stream_options": {"include_usage": True}})
    head = events[0]["choices"][0]
    assert head["delta"]["role"] == "assistant" and "content" in head["delta"]  # the role rides on token 1
    done = next(e for e in events if e.get("choices") and e["choices"][0]["finish_reason"])
    timings = done["timings"]
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] >= PROMPT_TOKENS and usage["timings"] == timings
    assert first_seen >= timings["first_token_time"] > timings["arrival_time"] > 0
    assert timings["last_token_time"] >= timings["first_token_time"]
    assert timings["ttft_s"] == pytest.approx(timings["first_token_time"] - timings["arrival_time"])
    assert timings["itl_max_s"] >= timings["itl_mean_s"] > 0  # 8 tokens: 7 gaps


def test_grpc_first_chunk_comes_with_the_first_token(daemon):
    d, _, text = daemon
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=text)],
                         sampling_params=pb.SamplingParams(max_tokens=8, temperature=0))
    first_seen, chunks = None, []
    for c in d.stub.Chat(req, metadata=d.md, timeout=300):
        if first_seen is None:
            first_seen = time.time()
        chunks.append(c)
    assert chunks[0].token_ids  # the first chunk carries a token: nothing is sent before one exists
    m = chunks[-1].metrics
    assert chunks[-1].usage.prompt_tokens >= PROMPT_TOKENS
    assert first_seen >= m.first_token_time > m.arrival_time > 0
    assert m.ttft_s == pytest.approx(m.first_token_time - m.arrival_time)
    assert m.last_token_time >= m.first_token_time and m.itl_max_s >= m.itl_mean_s > 0
