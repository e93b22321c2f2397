"""Admission of chat and completion streams, shared by the gRPC servicer and the OpenAI HTTP
gateway, so both front ends feed the same router and scheduler with the same rules. No torch.

Interface::

    adm = Admission(router, frontend, tenants, limiter, model_name, model_path, max_prompt_bytes=...,
                    max_prompt_tokens=...)
    admitted = await adm.admit(principal, model, prompt, make_params, request_class, req_id, chat=...)
    try:
        async for out in admitted.events():   # the replica's RequestStepOutput messages
            ...
    finally:
        admitted.close()                      # aborts if unfinished; ends the tenant's lease

Lifecycle of ``admit`` (cheap checks first: a refused request costs the daemon almost nothing)::

    model served here? → tenant may use it? → daemon draining? → prompt size in bytes
    (daemon.max-prompt-bytes) → tenant limits as they stand (Limiter.precheck: streams, requests
    per minute, a full tokens-per-minute window, daily quota) → workers ready (≤ ready_wait_s)
    → chat template / tokenizer in a small thread pool (never on the event loop)
    → make_params(num_prompt_tokens) → context length and daemon.max-prompt-tokens
    → tenant's priority cap → tenant limits (Limiter.admit: the same plus this request's tokens,
    est. prompt + max_tokens; charged) → router.submit(tenant=...)

Errors are ``ApiError(code, message, retry_after_s)`` with ``code`` one of ``CODES`` (gRPC
status names in lower case); each front end maps them to its statuses (``GRPC_STATUS``,
``HTTP_STATUS``). Messages name the field or limit and the fix.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.errors import HpcserveError, RequestError

READY_WAIT_S = 30.0
CODES = ("invalid_argument", "not_found", "already_exists", "unavailable", "unauthenticated",
         "permission_denied", "resource_exhausted", "failed_precondition", "internal")
HTTP_STATUS = {"invalid_argument": 400, "not_found": 404, "already_exists": 409, "unavailable": 503,
               "unauthenticated": 401, "permission_denied": 403, "resource_exhausted": 429,
               "failed_precondition": 400, "internal": 500}


class ApiError(HpcserveError):
    """A request failed; ``code`` is one of ``CODES``. ``param`` names the offending field."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None, param: str | None = None,
                 http_status: int | None = None):
        super().__init__(message)
        self.code = code if code in CODES else "internal"
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param
        self.http_status = http_status  # overrides HTTP_STATUS[code] (e.g. 413 for a storage quota)


def api_error(exc: Exception) -> ApiError:
    """Map the package's errors to an ``ApiError`` (RequestError, tenants.AuthError)."""
    if isinstance(exc, ApiError):
        return exc
    code = getattr(exc, "code", None)
    if isinstance(exc, RequestError):
        mapped = {"already_exists": "already_exists", "unavailable": "unavailable"}.get(code, "invalid_argument")
        return ApiError(mapped, str(exc), param=exc.field)
    if code in CODES:  # AuthError: unauthenticated | permission_denied | resource_exhausted; StorageQuotaExceeded
        return ApiError(code, str(exc), retry_after_s=getattr(exc, "retry_after_s", None),
                        http_status=getattr(exc, "http_status", None))
    return ApiError("internal", str(exc))


@dataclass
class Admitted:
    """One admitted stream: the router's ``Inflight`` plus the tenant's lease."""

    inf: object
    lease: object
    prompt_len: int
    router: object
    is_finished: bool = field(default=False)
    is_closed: bool = field(default=False)

    async def events(self):
        """The replica's outputs until the request finishes. A lost replica or an engine failure
        raises ``ApiError`` (unavailable / internal); the last output has ``is_finished``."""
        from hpcserve.daemon.router import StreamError

        async for ev in self.inf.events():
            if isinstance(ev, StreamError):
                raise ApiError(ev.code.name.lower(), ev.message)
            if ev.is_finished:
                self.is_finished = True
                if ev.finish_reason == pb.FINISH_REASON_ERROR:
                    raise ApiError("internal", ev.error_message or "the replica failed the request")
            yield ev

    @property
    def num_output_tokens(self) -> int:
        return len(self.inf.token_ids)

    def close(self) -> None:
        """Abort the request if it has not finished (client gone, error) and end the lease. Idempotent."""
        if self.is_closed:
            return
        self.is_closed = True
        if not self.is_finished:
            self.router.abort(self.inf.req_id)
        self.lease.finish(self.prompt_len + self.num_output_tokens)


class _GroupLease:
    """One tenant lease shared by the ``n`` requests of one call: ends when all of them have,
    with the prompt counted once and every sample's output tokens."""

    def __init__(self, lease, n: int, prompt_len: int) -> None:
        self.lease, self.left, self.prompt_len, self.tokens = lease, n, prompt_len, prompt_len

    def finish(self, actual_tokens: int | None = None) -> None:
        self.left -= 1
        self.tokens += max(0, (actual_tokens or self.prompt_len) - self.prompt_len)
        if self.left == 0:
            self.lease.finish(self.tokens)


def prompt_bytes(prompt: str | list) -> int:
    """Size of a prompt as sent, in bytes of UTF-8 text: a string, or chat messages (their contents
    and roles); a token-id list has no text (0; the token cap applies to it)."""
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass"))
    return sum(len(str(m.get("content", "")).encode("utf-8", "surrogatepass")) + len(str(m.get("role", "")))
               for m in prompt if isinstance(m, dict))


