"""Router: the daemon's global scheduler. Admission, replica choice, the in-flight table and
batch feeding. No torch; runs on the daemon's event loop.

Interfaces
- Servicer: ``await wait_ready(timeout)``, ``submit(client_id, ids, params, request_class,
  tenant="default") -> Inflight`` (then ``async for item in inflight.events()``),
  ``abort_for(tenant, client_id)`` (a client's Abort: only its own tenant's requests),
  ``abort(req_id)`` (the daemon's own, by the router's id). Client ids are scoped per tenant: the
  router runs every request under a fresh id of its own, so one tenant can neither see, block nor
  abort another's request ids.
- ``WorkerPool`` callbacks: ``on_ready()``, ``on_outputs(replica, StepOutputs)``, ``on_lost(reason)``.
- Batch feeding (``feeder.BatchFeeder``, a mixin): ``run_feeder()`` (a task), ``wake()`` after a
  submit or cancel; ``exclude_tenants`` (None or a callable returning tenants whose lines must
  not be claimed now, e.g. over quota).
- Prefix-cache isolation: ``cache_salt`` (tenant -> salt, set by the daemon from the tenants'
  ``isolate-prefix-cache``) goes with every request of that tenant, chat and batch.
- Usage: ``meter`` (``usage.UsageMeter``, given or a fresh one). Each ``StepOutputs`` with a
  ``step_time_s`` is metered (its time x the replica's ranks, split by token share between the
  tenants of the scheduled requests; each share's useful seconds to the request's ``Account``,
  its tenant and class). Useful seconds of work never delivered are debited (``meter.debit``): a
  batch line requeued (abort, cancel, drain, lost launch) or ending in an error line (or a result
  the store already had), and the prefill replica's part of a failed KV handoff; chats are
  delivered as they stream and never debited (docs/utilization.md). Each request is counted once
  in ``meter.on_finished`` (its
  tenant, prompt length, tokens it produced): a chat when its stream ends (on the replica that
  streams it: the decode replica of a disaggregated one), whatever the reason but an admission
  error (FINISH_REASON_ERROR, nothing computed), so an aborted or dropped chat counts what its
  client got; a batch line when its output line is recorded in the store (``record_result``
  True: stop or length); error lines are not counted, and an aborted or dropped line is requeued
  and counted when it finishes on a later run.
- Shutdown: ``stop_feeding()``, ``await drain(timeout)``, ``abort_all(reason)``.

Lifecycle of an in-flight request::

    submit/feed ──AddRequest──► replica ──StepOutputs…──► finished: removed
                                   │                      (batch: result recorded in the store)
                                   ├─ abort(): AbortRequests; removed when the abort output comes
                                   └─ launch lost: chat → UNAVAILABLE on its stream;
                                                   batch → line requeued in the store

Routing:
- chat is packed onto the replica already serving the most chat, up to ``chat_pack_limit``
  requests (replicas with chat active cap their batch work, so packing keeps the others'
  batch uncapped); past that it goes to the replica with the most headroom: fewest interactive
  requests in flight, then the shortest recent step time, then the most free KV blocks;
- batch lines are claimed from the store (earliest deadline first, fair share between batches of
  equal deadline: see ``BatchStore.claim_lines``) only up to ``batch_watermark`` in flight per
  replica, and only while the replica's batch lines fit in its batch share of the KV cache
  (``1 - chat_kv_reserve``, counting prompt + max_tokens), so a replica's batch backlog stays
  shallow and chat never waits behind it; each replica's step scheduler then runs interactive
  requests ahead of batch ones;
- ``dedicated_chat_replicas = k > 0`` splits the pool instead: replicas 0..k-1 take only chat,
  the rest only batch (the dedicated-pools baseline of ``hpcserve bench mixed``).

Disaggregated (replicas with roles prefill and decode, ``disagg.roles``): every request with a
prompt of 2+ tokens goes prefill → decode::

    AddRequest(prefill_only) ──► prefill replica P ── KvEvent.ready(blocks) ──► router picks decode
    replica D (chat: most free KV blocks; batch: the line's home, chosen at feed time)
    AddRequest(remote_prefill) ──► D ── KvEvent.recv_meta ──► router ── StartKvSend ──► P
    P ═══ MPI ═══► D; D ── KvEvent.result ──► router; D decodes and streams tokens as usual

Chat goes first at every hop: P and D schedule interactive ahead of batch, the router hands a
chat off the moment its prefill is done, and D lands a chat's KV before any queued batch
handoff (preempting batch for blocks if it must). A failed transfer makes D compute the prompt
itself (the request still finishes once, on D). Prefill replicas never stream tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import grpc

from hpcserve.api.convert import logprobs_from_proto, sampling_to_proto
from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import worker_pb2 as wpb
from hpcserve.batch.openai_format import build_error_line, build_output_line
from hpcserve.daemon.feeder import BatchFeeder
from hpcserve.daemon.token_times import TokenTimes
from hpcserve.daemon.usage import BATCH, INTERACTIVE, Account, UsageMeter
from hpcserve.engine.outputs import RequestOutput
from hpcserve.engine.request import SamplingParams
from hpcserve.errors import RequestError

log = logging.getLogger("hpcserve.daemon")


@dataclass
class StreamError:
    code: grpc.StatusCode
    message: str


PREFILL, DECODE, RUN = "prefill", "decode", "run"  # Inflight.stage


@dataclass
class Inflight:
    req_id: str
    replica: object  # workers.Replica where it runs now (the prefill replica while stage == PREFILL)
    prompt_ids: list[int]
    params: SamplingParams
    request_class: int
    queue: asyncio.Queue | None = None  # chat: RequestStepOutput | StreamError items
    line: object = None  # batch: batches.ClaimedLine
    item: object = None  # batch: openai_format.BatchItem
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    num_cached_tokens: int = 0
    is_aborting: bool = False
    kv_blocks: int = 0  # batch: KV blocks reserved for it on its replica (prompt + max_tokens)
    home: object = None  # batch: the replica whose batch counters hold the line (its decode replica)
    prefill: object = None  # disaggregated: the prefill replica
    stage: str = RUN
    kv_handoff_s: float = 0.0
    kv_handoff_bytes: int = 0
    kv_result: bool | None = None  # decode side's transfer outcome, once known
    kv_blocks_promised: int = 0  # blocks announced to the decode replica's headroom until it posts the receive
    tenant: str = "default"  # whose usage it is (batch: the batch's tenant)
    client_id: str = ""  # chat: the id its client knows it by (unique per tenant); req_id is the router's own
    times: TokenTimes | None = None  # chat: arrival and the engine's token timestamps (TTFT, ITL)
    account: Account | None = None  # useful seconds earned so far (usage.Account); made from tenant and class

    def __post_init__(self) -> None:
        if self.account is None:
            self.account = Account(self.tenant, BATCH if self.request_class == pb.REQUEST_CLASS_BATCH else INTERACTIVE)

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None and self.stage == DECODE

    async def events(self):
        """Chat: the replica's outputs for this request until it finishes; a ``StreamError`` ends it."""
        while True:
            item = await self.queue.get()
            yield item
            if isinstance(item, StreamError) or item.is_finished:
                return


