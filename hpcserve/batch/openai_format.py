"""OpenAI Batch JSONL lines: parse/validate input lines, build output and error lines. No torch.

Interface:

    parse_line(text, line_no) -> BatchItem          # raises BatchLineError
    parse_request_body(url, body) -> (BatchItem, stream, include_usage, n)  # an HTTP /v1 body; RequestError
    LineParser().parse(text, line_no) -> BatchItem  # same, plus duplicate custom_id detection
    error_from_request_error(line_no, custom_id, exc: RequestError) -> BatchLineError
    build_output_line(item, out: RequestOutput, model_name, created, decode=None) -> dict
    build_error_line(custom_id, line_no, code, message) -> dict

Input line (one JSON object per line)::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}

``url`` is ``/v1/chat/completions`` (``messages``) or ``/v1/completions`` (``prompt``: one
string or one list of token ids). Sampling fields: ``max_tokens`` (chat also
``max_completion_tokens``; default ``DEFAULT_MAX_TOKENS`` = 256 when absent), ``temperature``
(default 1.0, as OpenAI), ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``,
``stop_token_ids``, ``ignore_eos``, ``n`` (only 1), ``stream`` (only false), ``logprobs``
(chat: bool plus ``top_logprobs`` 0..20; completions: int 0..20). ``model`` is echoed back,
not checked. ``null`` means "absent" for every optional field. Harmless OpenAI fields
(``user``, ``metadata``, ``store``, ``parallel_tool_calls``) are ignored; fields this server
cannot honour are accepted only at their default value (e.g. ``presence_penalty: 0``) and
otherwise rejected with ``unsupported_parameter`` naming the field. A ``developer`` message
is passed to the chat template as ``system``; text-part content lists are joined with "\\n".

Output line: ``{"id": "batch_req_…", "custom_id", "response": {"status_code": 200,
"request_id", "body": <chat.completion | text_completion>}, "error": null}``.
Error line: ``{"id", "custom_id" (null if the line had none), "response": null,
"error": {"code", "message", "line"}}`` with ``code`` one of ``ERROR_CODES``.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpcserve.engine.outputs import RequestOutput
from hpcserve.engine.request import SamplingParams, TokenLogprob
from hpcserve.errors import HpcserveError, RequestError

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
DEFAULT_MAX_TOKENS = 256
MAX_TOP_LOGPROBS = SamplingParams.MAX_LOGPROBS
ROLES = ("system", "user", "assistant", "developer")

ERROR_CODES = frozenset({
    "invalid_json", "invalid_request", "invalid_url", "invalid_method", "missing_field",
    "duplicate_custom_id", "context_length_exceeded", "unsupported_parameter",
})

# Body fields understood per endpoint (besides the ignored / default-only ones below).
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
           "stop_token_ids", "ignore_eos", "n", "stream", "logprobs"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
_IGNORED = {"user", "metadata", "store", "parallel_tool_calls"}
# Accepted only when equal to one of these values (the OpenAI default / a no-op).
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "repetition_penalty": (1,),
    "response_format": ({"type": "text"},), "logit_bias": ({},), "stream_options": (),
    "tools": ([],), "tool_choice": ("none",),
    "echo": (False,), "suffix": ("",), "best_of": (1,),  # completions
}


class BatchLineError(HpcserveError):
    """One input line cannot be run. ``code`` is one of ``ERROR_CODES``."""

    def __init__(self, line_no: int, custom_id: str | None, code: str, message: str):
        super().__init__(f"line {line_no}: {message}")
        self.line_no = line_no
        self.custom_id = custom_id
        self.code = code
        self.message = message


@dataclass
class BatchItem:
    """A validated input line. Exactly one of ``messages`` (chat) / ``prompt`` is set."""

    line_no: int
    custom_id: str
    url: str
    params: SamplingParams
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    model: str | None = None
    max_tokens_defaulted: bool = False

    @property
    def is_chat(self) -> bool:
        return self.url == CHAT_URL


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _same(a: object, b: object) -> bool:
    """Equality that does not confuse booleans with 0/1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


# --------------------------------------------------------------------------- parsing


