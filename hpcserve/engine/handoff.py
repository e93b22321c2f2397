"""KV handoff on one replica of a disaggregated (prefill → decode) deployment. No torch
import here: the connector (:mod:`hpcserve.transfer`) moves the tensors.

A prefill replica *produces*: it computes a prompt, keeps the blocks, and sends them. A
decode replica *consumes*: it receives a prompt's KV into blocks of its own and decodes. One
:class:`KVHandoff` serves both directions; what happens to a request depends on how it came.

The producer sends the KV of the prompt minus its last token; the consumer computes that
last token itself (one row, like a decode), so every sampled token, its logprobs and the
detokenized text come from one place, and greedy output equals colocated output.

Producer lifecycle (``LLMEngine.add_request(..., prefill_only=True)``)::

    computing ──prompt done──► held: blocks kept, event "ready" ──start_send──► sending ──done──► blocks freed,
        │                        │                                              event "result"
        └─ abort: the usual      └─ release (abort) or no start_send within the transfer
           abort output             timeout: blocks freed

Consumer lifecycle (``LLMEngine.add_remote_request``)::

    queued (no blocks; interactive first, then FCFS) ──blocks free──► receiving: event "recv_meta"
        ──SUCCESS──► scheduler.add_prefilled: admitted like any request, computes only the last token
        ──FAILED (peer dead, timeout, checksum mismatch)──► blocks freed, scheduler.add_request:
                     the prompt is computed here (fallback to colocated; output still once)
    abort while queued or receiving: the engine emits the abort output at once; the blocks
    are freed when the connector lets go of them.

Interface, driven by the replica loop (one thread)::

    keep_blocks(req) -> bool          scheduler hook (Scheduler.keep_blocks)
    start_send(req_id, meta_dict)     producer, after the consumer posted its receive
    add_remote(req, src_rank, src_block_ids, num_tokens)
    abort(req_id) -> Request | None   a queued/receiving consumer request (to emit its abort),
                                      or None (also releases a held producer request)
    poll(in_step=False) -> [(kind, req_id, payload)]   kinds: "ready" {block_ids, num_tokens,
                                      num_cached_tokens}, "recv_meta" (meta dict), "result"
                                      {is_send, success, nbytes, seconds, error, checksum_verified, peer}
    is_held(req_id), busy, counters()
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from hpcserve.engine.request import PRIORITY_INTERACTIVE, Request, RequestStatus
from hpcserve.transfer.base import KVConnectorScheduler, KVConnectorWorker, KVGeometry, TransferMeta, TransferState

log = logging.getLogger("hpcserve.handoff")


@dataclass
class _Remote:
    req: Request
    src_rank: int
    src_block_ids: list[int]
    num_tokens: int
    aborted: bool = False


@dataclass
class _Held:
    req: Request
    since: float
    sending: bool = False
    released: bool = False


class KVHandoff:
    def __init__(self, engine, connector: KVConnectorWorker, geometry: KVGeometry, rank: int,
                 target_group_bytes: int = 2 << 20, clock=time.monotonic) -> None:
        self.engine = engine
        self.kv = engine.kv
        self.scheduler = engine.scheduler
        self.connector = connector
        self.rank = rank
        self.clock = clock
        # the consumer builds every meta it receives (one builder per receiving rank keeps tags unique)
        self.builder = KVConnectorScheduler(geometry, rank, "consumer", target_group_bytes=target_group_bytes)
        self.producing: set[str] = set()  # prefill-only requests still computing
        self.held: dict[str, _Held] = {}
        self.queued: deque[_Remote] = deque()  # consumer: waiting for blocks
        self.receiving: dict[str, _Remote] = {}
        self._events: list[tuple[str, str, object]] = []
        self.num_sent = self.num_received = self.num_failed = self.num_fallbacks = 0
        self.bytes_sent = self.bytes_received = self.num_checksum_verified = 0
        self.scheduler.keep_blocks = self.keep_blocks

    # ------------------------------------------------------------------ producer
    def add_prefill_only(self, req_id: str) -> None:
        self.producing.add(req_id)

    def keep_blocks(self, req: Request) -> bool:
        if req.req_id not in self.producing:
            return False
        self.producing.discard(req.req_id)
        if req.status == RequestStatus.FINISHED_ABORTED or req.num_computed_tokens < 1:
            return False
        self.held[req.req_id] = _Held(req, self.clock())
        n = req.num_prompt_tokens - 1  # the consumer computes the last prompt token
        self._events.append(("ready", req.req_id, {
            "block_ids": list(req.block_ids[: self.builder.geometry.num_blocks_for(n)]), "num_tokens": n,
            "num_cached_tokens": req.num_cached_tokens}))
        return True

    def is_held(self, req_id: str) -> bool:
        return req_id in self.held

    def owns(self, req_id: str) -> bool:
        """The id is taken by a request this handoff holds (held, queued or receiving)."""
        return req_id in self.held or req_id in self.receiving or any(r.req.req_id == req_id for r in self.queued)

    def start_send(self, req_id: str, meta_dict: dict) -> None:
        h = self.held.get(req_id)
        if h is None or h.sending:
            log.warning("start_send for %s: no prompt KV held for it (released or timed out)", req_id)
            return
        meta = TransferMeta.from_dict(meta_dict)
        if meta.src_rank != self.rank or not set(meta.src_block_ids) <= set(h.req.block_ids):
            log.error("start_send for %s: the meta names blocks or a rank this replica does not hold", req_id)
            self._free_held(req_id)
            return
        self.connector.start_send(meta, self.engine.runner.kv_cache)
        h.sending = True

    def _free_held(self, req_id: str) -> None:
        h = self.held.pop(req_id, None)
        if h is not None:
            self.kv.free(h.req)

    # ------------------------------------------------------------------ consumer
    def add_remote(self, req: Request, src_rank: int, src_block_ids: list[int], num_tokens: int) -> None:
        """Queue ``req`` to receive the KV of its first ``num_tokens`` tokens from ``src_rank``.
        A handoff that cannot work (nothing to move, a bad block list) computes locally instead."""
        num_tokens = min(num_tokens, req.num_prompt_tokens - 1)
        need = self.builder.geometry.num_blocks_for(max(num_tokens, 1))
        if num_tokens < 1 or src_rank == self.rank or len(src_block_ids) < need:
            log.warning("request %s: unusable KV handoff (%d tokens from rank %d, %d blocks); computing it here",
                        req.req_id, num_tokens, src_rank, len(src_block_ids))
            self.num_fallbacks += 1
            self.scheduler.add_request(req)
            return
        r = _Remote(req, src_rank, list(src_block_ids), num_tokens)
        i = len(self.queued)  # interactive ahead of batch, FCFS within a class
        while i > 0 and self.queued[i - 1].req.priority > req.priority:
            i -= 1
        self.queued.insert(i, r)

    def _start_receives(self, in_step: bool) -> None:
        while self.queued:
            r = self.queued[0]
            need = self.builder.geometry.num_blocks_for(r.num_tokens)
            if self.kv.num_free_blocks < need and (in_step or not (
                r.req.priority <= PRIORITY_INTERACTIVE and self.scheduler.make_room(need, r.req.priority)
            )):
                return  # blocks free up as requests finish; the head keeps its place
            self.queued.popleft()
            if not self.kv.allocate(r.req, r.num_tokens):
                self.queued.appendleft(r)
                return
            meta = self.builder.build_meta(r.req.req_id, r.num_tokens, r.src_block_ids, r.req.block_ids, r.src_rank)
            try:
                self.connector.start_recv(meta, self.engine.runner.kv_cache)
            except Exception as exc:  # noqa: BLE001 - a bad handoff must not take the replica down
                log.error("request %s: cannot start the KV receive (%s); computing it here", r.req.req_id, exc)
                self.builder.transfer_done(r.req.req_id, TransferState.FAILED)
                self._fallback(r)
                continue
            self.receiving[r.req.req_id] = r
            self._events.append(("recv_meta", r.req.req_id, meta.to_dict()))

    def _fallback(self, r: _Remote) -> None:
        self.kv.free(r.req)
        r.req.num_computed_tokens = 0
        self.num_fallbacks += 1
        self.scheduler.add_request(r.req)

    # ------------------------------------------------------------------ both
    def abort(self, req_id: str) -> Request | None:
        """Abort ``req_id`` if the handoff owns it. Returns the consumer request (finished as
        aborted, for the engine's abort output), else None (a held producer request is released
        silently: the daemon already ended it)."""
        for r in self.queued:
            if r.req.req_id == req_id:
                self.queued.remove(r)
                r.req.status = RequestStatus.FINISHED_ABORTED
                return r.req
        r = self.receiving.get(req_id)
        if r is not None and not r.aborted:
            r.aborted = True
            r.req.status = RequestStatus.FINISHED_ABORTED
            self.connector.abort(req_id)  # blocks freed once the connector reports it done
            return r.req
        h = self.held.get(req_id)
        if h is not None:
            if h.sending:
                h.released = True
                self.connector.abort(req_id)
            else:
                self._free_held(req_id)
        return None

    def poll(self, in_step: bool = False) -> list[tuple[str, str, object]]:
        """Finish what the connector reports done, release held blocks nobody asked for, start the
        receives that fit, and return the events since the last call. ``in_step``: called between
        layers of a forward pass (the model's layer hook), so nothing is preempted: blocks of
        requests in the running step must not change hands."""
        if self.connector.num_active or self.receiving or self.held:
            for req_id, state in self.connector.done():
                self._finished(req_id, state)
        now = self.clock()
        for req_id, h in list(self.held.items()):
            if not h.sending and now - h.since > self.connector.timeout_s:
                log.warning("request %s: no decode replica asked for its KV within %.0f s; released",
                            req_id, self.connector.timeout_s)
                self._free_held(req_id)
        self._start_receives(in_step)
        out, self._events = self._events, []
        return out

    def _finished(self, req_id: str, state: TransferState) -> None:
        x = self.connector.info(req_id)
        ok = state == TransferState.SUCCESS
        result = {"is_send": x.is_send, "success": ok, "nbytes": x.meta.total_nbytes if ok else x.nbytes_done,
                  "seconds": x.elapsed_s or 0.0, "error": x.error or "", "peer": x.peer,
                  "checksum_verified": ok and not x.is_send and self.connector.checksum}
        if not ok:
            self.num_failed += 1
        if x.is_send:
            self._free_held(req_id)
            if ok:
                self.num_sent += 1
                self.bytes_sent += result["nbytes"]
            else:
                log.warning("request %s: KV send to rank %d failed: %s", req_id, x.peer, x.error)
        else:
            self.builder.transfer_done(req_id, state)
            r = self.receiving.pop(req_id, None)
            if r is None:
                return
            if r.aborted:
                self.kv.free(r.req)
                return
            if ok:
                self.num_received += 1
                self.bytes_received += result["nbytes"]
                self.num_checksum_verified += bool(result["checksum_verified"])
                r.req.num_computed_tokens = r.num_tokens
                self.kv.commit_computed(r.req)
                self.scheduler.add_prefilled(r.req)
            else:
                log.warning("request %s: KV receive from rank %d failed (%s); computing the prompt here",
                            req_id, x.peer, x.error)
                self._fallback(r)
        self._events.append(("result", req_id, result))

    @property
    def busy(self) -> bool:
        return bool(self.queued or self.receiving or self.connector.num_active or self._events)

    @property
    def has_pending_work(self) -> bool:
        """Transfers or held blocks that need polling."""
        return bool(self.queued or self.receiving or self.held or self.connector.num_active)

    def counters(self) -> dict[str, int]:
        return {"num_sent": self.num_sent, "num_received": self.num_received, "num_failed": self.num_failed,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "num_checksum_verified": self.num_checksum_verified, "num_active": self.connector.num_active,
                "num_fallbacks": self.num_fallbacks}
