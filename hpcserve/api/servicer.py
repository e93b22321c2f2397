"""The public ``hpcserve.api.v1.Serving`` servicer of the daemon (grpc.aio). No torch.

Chat / Complete lifecycle (one handler coroutine per stream)::

    validate (model, roles) → wait for ready workers (≤ READY_WAIT_S) → tokenize (chat
    template) → sampling params with server defaults → context-length check →
    router.submit → relay each replica output as a chunk → last chunk: finish_reason + usage

Errors reach clients as gRPC statuses with one line naming the field and the fix:
INVALID_ARGUMENT (bad field, prompt too long), ALREADY_EXISTS (request id in flight),
UNAVAILABLE (workers starting/relaunching/failed mid-stream, daemon draining), INTERNAL
(the replica rejected the request). A stream that ends early for any reason (client
cancel, disconnect, error) aborts its request on the replica, which frees its KV blocks.

Batch RPCs are delegated to ``api.batch_api.BatchApi``; submits and cancels wake the router.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from hpcserve import __version__
from hpcserve.api.convert import logprobs_from_proto, logprobs_to_proto, sampling_from_proto
from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc
from hpcserve.daemon.router import StreamError
from hpcserve.errors import RequestError

READY_WAIT_S = 30.0
DEFAULT_MAX_TOKENS = 1024  # when a stream gives none: what is left of the context, at most this
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_STATUS_OF_CODE = {"already_exists": grpc.StatusCode.ALREADY_EXISTS, "unavailable": grpc.StatusCode.UNAVAILABLE}


class ServingServicer(serving_pb2_grpc.ServingServicer):
    def __init__(self, *, router, frontend, batch_api, model_name: str, model_path: str, num_ranks: int,
                 state_dir: str, allocation=None) -> None:
        self.router = router
        self.frontend = frontend
        self.batch_api = batch_api
        self.model_name = model_name
        self.model_path = model_path
        self.num_ranks = num_ranks
        self.state_dir = state_dir
        self.allocation = allocation  # callable -> pb.Allocation | None
        self.started = time.monotonic()
        self.draining = False

    # ------------------------------------------------------------------ streams
    async def Chat(self, request, context):
        messages = []
        for i, m in enumerate(request.messages):
            if m.role not in ROLES:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {m.role!r}")
            messages.append({"role": ROLES[m.role], "content": m.content})
        if not messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "messages: give at least one message")
        async for chunk in self._stream(request, context, lambda: self.frontend.apply_chat_template(messages),
                                        pb.ChatChunk):
            yield chunk

    async def Complete(self, request, context):
        which = request.WhichOneof("prompt")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "prompt: set prompt_text or prompt_token_ids")
        prompt = request.prompt_text if which == "prompt_text" else list(request.prompt_token_ids.ids)
        async for chunk in self._stream(request, context, lambda: self.frontend.tokenize(prompt),
                                        pb.CompletionChunk):
            yield chunk

    async def _stream(self, request, context, make_ids, chunk_cls):
        if request.model and request.model not in (self.model_name, self.model_path):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: {request.model!r} is not served here; "
                                f"this server serves {self.model_name!r} (or leave model empty)")
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on its next start")
        if not await self.router.wait_ready(READY_WAIT_S):
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._not_ready_message())
        try:
            ids = make_ids()
            params = sampling_from_proto(
                request.sampling_params, self.frontend.default_max_tokens(len(ids), DEFAULT_MAX_TOKENS))
            self.frontend.check_length(len(ids), params)
            cls = request.request_class or pb.REQUEST_CLASS_INTERACTIVE
            req_id = request.request_id if request.HasField("request_id") else None
            inf = self.router.submit(req_id, ids, params, cls)
        except RequestError as exc:
            await context.abort(_STATUS_OF_CODE.get(exc.code, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
        finished = False
        try:
            async for ev in inf.events():
                if isinstance(ev, StreamError):
                    await context.abort(ev.code, ev.message)
                if ev.is_finished and ev.finish_reason == pb.FINISH_REASON_ERROR:
                    finished = True
                    await context.abort(grpc.StatusCode.INTERNAL, ev.error_message or "the replica failed the request")
                chunk = chunk_cls(request_id=inf.req_id, text=ev.new_text, token_ids=ev.new_token_ids)
                if ev.new_logprobs:
                    chunk.logprobs.extend(logprobs_to_proto(logprobs_from_proto(ev.new_logprobs),
                                                            self.frontend.decode_token))
                if ev.is_finished:
                    finished = True
                    n_out = len(inf.token_ids)
                    chunk.finish_reason = ev.finish_reason
                    chunk.usage.CopyFrom(pb.Usage(prompt_tokens=len(ids), completion_tokens=n_out,
                                                  total_tokens=len(ids) + n_out, cached_tokens=inf.num_cached_tokens))
                    chunk.metrics.CopyFrom(_metrics(inf))
                yield chunk
        finally:
            if not finished:
                self.router.abort(inf.req_id)  # client went away or the stream failed: free the replica

    def _not_ready_message(self) -> str:
        pool = self.router.pool
        if pool is not None and pool.fatal:
            return f"the worker ranks are down: {pool.fatal}"
        return (f"the worker ranks are not ready after {READY_WAIT_S:.0f} s (still loading the model, or "
                "relaunching); retry shortly and see `hpcserve status`")

    async def Abort(self, request, context):
        return pb.AbortResponse(is_aborted=self.router.abort(request.request_id))

    # ------------------------------------------------------------------ batches
    async def SubmitBatch(self, request, context):
        out = await self.batch_api.SubmitBatch(request, context)
        self.router.wake()
        return out

    async def GetBatch(self, request, context):
        return await self.batch_api.GetBatch(request, context)

    async def ListBatches(self, request, context):
        return await self.batch_api.ListBatches(request, context)

    async def CancelBatch(self, request, context):
        out = await self.batch_api.CancelBatch(request, context)
        self.router.wake()
        return out

    async def StreamBatchResults(self, request, context):
        async for line in self.batch_api.StreamBatchResults(request, context):
            yield line

    # ------------------------------------------------------------------ info
    async def GetServerInfo(self, request, context):
        pool = self.router.pool
        replicas = sorted(pool.replicas.values(), key=lambda r: r.replica_id) if pool else []
        info = pb.ServerInfo(
            version=__version__, model=self.model_name, num_ranks=self.num_ranks,
            replicas=[r.info() for r in replicas], uptime_s=time.monotonic() - self.started,
            is_ready=self.router.is_ready and not self.draining,
            max_model_len=self.frontend.max_model_len if self.router.is_ready else 0,
            num_worker_restarts=pool.num_restarts if pool else 0, state_dir=self.state_dir)
        alloc = await asyncio.to_thread(self.allocation) if self.allocation else None  # may run squeue
        if alloc is not None:
            info.allocation.CopyFrom(alloc)
        return info


def _metrics(inf) -> pb.RequestMetrics:
    """Where the request ran and its KV handoff, for the last chunk."""
    decode = inf.replica.replica_id
    m = pb.RequestMetrics(prefill_replica_id=inf.prefill.replica_id if inf.disaggregated else decode,
                          decode_replica_id=decode, disaggregated=inf.disaggregated)
    if inf.disaggregated:
        m.kv_handoff_s, m.kv_handoff_bytes = inf.kv_handoff_s, inf.kv_handoff_bytes
        m.kv_handoff_failed = inf.kv_result is False
    return m
