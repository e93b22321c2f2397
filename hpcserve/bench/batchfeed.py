"""The batch load of ``bench mixed``: batches submitted so the pool never runs out of lines,
whatever the machine's speed.

Lifecycle (one per mode with batch, on that mode's daemon)::

    feed = BatchFeed(stub, metadata, mode, lines, chunk, say)   lines(start, n) -> JSONL bytes
    await feed.start()            submit the first ``chunk`` lines; poll every POLL_S from then on
    feed.counts                   (lines submitted, lines answered) over all its batches
    feed.measure_from(t0)         from now on, a poll that finds no unanswered line marks it dry
    feed.saturated(t1)            it never ran dry between t0 and t1 (and had lines left at t1)
    feed.cached_tokens(t0, t1)    prompt tokens served from the prefix cache, lines answered in [t0, t1]
    await feed.stop()             stop polling and following; cancel every batch; -> the batch ids

Top-up rule: every ``POLL_S`` the feed reads its batches and the replicas' load; when the unanswered
lines fall below the low-water mark ``max(chunk, 2 x requests on the replicas + line rate x
TOPUP_HORIZON_S)`` it submits ``max(chunk, line rate x TOPUP_HORIZON_S)`` more lines (the next line
numbers of the same seeded stream) as a new batch. The line rate is measured from the answered lines
(an exponential average over polls), so a fast machine gets bigger top-ups earlier.

Cached tokens: every batch is followed with ``StreamBatchResults(follow=True)``; each output line's
``response.body.usage.prompt_tokens_details.cached_tokens`` is kept with the time it arrived here
(the daemon's result poll makes that up to its poll interval late).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence

import grpc

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.errors import HpcserveError

POLL_S = 0.5
TOPUP_HORIZON_S = 10.0
RATE_SMOOTHING = 0.3   # weight of the newest poll in the line-rate average
TERMINAL = (pb.BATCH_STATUS_COMPLETED, pb.BATCH_STATUS_FAILED, pb.BATCH_STATUS_CANCELLED, pb.BATCH_STATUS_EXPIRED)


def cached_tokens_of(line: pb.BatchResultLine) -> int:
    """``usage.prompt_tokens_details.cached_tokens`` of an output line (0 for error lines or none)."""
    if line.is_error:
        return 0
    try:
        usage = json.loads(line.json)["response"]["body"]["usage"]
        return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    except (ValueError, KeyError, TypeError):
        return 0


class BatchFeed:
    def __init__(self, stub, metadata: Sequence, mode: str, lines: Callable[[int, int], bytes], chunk: int,
                 say: Callable[[str], None]) -> None:
        self.stub, self.md, self.mode, self.lines, self.chunk, self.say = stub, metadata, mode, lines, chunk, say
        self.batch_ids: list[str] = []
        self._status: dict[str, int] = {}
        self._counts: dict[str, tuple[int, int]] = {}   # batch id -> (total, answered)
        self._results: list[tuple[float, int]] = []     # (arrival time, cached tokens) per output line
        self._tasks: list[asyncio.Task] = []
        self._next_line = 0
        self._rate = 0.0                                # answered lines per second
        self._last: tuple[float, int] | None = None
        self._measure_from: float | None = None
        self._dry_at: float | None = None

    @property
    def counts(self) -> tuple[int, int]:
        return sum(t for t, _ in self._counts.values()), sum(a for _, a in self._counts.values())

    async def start(self) -> None:
        await self._submit(self.chunk)
        self._tasks.append(asyncio.create_task(self._loop()))

    def measure_from(self, t0: float) -> None:
        self._measure_from = t0

    def saturated(self, t1: float) -> bool:
        total, answered = self.counts
        return (self._dry_at is None or self._dry_at > t1) and total > answered

    def cached_tokens(self, t0: float, t1: float) -> int:
        return sum(c for t, c in self._results if t0 <= t <= t1)

    async def stop(self) -> list[str]:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for bid in self.batch_ids:
            if self._status.get(bid) not in TERMINAL:
                try:
                    await self.stub.CancelBatch(pb.CancelBatchRequest(batch_id=bid), metadata=self.md, timeout=30)
                except grpc.aio.AioRpcError as exc:  # e.g. it finished meanwhile; the caller waits for idle
                    self.say(f"[{self.mode}] cancelling {bid}: {exc.code().name}: {exc.details()}")
        return list(self.batch_ids)

    async def _submit(self, n: int) -> None:
        body = self.lines(self._next_line, n)
        batch = await self.stub.SubmitBatch(pb.SubmitBatchRequest(input_jsonl=body,
                                                                  metadata={"bench": f"mixed-{self.mode}"}),
                                            metadata=self.md, timeout=300)
        if batch.status == pb.BATCH_STATUS_FAILED:
            raise HpcserveError(f"the benchmark batch failed validation: {list(batch.errors)[:3]}")
        self._next_line += n
        self.batch_ids.append(batch.id)
        self._counts[batch.id] = (batch.request_counts.total, 0)
        self._tasks.append(asyncio.create_task(self._follow(batch.id)))
        self.say(f"[{self.mode}] batch {batch.id}: {batch.request_counts.total} lines submitted "
                 f"({self._next_line} in all)")

    async def _follow(self, batch_id: str) -> None:
        call = self.stub.StreamBatchResults(pb.StreamBatchResultsRequest(batch_id=batch_id, follow=True),
                                            metadata=self.md)
        try:
            async for line in call:
                self._results.append((time.monotonic(), cached_tokens_of(line)))
        except grpc.aio.AioRpcError:
            pass  # the daemon is going away; the window is over by then
        finally:
            call.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.poll()
            except grpc.aio.AioRpcError as exc:  # one failed poll is not the end of the feed
                self.say(f"[{self.mode}] batch feed poll failed ({exc.code().name}: {exc.details()}); retrying")

    async def poll(self) -> None:
        for bid in self.batch_ids:
            if self._status.get(bid) in TERMINAL:
                continue
            b = await self.stub.GetBatch(pb.GetBatchRequest(batch_id=bid), metadata=self.md, timeout=30)
            self._status[bid] = b.status
            self._counts[bid] = (b.request_counts.total, b.request_counts.completed + b.request_counts.failed)
        info = await self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.md, timeout=30)
        now, (total, answered) = time.monotonic(), self.counts
        if self._last is not None and now > self._last[0]:
            rate = (answered - self._last[1]) / (now - self._last[0])
            self._rate += RATE_SMOOTHING * (rate - self._rate)
        self._last = (now, answered)
        left = total - answered
        if left <= 0 and self._measure_from is not None and self._dry_at is None:
            self._dry_at = now
        in_flight = sum(r.num_running + r.num_waiting for r in info.replicas if not r.is_chat_only)
        ahead = math.ceil(self._rate * TOPUP_HORIZON_S)
        if left < max(self.chunk, 2 * in_flight + ahead):
            await self._submit(max(self.chunk, ahead))
