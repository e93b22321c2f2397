"""``hpcserve bench mixed``: the process half. Starts real daemons, drives chat and batch load over
gRPC, samples the replicas' counters; the numbers are computed by ``hpcserve.bench.mixed``.

Interface::

    run_mixed(model, ranks, chat_rate, duration_s, batch_lines, seed=0, config_path=None,
              ttft_slo_s=None, itl_slo_s=None, slo_scale=slo.SLO_SCALE, progress=print_to_stderr) -> dict
    # {"modes": {chat_only, batch_only, shared, split: {metric: value}}, "targets": {...}, "config": {...}}
    Session(daemon, say)       the async gRPC side of one daemon (also used by ``disagg_run``)
    calibrate_slos(...)        the SLOs of a run (``hpcserve.bench.slo``), measured on a daemon of their own

Lifecycle (every daemon: ``daemons.BenchDaemons.run``, one at a time, the user's TOML plus the keys
named here):

1. load the user's site config, read the model's vocabulary size; print the machine and engine paths;
2. unless both SLOs are given: daemon "calibrate" (the user's config; nothing else ever runs on it)
   measures the unloaded TTFT and ITL; the SLOs are ``--slo-scale`` x those (``slo.derive``);
3. per mode, a fresh daemon (so every mode starts with a cold prefix cache) whose config is the
   user's plus the SLO keys and the mode's placement keys (``mixed.placement``: split dedicates
   ranks // 2 replicas to chat, chat_only spreads chat with ``chat-pack-limit = 0``); a few warm-up
   chats on unmeasured prompts; then the mode, on prompts of its own (``mixed.chat_workload`` /
   ``batch_workload`` with ``mode``).

One mode (``Session.run_mode``): start the batch feed (``batchfeed.BatchFeed``: batches topped up so
the pool never runs out of lines) and wait for its steady state (``Session.wait_steady``: every
batch-serving replica runs lines and at least one line per such replica has been answered, so the
window does not see only the first prefill burst), plus ``batch_warmup_s(duration)`` (2 s, or 5% of
a shorter window); snapshot the counters (window start = arrival origin); send the chat arrivals on
schedule, each as its own task so a slow stream never delays the next arrival; snapshot again at
start + duration (window end); let the chats that arrived in the window finish; stop the feed
(cancel its batches) and wait until every replica reports num_running == num_waiting == 0.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence

import grpc

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc
from hpcserve.bench import mixed, slo
from hpcserve.bench.batchfeed import TERMINAL, BatchFeed
from hpcserve.bench.daemons import GRPC_OPTIONS, BenchDaemons, DaemonProcess, model_vocab_size, read_toml
from hpcserve.daemon.utilization import KEYS as ECON_KEYS
from hpcserve.daemon.utilization import window_utilization
from hpcserve.errors import HpcserveError

BATCH_WARMUP_S = 2.0        # after steady state, at most this (and 5% of the window) more
BATCH_WARMUP_FRACTION = 0.05  # before the window opens
STEADY_TIMEOUT_S = 900.0    # batch submitted until it is in steady state (see Session.wait_steady)
IDLE_TIMEOUT_S = 180.0      # batch cancelled until every replica is idle
PROGRESS_EVERY_S = 5.0
WARMUP_CHATS_PER_RANK = 2   # short chats (16-token prompt, 8 tokens) before a daemon's mode


def batch_warmup_s(duration_s: float) -> float:
    return min(BATCH_WARMUP_S, BATCH_WARMUP_FRACTION * duration_s)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Session:
    """The async gRPC side of one daemon: load generation and counter sampling."""

    def __init__(self, daemon: DaemonProcess, say: Callable[[str], None]) -> None:
        self.channel = grpc.aio.insecure_channel(daemon.address, options=GRPC_OPTIONS)
        self.stub = serving_pb2_grpc.ServingStub(self.channel)
        self.md = daemon.metadata
        self.say = say

    async def close(self) -> None:
        await self.channel.close()

    async def info(self) -> pb.ServerInfo:
        return await self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.md, timeout=30)

    async def snapshot(self) -> tuple[dict[int, mixed.ReplicaCounters], float]:
        """The replicas' cumulative counters and when they were read (monotonic, mid-call)."""
        t0 = time.monotonic()
        info = await self.info()
        t = (t0 + time.monotonic()) / 2
        return {r.replica_id: mixed.ReplicaCounters(r.num_output_tokens_batch, r.num_output_tokens_interactive,
                                                    r.busy_time_s, r.num_preemptions) for r in info.replicas}, t

    async def usage(self) -> pb.UsageReport:
        """The daemon's usage report (admin: allocation and useful rank-seconds since it started)."""
        return await self.stub.GetUsage(pb.GetUsageRequest(), metadata=self.md, timeout=30)

    async def batch(self, batch_id: str) -> pb.Batch:
        return await self.stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id), metadata=self.md, timeout=30)

    async def chat(self, rid: str, prompt_ids: Sequence[int], max_tokens: int, rec: mixed.ChatRecord,
                   on_chunk: Callable[[pb.CompletionChunk], None] | None = None) -> None:
        """One greedy interactive ``Complete`` (EOS ignored); token times and errors go to ``rec``,
        every chunk also to ``on_chunk`` (e.g. to keep the token ids or the last chunk's metrics)."""
        req = pb.CompletionRequest(
            prompt_token_ids=pb.TokenIds(ids=list(prompt_ids)), request_id=rid,
            request_class=pb.REQUEST_CLASS_INTERACTIVE,
            sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        call = self.stub.Complete(req, metadata=self.md)
        try:
            async for chunk in call:
                if chunk.token_ids:
                    rec.chunks.append((time.monotonic(), len(chunk.token_ids)))
                if chunk.HasField("usage"):
                    rec.cached_tokens = chunk.usage.cached_tokens
                if on_chunk is not None:
                    on_chunk(chunk)
                if chunk.finish_reason in (pb.FINISH_REASON_ABORT, pb.FINISH_REASON_ERROR):
                    rec.error = pb.FinishReason.Name(chunk.finish_reason)
        except grpc.aio.AioRpcError as exc:
            rec.error = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            rec.error = "did not finish in time"
            call.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure is this request's, not the run's
            rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            rec.done = True

    async def warm_up(self, ranks: int, vocab_size: int) -> None:
        """A few short chats (``WARMUP_CHATS_PER_RANK`` per rank, 16 prompt and 8 output tokens) on
        unmeasured prompts (``mixed.unmeasured_ids``: no measured prompt shares a block with them)."""
        recs = [mixed.ChatRecord(time.monotonic()) for _ in range(ranks * WARMUP_CHATS_PER_RANK)]
        await asyncio.gather(*(self.chat(f"mixed-warmup-{i}", list(mixed.unmeasured_ids(f"warmup-{i}", 16, vocab_size)),
                                         8, r) for i, r in enumerate(recs)))
        failed = [r.error for r in recs if r.error]
        if failed:
            raise HpcserveError(f"warm-up chat failed: {failed[0]}")

    async def wait_steady(self, mode: str, feed: BatchFeed) -> None:
        """Until the batch is in steady state: every batch-serving replica runs lines and as many lines
        have been answered as there are such replicas (the first cohort is through prefill and decode,
        the lines in flight are at staggered stages)."""
        started = last_say = time.monotonic()
        while time.monotonic() < started + STEADY_TIMEOUT_S:
            info = await self.info()
            feeders = [r for r in info.replicas if not r.is_chat_only]
            busy = sum(r.num_running > 0 for r in feeders)
            total, answered = feed.counts
            if feeders and busy == len(feeders) and answered >= len(feeders):
                return
            if time.monotonic() - last_say >= PROGRESS_EVERY_S:
                last_say = time.monotonic()
                self.say(f"[{mode}] warming up {last_say - started:.0f} s: batch lines running on {busy}/"
                         f"{len(feeders)} replicas, {answered}/{total} lines done")
            await asyncio.sleep(0.2)
        self.say(f"[{mode}] warning: the batch did not reach steady state on every batch replica; "
                 "the window opens anyway")

    async def wait_idle(self, batch_ids: Sequence[str] = ()) -> None:
        """Wait until the (cancelled) batches are terminal and every replica is idle twice in a row."""
        deadline, idle_seen = time.monotonic() + IDLE_TIMEOUT_S, 0
        while time.monotonic() < deadline:
            done = True
            for bid in batch_ids:
                done = done and (await self.batch(bid)).status in TERMINAL
            info = await self.info()
            idle = done and all(r.num_running == 0 and r.num_waiting == 0 for r in info.replicas)
            idle_seen = idle_seen + 1 if idle else 0
            if idle_seen >= 2:
                return
            await asyncio.sleep(0.3)
        raise HpcserveError(f"the replicas did not go idle within {IDLE_TIMEOUT_S:g} s after the mode ended")

    async def run_mode(self, mode: str, arrivals: Sequence[mixed.ChatArrival], feed: BatchFeed | None,
                       duration_s: float, ttft_slo_s: float, itl_slo_s: float) -> dict:
        if feed is not None:
            await feed.start()
            await self.wait_steady(mode, feed)
            await asyncio.sleep(batch_warmup_s(duration_s))
        start, t0 = await self.snapshot()
        usage0 = await self.usage()
        if feed is not None:
            feed.measure_from(t0)
        records: list[mixed.ChatRecord] = []
        tasks: list[asyncio.Task] = []
        progress = asyncio.create_task(self._progress(mode, t0, duration_s, records, feed))
        batch_ids: list[str] = []
        try:
            for a in arrivals:
                delay = t0 + a.at_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec = mixed.ChatRecord(arrival_s=t0 + a.at_s)
                records.append(rec)
                tasks.append(asyncio.create_task(self.chat(f"mixed-{mode}-{a.index}", a.prompt_ids, a.max_tokens,
                                                           rec)))
            await asyncio.sleep(max(0.0, t0 + duration_s - time.monotonic()))
            end, t1 = await self.snapshot()
            usage1 = await self.usage()
            saturated = None if feed is None else feed.saturated(t1)
            if saturated is False:
                self.say(f"[{mode}] warning: the batch ran out of lines inside the window")
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=max(60.0, 4 * duration_s))
                for t in pending:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            progress.cancel()
            if feed is not None:
                batch_ids = await feed.stop()
        errors = [r.error for r in records if r.error]
        if errors:
            self.say(f"[{mode}] {len(errors)} chat request(s) failed, e.g. {errors[0]}")
        await self.wait_idle(batch_ids)
        try:
            out = mixed.mode_metrics(records, start, end, t1 - t0, ttft_slo_s, itl_slo_s, has_chat=bool(arrivals),
                                     window_end=t1,
                                     batch_cached_tokens=None if feed is None else feed.cached_tokens(t0, t1))
        except ValueError as exc:
            raise HpcserveError(f"{mode}: {exc}") from None
        out["batch_saturated"] = saturated
        try:  # useful rank-seconds delivered in the window / allocated (docs/utilization.md)
            econ = window_utilization(usage0, usage1)
        except ValueError:  # not an admin key (no allocation in the report)
            econ = dict.fromkeys(ECON_KEYS)
            self.say(f"[{mode}] no economic utilization: the endpoint key is not an admin tenant's")
        out.update({k: econ[k] for k in ECON_KEYS})
        out["batch_lines_submitted"] = None if feed is None else feed.counts[0]
        self.say(f"[{mode}] done: window {t1 - t0:.1f} s, {len(records)} chats, "
                 f"batch {out['batch_tokens_per_s']:.1f} tok/s, chat {out['chat_tokens_per_s']:.1f} tok/s, "
                 f"{out['num_cached_tokens']} cached prompt tokens")
        return out

    async def _progress(self, mode, t0, duration_s, records, feed) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            elapsed = time.monotonic() - t0
            msg = f"[{mode}] {min(elapsed, duration_s):.0f}/{duration_s:g} s"
            if elapsed > duration_s:
                msg += " (window closed; waiting for the last chats)"
            if records:
                msg += f", chat {len(records)} sent, {sum(r.done for r in records)} done"
            if feed is not None:
                total, answered = feed.counts
                msg += f", batch {answered}/{total} lines"
            self.say(msg)


