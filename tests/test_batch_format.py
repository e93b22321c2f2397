"""Pure tests of hpcserve.batch.openai_format: parsing, validation, output/error shapes."""

from __future__ import annotations

import json

import pytest

from hpcserve.batch.openai_format import (
    CHAT_URL,
    COMPLETIONS_URL,
    DEFAULT_MAX_TOKENS,
    ERROR_CODES,
    BatchLineError,
    LineParser,
    build_error_line,
    build_output_line,
    error_from_request_error,
    parse_line,
)
from hpcserve.engine.outputs import RequestOutput
from hpcserve.engine.request import SamplingParams, TokenLogprob
from hpcserve.errors import RequestError


def line(body=None, *, url=CHAT_URL, custom_id="c1", method="POST", **extra) -> str:
    obj = {"custom_id": custom_id, "method": method, "url": url}
    if body is not None:
        obj["body"] = body
    obj.update(extra)
    return json.dumps(obj)


def chat(**fields) -> str:
    return line({"messages": [{"role": "user", "content": "hi"}], **fields})


def comp(**fields) -> str:
    return line({"prompt": "hello", **fields}, url=COMPLETIONS_URL)


def err(text: str, line_no: int = 7) -> BatchLineError:
    with pytest.raises(BatchLineError) as ei:
        parse_line(text, line_no)
    assert ei.value.line_no == line_no
    assert ei.value.code in ERROR_CODES
    return ei.value


# --------------------------------------------------------------------------- good lines


def test_chat_line_maps_to_sampling_params():
    item = parse_line(chat(model="m", max_tokens=12, temperature=0, top_p=0.9, top_k=5, min_p=0.1,
                           seed=3, stop="END", stop_token_ids=[7], ignore_eos=True, n=1,
                           stream=False, logprobs=True, top_logprobs=3, user="u",
                           metadata={"a": 1}, response_format={"type": "text"},
                           frequency_penalty=0, presence_penalty=0.0), 4)
    assert item.is_chat and item.url == CHAT_URL and item.line_no == 4 and item.custom_id == "c1"
    assert item.messages == [{"role": "user", "content": "hi"}] and item.prompt is None
    assert item.model == "m" and not item.max_tokens_defaulted
    assert item.params == SamplingParams(max_tokens=12, temperature=0, top_p=0.9, top_k=5, min_p=0.1,
                                         seed=3, stop=["END"], stop_token_ids=[7], ignore_eos=True,
                                         logprobs=3)


def test_chat_defaults_and_content_parts():
    text = line({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok", "name": "bot"},
    ]})
    item = parse_line(text, 1)
    assert item.messages == [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "a\nb"},
                             {"role": "assistant", "content": "ok"}]
    assert item.params.max_tokens == DEFAULT_MAX_TOKENS == 256 and item.max_tokens_defaulted
    assert item.params.temperature == 1.0 and item.params.logprobs is None
    assert parse_line(chat(logprobs=True), 1).params.logprobs == 0
    assert parse_line(chat(max_completion_tokens=9), 1).params.max_tokens == 9
    # null means absent
    assert parse_line(chat(temperature=None, stop=None, n=None), 1).params.temperature == 1.0


def test_completion_line_maps_to_sampling_params():
    item = parse_line(comp(max_tokens=5, temperature=0.5, logprobs=2, stop=["a", "b"], echo=False), 2)
    assert not item.is_chat and item.prompt == "hello" and item.messages is None
    assert item.params == SamplingParams(max_tokens=5, temperature=0.5, logprobs=2, stop=["a", "b"])
    ids = parse_line(line({"prompt": [1, 2, 3]}, url=COMPLETIONS_URL), 2)
    assert ids.prompt == [1, 2, 3] and ids.params.max_tokens == 256


def test_surrounding_whitespace_ok():
    assert parse_line("  " + chat() + "  \n", 1).custom_id == "c1"


# --------------------------------------------------------------------------- error codes


