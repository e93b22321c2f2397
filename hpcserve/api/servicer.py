"""The public ``hpcserve.api.v1.Serving`` servicer of the daemon (grpc.aio). No torch.

Every call runs for the tenant of its API key (``api.auth.current_principal()``).

Chat / Complete lifecycle (one handler coroutine per stream)::

    validate (roles, prompt) → ``Admission.admit`` (model, tenant permission, draining, ready
    workers, tokenize, sampling defaults, context length, priority cap, tenant limits,
    router.submit) → relay each replica output as a chunk → last chunk: finish_reason, usage,
    metrics → ``Admitted.close()`` (abort if unfinished, end the tenant's lease)

Errors reach clients as gRPC statuses with one line naming the field and the fix:
INVALID_ARGUMENT (bad field, prompt too long), NOT_FOUND (model not served), ALREADY_EXISTS
(request id in flight), UNAVAILABLE (workers starting/relaunching/failed mid-stream, daemon
draining), PERMISSION_DENIED (model or RPC not allowed for the tenant), RESOURCE_EXHAUSTED
(tenant limit; a ``retry-after`` trailer in seconds), INTERNAL (the replica rejected the
request). A stream that ends early for any reason (client cancel, disconnect, error) aborts
its request on the replica, which frees its KV blocks.

Admin keys only: ``Drain``; ``CreateKey`` / ``ListKeys`` / ``RevokeKey`` (the daemon's keys file); the replicas,
allocation, state dir and event-loop lag in ``GetServerInfo``; every
tenant's rows in ``GetUsage`` (other keys get their own tenant's).

Batch RPCs are delegated to ``api.batch_api.BatchApi``; submits and cancels wake the router.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from hpcserve import __version__
from hpcserve.api.admission import ApiError, api_error
from hpcserve.api.auth import abort_with, current_principal
from hpcserve.api.convert import logprobs_from_proto, logprobs_to_proto, sampling_from_proto
from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc
from hpcserve.errors import HpcserveError

DEFAULT_MAX_TOKENS = 1024  # when a stream gives none: what is left of the context, at most this
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ServingServicer(serving_pb2_grpc.ServingServicer):
    def __init__(self, *, admission, batch_api, num_ranks: int, state_dir: str, allocation=None,
                 usage=None, on_drain=None, loop_lag=None) -> None:
        self.admission = admission
        self.router = admission.router
        self.frontend = admission.frontend
        self.tenants = admission.tenants
        self.batch_api = batch_api
        self.model_name = admission.model_name
        self.num_ranks = num_ranks
        self.state_dir = state_dir
        self.allocation = allocation  # callable -> pb.Allocation | None
        self.usage = usage  # callable(GetUsageRequest, tenant or None for all) -> pb.UsageReport
        self.on_drain = on_drain  # callable: start the daemon's graceful stop
        self.loop_lag = loop_lag  # callable -> worst event-loop lateness over the last minute (s)
        self.started = time.monotonic()

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.admission.draining = value

    async def _require_admin(self, context, what: str):
        principal = current_principal()
        try:
            self.tenants.require_admin(principal, what)
        except HpcserveError as exc:
            await abort_with(context, api_error(exc))
        return principal

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
        async for chunk in self._stream(request, context, messages, pb.ChatChunk, chat=True):
            yield chunk

    async def Complete(self, request, context):
        which = request.WhichOneof("prompt")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "prompt: set prompt_text or prompt_token_ids")
        prompt = request.prompt_text if which == "prompt_text" else list(request.prompt_token_ids.ids)
        async for chunk in self._stream(request, context, prompt, pb.CompletionChunk):
            yield chunk

    async def _stream(self, request, context, prompt, chunk_cls, chat: bool = False):
        principal = current_principal()

        def make_params(num_prompt_tokens: int):
            return sampling_from_proto(request.sampling_params,
                                       self.frontend.default_max_tokens(num_prompt_tokens, DEFAULT_MAX_TOKENS))
        try:
            adm = await self.admission.admit(
                principal, request.model, prompt, make_params,
                request.request_class or pb.REQUEST_CLASS_INTERACTIVE,
                request.request_id if request.HasField("request_id") else None, chat=chat)
        except ApiError as exc:
            await abort_with(context, exc)
        inf = adm.inf
        try:
            async for ev in adm.events():
                chunk = chunk_cls(request_id=inf.client_id, text=ev.new_text, token_ids=ev.new_token_ids)
                if ev.new_logprobs:
                    chunk.logprobs.extend(logprobs_to_proto(logprobs_from_proto(ev.new_logprobs),
                                                            self.frontend.decode_token))
                if ev.is_finished:
                    n_in, n_out = adm.prompt_len, len(inf.token_ids)
                    chunk.finish_reason = ev.finish_reason
                    chunk.usage.CopyFrom(pb.Usage(prompt_tokens=n_in, completion_tokens=n_out,
                                                  total_tokens=n_in + n_out, cached_tokens=inf.num_cached_tokens))
                    chunk.metrics.CopyFrom(_metrics(inf))
                yield chunk
        except ApiError as exc:
            await abort_with(context, exc)
        finally:
            adm.close()  # client went away or the stream failed: free the replica; end the tenant's lease

    async def Abort(self, request, context):
        """Only the caller's tenant's requests: another tenant's id is unknown (nothing is aborted)."""
        principal = current_principal()
        tenant = principal.tenant if principal is not None else "default"
        return pb.AbortResponse(is_aborted=self.router.abort_for(tenant, request.request_id))

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
        principal = current_principal()
        pool = self.router.pool
        info = pb.ServerInfo(
            version=__version__, model=self.model_name, num_ranks=self.num_ranks,
            uptime_s=time.monotonic() - self.started, is_ready=self.router.is_ready and not self.draining,
            max_model_len=self.frontend.max_model_len if self.router.is_ready else 0,
            num_worker_restarts=pool.num_restarts if pool else 0)
        if principal is not None:
            info.tenant, info.is_admin = principal.tenant, principal.is_admin
        if principal is not None and not principal.is_admin:
            return info  # replicas, allocation and the state dir are server-wide: admin only
        replicas = sorted(pool.replicas.values(), key=lambda r: r.replica_id) if pool else []
        info.replicas.extend(r.info() for r in replicas)
        info.state_dir = self.state_dir
        if self.loop_lag is not None:
            info.event_loop_lag_max_s = self.loop_lag()
        alloc = await asyncio.to_thread(self.allocation) if self.allocation else None  # may run squeue
        if alloc is not None:
            info.allocation.CopyFrom(alloc)
        return info

    async def GetUsage(self, request, context):
        principal = current_principal()
        if request.since_day and not _is_day(request.since_day):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"since_day: must be a UTC day YYYY-MM-DD, got {request.since_day!r}")
        if self.usage is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "usage accounting is not enabled on this server")
        every = principal is None or principal.is_admin
        return await self.usage(request, None if every else principal.tenant)

    async def Drain(self, request, context):
        await self._require_admin(context, "Drain")
        if self.on_drain is not None:
            self.on_drain()
        return pb.DrainResponse(is_draining=True)

    # ------------------------------------------------------------------ keys (admin)
    async def _keys_call(self, context, what: str, fn):
        await self._require_admin(context, what)
        keys_file = self.tenants.keys_file
        if keys_file is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this daemon has no keys file (auth.keys-file)")
        try:
            out = await asyncio.to_thread(fn, keys_file)
        except HpcserveError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, " ".join(str(exc).split()))
        self.tenants.reload_now()
        return out

    async def CreateKey(self, request, context):
        if request.tenant not in self.tenants.names:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"tenant: {request.tenant!r} is not defined in the daemon's site config "
                                f"(defined: {', '.join(self.tenants.names)}); add [tenants.{request.tenant or 'NAME'}]")
        key, rec = await self._keys_call(context, "CreateKey", lambda kf: kf.add(request.tenant, request.note))
        return pb.CreateKeyResponse(key=key, info=_key_info(rec))

    async def ListKeys(self, request, context):
        records = await self._keys_call(context, "ListKeys", lambda kf: kf.records())
        return pb.ListKeysResponse(keys=[_key_info(r) for r in records
                                         if not request.tenant or r.tenant == request.tenant])

    async def RevokeKey(self, request, context):
        rec = await self._keys_call(context, "RevokeKey", lambda kf: kf.revoke(request.key_id))
        return _key_info(rec)


def _key_info(rec) -> pb.ApiKeyInfo:
    return pb.ApiKeyInfo(key_id=rec.key_id, tenant=rec.tenant, hint=rec.hint, created_at=int(rec.created_at),
                         revoked_at=int(rec.revoked_at or 0), note=rec.note)


def _metrics(inf) -> pb.RequestMetrics:
    """Where the request ran, its KV handoff and its token timings, for the last chunk."""
    decode = inf.replica.replica_id
    m = pb.RequestMetrics(prefill_replica_id=inf.prefill.replica_id if inf.disaggregated else decode,
                          decode_replica_id=decode, disaggregated=inf.disaggregated,
                          request_class=inf.request_class)
    if inf.disaggregated:
        m.kv_handoff_s, m.kv_handoff_bytes = inf.kv_handoff_s, inf.kv_handoff_bytes
        m.kv_handoff_failed = inf.kv_result is False
    if inf.times is not None:
        for k, v in inf.times.as_dict().items():
            setattr(m, k, v)
    return m


def _is_day(s: str) -> bool:
    import datetime

    try:
        datetime.date.fromisoformat(s)
    except ValueError:
        return False
    return len(s) == 10
