"""The aiohttp application of the OpenAI-compatible API: auth, errors, models, health. No torch.

Interface: ``HttpGateway(admission, store, policy=BatchPolicy())``;
``await start(host, port, ssl_context=None) -> bound port``; ``await stop()``. Handlers read
the caller's ``Principal`` from ``request["principal"]`` (set by the auth middleware) and raise
``ApiError`` for anything the client must fix; the error middleware turns it (and any
unexpected exception, logged here with its traceback) into OpenAI's error body. See the
package docstring for the routes.
"""

from __future__ import annotations

import json
import logging
import math
import time

from aiohttp import web

from hpcserve.api.admission import HTTP_STATUS, ApiError, api_error
from hpcserve.errors import HpcserveError

log = logging.getLogger("hpcserve.http")

MAX_BODY_BYTES = 32 << 20  # JSON bodies; file uploads stream past this (their own limit is the store's)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable_error"}
_CODES = {401: "invalid_api_key", 404: "not_found", 413: "storage_quota_exceeded", 429: "rate_limit_exceeded",
          503: "unavailable"}


def error_response(err: ApiError) -> web.Response:
    status = err.http_status or HTTP_STATUS.get(err.code, 500)
    code = _CODES.get(status)
    if status == 429 and "quota" in err.message:
        code = "insufficient_quota"
    if status == 404 and err.param == "model":
        code = "model_not_found"
    body = {"error": {"message": " ".join(err.message.split()), "type": _TYPES.get(status, "server_error"),
                      "param": err.param, "code": code}}
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="hpcserve"'
    return web.json_response(body, status=status, headers=headers)


def error_event(err: ApiError) -> bytes:
    """An SSE event carrying an error (a stream that already started cannot change its status)."""
    body = {"error": {"message": err.message, "type": _TYPES.get(HTTP_STATUS.get(err.code, 500), "server_error"),
                      "param": err.param, "code": err.code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def read_json(request: web.Request) -> dict:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError("invalid_argument", f"body: not valid JSON ({exc}); send a JSON object with "
                       "Content-Type: application/json") from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError("invalid_argument", f"body: larger than {MAX_BODY_BYTES >> 20} MiB") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_argument", "body: must be a JSON object", param="body")
    return body


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class HttpGateway:
    """See the module docstring."""

    def __init__(self, admission, store, policy=None) -> None:
        from hpcserve.api.openai_http import batches, completions
        from hpcserve.daemon.batch_policy import BatchPolicy

        self.admission = admission
        self.store = store
        self.policy = policy if policy is not None else BatchPolicy()
        self.app = web.Application(middlewares=[self._errors, self._auth], client_max_size=MAX_BODY_BYTES)
        self.app["gateway"] = self
        r = self.app.router
        r.add_get("/health", self.health)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model_id:.+}", self.model)
        completions.add_routes(r)
        batches.add_routes(r)
        self._runner: web.AppRunner | None = None
        self.created = time.time()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int, ssl_context=None) -> int:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise HpcserveError(f"daemon.http: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                                "set --http HOST:PORT to a free address, e.g. 127.0.0.1:0") from None
        return self._runner.addresses[0][1]  # the bound port (port 0 = any free one)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ middlewares
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc)
        except HpcserveError as exc:
            return error_response(api_error(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(ApiError(
                {404: "not_found", 405: "invalid_argument", 413: "invalid_argument"}.get(exc.status, "invalid_argument"),
                f"{request.method} {request.path}: {exc.reason}" + (
                    "; see /v1/models, /v1/chat/completions, /v1/completions, /v1/files, /v1/batches"
                    if exc.status in (404, 405) else "")))
        except Exception as exc:  # never a traceback to the client: log it here
            log.exception("%s %s failed", request.method, request.path)
            return error_response(ApiError("internal", f"internal error in the daemon ({type(exc).__name__}); "
                                                       "see the daemon's log"))

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.path == "/health":
            return await handler(request)
        try:
            request["principal"] = self.admission.tenants.authenticate(_bearer(request))
        except HpcserveError as exc:
            raise api_error(exc) from None
        return await handler(request)

    # ------------------------------------------------------------------ models, health
    def _model_object(self) -> dict:
        return {"id": self.admission.model_name, "object": "model", "created": int(self.created),
                "owned_by": "hpcserve", "max_model_len": self.admission.frontend.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        try:
            self.admission.check_model(request["principal"], None)
            data = [self._model_object()]
        except ApiError:
            data = []  # the tenant may use no model served here
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        self.admission.check_model(request["principal"], request.match_info["model_id"])
        return web.json_response(self._model_object())

    async def health(self, request: web.Request) -> web.Response:
        ready = self.admission.router.is_ready and not self.admission.draining
        return web.json_response({"status": "ok" if ready else "unavailable"}, status=200 if ready else 503)
