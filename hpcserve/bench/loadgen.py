"""``hpcserve bench mixed``: the process half. Starts real daemons, drives chat and batch load over
gRPC, samples the replicas' counters; the numbers are computed by ``hpcserve.bench.mixed``.

Interface::

    run_mixed(model, ranks, chat_rate, duration_s, batch_lines, seed=0, config_path=None,
              ttft_slo_s=None, itl_slo_s=None, progress=print_to_stderr) -> dict
    # {"modes": {chat_only, batch_only, shared, split: {metric: value}}, "targets": {...}, "config": {...}}

Lifecycle:

1. load the user's site config (SLO defaults from its ``[slo]``), read the model's vocabulary size;
2. daemon "pool": ``python -m hpcserve serve --listen 127.0.0.1:0 --state-dir TMP --config GEN`` in its
   own session, where GEN is the user's TOML plus the SLO keys and ``dedicated-chat-replicas = 0``;
   wait for ``endpoint.json`` and ``GetServerInfo().is_ready``; a few short warm-up chats;
   run chat_only, batch_only, shared (one asyncio loop, grpc.aio);
3. daemon "split": the same with ``dedicated-chat-replicas = ranks // 2``; run split;
4. each daemon is stopped with SIGTERM (SIGKILL to its process group if it hangs), also on errors
   and Ctrl-C. The temporary directory (state dirs, daemon logs) is removed on success and kept,
   with its path in the error, on failure.

One mode: submit the batch (if any) and wait for its steady state (``Session.wait_steady``: every
batch-serving replica runs lines and at least one line per such replica has finished, so the window
does not see only the first prefill burst of a freshly submitted batch), plus
``batch_warmup_s(duration)`` (2 s, or 5% of a shorter window); snapshot the counters (window start =
arrival origin); send the chat arrivals on schedule, each as its own task so a slow stream never
delays the next arrival; snapshot again at start + duration (window end); let the chats that arrived
in the window finish; cancel the batch and wait until every replica reports num_running ==
num_waiting == 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc
from hpcserve.bench import mixed
from hpcserve.daemon.utilization import KEYS as ECON_KEYS
from hpcserve.daemon.utilization import window_utilization
from hpcserve.errors import HpcserveError

BATCH_WARMUP_S = 2.0        # after steady state, at most this (and 5% of the window) more
BATCH_WARMUP_FRACTION = 0.05  # before the window opens
READY_TIMEOUT_S = 900.0     # daemon start until every replica serves
STEADY_TIMEOUT_S = 900.0    # batch submitted until it is in steady state (see Session.wait_steady)
IDLE_TIMEOUT_S = 180.0      # batch cancelled until every replica is idle
STOP_TIMEOUT_S = 60.0       # SIGTERM until SIGKILL
PROGRESS_EVERY_S = 5.0
WARMUP_CHATS_PER_RANK = 2   # short chats (16-token prompt, 8 tokens) before a daemon's first mode

_TERMINAL = (pb.BATCH_STATUS_COMPLETED, pb.BATCH_STATUS_FAILED, pb.BATCH_STATUS_CANCELLED, pb.BATCH_STATUS_EXPIRED)
_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def batch_warmup_s(duration_s: float) -> float:
    return min(BATCH_WARMUP_S, BATCH_WARMUP_FRACTION * duration_s)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_vocab_size(model: str) -> int:
    """``vocab_size`` from the model's config.json (``demo`` and .gguf are resolved as the daemon does)."""
    from hpcserve.models.loader import resolve_model

    path = resolve_model(model) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HpcserveError(f"cannot read the model's config {path}: {exc}") from None
    vocab = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise HpcserveError(f"{path}: no usable vocab_size")
    return vocab