@pytest.mark.parametrize(
    "text, code, field",
    [
        ("{not json", "invalid_json", "JSON"),
        ('["a list"]', "invalid_request", "object"),
        (json.dumps({"method": "POST", "url": CHAT_URL, "body": {}}), "missing_field", "custom_id"),
        (line({"messages": []}, custom_id=""), "invalid_request", "custom_id"),
        (line({"messages": []}, custom_id=5), "invalid_request", "custom_id"),
        (json.dumps({"custom_id": "c1", "url": CHAT_URL, "body": {}}), "missing_field", "method"),
        (json.dumps({"custom_id": "c1", "method": "POST", "body": {}}), "missing_field", "url"),
        (line(None), "missing_field", "body"),
        (line({"messages": []}, method="GET"), "invalid_method", "method"),
        (line({"messages": []}, url="/v1/embeddings"), "invalid_url", "url"),
        (line([1, 2]), "invalid_request", "body"),
        (line({"max_tokens": 3}), "missing_field", "messages"),
        (line({"max_tokens": 3}, url=COMPLETIONS_URL), "missing_field", "prompt"),
        (line({"messages": []}), "invalid_request", "messages"),
        (line({"messages": "hi"}), "invalid_request", "messages"),
        (line({"messages": [{"role": "tool", "content": "x"}]}), "invalid_request", "messages[0].role"),
        (line({"messages": [{"content": "x"}]}), "missing_field", "messages[0].role"),
        (line({"messages": [{"role": "user"}]}), "missing_field", "messages[0].content"),
        (line({"messages": [{"role": "user", "content": 5}]}), "invalid_request", "messages[0].content"),
        (line({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
         "unsupported_parameter", "messages[0].content[0].type"),
        (line({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": 1}]}]}),
         "unsupported_parameter", "messages[0].tool_calls"),
        (line({"prompt": ["a", "b"]}, url=COMPLETIONS_URL), "invalid_request", "prompt"),
        (line({"prompt": [[1, 2], [3]]}, url=COMPLETIONS_URL), "invalid_request", "prompt"),
        (line({"prompt": [1, -2]}, url=COMPLETIONS_URL), "invalid_request", "prompt"),
        (line({"prompt": ""}, url=COMPLETIONS_URL), "invalid_request", "prompt"),
        (line({"prompt": 5}, url=COMPLETIONS_URL), "invalid_request", "prompt"),
        (chat(max_tokens=0), "invalid_request", "max_tokens"),
        (chat(max_tokens="10"), "invalid_request", "max_tokens"),
        (chat(max_completion_tokens=-1), "invalid_request", "max_completion_tokens"),
        (chat(max_tokens=5, max_completion_tokens=6), "invalid_request", "max_completion_tokens"),
        (chat(temperature=-1), "invalid_request", "temperature"),
        (chat(temperature="hot"), "invalid_request", "temperature"),
        (chat(top_p=0), "invalid_request", "top_p"),
        (chat(top_k=-5), "invalid_request", "top_k"),
        (chat(min_p=2), "invalid_request", "min_p"),
        (chat(seed=1.5), "invalid_request", "seed"),
        (chat(stop=5), "invalid_request", "stop"),
        (chat(stop=[""]), "invalid_request", "stop"),
        (chat(stop_token_ids=3), "invalid_request", "stop_token_ids"),
        (chat(stop_token_ids=[-1]), "invalid_request", "stop_token_ids"),
        (chat(ignore_eos="yes"), "invalid_request", "ignore_eos"),
        (chat(logprobs=3), "invalid_request", "logprobs"),
        (chat(logprobs=True, top_logprobs=21), "invalid_request", "top_logprobs"),
        (chat(top_logprobs=2), "invalid_request", "top_logprobs"),
        (comp(logprobs=21), "invalid_request", "logprobs"),
        (comp(logprobs=True), "invalid_request", "logprobs"),
        (chat(model=3), "invalid_request", "model"),
        (chat(n=2), "unsupported_parameter", "n"),
        (chat(n=True), "unsupported_parameter", "n"),
        (chat(stream=True), "unsupported_parameter", "stream"),
        (chat(stream="no"), "invalid_request", "stream"),
        (chat(frequency_penalty=0.5), "unsupported_parameter", "frequency_penalty"),
        (chat(presence_penalty=1), "unsupported_parameter", "presence_penalty"),
        (chat(response_format={"type": "json_object"}), "unsupported_parameter", "response_format"),
        (chat(logit_bias={"1": 5}), "unsupported_parameter", "logit_bias"),
        (chat(tools=[{"type": "function"}]), "unsupported_parameter", "tools"),
        (chat(prompt="x"), "unsupported_parameter", "prompt"),
        (chat(foo=1), "unsupported_parameter", "foo"),
        (comp(echo=True), "unsupported_parameter", "echo"),
        (comp(best_of=2), "unsupported_parameter", "best_of"),
        (comp(suffix="x"), "unsupported_parameter", "suffix"),
        (comp(messages=[]), "unsupported_parameter", "messages"),
        (comp(max_completion_tokens=5), "unsupported_parameter", "max_completion_tokens"),
    ],
)
def test_bad_line_code_and_field(text, code, field):
    e = err(text)
    assert e.code == code, e.message
    assert field in e.message
    expect_id = None if code in ("invalid_json",) or "custom_id" in field or field == "object" else "c1"
    assert e.custom_id == expect_id


def test_duplicate_custom_id():
    p = LineParser()
    p.parse(chat(), 1)
    with pytest.raises(BatchLineError) as ei:
        p.parse(chat(), 3)
    assert ei.value.code == "duplicate_custom_id" and ei.value.custom_id == "c1"
    assert "custom_id" in ei.value.message and "line 1" in ei.value.message
    # an invalid line still claims its custom_id; a later valid line with it is a duplicate
    with pytest.raises(BatchLineError) as ei:
        p.parse(line({"messages": []}, custom_id="c2"), 4)
    assert ei.value.code == "invalid_request"
    with pytest.raises(BatchLineError) as ei:
        p.parse(line({"messages": [{"role": "user", "content": "x"}]}, custom_id="c2"), 5)
    assert ei.value.code == "duplicate_custom_id"
    assert p.parse(line({"messages": [{"role": "user", "content": "x"}]}, custom_id="c3"), 6)


def test_engine_request_error_mapping():
    e = error_from_request_error(
        9, "c9", RequestError("prompt: 600 tokens + max_tokens 256 > 512", field="prompt",
                              code="context_length_exceeded"))
    assert (e.line_no, e.custom_id, e.code) == (9, "c9", "context_length_exceeded")
    assert "prompt" in e.message
    e = error_from_request_error(9, "c9", RequestError("messages: bad", field="messages",
                                                       code="something_else"))
    assert e.code == "invalid_request"


# --------------------------------------------------------------------------- output shapes


def _out(logprobs=None) -> RequestOutput:
    return RequestOutput(req_id="r", prompt_token_ids=[1, 2, 3], token_ids=[4, 5], text="ab",
                         new_token_ids=[5], new_text="b", finished=True, finish_reason="length",
                         logprobs=logprobs)


def test_chat_output_line_shape():
    item = parse_line(chat(), 1)
    d = build_output_line(item, _out(), "served", 1700000000)
    json.dumps(d, allow_nan=False)
    assert d["id"].startswith("batch_req_") and d["custom_id"] == "c1" and d["error"] is None
    r = d["response"]
    assert r["status_code"] == 200 and r["request_id"]
    b = r["body"]
    assert b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-")
    assert b["created"] == 1700000000 and b["model"] == "served"
    assert b["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "ab"},
                             "logprobs": None, "finish_reason": "length"}]
    assert b["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert build_output_line(item, _out(), "served", 0)["id"] != d["id"]


def test_chat_logprobs_shape():
    item = parse_line(chat(model="mine", logprobs=True, top_logprobs=1), 1)
    lps = [TokenLogprob(4, -0.5, [(4, -0.5)]), TokenLogprob(5, float("-inf"), [(6, -0.1)])]
    b = build_output_line(item, _out(lps), "served", 0, decode=lambda t: f"<{t}>")["response"]["body"]
    json.dumps(b, allow_nan=False)
    assert b["model"] == "mine"
    content = b["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "<4>", "logprob": -0.5, "bytes": list(b"<4>"),
                          "top_logprobs": [{"token": "<4>", "logprob": -0.5, "bytes": list(b"<4>")}]}
    assert content[1]["logprob"] == -9999.0


def test_completion_output_line_shape():
    item = parse_line(comp(logprobs=1), 1)
    lps = [TokenLogprob(4, -0.5, [(4, -0.5)]), TokenLogprob(5, -1.0, [(6, -0.1)])]
    b = build_output_line(item, _out(lps), "served", 5)["response"]["body"]
    assert b["object"] == "text_completion" and b["id"].startswith("cmpl-") and b["model"] == "served"
    ch = b["choices"][0]
    assert ch["text"] == "ab" and ch["index"] == 0 and ch["finish_reason"] == "length"
    assert ch["logprobs"] == {"tokens": ["token_id:4", "token_id:5"], "token_logprobs": [-0.5, -1.0],
                              "top_logprobs": [{"token_id:4": -0.5}, {"token_id:6": -0.1}],
                              "text_offset": [0, 10]}
    no_lp = build_output_line(parse_line(comp(), 1), _out(lps), "s", 5)["response"]["body"]
    assert no_lp["choices"][0]["logprobs"] is None


def test_error_line_shape():
    d = build_error_line("c1", 3, "invalid_url", "url: bad")
    assert d["id"].startswith("batch_req_") and d["custom_id"] == "c1" and d["response"] is None
    assert d["error"] == {"code": "invalid_url", "message": "url: bad", "line": 3}
    assert build_error_line(None, 1, "invalid_json", "x")["custom_id"] is None
