"""Command-line entry point: a click group whose subcommands live in ``hpcserve/commands/``.

Kept thin: each command parses its flags and calls into the package. User-facing
errors (``HpcserveError``) print as one line and exit 2, never as a traceback.
"""

from __future__ import annotations

import os
import sys

import click

# grpc's C core logs TLS handshake failures at INFO on stderr; hpcserve reports them as one line
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from hpcserve import __version__
from hpcserve.errors import HpcserveError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HpcserveError as exc:
            click.echo(f"hpcserve: error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("hpcserve: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpcserve")
def main() -> None:
    """hpcserve: LLM inference for Slurm/HPC sites.

    Service: `serve` runs the daemon; `submit` sends it an OpenAI Batch JSONL file,
    `status` shows the daemon and its batches, `results` writes a batch's output
    files, `cancel` stops a batch, `chat` talks to the model (one-shot or REPL).
    Clients find the daemon via --endpoint, HPCSERVE_ENDPOINT or the state dir's
    endpoint.json (--state-dir, HPCSERVE_STATE_DIR, default ~/.hpcserve).
    `keys` manages the API keys of the site's tenants (add, list, revoke);
    `status --tenants` shows their usage; `drain` stops the daemon (admin key).

    Offline: `run-batch` runs an OpenAI Batch JSONL file through the engine,
    `bench throughput` measures it against transformers, `models demo` prepares the
    embedded SmolLM2-135M-Instruct model.
    """


def _register() -> None:
    from hpcserve.commands import bench, chat, jobs, keys, models, run_batch, sbatch, serve, up, usage

    main.add_command(serve.serve)
    main.add_command(serve.worker)
    main.add_command(models.models)
    main.add_command(run_batch.run_batch)
    main.add_command(bench.bench)
    main.add_command(jobs.submit)
    main.add_command(jobs.status)
    main.add_command(jobs.results)
    main.add_command(jobs.cancel)
    main.add_command(usage.drain)
    main.add_command(chat.chat)
    main.add_command(sbatch.sbatch)
    main.add_command(up.up)
    main.add_command(up.down)
    main.add_command(keys.keys)


_register()