def calibrate_slos(daemons: BenchDaemons, config_doc: dict, vocab_size: int, prompt_len: int, scale: float,
                   ttft_slo_s: float | None, itl_slo_s: float | None) -> dict:
    """The run's SLOs (``slo.derive``); measures the unloaded latencies on a daemon "calibrate"
    (``config_doc``, cold, used for nothing else) unless both SLOs are given."""
    if ttft_slo_s is not None and itl_slo_s is not None:
        return slo.derive(None, scale, ttft_slo_s, itl_slo_s)

    def body(daemon: DaemonProcess, info: pb.ServerInfo) -> dict:
        async def go() -> dict:
            session = Session(daemon, daemons.say)
            try:
                await session.warm_up(daemons.ranks, vocab_size)
                return await slo.measure_unloaded(session.chat, vocab_size, prompt_len, info.max_model_len or None)
            finally:
                await session.close()
        return asyncio.run(go())

    unloaded = daemons.run("calibrate", config_doc, body, "unloaded latencies for the SLOs")
    out = slo.derive(unloaded, scale, ttft_slo_s, itl_slo_s)
    daemons.say(f"SLOs: TTFT {out['chat_ttft_slo_s']:.3g} s, ITL {out['chat_itl_slo_s']:.3g} s ({out['derivation']})")
    return out


