"""The batch RPCs of ``hpcserve.api.v1.Serving`` over a ``BatchStore``. No torch.

Interface: ``BatchApi(store, policy=BatchPolicy())`` has the grpc.aio servicer
methods ``SubmitBatch``, ``GetBatch``, ``ListBatches``, ``CancelBatch`` (coroutines) and
``StreamBatchResults`` (an async generator); the daemon's servicer delegates to them with
``(request, context)`` unchanged. ``batch_to_proto(d)`` / ``batch_from_proto(pb)`` convert
between the store's OpenAI-shaped batch dict and ``serving_pb2.Batch``.

Tenancy: every call acts for ``current_principal()``'s tenant (``"default"`` when the server
has no auth interceptor, e.g. in tests): batches are created for it, and another tenant's batch
is NOT_FOUND exactly like an unknown id. ``daemon.batch_policy.BatchPolicy`` decides the rest:
the completion windows the site grants, which files a tenant may name by ``input_path``
(PERMISSION_DENIED otherwise) and its storage quota for inline inputs (RESOURCE_EXHAUSTED).

Lifecycle: one instance per daemon, sharing the daemon's store (created and ``recover()``-ed
by the daemon, which also runs the lines). Every store call runs in ``asyncio.to_thread``.
Errors reach the client as one status with a message naming the field and the fix:
unknown id -> NOT_FOUND; a bad completion_window / metadata / endpoint / input ->
INVALID_ARGUMENT; anything unexpected -> INTERNAL (logged here with its traceback, never
sent). ``StreamBatchResults`` without ``follow`` sends the stored lines in the files' order
(output lines, then error lines, each in input-line order) and ends; with ``follow`` it
sends lines in the order they were stored, polling every ``poll_interval_s`` (0.3 s), until
the batch is terminal and every line has been sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from hpcserve.api.auth import current_principal
from hpcserve.api.v1 import serving_pb2
from hpcserve.batch.openai_format import URLS
from hpcserve.daemon.batch_policy import BatchPolicy
from hpcserve.daemon.batches import TERMINAL, BatchNotFound, BatchStore
from hpcserve.errors import HpcserveError, RequestError

log = logging.getLogger("hpcserve.api.batch")

DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits
_PAGE = 500  # result lines read from the store per thread hop
_TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
               "expired_at", "cancelling_at", "cancelled_at")


class _Invalid(Exception):
    """An argument the client must fix: INVALID_ARGUMENT with this message."""


class BatchApi:
    """See the module docstring."""

    poll_interval_s = 0.3

    def __init__(self, store: BatchStore, policy: BatchPolicy | None = None):
        self.store = store
        self.policy = policy if policy is not None else BatchPolicy()

    # ---------------------------------------------------------------- helpers

    async def _run(self, context: grpc.aio.ServicerContext, method: str, fn: Callable[..., Any],
                   *args: Any, field: str = "batch_id", **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a thread; errors abort the call with one clear status."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except _Invalid as exc:
            code, msg = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except BatchNotFound as exc:
            code, msg = grpc.StatusCode.NOT_FOUND, (f"{field}: no batch with id {exc.batch_id!r} on this "
                                                    "daemon; `hpcserve status` lists the batches")
        except RequestError as exc:
            code, msg = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except HpcserveError as exc:  # AuthError (permission_denied), StorageQuotaExceeded (resource_exhausted)
            code = getattr(grpc.StatusCode, str(getattr(exc, "code", "")).upper(), grpc.StatusCode.FAILED_PRECONDITION)
            msg = str(exc)
        except Exception as exc:  # never a traceback to the client: log it here
            log.exception("%s failed", method)
            code = grpc.StatusCode.INTERNAL
            msg = (f"internal error in the daemon during {method} ({type(exc).__name__}: {exc}); "
                   "see the daemon's log")
        await context.abort(code, " ".join(msg.split()))

    @staticmethod
    async def _invalid(context: grpc.aio.ServicerContext, msg: str) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg)

    @staticmethod
    def _tenant() -> str:
        p = current_principal()
        return p.tenant if p is not None else "default"

    @staticmethod
    def _batch_id(request) -> str | None:
        return request.batch_id.strip() or None

    # ---------------------------------------------------------------- RPCs

    async def SubmitBatch(self, request: serving_pb2.SubmitBatchRequest,
                          context: grpc.aio.ServicerContext) -> serving_pb2.Batch:
        kind = request.WhichOneof("input")
        if kind is None:
            await self._invalid(context, "input: set input_jsonl (the JSONL content) or input_path "
                                         "(an absolute path the daemon can read)")
        endpoint = request.endpoint or None
        try:
            window = self.policy.window(request.completion_window)
            if endpoint is not None and endpoint not in URLS:
                raise _Invalid(f"endpoint: must be {' or '.join(URLS)}, or empty to take it from the "
                               f"lines' url; got {endpoint!r}")
            metadata = check_metadata(dict(request.metadata))
        except (RequestError, _Invalid) as exc:
            msg = str(exc)
        else:
            msg = None
        if msg is not None:
            await self._invalid(context, msg)

        principal = current_principal()
        tenant = principal.tenant if principal is not None else "default"
        quota = self.policy.quota_bytes(principal)

        def create() -> dict:
            if kind == "input_jsonl":
                return self.store.create_batch(request.input_jsonl, window, metadata, endpoint=endpoint,
                                               tenant=tenant, quota_bytes=quota)
            f, name = self.policy.open_input(principal, request.input_path)
            return self.store.create_batch(f, window, metadata, endpoint=endpoint, tenant=tenant, input_name=name)

        return batch_to_proto(await self._run(context, "SubmitBatch", create))

    async def GetBatch(self, request: serving_pb2.GetBatchRequest,
                       context: grpc.aio.ServicerContext) -> serving_pb2.Batch:
        batch_id = self._batch_id(request)
        if batch_id is None:
            await self._invalid(context, "batch_id: required (the batch_... id SubmitBatch returned)")
        return batch_to_proto(await self._run(context, "GetBatch", self.store.get_batch, batch_id,
                                              tenant=self._tenant()))

    async def ListBatches(self, request: serving_pb2.ListBatchesRequest,
                          context: grpc.aio.ServicerContext) -> serving_pb2.ListBatchesResponse:
        limit = request.limit or DEFAULT_LIST_LIMIT
        if not 1 <= limit <= MAX_LIST_LIMIT:
            await self._invalid(context, f"limit: must be 1..{MAX_LIST_LIMIT} (0 = {DEFAULT_LIST_LIMIT}), "
                                         f"got {request.limit}")
        after = request.after.strip() or None
        rows = await self._run(context, "ListBatches", self.store.list_batches, limit + 1, after, field="after",
                               tenant=self._tenant())
        return serving_pb2.ListBatchesResponse(batches=[batch_to_proto(d) for d in rows[:limit]],
                                               has_more=len(rows) > limit)

    async def CancelBatch(self, request: serving_pb2.CancelBatchRequest,
                          context: grpc.aio.ServicerContext) -> serving_pb2.Batch:
        batch_id = self._batch_id(request)
        if batch_id is None:
            await self._invalid(context, "batch_id: required (the batch_... id SubmitBatch returned)")
        return batch_to_proto(await self._run(context, "CancelBatch", self.store.cancel_batch, batch_id,
                                              tenant=self._tenant()))

    async def StreamBatchResults(self, request: serving_pb2.StreamBatchResultsRequest,
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[serving_pb2.BatchResultLine]:
        batch_id = self._batch_id(request)
        if batch_id is None:
            await self._invalid(context, "batch_id: required (the batch_... id SubmitBatch returned)")
        name, tenant = "StreamBatchResults", self._tenant()
        if not request.follow:
            rows = await self._run(context, name, self.store.result_rows, batch_id, tenant=tenant)
            while page := await self._run(context, name, lambda: list(itertools.islice(rows, _PAGE))):
                for custom_id, text, is_error in page:
                    yield serving_pb2.BatchResultLine(custom_id=custom_id or "", json=text, is_error=is_error)
            return
        seq = 0
        while True:
            # Status first: once it is terminal no line can change, so draining after it is complete.
            status = (await self._run(context, name, self.store.get_batch, batch_id, tenant=tenant))["status"]
            while True:
                page = await self._run(context, name, self.store.result_rows_after, batch_id, seq, _PAGE,
                                       tenant=tenant)
                for _, custom_id, text, is_error in page:
                    yield serving_pb2.BatchResultLine(custom_id=custom_id or "", json=text, is_error=is_error)
                if page:
                    seq = page[-1][0]
                if len(page) < _PAGE:
                    break
            if status in TERMINAL:
                return
            await asyncio.sleep(self.poll_interval_s)


def check_metadata(md: object) -> dict[str, str] | None:
    """OpenAI's metadata limits (shared by the gRPC and HTTP batch APIs); RequestError naming the field."""
    if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise RequestError("metadata: must be an object of string keys and string values", field="metadata")
    if len(md) > MAX_METADATA_PAIRS:
        raise RequestError(f"metadata: at most {MAX_METADATA_PAIRS} key/value pairs, got {len(md)}",
                           field="metadata")
    for k, v in md.items():
        if not 1 <= len(k) <= MAX_METADATA_KEY:
            raise RequestError(f"metadata: keys must be 1..{MAX_METADATA_KEY} characters, got {k[:80]!r}",
                               field="metadata")
        if len(v) > MAX_METADATA_VALUE:
            raise RequestError(f"metadata: the value of {k!r} is longer than {MAX_METADATA_VALUE} characters",
                               field="metadata")
    return md or None


