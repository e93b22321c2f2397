"""``hpcserve bench disagg``: the process half. Runs a colocated and a disaggregated daemon one after
the other on the same ranks and load, then the raw handoff-vs-MPI benchmark; the numbers are computed
by ``hpcserve.bench.disagg``.

Interface::

    run_disagg(model, ranks=2, duration_s=60, rate=0.2, streams=8, seed=0, config_path=None,
               ttft_slo_s=None, itl_slo_s=None, slo_scale=slo.SLO_SCALE, progress=print_to_stderr) -> dict

Lifecycle (every daemon: ``daemons.BenchDaemons.run``, one at a time):

1. load the user's site config, read the model's vocabulary size and KV geometry (layers, KV heads,
   head dim); print the machine and engine paths;
2. unless both SLOs are given: a daemon "calibrate" (the colocated config) measures the unloaded
   TTFT (at the longest long-prompt length) and ITL; SLOs = ``--slo-scale`` x those
   (``loadgen.calibrate_slos``, shared with ``bench mixed``);
3. per mode, a fresh daemon (cold prefix cache) with the user's TOML plus the SLO keys,
   ``engine.num-threads`` (cores // ranks unless the file sets it) and ``disagg.roles``: "" (every
   replica mixed) for "colocated", ``prefill:1,decode:RANKS-1`` for "disaggregated". In each:
   a. parity: the ``disagg.parity_prompts`` all at once, greedy; keep the token ids and metrics;
   b. wait until every replica is idle; the load (``_load``, prompts of the mode's own): stream slots
      in a closed loop and long prompts on their Poisson schedule for the window; then every request
      runs to its end;
   c. wait until idle, stop the daemon;
4. ``mpiexec -n 2 python -m hpcserve.transfer.bench`` with the served geometry (block size, group size
   and checksum setting from the site config; the KV dtype from the handoff bytes seen in 3.);
5. the result dict: the issue's keys, per-mode tables, handoff latency, parity, targets, config.

The temporary directory (state dirs, daemon logs) is removed on success and kept, with its path in
the error, on failure.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.bench import disagg, mixed, slo
from hpcserve.bench.daemons import BenchDaemons, DaemonProcess, model_vocab_size, read_toml
from hpcserve.bench.disagg import LONG, PARITY, STREAM, RequestRecord
from hpcserve.bench.loadgen import Session, _stderr, calibrate_slos, predicted_machine
from hpcserve.errors import HpcserveError

PROGRESS_EVERY_S = 5.0
TAIL_TIMEOUT_S = 300.0       # window end until every request of the load has ended (at least)
PARITY_TIMEOUT_S = 600.0
TRANSFER_TIMEOUT_S = 600.0


def _metrics_dict(m: pb.RequestMetrics) -> dict:
    return {"prefill_replica_id": m.prefill_replica_id, "decode_replica_id": m.decode_replica_id,
            "disaggregated": m.disaggregated, "kv_handoff_s": m.kv_handoff_s,
            "kv_handoff_bytes": m.kv_handoff_bytes, "kv_handoff_failed": m.kv_handoff_failed}


async def _request(session: Session, rid: str, ids: Sequence[int], max_tokens: int, rec: RequestRecord) -> None:
    def on_chunk(chunk: pb.CompletionChunk) -> None:
        rec.token_ids.extend(chunk.token_ids)
        if chunk.HasField("metrics"):
            rec.metrics = _metrics_dict(chunk.metrics)

    await session.chat(rid, ids, max_tokens, rec, on_chunk=on_chunk)


async def _parity(session: Session, mode: str, prompts) -> list[RequestRecord]:
    recs = [RequestRecord(time.monotonic(), kind=PARITY, key=f"parity-{i}", prompt_len=len(ids))
            for i, (ids, _) in enumerate(prompts)]
    tasks = [asyncio.create_task(_request(session, f"disagg-{mode}-parity-{i}", ids, n, r))
             for i, ((ids, n), r) in enumerate(zip(prompts, recs))]
    _, pending = await asyncio.wait(tasks, timeout=PARITY_TIMEOUT_S)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return recs


async def _load(session: Session, mode: str, arrivals: Sequence[disagg.Arrival], streams: int, duration_s: float,
                stream_prompt: Callable[[int, int], tuple], say) -> tuple[list[RequestRecord], float, float]:
    """Stream slots in a closed loop plus the long prompts on schedule; returns (records, t0, window_s)."""
    records: list[RequestRecord] = []
    t0 = time.monotonic()
    t_end = t0 + duration_s

    async def slot(s: int) -> None:
        n = 0
        while time.monotonic() < t_end:
            ids, max_tokens = stream_prompt(s, n)
            rec = RequestRecord(time.monotonic(), kind=STREAM, key=f"stream-{s}-{n}", prompt_len=len(ids))
            records.append(rec)
            await _request(session, f"disagg-{mode}-stream-{s}-{n}", ids, max_tokens, rec)
            if rec.error:
                return  # a failing stream is reported, not retried in a tight loop
            n += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            el = time.monotonic() - t0
            longs = [r for r in records if r.kind == LONG]
            say(f"[{mode}] {min(el, duration_s):.0f}/{duration_s:g} s"
                + (" (window closed; waiting for the last requests)" if el > duration_s else "")
                + f", long prompts {sum(r.done for r in longs)}/{len(longs)} done, stream requests "
                f"{sum(r.done for r in records if r.kind == STREAM)} done")

    tasks = [asyncio.create_task(slot(s)) for s in range(streams)]
    ticker = asyncio.create_task(progress())
    try:
        for a in arrivals:
            delay = t0 + a.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = RequestRecord(t0 + a.at_s, kind=LONG, key=f"long-{a.index}", prompt_len=len(a.prompt_ids))
            records.append(rec)
            tasks.append(asyncio.create_task(_request(session, f"disagg-{mode}-long-{a.index}", a.prompt_ids,
                                                      a.max_tokens, rec)))
        await asyncio.sleep(max(0.0, t_end - time.monotonic()))
        window_s = time.monotonic() - t0
        _, pending = await asyncio.wait(tasks, timeout=max(TAIL_TIMEOUT_S, 4 * duration_s))
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        ticker.cancel()
    return records, t0, window_s


async def _drive(daemon: DaemonProcess, mode: str, prompts, arrivals, streams: int, duration_s: float,
                 stream_prompt, ttft_slo_s: float, itl_slo_s: float, say) -> dict:
    session = Session(daemon, say)
    try:
        say(f"[{mode}] parity: {len(prompts)} prompts, greedy")
        par = await _parity(session, mode, prompts)
        failed = [r.error for r in par if r.error]
        if failed:
            say(f"[{mode}] {len(failed)} parity request(s) failed, e.g. {failed[0]}")
        await session.wait_idle()
        say(f"[{mode}] load: {streams} stream slots, {len(arrivals)} long prompts over {duration_s:g} s")
        records, t0, window_s = await _load(session, mode, arrivals, streams, duration_s, stream_prompt, say)
        failed = [r.error for r in records if r.error]
        if failed:
            say(f"[{mode}] {len(failed)} request(s) of the load failed, e.g. {failed[0]}")
        await session.wait_idle()
        info = await session.info()
        out = disagg.mode_metrics(records, t0, window_s, ttft_slo_s, itl_slo_s)
        out["num_cached_tokens_parity"] = sum(r.cached_tokens for r in par)
        out["replica_kv"] = [{"replica_id": r.replica_id, "role": pb.ReplicaRole.Name(r.role),
                              "num_sent": r.kv.num_sent, "num_received": r.kv.num_received,
                              "num_failed": r.kv.num_failed, "bytes_received": r.kv.bytes_received,
                              "num_fallbacks": r.kv.num_fallbacks} for r in info.replicas]
        say(f"[{mode}] done: {out['num_stream_requests']} stream requests, {out['num_long_requests']} long "
            f"prompts, ITL p99 {out['itl_p99_s'] if out['itl_p99_s'] is None else round(out['itl_p99_s'], 4)} s")
        return {"metrics": out, "parity": par, "load": records}
    finally:
        await session.close()


def _kv_itemsize(records: Sequence[RequestRecord], per_token_elems: int, block_size: int) -> float | None:
    """Bytes per KV element implied by the handoffs seen: bytes / (whole blocks of the prompt minus its
    last token x elements per token); the median over requests."""
    xs = []
    for r in records:
        m = r.metrics or {}
        if m.get("disaggregated") and m.get("kv_handoff_bytes") and r.prompt_len >= 2:
            blocks = -(-(r.prompt_len - 1) // block_size)
            xs.append(m["kv_handoff_bytes"] / (blocks * block_size * per_token_elems))
    return mixed.percentile(xs, 50)


def run_transfer_bench(mpiexec: str, geometry: dict, tokens: Sequence[int], group_mib: float, checksum: bool,
                       timeout: float = TRANSFER_TIMEOUT_S) -> dict:
    """``mpiexec -n 2 python -m hpcserve.transfer.bench`` with ``geometry``; its JSON object."""
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "hpcserve.transfer.bench",
           "--layers", str(geometry["num_layers"]), "--kv-heads", str(geometry["num_kv_heads"]),
           "--head-dim", str(geometry["head_dim"]), "--block-size", str(geometry["block_size"]),
           "--dtype", geometry["dtype"], "--tokens", ",".join(map(str, tokens)), "--group-mib", repr(group_mib)]
    if checksum:
        cmd.append("--checksum")
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HpcserveError(f"the handoff-vs-MPI benchmark did not run ({' '.join(cmd)}): {exc}") from None
    start = proc.stdout.find("{")
    try:
        if proc.returncode != 0 or start < 0:
            raise ValueError(f"exit code {proc.returncode}")
        return json.loads(proc.stdout[start:])
    except ValueError as exc:
        raise HpcserveError(f"the handoff-vs-MPI benchmark failed ({exc}): {' '.join(cmd)}\n"
                            f"{proc.stderr[-3000:]}{proc.stdout[-2000:]}") from None


def run_disagg(model: str, ranks: int = 2, duration_s: float = 60.0, rate: float = 0.2, streams: int = 8,
               seed: int = 0, config_path: str | os.PathLike | None = None, ttft_slo_s: float | None = None,
               itl_slo_s: float | None = None, slo_scale: float = slo.SLO_SCALE,
               progress: Callable[[str], None] | None = _stderr) -> dict:
    """Run both modes and the transfer benchmark; see the module docstring. Raises ``HpcserveError``
    with the failing daemon's log tail."""
    from hpcserve.bench.machine import describe
    from hpcserve.config import load_config
    from hpcserve.models.config import load_model_config
    from hpcserve.models.loader import resolve_model

    if ranks < 2:
        raise HpcserveError("bench disagg needs --ranks >= 2 (one prefill and at least one decode replica)")
    started = time.monotonic()

    def say(msg: str) -> None:
        if progress is not None:
            progress(f"bench disagg {time.monotonic() - started:6.1f}s {msg}")

    site = load_config(config_path, overrides={"daemon.ranks": ranks})  # validates the user's file
    user_doc = read_toml(Path(config_path)) if config_path else {}
    threads = mixed.rank_threads(site.engine.num_threads, ranks, os.cpu_count())
    say(f"resolving model {model}")
    vocab = model_vocab_size(model)
    mc = load_model_config(resolve_model(model))
    block_size = site.engine.block_size
    machine = predicted_machine(site)
    for line in describe(machine):
        say(line)
    roles = {"colocated": "", "disaggregated": f"prefill:1,decode:{ranks - 1}"}
    runs: dict = {}
    prompts = max_model_len = None
    with BenchDaemons("disagg", model, ranks, say) as daemons:
        slos = calibrate_slos(daemons, disagg.daemon_config(user_doc, site.slo.chat_ttft_p99_s,
                                                            site.slo.chat_itl_p99_s, roles["colocated"], threads),
                              vocab, disagg.LONG_PROMPT_LEN[1], slo_scale, ttft_slo_s, itl_slo_s)
        ttft, itl = slos["chat_ttft_slo_s"], slos["chat_itl_slo_s"]
        for mode in disagg.MODES:
            def body(daemon: DaemonProcess, info: pb.ServerInfo, mode: str = mode) -> dict:
                nonlocal prompts, max_model_len
                say(f"daemon '{mode}' replicas: " + ", ".join(
                    pb.ReplicaRole.Name(r.role).removeprefix("REPLICA_ROLE_").lower() for r in info.replicas))
                if mode == "disaggregated" and not any(r.role == pb.REPLICA_ROLE_PREFILL for r in info.replicas):
                    raise HpcserveError("the disaggregated daemon reports no prefill replica")
                max_model_len = info.max_model_len or None
                if prompts is None:
                    prompts = disagg.parity_prompts(seed, vocab, max_model_len)
                arrivals = disagg.long_prompt_workload(seed, rate, duration_s, vocab, max_model_len, mode=mode)
                say(f"[{mode}] workload: {len(arrivals)} long prompts in {duration_s:g} s, {streams} stream slots")
                stream_prompt = functools.partial(disagg.stream_prompt, seed, vocab_size=vocab,
                                                  max_model_len=max_model_len, mode=mode)
                return asyncio.run(_drive(daemon, mode, prompts, arrivals, streams, duration_s, stream_prompt,
                                          ttft, itl, say))

            runs[mode] = daemons.run(mode, disagg.daemon_config(user_doc, ttft, itl, roles[mode], threads), body,
                                     f"roles {roles[mode] or 'all mixed'}")
        dis = runs["disaggregated"]
        per_token = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim
        itemsize = _kv_itemsize(dis["parity"] + dis["load"], per_token, block_size)
        geometry = {"num_layers": mc.num_layers, "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
                    "block_size": block_size, "dtype": disagg.kv_dtype(itemsize)}
        say(f"handoff vs raw MPI: mpiexec -n 2 python -m hpcserve.transfer.bench ({geometry})")
        tb = run_transfer_bench(site.daemon.mpiexec_path, geometry, disagg.TRANSFER_TOKENS, site.disagg.group_mib,
                                site.disagg.kv_checksum)
    num_long = len(disagg.long_prompt_workload(seed, rate, duration_s, vocab, max_model_len, mode="colocated"))
    return _result(runs, tb, prompts, num_long, geometry, itemsize, cfg={
        "model": model, "ranks": ranks, "duration_s": duration_s, "rate": rate, "streams": streams, "seed": seed,
        "chat_ttft_slo_s": ttft, "chat_itl_slo_s": itl, "slo": slos, "roles": roles, "vocab_size": vocab,
        "max_model_len": max_model_len, "engine_num_threads": site.engine.num_threads or threads,
        "machine": machine, "site_config": str(config_path) if config_path else None})