class DaemonProcess:
    """One ``hpcserve serve`` subprocess on its own state dir under ``workdir``."""

    def __init__(self, name: str, model: str, ranks: int, config_path: Path, workdir: Path) -> None:
        self.name, self.model, self.ranks, self.config_path = name, model, ranks, config_path
        self.state_dir = workdir / f"{name}-state"
        self.log_path = workdir / f"{name}-daemon.log"
        self.proc: subprocess.Popen | None = None
        self.address = self.token = ""

    def start(self, timeout: float = READY_TIMEOUT_S) -> pb.ServerInfo:
        self.state_dir.mkdir(parents=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hpcserve", "serve", "--model", self.model, "--ranks", str(self.ranks),
                 "--listen", "127.0.0.1:0", "--state-dir", str(self.state_dir), "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        channel = None
        try:
            while True:
                if self.proc.poll() is not None:
                    raise HpcserveError(f"the {self.name} daemon exited with {self.proc.returncode} while starting")
                if time.monotonic() > deadline:
                    raise HpcserveError(f"the {self.name} daemon was not ready in {timeout:g} s")
                if channel is None:
                    try:
                        ep = json.loads((self.state_dir / "endpoint.json").read_text())
                    except (OSError, ValueError):
                        ep = None
                    if ep and ep.get("pid") == self.proc.pid:
                        self.address, self.token = ep["address"], ep.get("token") or ""
                        channel = grpc.insecure_channel(self.address, options=_OPTIONS)
                if channel is not None:
                    stub = serving_pb2_grpc.ServingStub(channel)
                    try:
                        info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.metadata, timeout=10)
                        if info.is_ready:
                            return info
                    except grpc.RpcError:
                        pass
                time.sleep(0.25)
        finally:
            if channel is not None:
                channel.close()

    @property
    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait; SIGKILL the process group if it hangs. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        parts = []
        for path in (self.log_path, self.state_dir / "logs" / "workers.log"):
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                parts.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(parts)


