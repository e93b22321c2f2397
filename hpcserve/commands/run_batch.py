"""``hpcserve run-batch``: run an OpenAI Batch JSONL file offline through the engine.

Interface: the click command ``run_batch`` (registered by ``hpcserve.cli`` as ``run-batch``).
Builds an ``LLMEngine`` from the flags, calls ``hpcserve.batch.runner.run_batch`` and prints
a one-line summary to stderr. Engine imports happen inside the command so ``--help`` is fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from hpcserve.errors import HpcserveError

_HELP = """Run an OpenAI Batch JSONL file offline and write the results.

\b
IN.jsonl holds one request per line, e.g.:
  {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}
  {"custom_id": "q2", "method": "POST", "url": "/v1/completions",
   "body": {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}}

\b
OUT.jsonl gets one line per input line, in completion order (match on custom_id):
  {"id": "batch_req_...", "custom_id": "q1", "error": null,
   "response": {"status_code": 200, "request_id": "...", "body": {<chat.completion>}}}
A line that cannot run (bad JSON, missing or unsupported field, duplicate custom_id,
prompt too long for the context) gets an error line instead, in OUT.jsonl or in
--errors ERR.jsonl if given:
  {"id": "...", "custom_id": "q3", "response": null,
   "error": {"code": "context_length_exceeded", "message": "...", "line": 3}}

\b
Supported body fields: messages | prompt (one string or token-id list), max_tokens
(default 256), max_completion_tokens, temperature (default 1.0), top_p, top_k, min_p,
seed, stop, stop_token_ids, ignore_eos, logprobs/top_logprobs, n=1, stream=false, model
(echoed, not checked). Output files appear only when the whole batch is done; until then
results accumulate in OUT.jsonl.partial.
"""


@click.command("run-batch", help=_HELP, short_help="Run an OpenAI Batch JSONL file offline.")
@click.argument("input_path", metavar="IN.jsonl", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_path", required=True, metavar="OUT.jsonl",
              type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Where to write results (replaced atomically at the end).")
@click.option("--model", default="demo", show_default=True, metavar="PATH|demo",
              help="Hugging Face model directory, GGUF file, or 'demo' for the embedded model.")
@click.option("--errors", "errors_path", metavar="ERR.jsonl", default=None,
              type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Write error lines here instead of into OUT.jsonl.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Weight/serving dtype.")
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="Context length (prompt + completion); default: the model's.")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests kept in the engine at once; more lines are read as they finish.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: only when stderr is a terminal).")
def run_batch(input_path: Path, output_path: Path, model: str, errors_path: Path | None,
              dtype: str, max_model_len: int | None, max_in_flight: int,
              progress: bool | None) -> None:
    from hpcserve.batch.runner import run_batch as _run
    from hpcserve.engine.core import EngineConfig, LLMEngine

    # Checked before the (slow) model load; HpcserveError prints as one line via the CLI group.
    if not input_path.is_file():
        what = "is a directory" if input_path.is_dir() else "does not exist"
        raise HpcserveError(f"input file {input_path} {what}")
    for p in (output_path, errors_path):
        if p is not None and not p.absolute().parent.is_dir():
            raise HpcserveError(f"cannot write {p}: directory {p.absolute().parent} does not exist")
    kwargs = {"model": model, "dtype": dtype}
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    engine = LLMEngine(EngineConfig(**kwargs))
    summary = _run(engine, input_path, output_path, errors_path=errors_path,
                   progress=progress, max_in_flight=max_in_flight)
    where = f"{output_path}" + (f", errors in {errors_path}" if errors_path and summary.num_errors else "")
    click.echo(f"hpcserve run-batch: {summary.one_line()} -> {where}", err=True)