def predicted_machine(site) -> dict:
    """``machine.machine_report`` with the engine paths the daemons' ranks take for ``site``'s dtype."""
    from hpcserve.bench.machine import engine_paths, machine_report
    from hpcserve.engine.model_runner import DTYPES, choose_compute_dtype

    compute = choose_compute_dtype(DTYPES[site.model.dtype], "cpu")
    return machine_report(paths=engine_paths(compute), checkpoint_dtype=site.model.dtype,
                          compute_dtype=str(compute).replace("torch.", ""))


async def _one_mode(daemon: DaemonProcess, mode: str, arrivals, feed_lines, chunk: int, ranks: int, vocab: int,
                    duration_s: float, ttft_slo_s: float, itl_slo_s: float, say) -> dict:
    session = Session(daemon, say)
    try:
        await session.warm_up(ranks, vocab)
        say(f"[{mode}] starting ({duration_s:g} s window)")
        feed = None if feed_lines is None else BatchFeed(session.stub, session.md, mode, feed_lines, chunk, say)
        return await session.run_mode(mode, arrivals, feed, duration_s, ttft_slo_s, itl_slo_s)
    finally:
        await session.close()


def run_mixed(model: str, ranks: int, chat_rate: float, duration_s: float, batch_lines: int, seed: int = 0,
              config_path=None, ttft_slo_s: float | None = None, itl_slo_s: float | None = None,
              slo_scale: float = slo.SLO_SCALE, progress: Callable[[str], None] | None = _stderr) -> dict:
    """Run the four modes; see the module docstring. Raises ``HpcserveError`` with the daemon's log tail."""
    from pathlib import Path

    from hpcserve.bench.machine import describe
    from hpcserve.config import load_config

    if ranks < 2:
        raise HpcserveError("bench mixed needs --ranks >= 2 (the split mode gives half the ranks to chat)")
    started = time.monotonic()

    def say(msg: str) -> None:
        if progress is not None:
            progress(f"bench mixed {time.monotonic() - started:6.1f}s {msg}")

    site = load_config(config_path, overrides={"daemon.ranks": ranks})  # validates the user's file
    user_doc = read_toml(Path(config_path)) if config_path else {}
    say(f"resolving model {model}")
    vocab = model_vocab_size(model)
    machine = predicted_machine(site)
    for line in describe(machine):
        say(line)
    threads = mixed.rank_threads(site.engine.num_threads, ranks, os.cpu_count())
    modes: dict = {}
    daemons_cfg: dict = {}
    max_model_len = None
    with BenchDaemons("mixed", model, ranks, say) as daemons:
        slos = calibrate_slos(daemons, mixed.daemon_config(user_doc, site.slo.chat_ttft_p99_s, site.slo.chat_itl_p99_s,
                                                           0, num_threads=threads),
                              vocab, mixed.CHAT_PROMPT_LEN[1], slo_scale, ttft_slo_s, itl_slo_s)
        ttft, itl = slos["chat_ttft_slo_s"], slos["chat_itl_slo_s"]
        for mode in mixed.MODES:
            keys = mixed.placement(mode, ranks)
            daemons_cfg[mode] = {"dedicated-chat-replicas": keys["dedicated-chat-replicas"],
                                 "chat-pack-limit": keys.get("chat-pack-limit", site.daemon.chat_pack_limit)}

            def body(daemon: DaemonProcess, info: pb.ServerInfo, mode: str = mode) -> dict:
                nonlocal max_model_len
                max_model_len = mml = info.max_model_len or None
                arrivals = ([] if mode == "batch_only" else
                            mixed.chat_workload(seed, chat_rate, duration_s, vocab, mml, mode=mode))
                lines = (None if mode == "chat_only" else
                         lambda start, n: mixed.batch_jsonl(mixed.batch_workload(seed, n, vocab, mml, mode=mode,
                                                                                 start=start)))
                say(f"[{mode}] workload: {len(arrivals)} chat arrivals in {duration_s:g} s"
                    + ("" if lines is None else f", batch lines {batch_lines} at a time, topped up"))
                return asyncio.run(_one_mode(daemon, mode, arrivals, lines, batch_lines, ranks, vocab, duration_s,
                                             ttft, itl, say))

            what = ", ".join(f"{k} {v}" for k, v in daemons_cfg[mode].items())
            modes[mode] = daemons.run(mode, mixed.daemon_config(user_doc, ttft, itl, keys["dedicated-chat-replicas"],
                                                                keys.get("chat-pack-limit"), threads), body, what)
    num_arrivals = len(mixed.chat_workload(seed, chat_rate, duration_s, vocab, max_model_len, mode="chat_only"))
    return {
        "modes": {m: modes.get(m) for m in mixed.MODES},
        "targets": mixed.evaluate_targets(modes),
        "config": {
            "model": model, "ranks": ranks, "chat_rate": chat_rate, "duration_s": duration_s,
            "batch_lines": batch_lines, "seed": seed, "chat_ttft_slo_s": ttft, "chat_itl_slo_s": itl,
            "slo": slos, "daemons": daemons_cfg, "engine_num_threads": site.engine.num_threads or threads,
            "split_dedicated_chat_replicas": ranks // 2, "vocab_size": vocab, "max_model_len": max_model_len,
            "num_chat_arrivals": num_arrivals,
            "chat_prompt_len": list(mixed.CHAT_PROMPT_LEN), "chat_output_len": list(mixed.CHAT_OUTPUT_LEN),
            "batch_prompt_len": list(mixed.BATCH_PROMPT_LEN), "batch_output_len": list(mixed.BATCH_OUTPUT_LEN),
            "batch_warmup_s": batch_warmup_s(duration_s), "machine": machine,
            "site_config": str(config_path) if config_path else None,
        },
    }