def _result(runs: dict, tb: dict, prompts, num_long: int, geometry: dict, itemsize, cfg: dict) -> dict:
    colo, dis = runs["colocated"], runs["disaggregated"]
    lens = [len(ids) for ids, _ in prompts]

    def outs(recs):
        return [list(r.token_ids) if r.error is None and r.done else None for r in recs]

    parity = disagg.compare_parity(outs(colo["parity"]), outs(dis["parity"]), lens)
    parity.update(disagg.handoff_counts(dis["parity"]))
    samples = disagg.handoff_samples(dis["parity"] + dis["load"])
    modes = {m: runs[m]["metrics"] for m in disagg.MODES}
    itl = {m: modes[m]["itl_p99_s"] for m in disagg.MODES}
    return {
        "handoff_gib_s": tb["handoff_gib_s"],
        "mpi_raw_gib_s": tb["mpi_raw_gib_s"],
        "handoff_ratio": tb["handoff_ratio"],
        "itl_p99_s": itl,
        "goodput": {m: modes[m]["goodput"] for m in disagg.MODES},
        "parity": parity["parity"],
        "targets": disagg.evaluate_targets(tb["handoff_ratio"], itl["colocated"], itl["disaggregated"],
                                           parity["parity"]),
        "modes": modes,
        "handoff_latency": disagg.handoff_table(samples),
        "handoff_samples": samples,
        "parity_detail": parity,
        "transfer_bench": {k: tb.get(k) for k in ("geometry", "config", "results", "verified")},
        "config": {**cfg, "num_long_prompts": num_long, "kv_itemsize_observed": itemsize,
                   "kv_geometry": geometry, "transfer_tokens": list(disagg.TRANSFER_TOKENS),
                   "stream_prompt_len": list(disagg.STREAM_PROMPT_LEN), "stream_output_len": disagg.STREAM_OUTPUT_LEN,
                   "long_prompt_len": list(disagg.LONG_PROMPT_LEN), "long_output_len": disagg.LONG_OUTPUT_LEN,
                   "parity_prompt_lens": lens},
    }
