"""`hpcserve bench ...`: benchmarks that print numbers, baseline side by side."""

from __future__ import annotations

import json

import click


def _workload_options(config_note: str):
    """--seed, --config, --chat-ttft-slo, --chat-itl-slo, --slo-scale and --json: shared by the
    benchmarks that start daemons and drive a chat workload against SLOs (mixed, disagg)."""
    from hpcserve.bench.slo import SLO_SCALE

    def deco(f):
        f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a report.")(f)
        f = click.option("--slo-scale", default=SLO_SCALE, show_default=True, type=click.FloatRange(0, min_open=True),
                         help="Default SLOs = this x the unloaded TTFT / ITL p99 measured on a daemon of their own "
                              "before the modes (see bench/README.md).")(f)
        f = click.option("--chat-itl-slo", default=None, type=click.FloatRange(0, min_open=True), metavar="SECONDS",
                         help="Chat ITL SLO for attainment and goodput [default: --slo-scale x the unloaded "
                              "ITL p99].")(f)
        f = click.option("--chat-ttft-slo", default=None, type=click.FloatRange(0, min_open=True), metavar="SECONDS",
                         help="Chat TTFT SLO for attainment and goodput [default: --slo-scale x the unloaded "
                              "TTFT].")(f)
        f = click.option("--config", "config_path", default=None, metavar="FILE",
                         type=click.Path(dir_okay=False, exists=True),
                         help=f"Site config TOML for the daemons ({config_note}).")(f)
        return click.option("--seed", default=0, show_default=True, type=int,
                            help="Seed of the workload (arrivals, lengths, ids).")(f)
    return deco


@click.group()
def bench() -> None:
    """Benchmarks. Each runs its baseline in the same invocation and prints ratios."""


