"""Bearer-token authentication of the public gRPC API. No torch.

Interface: ``TokenAuthInterceptor(token)`` is a ``grpc.aio.ServerInterceptor``; pass it to
``grpc.aio.server(interceptors=[...])``. Calls to methods under ``/hpcserve.api.v1.Serving/``
must carry the metadata ``authorization: Bearer <token>`` (compared in constant time);
otherwise they end with UNAUTHENTICATED and a message saying where clients find the token.
Every other service passes through untouched: gRPC health and reflection, and
``/hpcserve.api.v1.WorkerLink/`` (workers authenticate in-band with their Hello secret).
Works for unary and streaming handlers (a rejected call keeps its handler's kind).

Lifecycle: the daemon creates one with the token it writes into ``endpoint.json``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

PROTECTED_PREFIXES = ("/hpcserve.api.v1.Serving/",)
UNAUTHENTICATED_MESSAGE = ("missing or wrong token: clients read it from the daemon's endpoint.json "
                           "(--state-dir) or HPCSERVE_TOKEN")


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


async def _reject(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (and (de)serializers) that aborts with UNAUTHENTICATED."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_reject, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_reject, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_reject, **kw)
    return grpc.stream_stream_rpc_method_handler(_reject, **kw)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """See the module docstring."""

    def __init__(self, token: str, protected_prefixes: tuple[str, ...] = PROTECTED_PREFIXES):
        if not token:
            raise ValueError("TokenAuthInterceptor needs a non-empty token")
        self._token = token.encode("utf-8")
        self._prefixes = tuple(protected_prefixes)

    def is_authorized(self, metadata: Iterable[Any] | None) -> bool:
        token = bearer_token(metadata)
        return token is not None and hmac.compare_digest(token.encode("utf-8"), self._token)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(self._prefixes):
            return handler
        if self.is_authorized(handler_call_details.invocation_metadata):
            return handler
        return _rejecting(handler)
