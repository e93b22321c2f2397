"""API-key authentication of the public gRPC API: every call is made by a tenant. No torch.

Interface: ``TenantAuthInterceptor(tenants)`` is a ``grpc.aio.ServerInterceptor``; pass it to
``grpc.aio.server(interceptors=[...])``. Calls to methods under ``/hpcserve.api.v1.Serving/``
must carry the metadata ``authorization: Bearer <key>``; the key is looked up with
``tenants.authenticate`` (``hpcserve.daemon.tenants.Tenants``: the hashed keys file plus the
key the daemon minted for endpoint.json). A missing, unknown or revoked key ends the call
with UNAUTHENTICATED and a message saying where keys come from. Inside an accepted call,
``current_principal()`` returns the caller's ``Principal`` (tenant, key id, policy): the
interceptor wraps the handler so the principal is set in the handler's own context, for
unary and streaming handlers alike.

Every other service passes through untouched: gRPC health and reflection, and
``/hpcserve.api.v1.WorkerLink/`` (workers authenticate in-band with their per-launch secret).

``abort_with(context, ApiError)`` ends a call with the error's status; RESOURCE_EXHAUSTED
carries a ``retry-after`` trailer (whole seconds), like HTTP's Retry-After header.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

PROTECTED_PREFIXES = ("/hpcserve.api.v1.Serving/",)
_principal: contextvars.ContextVar = contextvars.ContextVar("hpcserve_principal", default=None)


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, if any."""
    for item in metadata or ():
        key, value = item[0], item[1]
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def current_principal():
    """The ``Principal`` of the call being served (None outside an authenticated call)."""
    return _principal.get()


async def abort_with(context: grpc.aio.ServicerContext, err) -> None:
    """End the call with ``err`` (an ``admission.ApiError``)."""
    code = getattr(grpc.StatusCode, err.code.upper(), grpc.StatusCode.INTERNAL)
    trailers = ()
    if err.retry_after_s is not None:
        trailers = (("retry-after", str(max(1, math.ceil(err.retry_after_s)))),)
    await context.abort(code, " ".join(err.message.split()), trailing_metadata=trailers)


def _wrap(handler: grpc.RpcMethodHandler, authenticate: Callable[[grpc.aio.ServicerContext], Awaitable[Any]]):
    """A handler of the same kind that authenticates first and runs the original with the principal set."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request, context):
            token = _principal.set(await authenticate(context))
            try:
                return await inner(request, context)
            finally:
                _principal.reset(token)
        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(unary, **kw)
    inner = handler.unary_stream or handler.stream_stream

    async def streaming(request, context):
        token = _principal.set(await authenticate(context))
        try:
            async for item in inner(request, context):
                yield item
        finally:
            _principal.reset(token)
    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return make(streaming, **kw)


class TenantAuthInterceptor(grpc.aio.ServerInterceptor):
    """See the module docstring."""

    def __init__(self, tenants, protected_prefixes: tuple[str, ...] = PROTECTED_PREFIXES):
        self.tenants = tenants
        self._prefixes = tuple(protected_prefixes)

    async def _authenticate(self, context: grpc.aio.ServicerContext):
        from hpcserve.api.admission import api_error
        from hpcserve.errors import HpcserveError

        try:
            return self.tenants.authenticate(bearer_token(context.invocation_metadata()))
        except HpcserveError as exc:
            await abort_with(context, api_error(exc))

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(self._prefixes):
            return handler
        return _wrap(handler, self._authenticate)
