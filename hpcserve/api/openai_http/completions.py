"""``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI bodies in, OpenAI
responses out, streamed as server-sent events or returned whole. No torch.

Lifecycle of one request::

    read JSON → ``parse_request_body`` (the batch-line rules plus stream / stream_options)
    → ``Admission.admit`` (model, tenant, limits, router.submit; interactive class, capped by
    the tenant's priority) → stream: ``data: <chunk>`` per output with tokens (the first also
    carries the role), a last chunk with finish_reason and timings, an optional usage chunk (``stream_options.include_usage``), ``data: [DONE]``;
    not streamed: one ``chat.completion`` / ``text_completion`` object (the same builder as
    batch output lines) → ``Admitted.close()``.

Nothing is streamed before the first token: a chat's ``role`` rides on the chunk of its first
token (clients measure TTFT from the first chunk with choices). The server's own timings
(``daemon.token_times``: arrival, first and last token times from the engine's clock, TTFT and
ITL) come as ``timings`` on the chunk that finishes a choice, and as ``usage.timings`` in the
usage chunk and in whole responses (a list in choice order when n > 1).

``n`` (1..16) samples of one prompt are ``n`` router requests under one tenant lease: choices
with ``index`` 0..n-1, streamed interleaved as they come. A client that disconnects cancels the handler (aiohttp ``handler_cancellation``), and closing
the admission aborts the request on its replica. An error after the stream started (a lost
worker step) is sent as a final ``data: {"error": ...}`` event, which the openai SDK raises.
A ``max_tokens`` left out means what is left of the context, at most 1024 (as over gRPC).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from aiohttp import web

from hpcserve.api.admission import ApiError, api_error
from hpcserve.api.convert import logprobs_from_proto
from hpcserve.api.openai_http.server import error_event, read_json
from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.batch.openai_format import (
    CHAT_URL,
    COMPLETIONS_URL,
    build_output_line,
    chat_logprobs,
    completion_logprobs,
    new_id,
    parse_request_body,
)
from hpcserve.engine.outputs import RequestOutput
from hpcserve.errors import RequestError

DEFAULT_MAX_TOKENS = 1024
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post(CHAT_URL, chat_completions)
    router.add_post(COMPLETIONS_URL, completions)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CHAT_URL)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, COMPLETIONS_URL)


async def _serve(request: web.Request, url: str) -> web.StreamResponse:
    gw = request.app["gateway"]
    adm_core, frontend = gw.admission, gw.admission.frontend
    body = await read_json(request)
    try:
        item, stream, include_usage, n = parse_request_body(url, body)
    except RequestError as exc:
        raise api_error(exc) from None
    if "model" not in body:
        raise ApiError("invalid_argument", "model: required; GET /v1/models lists the served model", param="model")

    def make_params(num_prompt_tokens: int):
        if not item.max_tokens_defaulted:
            return item.params
        return dataclasses.replace(item.params,
                                   max_tokens=frontend.default_max_tokens(num_prompt_tokens, DEFAULT_MAX_TOKENS))

    choices = await adm_core.admit_n(request["principal"], item.model,
                                     item.messages if item.is_chat else item.prompt, make_params,
                                     pb.REQUEST_CLASS_INTERACTIVE, None, n, chat=item.is_chat)
    try:
        if stream:
            return await _stream(request, gw, item, choices, include_usage)
        return await _whole(gw, item, choices)
    finally:
        for c in choices:
            c.close()


async def _collect(admitted) -> str:
    reason = "stop"
    async for ev in admitted.events():
        if ev.is_finished:
            reason = _FINISH.get(ev.finish_reason, "stop")
    return reason


async def _whole(gw, item, choices) -> web.Response:
    reasons = await asyncio.gather(*(_collect(c) for c in choices))
    decode, body = gw.admission.frontend.decode_token, None
    for i, (adm, reason) in enumerate(zip(choices, reasons)):
        inf = adm.inf
        out = RequestOutput(req_id=inf.req_id, prompt_token_ids=inf.prompt_ids, token_ids=inf.token_ids,
                            text="".join(inf.text), new_token_ids=[], new_text="", finished=True,
                            finish_reason=reason, num_cached_tokens=inf.num_cached_tokens,
                            logprobs=inf.logprobs if item.params.logprobs is not None else None)
        one = build_output_line(item, out, gw.admission.model_name, int(time.time()), decode)["response"]["body"]
        if body is None:
            body = one
        else:  # n > 1: the other samples are more choices; the prompt is counted once
            one["choices"][0]["index"] = i
            body["choices"].append(one["choices"][0])
            u = body["usage"]
            u["completion_tokens"] += one["usage"]["completion_tokens"]
            u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
    body["usage"]["timings"] = _usage_timings(choices)
    return web.json_response(body)


def _timings(admitted) -> dict | None:
    """The server's token timings of one choice (``daemon.token_times``)."""
    times = admitted.inf.times
    return times.as_dict() if times is not None else None


def _usage_timings(choices) -> dict | list | None:
    """``usage.timings``: the one choice's timings, or a list in choice order when n > 1."""
    return _timings(choices[0]) if len(choices) == 1 else [_timings(c) for c in choices]


async def _stream(request: web.Request, gw, item, choices, include_usage: bool) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    chat = item.is_chat
    rid, created = new_id("chatcmpl-" if chat else "cmpl-"), int(time.time())
    model = item.model or gw.admission.model_name
    decode = gw.admission.frontend.decode_token
    want_lps = item.params.logprobs is not None

    def chunk(choice: dict | None, usage: dict | None = None, timings: dict | None = None) -> bytes:
        obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
               "model": model, "choices": [choice] if choice is not None else []}
        if usage is not None:
            obj["usage"] = usage
        if timings is not None:
            obj["timings"] = timings
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    started: set[int] = set()  # choices whose first chunk went out

    def choice_of(i: int, ev) -> dict | None:
        reason = _FINISH.get(ev.finish_reason, "stop") if ev.is_finished else None
        if not ev.new_text and not ev.new_token_ids and reason is None:
            return None
        lps = None
        if want_lps and ev.new_logprobs:
            lp = logprobs_from_proto(ev.new_logprobs)
            lps = chat_logprobs(lp, decode) if chat else completion_logprobs(lp, decode)
        if chat:
            delta = {"content": ev.new_text} if ev.new_text or reason is None else {}
            if i not in started:  # the role rides on the first token's chunk: nothing goes out before it
                delta = {"role": "assistant", "content": ev.new_text}
            started.add(i)
            return {"index": i, "delta": delta, "logprobs": lps, "finish_reason": reason}
        return {"index": i, "text": ev.new_text, "logprobs": lps, "finish_reason": reason}

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, adm) -> None:
        try:
            async for ev in adm.events():
                queue.put_nowait((i, ev))
        except ApiError as exc:
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    pumps = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
    try:
        open_choices = len(choices)
        while open_choices:
            i, ev = await queue.get()
            if ev is None:
                open_choices -= 1
                continue
            if isinstance(ev, ApiError):
                await resp.write(error_event(ev))
                break
            choice = choice_of(i, ev)
            if choice is not None:
                await resp.write(chunk(choice, timings=_timings(choices[i]) if ev.is_finished else None))
        else:
            if include_usage:
                n_in = choices[0].prompt_len
                n_out = sum(c.num_output_tokens for c in choices)
                await resp.write(chunk(None, {"prompt_tokens": n_in, "completion_tokens": n_out,
                                              "total_tokens": n_in + n_out, "timings": _usage_timings(choices)}))
    finally:
        for t in pumps:
            t.cancel()
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