class Session:
    """The async gRPC side of one daemon: load generation and counter sampling."""

    def __init__(self, daemon: DaemonProcess, say: Callable[[str], None]) -> None:
        self.channel = grpc.aio.insecure_channel(daemon.address, options=_OPTIONS)
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

    async def warm_up(self, ranks: int) -> None:
        recs = [mixed.ChatRecord(time.monotonic()) for _ in range(ranks * WARMUP_CHATS_PER_RANK)]
        await asyncio.gather(*(self.chat(f"mixed-warmup-{i}", list(range(100, 116)), 8, r)
                               for i, r in enumerate(recs)))
        failed = [r.error for r in recs if r.error]
        if failed:
            raise HpcserveError(f"warm-up chat failed: {failed[0]}")

    async def wait_steady(self, mode: str, batch_id: str) -> None:
        """Until the batch is in steady state: every batch-serving replica runs lines and as many lines
        have finished as there are such replicas (the first cohort is through prefill and decode, the
        lines in flight are at staggered stages); then ``batch_warmup_s``."""
        started = last_say = time.monotonic()
        while time.monotonic() < started + STEADY_TIMEOUT_S:
            info, batch = await self.info(), await self.batch(batch_id)
            feeders = [r for r in info.replicas if not r.is_chat_only]
            busy = sum(r.num_running > 0 for r in feeders)
            c = batch.request_counts
            if batch.status in _TERMINAL:
                break
            if feeders and busy == len(feeders) and c.completed + c.failed >= len(feeders):
                return
            if time.monotonic() - last_say >= PROGRESS_EVERY_S:
                last_say = time.monotonic()
                self.say(f"[{mode}] warming up {last_say - started:.0f} s: batch lines running on {busy}/"
                         f"{len(feeders)} replicas, {c.completed + c.failed}/{c.total} lines done")
            await asyncio.sleep(0.2)
        self.say(f"[{mode}] warning: the batch did not reach steady state on every batch replica; "
                 "the window opens anyway")

    async def wait_idle(self, batch_id: str | None) -> None:
        """Cancel the batch (if any) and wait until it is terminal and every replica is idle twice in a row."""
        if batch_id:
            await self.stub.CancelBatch(pb.CancelBatchRequest(batch_id=batch_id), metadata=self.md, timeout=30)
        deadline, idle_seen = time.monotonic() + IDLE_TIMEOUT_S, 0
        while time.monotonic() < deadline:
            done = batch_id is None or (await self.batch(batch_id)).status in _TERMINAL
            info = await self.info()
            idle = done and all(r.num_running == 0 and r.num_waiting == 0 for r in info.replicas)
            idle_seen = idle_seen + 1 if idle else 0
            if idle_seen >= 2:
                return
            await asyncio.sleep(0.3)
        raise HpcserveError(f"the replicas did not go idle within {IDLE_TIMEOUT_S:g} s after the mode ended")

    async def run_mode(self, mode: str, arrivals: Sequence[mixed.ChatArrival], batch_bytes: bytes | None,
                       duration_s: float, ttft_slo_s: float, itl_slo_s: float) -> dict:
        batch_id = None
        if batch_bytes:
            batch = await self.stub.SubmitBatch(pb.SubmitBatchRequest(input_jsonl=batch_bytes,
                                                                      metadata={"bench": f"mixed-{mode}"}),
                                                metadata=self.md, timeout=300)
            if batch.status == pb.BATCH_STATUS_FAILED:
                raise HpcserveError(f"the benchmark batch failed validation: {list(batch.errors)[:3]}")
            batch_id = batch.id
            self.say(f"[{mode}] batch {batch_id}: {batch.request_counts.total} lines submitted, warming up")
            await self.wait_steady(mode, batch_id)
            await asyncio.sleep(batch_warmup_s(duration_s))
        start, t0 = await self.snapshot()
        usage0 = await self.usage()
        records: list[mixed.ChatRecord] = []
        tasks: list[asyncio.Task] = []
        progress = asyncio.create_task(self._progress(mode, t0, duration_s, records, batch_id))
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
            saturated = None
            if batch_id:
                saturated = (await self.batch(batch_id)).status not in _TERMINAL
                if not saturated:
                    self.say(f"[{mode}] warning: the batch finished inside the window; use more --batch-lines")
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=max(60.0, 4 * duration_s))
                for t in pending:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            progress.cancel()
        errors = [r.error for r in records if r.error]
        if errors:
            self.say(f"[{mode}] {len(errors)} chat request(s) failed, e.g. {errors[0]}")
        await self.wait_idle(batch_id)
        try:
            out = mixed.mode_metrics(records, start, end, t1 - t0, ttft_slo_s, itl_slo_s, has_chat=bool(arrivals),
                                     window_end=t1)
        except ValueError as exc:
            raise HpcserveError(f"{mode}: {exc}") from None
        out["batch_saturated"] = saturated
        try:  # useful rank-seconds delivered in the window / allocated (docs/utilization.md)
            econ = window_utilization(usage0, usage1)
        except ValueError:  # not an admin key (no allocation in the report)
            econ = dict.fromkeys(ECON_KEYS)
            self.say(f"[{mode}] no economic utilization: the endpoint key is not an admin tenant's")
        out.update({k: econ[k] for k in ECON_KEYS})
        self.say(f"[{mode}] done: window {t1 - t0:.1f} s, {len(records)} chats, "
                 f"batch {out['batch_tokens_per_s']:.1f} tok/s, chat {out['chat_tokens_per_s']:.1f} tok/s")
        return out

    async def _progress(self, mode, t0, duration_s, records, batch_id) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            elapsed = time.monotonic() - t0
            msg = f"[{mode}] {min(elapsed, duration_s):.0f}/{duration_s:g} s"
            if elapsed > duration_s:
                msg += " (window closed; waiting for the last chats)"
            if records:
                msg += f", chat {len(records)} sent, {sum(r.done for r in records)} done"
            if batch_id:
                try:
                    c = (await self.batch(batch_id)).request_counts
                    msg += f", batch {c.completed + c.failed}/{c.total} lines"
                except grpc.aio.AioRpcError:
                    pass
            self.say(msg)


async def _run_modes(daemon: DaemonProcess, modes: Sequence[str], arrivals, batch_bytes: bytes, ranks: int,
                     duration_s: float, ttft_slo_s: float, itl_slo_s: float, say) -> dict:
    session = Session(daemon, say)
    try:
        await session.warm_up(ranks)
        out = {}
        for mode in modes:
            say(f"[{mode}] starting ({duration_s:g} s window)")
            out[mode] = await session.run_mode(mode, arrivals if mode != "batch_only" else [],
                                               batch_bytes if mode != "chat_only" else None,
                                               duration_s, ttft_slo_s, itl_slo_s)
        return out
    finally:
        await session.close()


def _read_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads(path.read_text(encoding="utf-8"))