@bench.command("throughput")
@click.option("--model", default="demo", show_default=True, help="HF directory, .gguf file, or 'demo'.")
@click.option("--num-prompts", default=32, show_default=True, type=click.IntRange(1))
@click.option("--input-len", default=32, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=64, show_default=True, type=click.IntRange(1))
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="Checkpoint dtype (both engines compute in hpcserve's compute dtype for it).")
@click.option("--baseline", default=None, type=click.Choice(["hf"]), help="Also run transformers generate on the same prompts.")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads for both engines (default: torch's choice).")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(1), help="Alternate the engines this many rounds; each one's best round counts.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the prompts (each round draws its own).")
@click.option("--prefix-caching", is_flag=True, help="Turn hpcserve's prefix cache on (off by default: the prompts "
              "share no prefixes, and transformers has no such cache).")
@click.option("--native-baseline", is_flag=True, help="When hpcserve computes a bf16 checkpoint in fp32 here, also "
              "time transformers in native bf16 (an extra number, not the headline ratio).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def throughput(model, num_prompts, input_len, output_len, dtype, baseline, threads, repeats, seed, prefix_caching,
               native_baseline, as_json) -> None:
    """Offline generation throughput: random prompts, fixed output length, greedy.

    Every prompt generates exactly --output-len tokens (EOS ignored). With
    --baseline hf, transformers' generate runs the same prompts in the same
    process, in the same compute dtype on the same weight values; the two
    alternate for --repeats rounds, every round (and the warm-up) on prompts
    of its own, each engine's best round counts, and the ratio
    hpcserve/baseline is printed. hpcserve's prefix cache is off unless
    --prefix-caching. The cores are shared: compare ratios, and use --repeats
    3 or more for numbers you quote. See bench/README.md.
    """
    from hpcserve.bench.machine import describe
    from hpcserve.bench.throughput import run_throughput

    say = None if as_json else (lambda m: click.echo(f"... {m}", err=True))
    res = run_throughput(
        model, num_prompts, input_len, output_len, dtype, baseline, num_threads=threads, seed=seed, repeats=repeats,
        prefix_caching=prefix_caching, native_baseline=native_baseline, progress=say,
    )
    if as_json:
        click.echo(json.dumps(res))
        return
    for line in describe(res["machine"]):
        click.echo(line)
    h = res["hpcserve"]
    click.echo(f"{'engine':<10} {'tokens/s':>10} {'elapsed s':>10} {'cached tok':>10}  checkpoint -> compute dtype")
    rows = [("hpcserve", h, "")] + [(b["name"], b, label) for b, label in
                                    ((res["baseline"], ""), (res["baseline_native"], "  (extra, not the headline)"))
                                    if b]
    for name, e, label in rows:
        click.echo(f"{name:<10} {e['tokens_per_s']:>10.1f} {e['elapsed_s']:>10.2f} {e['num_cached_tokens']:>10d}  "
                   f"{e['checkpoint_dtype']} -> {e['compute_dtype']}{label}")
    if res["baseline"]:
        click.echo(f"ratio: {res['ratio']:.2f}x ({h['compute_dtype']} vs {res['baseline']['compute_dtype']})   "
                   f"greedy outputs identical: {res['greedy_match']:.0%}")


def _mixed_help() -> str:
    from hpcserve.bench import mixed as m

    return f"""Chat and batch on one pool of ranks: four modes, same model and ranks, same load shape.

    \b
    chat_only   Poisson chat arrivals at --chat-rate req/s, no batch; chat spread
                over the replicas ([daemon] chat-pack-limit = 0)
    batch_only  batch lines keep the pool busy, no chat
    shared      both at once on every replica (hpcserve as designed)
    split       both, with [daemon] dedicated-chat-replicas = RANKS // 2

    Every mode runs on a fresh daemon (cold prefix cache; `hpcserve serve` subprocesses
    on a temporary state dir, --config merged with the SLO and placement keys) with
    prompts of its own (same arrival times and lengths, token ids per mode). The batch
    is submitted --batch-lines at a time and topped up so it never runs out. Each mode
    measures --duration seconds; in batch modes the window opens once the batch is in
    steady state (a line per batch replica finished). Unless both SLOs are given, a
    first daemon measures the unloaded TTFT and ITL p99; SLOs = --slo-scale x those.

    \b
    Workload (token counts, uniform, inclusive; greedy, EOS ignored; token ids
    uniform in [100, vocab-100); clipped to the served context length):
      chat   Complete streams, prompt {m.CHAT_PROMPT_LEN[0]}-{m.CHAT_PROMPT_LEN[1]} tokens, \
output {m.CHAT_OUTPUT_LEN[0]}-{m.CHAT_OUTPUT_LEN[1]} tokens
      batch  /v1/completions lines, prompt {m.BATCH_PROMPT_LEN[0]}-{m.BATCH_PROMPT_LEN[1]} tokens, \
max_tokens {m.BATCH_OUTPUT_LEN[0]}-{m.BATCH_OUTPUT_LEN[1]}

    Metrics per mode: TTFT and ITL p50/p99, SLO attainment (TTFT <= the TTFT SLO and the
    request's own p99 ITL <= the ITL SLO), batch/chat/total output tok/s and busy fraction
    from the replicas' counters, goodput (batch tokens + tokens of chats that met the SLO,
    per s), economic utilization (useful rank-seconds delivered / allocated, from the daemon;
    docs/utilization.md), and the prompt tokens served from the prefix cache. The three
    targets of issue #4 are printed as PASS/FAIL with their ratios; see bench/README.md.
    """


@bench.command("mixed", help=_mixed_help(), short_help="Chat and batch on one pool: shared vs split vs alone.")
@click.option("--model", default="demo", show_default=True, metavar="PATH|demo",
              help="HF directory, .gguf file, or 'demo'.")
@click.option("--ranks", default=2, show_default=True, type=click.IntRange(2), help="Worker ranks (replicas).")
@click.option("--chat-rate", default=0.3, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Chat arrivals per second (Poisson). The default keeps 2 CPU ranks with the demo model about "
                   "90% busy on chat alone; past the pool's capacity queues grow and latencies mean nothing.")
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Measurement window of each mode, seconds.")
@click.option("--batch-lines", default=256, show_default=True, type=click.IntRange(1),
              help="Lines per batch submission in batch_only, shared and split (more are submitted whenever "
                   "the backlog runs low).")
@_workload_options("the benchmark sets the SLO and placement keys")
def mixed_cmd(model, ranks, chat_rate, duration, batch_lines, seed, config_path, chat_ttft_slo, chat_itl_slo,
              slo_scale, as_json) -> None:
    from hpcserve.bench.loadgen import run_mixed
    from hpcserve.bench.mixed import render_table

    res = run_mixed(model, ranks, chat_rate, duration, batch_lines, seed=seed, config_path=config_path,
                    ttft_slo_s=chat_ttft_slo, itl_slo_s=chat_itl_slo, slo_scale=slo_scale)
    click.echo(json.dumps(res, indent=None) if as_json else render_table(res))


def _disagg_help() -> str:
    from hpcserve.bench import disagg as d

    return f"""Disaggregated prefill/decode against colocated serving on the same ranks.

    One run, three measurements (about 2 x (daemon start + parity + --duration + the
    load's tail) + the SLO calibration daemon: 5-6 minutes on the demo model with the
    defaults). Unless both SLOs are given, a first daemon measures the unloaded TTFT (at
    the longest long prompt) and ITL p99; SLOs = --slo-scale x those.

    \b
    1. ITL under prefill-heavy load. Two fresh daemons, one after the other, on --ranks ranks:
         colocated      every replica mixed (prefill and decode, chunked prefill)
         disaggregated  [disagg] roles = "prefill:1,decode:RANKS-1"
       Same load shape in both (token ids per mode), for --duration seconds: --streams stream slots, each sending
       greedy requests of {d.STREAM_PROMPT_LEN[0]}-{d.STREAM_PROMPT_LEN[1]} prompt and \
{d.STREAM_OUTPUT_LEN} output tokens back to back,
       while long prompts ({d.LONG_PROMPT_LEN[0]}-{d.LONG_PROMPT_LEN[1]} tokens, {d.LONG_OUTPUT_LEN} output \
tokens) arrive as a Poisson
       process at --rate per second. itl_p99_s: p99 of the streams' inter-token gaps
       until the last long prompt is done. goodput: requests per second of the window
       that met the TTFT and ITL SLOs.
    2. Parity: before the load, {len(d.PARITY_PROMPT_LENS)} prompts of \
{d.PARITY_PROMPT_LENS[0]}-{d.PARITY_PROMPT_LENS[-1]} tokens, greedy, in both
       daemons; parity is true when all outputs are identical.
    3. KV handoff bandwidth against raw MPI Send/Recv of the same bytes between the
       same 2 ranks (mpiexec -n 2 python -m hpcserve.transfer.bench, the model's KV
       geometry, prompts of {",".join(map(str, d.TRANSFER_TOKENS))} tokens); and from the disaggregated run,
       the handoff latency of every request against its prompt length.

    \b
    Targets (PASS/FAIL with the numbers):
      handoff_ratio >= {d.HANDOFF_RATIO_MIN}
      itl_p99_s disaggregated <= colocated
      parity true

    Progress goes to stderr; the report (or one JSON object with --json: handoff_gib_s,
    mpi_raw_gib_s, handoff_ratio, itl_p99_s and goodput per mode, parity, and details)
    to stdout. Definitions: bench/README.md.
    """


@bench.command("disagg", help=_disagg_help(), short_help="Disaggregated prefill/decode vs colocated: ITL, "
               "handoff bandwidth, parity.")
@click.option("--model", default="demo", show_default=True, metavar="PATH|demo",
              help="HF directory, .gguf file, or 'demo'.")
@click.option("--ranks", default=2, show_default=True, type=click.IntRange(2),
              help="Worker ranks of each daemon (disaggregated: 1 prefill, the rest decode).")
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Load window of each mode, seconds.")
@click.option("--rate", default=0.2, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Long-prompt arrivals per second (Poisson).")
@click.option("--streams", default=8, show_default=True, type=click.IntRange(1),
              help="Stream slots (concurrent decode-heavy requests) during the window.")
@_workload_options("the benchmark sets the SLO keys and disagg.roles")
def disagg_cmd(model, ranks, duration, rate, streams, seed, config_path, chat_ttft_slo, chat_itl_slo,
               slo_scale, as_json) -> None:
    from hpcserve.bench.disagg import render_table
    from hpcserve.bench.disagg_run import run_disagg

    res = run_disagg(model, ranks, duration, rate, streams, seed=seed, config_path=config_path,
                     ttft_slo_s=chat_ttft_slo, itl_slo_s=chat_itl_slo, slo_scale=slo_scale)
    click.echo(json.dumps(res) if as_json else render_table(res))


@bench.command("api", short_help="The OpenAI-compatible HTTP API vs gRPC on one daemon: TTFT, latency, tok/s.")
@click.option("--model", default="demo", show_default=True, help="HF directory, .gguf file, or 'demo'.")
@click.option("--ranks", default=1, show_default=True, type=click.IntRange(1), help="Worker ranks of the daemon.")
@click.option("--requests", default=12, show_default=True, type=click.IntRange(1),
              help="Sequential request pairs (one gRPC, one HTTP, same prompt, alternating order).")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1),
              help="Streams at once in the concurrent phase.")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(1),
              help="Tokens per request (EOS ignored, so every request makes exactly this many).")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1),
              help="Concurrent rounds per front end (alternating; each front end's best round counts).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def api_cmd(model, ranks, requests, concurrency, max_tokens, rounds, as_json) -> None:
    """Measure what the OpenAI-compatible HTTP front end (SSE) costs against gRPC: one daemon
    serves both; the same greedy requests go through each, sequentially (TTFT and latency
    medians) and concurrently (tokens/s); both must give identical text. Prints HTTP/gRPC ratios."""
    from hpcserve.bench.api import format_table, run_api_bench

    say = None if as_json else (lambda m: click.echo(f"... {m}", err=True))
    res = run_api_bench(model, ranks, requests, concurrency, max_tokens, rounds, say=say or (lambda m: None))
    click.echo(json.dumps(res) if as_json else format_table(res))
