"""`hpcserve bench ...`: benchmarks that print numbers, baseline side by side."""

from __future__ import annotations

import json

import click


@click.group()
def bench() -> None:
    """Benchmarks. Each runs its baseline in the same invocation and prints ratios."""


@bench.command("throughput")
@click.option("--model", default="demo", show_default=True, help="HF directory, .gguf file, or 'demo'.")
@click.option("--num-prompts", default=32, show_default=True, type=click.IntRange(1))
@click.option("--input-len", default=32, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=64, show_default=True, type=click.IntRange(1))
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]))
@click.option("--baseline", default=None, type=click.Choice(["hf"]), help="Also run transformers generate on the same prompts.")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads for both engines (default: torch's choice).")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(1), help="Alternate the engines this many rounds; each one's best round counts.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def throughput(model, num_prompts, input_len, output_len, dtype, baseline, threads, repeats, as_json) -> None:
    """Offline generation throughput: random prompts, fixed output length, greedy.

    Every prompt generates exactly --output-len tokens (EOS ignored). With
    --baseline hf, transformers' generate runs the same prompts in the same
    process; the two alternate for --repeats rounds, each one's best round
    counts, and the ratio hpcserve/baseline is printed. The cores are shared:
    compare ratios, and use --repeats 3 or more for numbers you quote.
    """
    from hpcserve.bench.throughput import run_throughput

    say = None if as_json else (lambda m: click.echo(f"... {m}", err=True))
    res = run_throughput(
        model, num_prompts, input_len, output_len, dtype, baseline, num_threads=threads, repeats=repeats, progress=say
    )
    if as_json:
        click.echo(json.dumps(res))
        return
    h, b = res["hpcserve"], res["baseline"]
    click.echo(f"{'engine':<10} {'tokens/s':>10} {'elapsed s':>10}  dtype (compute)")
    click.echo(f"{'hpcserve':<10} {h['tokens_per_s']:>10.1f} {h['elapsed_s']:>10.2f}  {h['dtype']} ({h['compute_dtype']})")
    if b:
        click.echo(f"{b['name']:<10} {b['tokens_per_s']:>10.1f} {b['elapsed_s']:>10.2f}  {b['dtype']}")
        click.echo(f"ratio: {res['ratio']:.2f}x   greedy outputs identical: {res['greedy_match']:.0%}")
