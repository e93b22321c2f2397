"""``hpcserve serve`` (the control daemon) and ``hpcserve worker`` (one rank of its worker step)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from hpcserve.errors import HpcserveError


@click.command()
@click.option("--model", metavar="PATH|demo", help='Model to serve: "demo" (SmolLM2-135M-Instruct, built in), '
              "an HF-layout directory or a .gguf file. [config: model.path]")
@click.option("--ranks", type=click.IntRange(min=1), help="MPI ranks in the worker step; each rank is one "
              "replica today. [config: daemon.ranks; default 1]")
@click.option("--roles", metavar="SPEC", help='Replica roles in rank order, e.g. "prefill:1,decode:1": '
              "prefill replicas compute prompts and hand the KV cache to decode replicas over MPI. The counts "
              "must add up to --ranks (which defaults to their sum). [config: disagg.roles; default: all mixed]")
@click.option("--listen", metavar="HOST:PORT", help="gRPC address; 127.0.0.1:0 picks a free port. "
              "[config: daemon.listen; default 127.0.0.1:50051]")
@click.option("--http", metavar="HOST:PORT", help="Also serve the OpenAI-compatible HTTP API (/v1: models, chat "
              "completions, completions, files, batches) on this address; 127.0.0.1:0 picks a free port (see "
              "endpoint.json). [env HPCSERVE_HTTP; config: daemon.http; default: off]")
@click.option("--state-dir", metavar="DIR", help="Batch store, endpoint file and logs. "
              "[env HPCSERVE_STATE_DIR; config: daemon.state-dir; default ~/.hpcserve]")
@click.option("--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="Site config TOML (see site-configs/ and docs/config.md).")
@click.option("--slurm", "use_slurm", is_flag=True, help="Run inside a Slurm allocation (an sbatch job, see "
              "`hpcserve sbatch render`): start the workers with srun as a step of this job, --ranks defaults to "
              "SLURM_NTASKS, and drain on SIGUSR1 (sbatch --signal=B:USR1@SECONDS).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True)
def serve(model, ranks, roles, listen, http, state_dir, config_path, use_slurm, log_level):
    """Run the control daemon: serve chats and batch jobs from one set of worker ranks.

    With --roles prefill:N,decode:M the ranks split into prefill and decode replicas: every
    request is prefilled on one and decoded on another, its KV cache handed over by MPI.

    The daemon launches the workers as one MPI world (`mpiexec -n RANKS hpcserve worker`,
    the venv's mpiexec), relaunches them if they die, keeps batch jobs in a SQLite store in the
    state dir, and writes STATE_DIR/endpoint.json so that `hpcserve chat|submit|status` find it.

    Every call needs an API key of a tenant ([tenants.NAME] in the site config; keys from
    `hpcserve keys add`). The daemon also mints a key for auth.endpoint-tenant ("default" in
    the laptop config) and writes it into endpoint.json (0600), so local clients and the
    openai SDK (api_key from that file, base_url http://HOST:PORT/v1) need no set-up.
    Stop it with SIGTERM or Ctrl-C: chats get drain-timeout-s to finish, unfinished batch lines
    resume on the next start.
    """
    from hpcserve.config import load_config
    from hpcserve.config_tables import parse_roles
    from hpcserve.daemon.server import serve as run_daemon

    if roles is not None and ranks is None and parse_roles(roles):
        ranks = len(parse_roles(roles))  # --roles alone sets the rank count
    if use_slurm:
        ranks = _slurm_ranks(ranks)
    cfg = load_config(config_path, overrides={"model.path": model, "daemon.ranks": ranks, "disagg.roles": roles,
                                              "daemon.listen": listen, "daemon.http": http,
                                              "daemon.state-dir": state_dir})
    mpiexec = cfg.daemon.mpiexec_path
    if not use_slurm and not Path(mpiexec).is_file():
        raise HpcserveError(f"mpiexec not found at {mpiexec}: install an MPI (`pip install mpich` in this venv) "
                            "or set [daemon] mpiexec in the site config")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s hpcserve %(levelname)s %(message)s")
    sys.exit(run_daemon(cfg, slurm=use_slurm))


def _slurm_ranks(ranks: int | None) -> int:
    """--slurm: the worker step's size is the allocation's task count unless --ranks says less."""
    import os
    import shutil

    ntasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS")
    het = int(os.environ.get("SLURM_HET_SIZE") or 0)
    if het > 1:  # hetjob.sbatch: SLURM_NTASKS describes component 0 only
        ntasks = str(sum(int(os.environ.get(f"SLURM_NTASKS_HET_GROUP_{i}") or 0) for i in range(het)))
    if not os.environ.get("SLURM_JOB_ID") or not ntasks:
        raise HpcserveError("--slurm: not inside a Slurm allocation (SLURM_JOB_ID/SLURM_NTASKS unset); run it from "
                            "an sbatch script (`hpcserve sbatch render`) or drop --slurm to use the local mpiexec")
    if shutil.which("srun") is None:
        raise HpcserveError("--slurm: srun is not on PATH")
    if ranks is not None and ranks > int(ntasks):
        raise HpcserveError(f"--ranks {ranks} exceeds the allocation's {ntasks} tasks (SLURM_NTASKS); "
                            "submit with --ntasks >= ranks or lower --ranks")
    return ranks or int(ntasks)


@click.command(hidden=True)
def worker():
    """(Internal) one rank of the worker step; started by `hpcserve serve` under mpiexec/srun."""
    from hpcserve.cluster.worker import main

    sys.exit(main())