class Admission:
    """See the module docstring. ``draining`` is set by the daemon when it stops."""

    def __init__(self, router, frontend, tenants, limiter, model_name: str, model_path: str,
                 ready_wait_s: float = READY_WAIT_S, max_prompt_bytes: int = 4 << 20,
                 max_prompt_tokens: int = 0, tokenizer_threads: int = 2) -> None:
        self.router = router
        self.frontend = frontend
        self.tenants = tenants
        self.limiter = limiter
        self.model_name = model_name
        self.model_path = model_path
        self.ready_wait_s = ready_wait_s
        self.max_prompt_bytes = max_prompt_bytes
        self.max_prompt_tokens = max_prompt_tokens  # 0: the context length is the only cap
        self.draining = False
        # chat templates and tokenizers run here, never on the event loop (a large prompt would stall
        # every stream); a small pool, so a flood queues instead of taking every core
        self._tokenizer = ThreadPoolExecutor(max_workers=tokenizer_threads, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    def check_model(self, principal, model: str | None) -> None:
        """``model`` (empty = the served one) must be served here and allowed for the tenant."""
        if model and model not in (self.model_name, self.model_path):
            raise ApiError("not_found", f"model: {model!r} is not served here; this server serves "
                           f"{self.model_name!r} (GET /v1/models lists it)", param="model")
        try:
            self.tenants.check_model(principal, self.model_name)
        except HpcserveError as exc:
            raise api_error(exc) from None

    async def admit(self, principal, model: str | None, prompt: str | list, make_params: Callable[[int], object],
                    request_class: int, req_id: str | None, chat: bool = False) -> Admitted:
        return (await self.admit_n(principal, model, prompt, make_params, request_class, req_id, 1, chat=chat))[0]

    async def admit_n(self, principal, model: str | None, prompt: str | list, make_params: Callable[[int], object],
                      request_class: int, req_id: str | None, n: int, chat: bool = False) -> list[Admitted]:
        """``n`` samples of one prompt (OpenAI's ``n``): one tenant request (one lease, estimated at
        prompt + n x max_tokens), ``n`` router requests; sample i of a seeded request uses seed + i.
        ``prompt``: chat messages (``chat``), or a completion prompt (text or token ids)."""
        self.check_model(principal, model)
        if self.draining:
            raise ApiError("unavailable", "the server is shutting down; retry on its next start")
        self._check_size(prompt, chat)
        try:
            self.limiter.precheck(principal.tenant)  # before any work for an over-limit tenant
        except HpcserveError as exc:
            raise api_error(exc) from None
        if not await self.router.wait_ready(self.ready_wait_s):
            raise ApiError("unavailable", self.not_ready_message())
        try:
            ids = await self._tokenize(prompt, chat)
            params = make_params(len(ids))
            self.frontend.check_length(len(ids), params)
            if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
                raise ApiError("invalid_argument", f"prompt: {len(ids)} tokens, more than this server takes per "
                               f"request (daemon.max-prompt-tokens = {self.max_prompt_tokens}); shorten it",
                               param="prompt")
            asked = "batch" if request_class == pb.REQUEST_CLASS_BATCH else "interactive"
            cls = pb.REQUEST_CLASS_BATCH if self.tenants.priority_class(principal, asked) == "batch" \
                else pb.REQUEST_CLASS_INTERACTIVE
            lease = self.limiter.admit(principal.tenant, len(ids) + n * params.max_tokens)
        except HpcserveError as exc:
            raise api_error(exc) from None
        group = _GroupLease(lease, n, len(ids)) if n > 1 else lease
        out: list[Admitted] = []
        try:
            for i in range(n):
                p = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                rid = req_id if n == 1 or req_id is None else f"{req_id}-{i}"
                out.append(Admitted(self.router.submit(rid, ids, p, cls, tenant=principal.tenant), group, len(ids),
                                    self.router))
        except HpcserveError as exc:
            for a in out:
                a.close()
            for _ in range(n - len(out)):
                group.finish(len(ids))
            raise api_error(exc) from None
        return out

    def _check_size(self, prompt: str | list, chat: bool) -> None:
        """The caps that need no tokenizer: bytes of text, and the length of a token-id prompt."""
        size = prompt_bytes(prompt)
        if size > self.max_prompt_bytes:
            raise ApiError("invalid_argument", f"{'messages' if chat else 'prompt'}: {size} bytes, more than this "
                           f"server takes per request (daemon.max-prompt-bytes = {self.max_prompt_bytes}); shorten it",
                           param="messages" if chat else "prompt")
        if not chat and isinstance(prompt, list) and self.max_prompt_tokens and len(prompt) > self.max_prompt_tokens:
            raise ApiError("invalid_argument", f"prompt: {len(prompt)} tokens, more than this server takes per "
                           f"request (daemon.max-prompt-tokens = {self.max_prompt_tokens}); shorten it",
                           param="prompt")

    async def _tokenize(self, prompt: str | list, chat: bool) -> list[int]:
        fn = self.frontend.apply_chat_template if chat else self.frontend.tokenize
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer, fn, prompt)

    def not_ready_message(self) -> str:
        pool = self.router.pool
        if pool is not None and pool.fatal:
            return f"the worker ranks are down: {pool.fatal}"
        return (f"the worker ranks are not ready after {self.ready_wait_s:.0f} s (still loading the model, or "
                "relaunching); retry shortly and see `hpcserve status`")

