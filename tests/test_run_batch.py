"""End-to-end tests of hpcserve.batch.runner and `hpcserve run-batch` with a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from hpcserve.engine.core import EngineConfig, LLMEngine
except ImportError as exc:  # the engine is written concurrently
    pytest.skip(f"hpcserve.engine.core does not import yet ({exc})", allow_module_level=True)
try:
    from tests.model_factory import make_tiny_model
except ImportError:
    try:  # tests/ has no __init__.py; conftest puts tests/ on sys.path
        from model_factory import make_tiny_model
    except ImportError as exc:
        pytest.skip(f"tests.model_factory does not import yet ({exc})", allow_module_level=True)

from hpcserve.batch.runner import count_lines, run_batch

MAX_MODEL_LEN = 96
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny-batch"), "llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN,
                                  num_threads=1))


def req(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _mixed_lines() -> tuple[list[str], dict[str, dict]]:
    """Input lines and, per good custom_id, its body. Blank lines included."""
    good = {
        "chat-1": (CHAT, {"messages": msgs("Hello, how are you?"), "max_tokens": 5, "temperature": 0,
                          "ignore_eos": True}),
        "chat-2": (CHAT, {"messages": [{"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                          "max_completion_tokens": 4, "ignore_eos": True, "logprobs": True,
                          "top_logprobs": 2, "model": "my-model"}),
        "comp-1": (COMP, {"prompt": "the cat sees a red ball", "max_tokens": 6, "seed": 7,
                          "ignore_eos": True, "logprobs": 1}),
        "comp-2": (COMP, {"prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0, "ignore_eos": True}),
        "comp-default": (COMP, {"prompt": "Once upon a time", "ignore_eos": True}),  # 256 -> clamped
    }
    lines = [req(cid, url, body) for cid, (url, body) in good.items()]
    lines[2:2] = ["", "   "]
    bad = [
        ("{oops", "invalid_json", None),
        (json.dumps({"custom_id": "bad-missing", "method": "POST", "url": CHAT}), "missing_field",
         "bad-missing"),
        (req("bad-url", "/v1/embeddings", {"input": "x"}), "invalid_url", "bad-url"),
        (req("bad-method", CHAT, {"messages": msgs("x")}, method="GET"), "invalid_method", "bad-method"),
        (req("bad-param", CHAT, {"messages": msgs("x"), "temperature": -1}), "invalid_request", "bad-param"),
        (req("bad-n", COMP, {"prompt": "x", "n": 3}), "unsupported_parameter", "bad-n"),
        (req("chat-1", COMP, {"prompt": "dup"}), "duplicate_custom_id", "chat-1"),
        (req("bad-long", COMP, {"prompt": list(range(10, 10 + MAX_MODEL_LEN + 5)), "max_tokens": 1}),
         "context_length_exceeded", "bad-long"),
        (req("bad-vocab", COMP, {"prompt": [10**7], "max_tokens": 2}), "invalid_request", "bad-vocab"),
    ]
    lines += [text for text, _, _ in bad]
    expected_errors = {i + 1: (code, cid) for i, text in enumerate(lines)
                       for t, code, cid in bad if t == text}
    return lines, {"good": good, "errors": expected_errors}


@pytest.mark.parametrize("separate_errors", [True, False])
def test_mixed_file(engine, tmp_path, separate_errors):
    lines, expect = _mixed_lines()
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, errs = tmp_path / "out.jsonl", (tmp_path / "err.jsonl" if separate_errors else None)

    summary = run_batch(engine, inp, out, errors_path=errs, progress=False, max_in_flight=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.jsonl", "out.jsonl"] + (["err.jsonl"] if separate_errors else []))  # no .partial left
    rows = read_jsonl(out) + (read_jsonl(errs) if errs else [])
    ok = [r for r in rows if r["error"] is None]
    bad = [r for r in rows if r["error"] is not None]
    if separate_errors:
        assert all(r["error"] is None for r in read_jsonl(out))

    good = expect["good"]
    assert sorted(r["custom_id"] for r in ok) == sorted(good)
    assert {r["error"]["line"]: (r["error"]["code"], r["custom_id"]) for r in bad} == expect["errors"]
    assert len(bad) == len(expect["errors"])
    for r in bad:
        assert r["response"] is None and r["id"].startswith("batch_req_") and r["error"]["message"]

    tot_p = tot_c = 0
    for r in ok:
        url, body = good[r["custom_id"]]
        resp = r["response"]
        assert resp["status_code"] == 200
        b = resp["body"]
        ch = b["choices"][0]
        u = b["usage"]
        if url == CHAT:
            assert b["object"] == "chat.completion" and ch["message"]["role"] == "assistant"
            parsed = [{"role": "system" if m["role"] == "developer" else m["role"],
                       "content": m["content"] if isinstance(m["content"], str)
                       else "\n".join(p["text"] for p in m["content"])} for m in body["messages"]]
            n_prompt = len(engine.apply_chat_template(parsed))
        else:
            assert b["object"] == "text_completion" and isinstance(ch["text"], str)
            n_prompt = len(engine.tokenize(body["prompt"]))
        assert b["model"] == body.get("model", engine.model_name)
        assert u["prompt_tokens"] == n_prompt
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None:  # default 256 lowered to fit the context
            max_tokens = MAX_MODEL_LEN - n_prompt
        assert ch["finish_reason"] == "length" and u["completion_tokens"] == max_tokens
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] <= MAX_MODEL_LEN
        if "logprobs" in body:
            lp = ch["logprobs"]
            toks = lp["content"] if url == CHAT else lp["tokens"]
            assert len(toks) == u["completion_tokens"]
            if url == CHAT:
                assert all(len(t["top_logprobs"]) == 2 for t in lp["content"])
        else:
            assert ch["logprobs"] is None
        tot_p += u["prompt_tokens"]
        tot_c += u["completion_tokens"]

    n_lines = len(good) + len(expect["errors"])
    assert (summary.num_lines, summary.num_ok, summary.num_errors) == (n_lines, len(good), len(bad))
    assert (summary.prompt_tokens, summary.completion_tokens) == (tot_p, tot_c)
    assert summary.elapsed_s > 0
    assert not engine.has_unfinished_requests()


def test_context_length_exceeded(engine, tmp_path):
    long_text = "the quick fox runs in the park " * 40
    lines = [
        req("long-chat", CHAT, {"messages": msgs(long_text), "max_tokens": 4}),
        req("long-comp", COMP, {"prompt": long_text}),
        req("no-room", COMP, {"prompt": "the cat sees a red ball", "max_tokens": MAX_MODEL_LEN}),
        req("fits", COMP, {"prompt": "the cat", "max_tokens": 2}),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines), encoding="utf-8")  # no trailing newline
    assert count_lines(inp) == 4
    summary = run_batch(engine, inp, out)
    rows = {r["custom_id"]: r for r in read_jsonl(out)}
    assert set(rows) == {"long-chat", "long-comp", "no-room", "fits"}
    for cid in ("long-chat", "long-comp", "no-room"):
        assert rows[cid]["error"]["code"] == "context_length_exceeded", rows[cid]
        assert "context length" in rows[cid]["error"]["message"]
    assert rows["fits"]["response"]["status_code"] == 200
    assert (summary.num_ok, summary.num_errors) == (1, 3)


def test_empty_and_blank_file(engine, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n \n\n", encoding="utf-8")
    summary = run_batch(engine, inp, out, progress=True)
    assert out.read_text() == "" and summary.num_lines == 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from hpcserve.cli import main; main()", *args],
                          check=False, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli(model_dir, tmp_path):
    try:
        import hpcserve.cli  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"hpcserve.cli does not import yet ({exc})")
    inp, out, errs = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    inp.write_text("\n".join([
        req("a", CHAT, {"messages": msgs("hi"), "max_tokens": 3}),
        req("b", COMP, {"prompt": "the cat", "max_tokens": 3}),
        req("c", "/v1/nope", {}),
    ]) + "\n", encoding="utf-8")

    res = _cli("run-batch", "--model", str(model_dir), str(inp), "-o", str(out), "--errors", str(errs),
               "--max-model-len", "64")
    assert res.returncode == 0, res.stderr
    assert sorted(r["custom_id"] for r in read_jsonl(out)) == ["a", "b"]
    assert [r["error"]["code"] for r in read_jsonl(errs)] == ["invalid_url"]
    assert "2 ok, 1 errors" in res.stderr and "tok/s" in res.stderr

    help_res = _cli("run-batch", "--help")
    assert help_res.returncode == 0 and "custom_id" in help_res.stdout

    res = _cli("run-batch", "--model", str(model_dir), str(tmp_path / "missing.jsonl"), "-o", str(out))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "missing.jsonl" in res.stderr


class _FakeEngine:
    """Finishes one request per step; raises on step number ``crash_at``."""

    model_name = "fake"
    max_model_len = 1000
    tokenizer = None

    def __init__(self, crash_at: int | None = None):
        from hpcserve.engine.outputs import RequestOutput

        self._out = RequestOutput
        self.queue: list[str] = []
        self.max_seen = self.steps = 0
        self.crash_at = crash_at
        self.aborted: list[str] = []

    def apply_chat_template(self, messages):
        return [1, 2]

    def tokenize(self, prompt):
        return [1] * len(prompt.split())

    def add_request(self, req_id, prompt, params):
        self.queue.append(req_id)
        self.max_seen = max(self.max_seen, len(self.queue))

    def step(self):
        self.steps += 1
        if self.steps == self.crash_at:
            raise RuntimeError("boom")
        rid = self.queue.pop(0)
        return [self._out(rid, [1, 2], [3], "x", [3], "x", True, "length")]

    def has_unfinished_requests(self):
        return bool(self.queue)

    def abort_request(self, req_id):
        self.aborted.append(req_id)


def _fake_file(tmp_path: Path, n: int) -> Path:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(req(f"r{i}", COMP, {"prompt": "a b c", "max_tokens": 1}) + "\n"
                           for i in range(n)), encoding="utf-8")
    return inp


def test_streams_with_bounded_in_flight(tmp_path):
    eng = _FakeEngine()
    summary = run_batch(eng, _fake_file(tmp_path, 20), tmp_path / "out.jsonl", max_in_flight=3)
    assert eng.max_seen == 3 and summary.num_ok == 20
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 20


def test_crash_leaves_only_partial(tmp_path):
    eng = _FakeEngine(crash_at=5)
    with pytest.raises(RuntimeError, match="boom"):
        run_batch(eng, _fake_file(tmp_path, 10), tmp_path / "out.jsonl", max_in_flight=2)
    assert not (tmp_path / "out.jsonl").exists()
    assert len(read_jsonl(tmp_path / "out.jsonl.partial")) == 4
    assert sorted(eng.aborted) == ["batch-5", "batch-6"]  # lines 5, 6 were in flight