def run_mixed(model: str, ranks: int, chat_rate: float, duration_s: float, batch_lines: int, seed: int = 0,
              config_path: str | os.PathLike | None = None, ttft_slo_s: float | None = None,
              itl_slo_s: float | None = None, progress: Callable[[str], None] | None = _stderr) -> dict:
    """Run the four modes; see the module docstring. Raises ``HpcserveError`` with the daemon's log tail."""
    from hpcserve.config import load_config

    if ranks < 2:
        raise HpcserveError("bench mixed needs --ranks >= 2 (the split mode gives half the ranks to chat)")
    started = time.monotonic()

    def say(msg: str) -> None:
        if progress is not None:
            progress(f"bench mixed {time.monotonic() - started:6.1f}s {msg}")

    site = load_config(config_path, overrides={"daemon.ranks": ranks})  # validates the user's file
    ttft_slo_s = site.slo.chat_ttft_p99_s if ttft_slo_s is None else ttft_slo_s
    itl_slo_s = site.slo.chat_itl_p99_s if itl_slo_s is None else itl_slo_s
    user_doc = _read_toml(Path(config_path)) if config_path else {}
    say(f"resolving model {model}")
    vocab = model_vocab_size(model)
    split_k = ranks // 2
    workdir = Path(tempfile.mkdtemp(prefix="hpcserve-bench-mixed-"))
    modes: dict = {}
    max_model_len = workload = None
    ok = False
    try:
        for name, k, names in (("pool", 0, ("chat_only", "batch_only", "shared")), ("split", split_k, ("split",))):
            cfg_path = workdir / f"{name}.toml"
            cfg_path.write_text(mixed.dump_toml(mixed.daemon_config(user_doc, ttft_slo_s, itl_slo_s, k)))
            load_config(cfg_path, overrides={"daemon.ranks": ranks})  # a bad merge fails here, not in the daemon
            daemon = DaemonProcess(name, model, ranks, cfg_path, workdir)
            what = "shared pool" if k == 0 else f"split: chat on replicas 0..{k - 1}, batch on the rest"
            say(f"starting daemon '{name}' ({ranks} ranks, {what}); logs in {daemon.log_path}")
            try:
                info = daemon.start()
                say(f"daemon '{name}' ready (max_model_len {info.max_model_len})")
                if workload is None:
                    max_model_len = info.max_model_len or None
                    workload = (mixed.chat_workload(seed, chat_rate, duration_s, vocab, max_model_len),
                                mixed.batch_jsonl(mixed.batch_workload(seed, batch_lines, vocab, max_model_len)))
                    say(f"workload: {len(workload[0])} chat arrivals in {duration_s:g} s, {batch_lines} batch lines")
                modes.update(asyncio.run(_run_modes(daemon, names, workload[0], workload[1], ranks, duration_s,
                                                    ttft_slo_s, itl_slo_s, say)))
            except (HpcserveError, grpc.RpcError) as exc:
                why = (f"a call to the {name} daemon failed ({exc.code().name}: {exc.details()})"
                       if isinstance(exc, grpc.RpcError) else str(exc))
                raise HpcserveError(f"{why}\n{daemon.log_tail()}\n(benchmark files kept in {workdir})") from None
            finally:
                say(f"stopping daemon '{name}'")
                daemon.stop()
        ok = True
    finally:
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "modes": {m: modes.get(m) for m in mixed.MODES},
        "targets": mixed.evaluate_targets(modes),
        "config": {
            "model": model, "ranks": ranks, "chat_rate": chat_rate, "duration_s": duration_s,
            "batch_lines": batch_lines, "seed": seed, "chat_ttft_slo_s": ttft_slo_s, "chat_itl_slo_s": itl_slo_s,
            "split_dedicated_chat_replicas": split_k, "vocab_size": vocab, "max_model_len": max_model_len,
            "num_chat_arrivals": len(workload[0]) if workload else 0,
            "chat_prompt_len": list(mixed.CHAT_PROMPT_LEN), "chat_output_len": list(mixed.CHAT_OUTPUT_LEN),
            "batch_prompt_len": list(mixed.BATCH_PROMPT_LEN), "batch_output_len": list(mixed.BATCH_OUTPUT_LEN),
            "batch_warmup_s": batch_warmup_s(duration_s), "site_config": str(config_path) if config_path else None,
        },
    }