# -------------------------------------------------------------------- conversions

def batch_to_proto(d: dict) -> serving_pb2.Batch:
    """The store's batch dict (OpenAI field names) as a ``serving_pb2.Batch``."""
    pb = serving_pb2.Batch(
        id=d["id"], status=serving_pb2.BatchStatus.Value("BATCH_STATUS_" + d["status"].upper()),
        endpoint=d.get("endpoint") or "", completion_window=d.get("completion_window") or "",
        input_file=d.get("input_file") or "", output_file=d.get("output_file") or "",
        error_file=d.get("error_file") or "", metadata={str(k): str(v) for k, v in (d.get("metadata") or {}).items()},
        **{k: int(d.get(k) or 0) for k in _TIMESTAMPS})
    rc = d.get("request_counts") or {}
    pb.request_counts.CopyFrom(serving_pb2.BatchRequestCounts(
        total=rc.get("total", 0), completed=rc.get("completed", 0), failed=rc.get("failed", 0)))
    errors = d.get("errors")
    for e in (errors.get("data") if isinstance(errors, dict) else errors) or ():
        err = serving_pb2.BatchError(code=str(e.get("code") or ""), message=str(e.get("message") or ""))
        if e.get("line") is not None:
            err.line = int(e["line"])
        pb.errors.append(err)
    usage = d.get("usage") or {}
    inp, out = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
    pb.usage.CopyFrom(serving_pb2.BatchUsage(input_tokens=inp, output_tokens=out, total_tokens=inp + out))
    return pb


def batch_from_proto(pb: serving_pb2.Batch) -> dict:
    """A ``serving_pb2.Batch`` as an OpenAI Batch object (unset times and files are None)."""
    errors = [{"code": e.code, "message": e.message, "param": None, "line": e.line if e.HasField("line") else None}
              for e in pb.errors]
    d: dict[str, Any] = {
        "id": pb.id, "object": "batch", "endpoint": pb.endpoint or None,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file": pb.input_file or None, "completion_window": pb.completion_window or None,
        "status": serving_pb2.BatchStatus.Name(pb.status).removeprefix("BATCH_STATUS_").lower(),
        "output_file": pb.output_file or None, "error_file": pb.error_file or None,
    }
    d.update({k: getattr(pb, k) or None for k in _TIMESTAMPS})
    d["request_counts"] = {"total": pb.request_counts.total, "completed": pb.request_counts.completed,
                           "failed": pb.request_counts.failed}
    d["metadata"] = dict(pb.metadata) or None
    d["usage"] = {"input_tokens": pb.usage.input_tokens, "output_tokens": pb.usage.output_tokens,
                  "total_tokens": pb.usage.input_tokens + pb.usage.output_tokens}
    return d