class Router(BatchFeeder):
    def __init__(self, frontend, store, model_name: str, batch_watermark: int, chat_kv_reserve: float = 0.1,
                 dedicated_chat_replicas: int = 0, chat_pack_limit: int = 0, meter: UsageMeter | None = None) -> None:
        self.meter = meter if meter is not None else UsageMeter()
        # tenant -> its prefix-cache namespace on the replicas ("" = shared; isolate-prefix-cache: its own)
        self.cache_salt: Callable[[str], str] = lambda tenant: ""
        # tenants whose batch lines the feeder must not claim now (None: no restriction)
        self.exclude_tenants: Callable[[], Collection[str]] | None = None
        self.chat_pack_limit = chat_pack_limit
        # Slurm: seconds until the allocation's drain (None: no limit); lines that would not finish
        # by then stay pending for the next allocation instead of being started and aborted
        self.seconds_to_drain = None
        self.frontend = frontend
        self.store = store
        self.model_name = model_name
        self.batch_watermark = batch_watermark
        self.chat_kv_reserve = chat_kv_reserve
        self.dedicated_chat_replicas = dedicated_chat_replicas
        self.pool = None  # set by the server once the WorkerPool exists
        self.inflight: dict[str, Inflight] = {}
        self._by_client: dict[tuple[str, str], str] = {}  # chats: (tenant, client id) -> req_id
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._feeding = True
        self._tasks: set[asyncio.Task] = set()  # pending store writes
        self._last_expiry_check = 0.0
        self.prefills: list = []  # replicas with role prefill (disaggregated mode when both lists are non-empty)
        self.decodes: list = []
        self.num_handoffs = 0
        self.num_handoff_failures = 0

    # ------------------------------------------------------------------ readiness
    async def wait_ready(self, timeout: float) -> bool:
        if self._ready.is_set():
            return True
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def on_ready(self) -> None:
        lens = [r.hello.max_model_len for r in self.pool.replicas.values()]
        if lens:
            self.frontend.max_model_len = min(lens)
        reps = sorted(self.pool.replicas.values(), key=lambda r: r.replica_id)
        self.prefills = [r for r in reps if r.hello.role == pb.REPLICA_ROLE_PREFILL]
        self.decodes = [r for r in reps if r.hello.role == pb.REPLICA_ROLE_DECODE]
        k = self.dedicated_chat_replicas
        for r in self.pool.replicas.values():
            r.is_chat_only = r.replica_id < k
            r.is_batch_only = k > 0 and r.replica_id >= k
        self._ready.set()
        self.wake()

    def on_lost(self, reason: str) -> None:
        self._ready.clear()
        msg = (f"the worker ranks failed ({reason}); hpcserve is relaunching them: retry the request "
               "in a few seconds")
        if self.inflight:
            log.warning("%d in-flight request(s) dropped: %s", len(self.inflight), reason)
        for inf in list(self.inflight.values()):
            self._drop(inf)
            if inf.queue is not None:
                self._meter_chat_end(inf, pb.FINISH_REASON_ABORT)
                inf.queue.put_nowait(StreamError(grpc.StatusCode.UNAVAILABLE, msg))
            else:
                self._spawn_write(self._requeue(inf))

    # ------------------------------------------------------------------ chat
    def pick_replica(self):
        """Where a chat goes. Packing first: the replica already serving the most chat, as long as it
        has fewer than ``chat_pack_limit`` (a replica with chat active caps its batch work, so fewer
        such replicas means more batch throughput at the same chat latency). Otherwise the replica
        with the most headroom: fewest interactive requests in flight (they share its steps), then
        the shortest recent step time, then the most free KV blocks."""
        reps = [r for r in self.pool.replicas.values() if not r.is_batch_only
                and r.hello.role != pb.REPLICA_ROLE_PREFILL]

        def chats(r) -> int:
            return r.num_inflight - r.num_inflight_batch

        packable = [r for r in reps if 0 < chats(r) < self.chat_pack_limit]
        if packable:
            return max(packable, key=lambda r: (chats(r), -r.replica_id))
        return min(reps, key=lambda r: (chats(r), round(r.load.recent_step_time_s, 3), -r.load.num_free_kv_blocks,
                                        r.replica_id))

    def submit(self, client_id: str | None, ids: list[int], params: SamplingParams, request_class: int,
               tenant: str = "default") -> Inflight:
        """Route a chat. ``client_id`` (None: a fresh one) names it for its tenant's ``abort`` and in its
        chunks; it must be unique among the tenant's requests in flight. Other tenants' ids are
        invisible: the router runs every request under an id of its own."""
        if not self.is_ready:
            raise RequestError("the worker ranks are not ready (starting or relaunching); retry shortly",
                               code="unavailable")
        req_id = f"req-{uuid.uuid4().hex}"
        client_id = client_id or req_id
        if (tenant, client_id) in self._by_client:
            raise RequestError(f"request_id: {client_id!r} is already in flight; use a unique id",
                               field="request_id", code="already_exists")
        if self.disaggregated and len(ids) >= 2:
            p = self._pick_prefill(interactive=request_class != pb.REQUEST_CLASS_BATCH)
            inf = Inflight(req_id, p, ids, params, request_class, queue=asyncio.Queue(), prefill=p, stage=PREFILL,
                           tenant=tenant, client_id=client_id, times=TokenTimes(time.time()))
        else:
            inf = Inflight(req_id, self.pick_replica(), ids, params, request_class, queue=asyncio.Queue(),
                           tenant=tenant, client_id=client_id, times=TokenTimes(time.time()))
        self._by_client[(tenant, client_id)] = req_id
        self._send(inf)
        return inf

    def _start_line(self, line, item, ids: list[int], params: SamplingParams, replica, kv_blocks: int) -> None:
        """Run a claimed batch line with its home on ``replica`` (the feeder chose it)."""
        req_id = f"batch-{line.batch_id}-{line.line_no}-{uuid.uuid4().hex[:8]}"
        inf = Inflight(req_id, replica, ids, params, pb.REQUEST_CLASS_BATCH, line=line, item=item,
                       kv_blocks=kv_blocks, home=replica, tenant=line.tenant)
        if self.disaggregated and len(ids) >= 2 and replica.hello.role == pb.REPLICA_ROLE_DECODE:
            inf.replica = inf.prefill = self._pick_prefill(interactive=False)
            inf.stage = PREFILL
        self._send(inf)

    # ------------------------------------------------------------------ disaggregated
    @property
    def disaggregated(self) -> bool:
        return bool(self.prefills and self.decodes)

    def _pick_prefill(self, interactive: bool):
        """Chat: the prefill replica with the fewest chats in flight (each schedules chat ahead of
        batch, so queued batch prefills barely delay it); batch: the fewest requests in flight."""
        def key(r):
            chats = r.num_inflight - r.num_inflight_batch_here
            return (chats, r.num_inflight, r.replica_id) if interactive else (r.num_inflight, r.replica_id)
        return min(self.prefills, key=key)

    def _pick_decode(self, num_tokens: int):
        """The decode replica with the most KV headroom: free blocks in its last load report minus
        the blocks of handoffs sent to it since, then the fewest requests in flight."""
        def headroom(r):
            return r.load.num_free_kv_blocks if r.load.num_kv_blocks else r.hello.num_kv_blocks  # before 1st report
        return max(self.decodes, key=lambda r: (headroom(r) - r.kv_promised, -r.num_inflight, -r.replica_id))

    def _on_kv_event(self, replica, inf: Inflight, ev) -> None:
        kind = ev.WhichOneof("kind")
        if kind == "ready" and inf.stage == PREFILL and replica is inf.prefill:
            if inf.is_aborting:  # the abort crossed the prefill's end: P releases on the abort; end it here
                self._drop(inf)
                self._end_aborted(inf)
                return
            target = inf.home if inf.home is not None else self._pick_decode(len(inf.prompt_ids))
            need = -(-ev.ready.num_tokens // max(1, target.hello.block_size))
            replica.num_inflight -= 1
            if inf.line is not None:
                replica.num_inflight_batch_here -= 1
            inf.replica, inf.stage = target, DECODE
            target.num_inflight += 1
            target.kv_promised += need
            inf.kv_blocks_promised = need
            self.num_handoffs += 1
            target.send(wpb.DaemonMessage(add_request=self._add_request(inf, remote_prefill=wpb.RemotePrefill(
                src_rank=replica.hello.rank, src_block_ids=ev.ready.block_ids, num_tokens=ev.ready.num_tokens,
                num_cached_tokens=ev.ready.num_cached_tokens))))
        elif kind == "recv_meta_json" and inf.stage == DECODE and replica is inf.replica:
            replica.kv_promised = max(0, replica.kv_promised - inf.kv_blocks_promised)
            if not inf.is_aborting:
                inf.prefill.send(wpb.DaemonMessage(start_kv_send=wpb.StartKvSend(
                    request_id=inf.req_id, meta_json=ev.recv_meta_json)))
        elif kind == "result" and not ev.result.is_send and replica is inf.replica:
            inf.kv_result = ev.result.success
            inf.kv_handoff_s, inf.kv_handoff_bytes = ev.result.seconds, ev.result.nbytes
            if not ev.result.success:
                self.num_handoff_failures += 1
                self.meter.debit(inf.account, inf.prefill.replica_id)  # D recomputes the prompt and earns it
                log.warning("request %s: KV handoff from replica %d failed (%s); replica %d computes the prompt",
                            inf.req_id, inf.prefill.replica_id, ev.result.error, replica.replica_id)
                inf.prefill.send(wpb.DaemonMessage(abort_requests=wpb.AbortRequests(request_ids=[inf.req_id])))

    def _end_aborted(self, inf: Inflight) -> None:
        if inf.queue is not None:
            self._meter_chat_end(inf, pb.FINISH_REASON_ABORT)
            inf.queue.put_nowait(wpb.RequestStepOutput(request_id=inf.req_id, is_finished=True,
                                                       finish_reason=pb.FINISH_REASON_ABORT))
        else:
            self._spawn_write(self._requeue(inf))
            self.wake()

    def abort_for(self, tenant: str, client_id: str) -> bool:
        """A client's Abort: the tenant's chat with that id (another tenant's is unknown here)."""
        req_id = self._by_client.get((tenant, client_id))
        return req_id is not None and self.abort(req_id)

    def abort(self, req_id: str) -> bool:
        """Abort by the router's own id (the daemon: closed streams, cancelled batches, drain)."""
        inf = self.inflight.get(req_id)
        if inf is None or inf.is_aborting:
            return False
        inf.is_aborting = True
        msg = wpb.DaemonMessage(abort_requests=wpb.AbortRequests(request_ids=[req_id]))
        inf.replica.send(msg)
        if inf.stage == DECODE and inf.kv_result is None:
            inf.prefill.send(msg)  # release the prompt KV it may still hold
        return True

    def _add_request(self, inf: Inflight, **kw) -> wpb.AddRequest:
        return wpb.AddRequest(
            request_id=inf.req_id, prompt_token_ids=inf.prompt_ids, sampling_params=sampling_to_proto(inf.params),
            request_class=inf.request_class, eos_token_ids=self.frontend.eos_token_ids,
            cache_salt=self.cache_salt(inf.tenant), **kw)

    def _send(self, inf: Inflight) -> None:
        self.inflight[inf.req_id] = inf
        inf.replica.num_inflight += 1
        if inf.line is not None:
            if inf.home is None:
                inf.home = inf.replica
            inf.home.num_inflight_batch += 1
            inf.home.batch_kv_reserved += inf.kv_blocks
            inf.replica.num_inflight_batch_here += 1
        inf.replica.send(wpb.DaemonMessage(add_request=self._add_request(inf, prefill_only=inf.stage == PREFILL)))

    def _drop(self, inf: Inflight) -> None:
        if self.inflight.pop(inf.req_id, None) is not None:
            if inf.client_id:
                self._by_client.pop((inf.tenant, inf.client_id), None)
            inf.replica.num_inflight -= 1
            if inf.line is not None:
                inf.home.num_inflight_batch -= 1
                inf.home.batch_kv_reserved -= inf.kv_blocks
                if inf.stage != DECODE:
                    inf.replica.num_inflight_batch_here -= 1
            if inf.stage == DECODE and inf.kv_result is None:  # ended before its handoff did: release P's KV
                inf.prefill.send(wpb.DaemonMessage(abort_requests=wpb.AbortRequests(request_ids=[inf.req_id])))

    # ------------------------------------------------------------------ outputs
    def on_outputs(self, replica, outs: wpb.StepOutputs) -> None:
        if outs.step_time_s:  # before the outputs: requests finishing in this step are still in flight
            self.meter.on_step(((s.request_id, s.num_tokens, s.useful_s) for s in outs.shares), self._account_of,
                               outs.step_time_s, num_ranks=getattr(getattr(replica, "hello", None), "num_ranks", 0),
                               replica_id=getattr(replica, "replica_id", 0))
        for o in outs.outputs:
            inf = self.inflight.get(o.request_id)
            if inf is not None and o.HasField("kv_event"):
                self._on_kv_event(replica, inf, o.kv_event)
                continue
            if inf is None or inf.replica is not replica:
                continue
            inf.token_ids.extend(o.new_token_ids)
            if inf.times is not None:
                inf.times.add(outs.token_time, len(o.new_token_ids))
            inf.text.append(o.new_text)
            if o.new_logprobs:
                inf.logprobs.extend(logprobs_from_proto(o.new_logprobs))
            if o.num_cached_tokens:
                inf.num_cached_tokens = o.num_cached_tokens
            if o.is_finished:
                self._drop(inf)
            if inf.queue is not None:
                if o.is_finished:
                    self._meter_chat_end(inf, o.finish_reason)
                inf.queue.put_nowait(o)
            elif o.is_finished:
                self._spawn_write(self._finish_line(inf, o))
                self.wake()

    def _account_of(self, req_id: str) -> Account | None:
        inf = self.inflight.get(req_id)
        return inf.account if inf is not None else None

    def _meter_chat_end(self, inf: Inflight, finish_reason: int) -> None:
        """Count a chat whose stream ends now (called once per chat; see the module docstring)."""
        if finish_reason != pb.FINISH_REASON_ERROR:
            self.meter.on_finished(inf.tenant, len(inf.prompt_ids), len(inf.token_ids))

    async def _finish_line(self, inf: Inflight, o) -> None:
        line = inf.line
        if o.finish_reason == pb.FINISH_REASON_ABORT:
            await self._requeue(inf)  # cancelled batch or shutdown: the line is not done
            return
        if o.finish_reason == pb.FINISH_REASON_ERROR:
            code = o.error_code if o.error_code else "server_error"
            result, is_error = build_error_line(inf.item.custom_id, line.line_no, code, o.error_message), True
        else:
            reason = "stop" if o.finish_reason == pb.FINISH_REASON_STOP else "length"
            out = RequestOutput(req_id=inf.req_id, prompt_token_ids=inf.prompt_ids, token_ids=inf.token_ids,
                                text="".join(inf.text), new_token_ids=[], new_text="", finished=True,
                                finish_reason=reason, num_cached_tokens=inf.num_cached_tokens,
                                logprobs=inf.logprobs if inf.params.logprobs is not None else None)
            result = build_output_line(inf.item, out, self.model_name, int(time.time()), self.frontend.decode_token)
            is_error = False
        if is_error:
            self.meter.debit(inf.account)  # an error line delivers no work
        recorded = await asyncio.to_thread(self.store.record_result, line.batch_id, line.line_no, result, is_error)
        if recorded and not is_error:  # the line's first (and only) result: count it once
            self.meter.on_finished(inf.tenant, len(inf.prompt_ids), len(inf.token_ids))
        elif not recorded:
            self.meter.debit(inf.account)  # the line had a result already: this run's work is not delivered

    async def _requeue(self, inf: Inflight) -> None:
        self.meter.debit(inf.account)  # the line runs again (or is cancelled): this run's work is not delivered
        await asyncio.to_thread(self.store.requeue, inf.line.batch_id, inf.line.line_no)

    def _spawn_write(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch store write failed: %r", task.exception())

    # ------------------------------------------------------------------ shutdown
    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is in flight (or ``timeout``); True if drained."""
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.inflight

    def abort_all(self) -> None:
        for req_id in list(self.inflight):
            self.abort(req_id)

    async def flush_writes(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
