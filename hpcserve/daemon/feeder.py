"""Batch feeding for the router: claims batch lines from the store and places them on replicas.
No torch; runs on the daemon's event loop.

``BatchFeeder`` is a mixin of ``router.Router`` (it was split out to keep the router short); it
uses the router's state (``store``, ``pool``, ``frontend``, ``inflight``, ``batch_watermark``,
``chat_kv_reserve``, ``seconds_to_drain``, ``exclude_tenants``, ``is_ready``, ``_feeding``,
``_wake``, ``_last_expiry_check``) and calls back ``abort(req_id)`` and ``_start_line(line, item,
ids, params, replica, kv_blocks)``, which builds the line's ``Inflight`` and sends it.

Interface (on the router): ``run_feeder()`` (a task until ``stop_feeding()``), ``wake()`` after
a submit, cancel or finished line. Each round (``_feed_once``, at least every ``FEED_POLL_S``):
mark expired batches (every ``EXPIRY_CHECK_S``), abort the lines of cancelled/expired batches,
then claim up to the free batch room (``batch_watermark`` per feedable replica) with
``store.claim_lines`` (passing ``exclude_tenants=exclude_tenants()`` when that is set: those
tenants' lines stay pending)
and place each line: a line that fails validation gets its error line at once; a line that fits
no replica's batch share of the KV cache, or would not finish before the allocation drains, is
given back with the rest of the claim.
"""

from __future__ import annotations

import asyncio
import logging
import time

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.batch.openai_format import BatchLineError, build_error_line
from hpcserve.batch.runner import prepare_item
from hpcserve.errors import RequestError

log = logging.getLogger("hpcserve.daemon")

FEED_POLL_S = 0.5
EXPIRY_CHECK_S = 30.0


class BatchFeeder:
    """Batch-feeding half of ``router.Router``; see the module docstring."""

    def wake(self) -> None:
        self._wake.set()

    def stop_feeding(self) -> None:
        self._feeding = False

    async def run_feeder(self) -> None:
        while self._feeding:
            try:
                await self._feed_once()
            except Exception:
                log.exception("batch feeder step failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), FEED_POLL_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _feed_once(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry_check >= EXPIRY_CHECK_S:
            self._last_expiry_check = now
            await asyncio.to_thread(self.store.check_expired)
        await self._abort_cancelled()
        if not self.is_ready or not self._feeding:
            return
        # a line is booked on a decode or mixed replica (its "home"); on a decode replica it is
        # prefilled by a prefill replica first, on a mixed one it runs colocated
        feedable = [r for r in self.pool.replicas.values()
                    if not r.is_chat_only and r.hello.role != pb.REPLICA_ROLE_PREFILL]
        room = sum(max(0, self.batch_watermark - r.num_inflight_batch) for r in feedable)
        if room <= 0:
            return
        kw = {} if self.exclude_tenants is None else {"exclude_tenants": self.exclude_tenants()}
        lines = await asyncio.to_thread(self.store.claim_lines, room, **kw)
        for i, line in enumerate(lines):
            if not self.is_ready:  # lost while we were claiming: give the line back
                await self._give_back(lines[i:])
                return
            try:
                item = line.parse()
                ids, params = prepare_item(self.frontend, item)
                try:
                    self.frontend.check_length(len(ids), params)
                except RequestError as exc:
                    raise BatchLineError(line.line_no, item.custom_id, exc.code, str(exc)) from None
            except BatchLineError as exc:
                err = build_error_line(exc.custom_id, exc.line_no, exc.code, exc.message)
                await asyncio.to_thread(self.store.record_result, line.batch_id, line.line_no, err, True)
                continue
            replica, need = self._batch_replica(feedable, len(ids) + params.max_tokens)
            if replica is None:  # every replica's batch share of the KV cache is spoken for
                await self._give_back(lines[i:])
                return
            if not self._finishes_before_drain(replica, len(ids), params.max_tokens):
                await self._give_back(lines[i:])
                return
            self._start_line(line, item, ids, params, replica, need)

    def _finishes_before_drain(self, replica, prompt_len: int, max_tokens: int) -> bool:
        """Whether a line can finish before the allocation drains: one recent step per output token
        plus one per block of the prompt (a pessimistic bound while steps are batched)."""
        left = self.seconds_to_drain() if self.seconds_to_drain is not None else None
        if left is None:
            return True
        step = replica.load.recent_step_time_s or 0.0
        return left > step * (max_tokens + -(-prompt_len // max(1, replica.hello.block_size)))

    def _batch_replica(self, feedable: list, num_tokens: int):
        """The replica with the most batch room that can hold ``num_tokens`` more within its batch
        share of the KV cache (1 - chat_kv_reserve); (None, 0) if none can."""
        best, best_need = None, 0
        for r in sorted(feedable, key=lambda r: (r.num_inflight_batch, r.replica_id)):
            if r.num_inflight_batch >= self.batch_watermark:
                continue
            need = -(-num_tokens // max(1, r.hello.block_size))
            share = int(r.hello.num_kv_blocks * (1.0 - self.chat_kv_reserve))
            if r.batch_kv_reserved + need <= share or r.num_inflight_batch == 0:
                best, best_need = r, need
                break
        return best, best_need

    async def _give_back(self, lines: list) -> None:
        for line in lines:
            await asyncio.to_thread(self.store.requeue, line.batch_id, line.line_no)

    async def _abort_cancelled(self) -> None:
        batch_ids = {inf.line.batch_id for inf in self.inflight.values() if inf.line is not None}
        for bid in batch_ids:
            status = (await asyncio.to_thread(self.store.get_batch, bid))["status"]
            if status in ("cancelling", "cancelled", "expired"):
                for inf in list(self.inflight.values()):
                    if inf.line is not None and inf.line.batch_id == bid:
                        self.abort(inf.req_id)
