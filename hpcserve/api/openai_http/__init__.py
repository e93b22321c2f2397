"""OpenAI-compatible HTTP API of the daemon (aiohttp, on the daemon's event loop). No torch.

Routes (all under ``/v1``, all need ``Authorization: Bearer <key>``)::

    GET  /v1/models, /v1/models/{id}                    models the tenant may use
    POST /v1/chat/completions, /v1/completions          streamed (SSE) or not     (completions.py)
    POST /v1/files  GET /v1/files[/{id}[/content]]  DELETE /v1/files/{id}          (batches.py)
    POST /v1/batches  GET /v1/batches[/{id}]  POST /v1/batches/{id}/cancel        (batches.py)
    GET  /health                                        200 when the workers are ready (no auth)

Chat and completions go through ``api.admission.Admission``, the same path as the gRPC
servicer (one router, one scheduler); files and batches use the daemon's batch store, scoped
to the caller's tenant (another tenant's id is 404 like an unknown one). Fields, statuses and
error bodies (``{"error": {"message", "type", "param", "code"}}``) follow OpenAI's; 429s carry
``Retry-After``.

Lifecycle: ``gw = HttpGateway(admission, store, batch_policy)``; ``await
gw.start(host, port, ssl_context)`` returns the bound port; ``await gw.stop()``.
"""

from hpcserve.api.openai_http.server import HttpGateway

__all__ = ["HttpGateway"]