def parse_line(text: str, line_no: int) -> BatchItem:
    """Validate one input line and map it to a ``BatchItem``; raise ``BatchLineError``."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = getattr(exc, "msg", str(exc))
        raise BatchLineError(line_no, None, "invalid_json", f"line is not valid JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise BatchLineError(line_no, None, "invalid_request",
                             f"line must be a JSON object, got {type(obj).__name__}")

    if obj.get("custom_id") is None:
        raise BatchLineError(line_no, None, "missing_field", "custom_id: required field is missing")
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchLineError(line_no, None, "invalid_request", "custom_id: must be a non-empty string")

    def fail(code: str, message: str) -> BatchLineError:
        return BatchLineError(line_no, custom_id, code, message)

    for name in ("method", "url", "body"):
        if obj.get(name) is None:
            raise fail("missing_field", f"{name}: required field is missing")
    if obj["method"] != "POST":
        raise fail("invalid_method", f"method: must be \"POST\", got {obj['method']!r}")
    url = obj["url"]
    if url not in URLS:
        raise fail("invalid_url", f"url: must be one of {', '.join(URLS)}; got {url!r}")
    body = obj["body"]
    if not isinstance(body, dict):
        raise fail("invalid_request", "body: must be a JSON object")

    try:
        return _parse_body(line_no, custom_id, url, body)
    except _FieldError as exc:
        raise fail(exc.code, str(exc)) from None


MAX_HTTP_N = 16  # choices per HTTP request (batch lines: 1)


def parse_request_body(url: str, body: Any) -> tuple[BatchItem, bool, bool, int]:
    """Validate the JSON body of an HTTP ``/v1/chat/completions`` or ``/v1/completions`` request
    with the same rules as a batch line, plus ``stream``, ``stream_options.include_usage`` and ``n``
    (1..``MAX_HTTP_N`` choices). Returns ``(item, stream, include_usage, n)``; raises
    ``RequestError`` naming the field."""
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object", field="body")
    b = dict(body)
    n = b.pop("n", None)
    if n is None:
        n = 1
    elif not _is_int(n) or not 1 <= n <= MAX_HTTP_N:
        raise RequestError(f"n: must be an integer 1..{MAX_HTTP_N}, got {n!r}", field="n")
    stream, opts = b.pop("stream", None), b.pop("stream_options", None)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"stream: must be a boolean, got {stream!r}", field="stream")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise RequestError("stream_options: must be an object like {\"include_usage\": true}",
                               field="stream_options")
        if not stream:
            raise RequestError("stream_options: only allowed with stream: true", field="stream_options")
        include_usage = bool(opts.get("include_usage"))
    try:
        item = _parse_body(0, "", url, b)
    except _FieldError as exc:
        msg = str(exc)
        raise RequestError(msg, field=msg.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0],
                           code=exc.code) from None
    return item, bool(stream), include_usage, n


class _FieldError(Exception):
    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


def _parse_body(line_no: int, custom_id: str, url: str, body: dict) -> BatchItem:
    chat = url == CHAT_URL
    known = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    for name, value in body.items():
        if name in known or name in _IGNORED or value is None:
            continue
        if name in _DEFAULT_ONLY:
            if any(_same(value, ok) for ok in _DEFAULT_ONLY[name]):
                continue
            raise _FieldError(f"{name}: not supported by hpcserve (got {value!r}); "
                              "remove the field or use its default", "unsupported_parameter")
        raise _FieldError(f"{name}: unsupported parameter for {url}", "unsupported_parameter")
    b = {k: v for k, v in body.items() if v is not None}

    model = b.get("model")
    if model is not None and not isinstance(model, str):
        raise _FieldError("model: must be a string")
    if "n" in b and not (_is_int(b["n"]) and b["n"] == 1):
        raise _FieldError(f"n: only n=1 is supported (got {b['n']!r}); "
                          "send one request (or batch line) per sample", "unsupported_parameter")
    if "stream" in b:
        if not isinstance(b["stream"], bool):
            raise _FieldError("stream: must be a boolean")
        if b["stream"]:
            raise _FieldError("stream: must be false in a batch file", "unsupported_parameter")

    messages = prompt = None
    if chat:
        if "messages" not in b:
            raise _FieldError("messages: required field is missing", "missing_field")
        messages = _parse_messages(b["messages"])
    else:
        if "prompt" not in b:
            raise _FieldError("prompt: required field is missing", "missing_field")
        prompt = _parse_prompt(b["prompt"])

    # max_tokens ---------------------------------------------------------------
    mt_field = "max_tokens"
    if chat and "max_completion_tokens" in b:
        if "max_tokens" in b and b["max_tokens"] != b["max_completion_tokens"]:
            raise _FieldError("max_completion_tokens: conflicts with max_tokens; give only one")
        mt_field = "max_completion_tokens"
    defaulted = mt_field not in b
    max_tokens = DEFAULT_MAX_TOKENS if defaulted else b[mt_field]

    # logprobs -----------------------------------------------------------------
    logprobs = None
    if chat:
        lp, top = b.get("logprobs", False), b.get("top_logprobs")
        if not isinstance(lp, bool):
            raise _FieldError(f"logprobs: must be a boolean for chat completions, got {lp!r}")
        if top is not None:
            if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
                raise _FieldError(f"top_logprobs: must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                                  f"got {top!r}")
            if not lp:
                raise _FieldError("top_logprobs: requires logprobs: true")
        if lp:
            logprobs = top or 0
    elif "logprobs" in b:
        logprobs = b["logprobs"]  # range checked by SamplingParams

    # shapes SamplingParams does not check itself
    stop = b.get("stop", [])
    if not isinstance(stop, str) and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _FieldError("stop: must be a string or a list of strings")
    stop_ids = b.get("stop_token_ids", [])
    if not isinstance(stop_ids, list):
        raise _FieldError("stop_token_ids: must be a list of integers")
    ignore_eos = b.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _FieldError("ignore_eos: must be a boolean")

    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=b.get("temperature", 1.0),
            top_k=b.get("top_k", 0),
            top_p=b.get("top_p", 1.0),
            min_p=b.get("min_p", 0.0),
            seed=b.get("seed"),
            stop=stop,
            stop_token_ids=stop_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
    except RequestError as exc:
        msg = str(exc)
        if exc.field == "max_tokens" and mt_field != "max_tokens":
            msg = msg.replace("max_tokens", mt_field, 1)
        if exc.field == "logprobs" and chat:
            msg = msg.replace("logprobs", "top_logprobs", 1)
        raise _FieldError(msg) from None
    except (TypeError, ValueError) as exc:  # defensive: a shape SamplingParams chokes on
        raise _FieldError(f"body: invalid sampling parameters ({exc})") from None

    return BatchItem(line_no=line_no, custom_id=custom_id, url=CHAT_URL if chat else COMPLETIONS_URL,
                     params=params, messages=messages, prompt=prompt, model=model,
                     max_tokens_defaulted=defaulted)


def _parse_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _FieldError("messages: must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _FieldError(f"{where}: must be an object with role and content")
        for key, value in m.items():
            if key not in ("role", "content", "name") and value not in (None, [], ""):
                raise _FieldError(f"{where}.{key}: not supported by hpcserve",
                                  "unsupported_parameter")
        role = m.get("role")
        if role is None:
            raise _FieldError(f"{where}.role: required field is missing", "missing_field")
        if role not in ROLES:
            raise _FieldError(f"{where}.role: must be one of {', '.join(ROLES)}; got {role!r}")
        if m.get("content") is None:
            raise _FieldError(f"{where}.content: required field is missing", "missing_field")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _parse_content(m["content"], where)})
    return out


def _parse_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _FieldError(f"{where}.content: must be a string or a non-empty list of text parts")
    texts = []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise _FieldError(f"{pw}: must be an object {{\"type\": \"text\", \"text\": ...}}")
        if part.get("type") != "text":
            raise _FieldError(f"{pw}.type: only \"text\" parts are supported, got {part.get('type')!r}",
                              "unsupported_parameter")
        if not isinstance(part.get("text"), str):
            raise _FieldError(f"{pw}.text: must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _parse_prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise _FieldError("prompt: must not be empty")
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise _FieldError("prompt: must not be empty")
        if all(_is_int(t) and t >= 0 for t in prompt):
            return list(prompt)
        if all(isinstance(p, (str, list)) for p in prompt):
            raise _FieldError("prompt: one prompt per line; a list of prompts is not supported "
                              "in a batch file (split it into separate lines)")
    raise _FieldError("prompt: must be a string or a list of non-negative token ids")


class LineParser:
    """``parse_line`` plus duplicate detection: a custom_id already seen on an earlier line
    (valid or not) makes the later line a ``duplicate_custom_id`` error."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def parse(self, text: str, line_no: int) -> BatchItem:
        try:
            item = parse_line(text, line_no)
            cid: str | None = item.custom_id
            error = None
        except BatchLineError as exc:
            cid, item, error = exc.custom_id, None, exc
        if cid is not None:
            first = self._seen.setdefault(cid, line_no)
            if first != line_no:
                raise BatchLineError(line_no, cid, "duplicate_custom_id",
                                     f"custom_id: {cid!r} already used on line {first}")
        if error is not None:
            raise error
        return item


def error_from_request_error(line_no: int, custom_id: str | None, exc: RequestError) -> BatchLineError:
    """Map an engine ``RequestError`` (e.g. from ``add_request``) to a line error."""
    code = exc.code if exc.code in ERROR_CODES else "invalid_request"
    return BatchLineError(line_no, custom_id, code, str(exc))


# --------------------------------------------------------------------------- output


def usage_of(out: RequestOutput) -> dict:
    p, c = len(out.prompt_token_ids), len(out.token_ids)
    usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if out.num_cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": out.num_cached_tokens}
    return usage


def _lp(x: float) -> float:
    # JSON has no -inf; OpenAI reports -9999.0 for "impossible".
    return float(x) if math.isfinite(x) else -9999.0


def chat_logprobs(lps: list[TokenLogprob], decode: Callable[[int], str]) -> dict:
    def entry(tid: int, lp: float) -> dict:
        s = decode(tid)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

    content = []
    for t in lps:
        e = entry(t.token_id, t.logprob)
        e["top_logprobs"] = [entry(tid, lp) for tid, lp in t.top]
        content.append(e)
    return {"content": content, "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], decode: Callable[[int], str]) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for t in lps:
        s = decode(t.token_id)
        tokens.append(s)
        token_lps.append(_lp(t.logprob))
        tops.append({decode(tid): _lp(lp) for tid, lp in t.top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _default_decode(token_id: int) -> str:
    return f"token_id:{token_id}"


def build_output_line(item: BatchItem, out: RequestOutput, model_name: str, created: int,
                      decode: Callable[[int], str] | None = None) -> dict:
    """A 200 output line for a finished request. ``decode(token_id) -> str`` renders tokens
    in logprobs (default ``"token_id:<id>"``). ``model`` echoes the request's, else ``model_name``."""
    decode = decode or _default_decode
    model = item.model or model_name
    want_lps = item.params.logprobs is not None and out.logprobs is not None
    if item.is_chat:
        body = {"id": new_id("chatcmpl-"), "object": "chat.completion"}
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "logprobs": chat_logprobs(out.logprobs, decode) if want_lps else None}
    else:
        body = {"id": new_id("cmpl-"), "object": "text_completion"}
        choice = {"index": 0, "text": out.text,
                  "logprobs": completion_logprobs(out.logprobs, decode) if want_lps else None}
    choice["finish_reason"] = out.finish_reason
    body.update(created=int(created), model=model, choices=[choice], usage=usage_of(out))
    return {
        "id": new_id("batch_req_"),
        "custom_id": item.custom_id,
        "response": {"status_code": 200, "request_id": new_id("req_"), "body": body},
        "error": None,
    }


def build_error_line(custom_id: str | None, line_no: int, code: str, message: str) -> dict:
    """An error line; ``custom_id`` is None when the input line had no usable one."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message, "line": line_no}}
