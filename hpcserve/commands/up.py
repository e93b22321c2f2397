"""``hpcserve up`` and ``hpcserve down``: the service's lifecycle on a Slurm site.

``up --config FILE``: render ``serve.sbatch`` from the site config into the state dir, submit it
with ``sbatch --parsable``, wait until the job's daemon wrote ``STATE_DIR/endpoint.json`` and its
workers are ready, and print how to connect. Idempotent: a service already answering there is
reported, not started twice.

``down --config FILE``: stop the service for good: cancel the queued continuation jobs (same job
name, pending), ask the running job to drain (``scancel -b --signal=USR1``: the batch script's
trap forwards it to the daemon, which checkpoints batch lines and exits 0), wait for the job to
end, and cancel it if it did not (or if it requeued itself). Without Slurm (a daemon started by
hand), it sends the daemon SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from hpcserve.errors import HpcserveError

ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")


def _slurm(*args: str, timeout: float = 60) -> str:
    exe = shutil.which(args[0])
    if exe is None:
        raise HpcserveError(f"{args[0]} not found on PATH: run this on a Slurm login node (or load the slurm module)")
    r = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise HpcserveError(f"{' '.join(args)} failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def _job_state(job_id: str) -> str | None:
    try:
        out = _slurm("squeue", "-h", "-j", job_id, "-o", "%T").strip()
    except HpcserveError:
        return None  # squeue errors for a job it no longer knows
    return out.splitlines()[0] if out else None


def _hpcserve_exe() -> str:
    exe = Path(sys.executable).parent / "hpcserve"
    return str(exe) if exe.exists() else f"{sys.executable} -m hpcserve"


def _answering(state: Path):
    """The Client of a ready daemon answering at the state dir's endpoint, else None."""
    from hpcserve.api.client import Client, ClientError

    try:
        client = Client.connect(None, state, timeout=3.0)
    except (ClientError, HpcserveError):
        return None
    try:
        if client.server_info().is_ready:
            return client
    except ClientError:
        pass
    client.close()
    return None


@click.command("up", short_help="Submit the service to Slurm and wait until it answers.")
@click.option("--config", "config_path", required=True, metavar="FILE", type=click.Path(dir_okay=False, exists=True),
              help="Site config TOML ([slurm] and [daemon] tables; see docs/slurm.md).")
@click.option("--template", default="serve.sbatch", show_default=True, help="sbatch template to submit.")
@click.option("--wait", "wait_s", type=click.FloatRange(0), default=1800.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the job to start and the workers to be ready (0: submit only).")
def up(config_path: str, template: str, wait_s: float) -> None:
    """Render the site's serve.sbatch into its state dir, submit it with sbatch, wait until the daemon
    is ready and print how to connect. With [slurm] continuation = "singleton" the job queues its
    own successor, so the service outlives one allocation's walltime.
    """
    from hpcserve.config import load_config
    from hpcserve.daemon.state_dir import prepare_state_dir
    from hpcserve.slurm.render import render

    config = str(Path(config_path).resolve())
    cfg = load_config(config)
    state = cfg.daemon.state_path
    client = _answering(state)
    if client is not None:
        with client:
            click.echo(f"hpcserve is already up at {client.address} (state dir {state}); "
                       f"stop it with `hpcserve down --config {config_path}`")
        return
    prepare_state_dir(state)  # private: the daemon keeps every tenant's prompts and outputs there
    (state / "logs").mkdir(mode=0o700, exist_ok=True)
    script = state / template
    script.write_text(render(template, cfg, config_path=config, hpcserve=_hpcserve_exe()))
    script.chmod(0o700)
    job = _slurm("sbatch", "--parsable", str(script)).strip().split(";")[0]
    click.echo(f"submitted {script} as Slurm job {job}", err=True)
    if wait_s <= 0:
        click.echo(job)
        return
    deadline, last = time.monotonic() + wait_s, None
    while time.monotonic() < deadline:
        st = _job_state(job)
        if st != last:
            click.echo(f"job {job}: {st or 'gone'}", err=True)
            last = st
        if st is None:
            log = sorted((state / "logs").glob(f"*{job}*"))
            raise HpcserveError(f"job {job} ended before the service was ready; see {log[0] if log else state}")
        client = _answering(state)
        if client is not None:
            with client:
                info = client.server_info()
            ep = client.endpoint
            http = (f"\n  OpenAI API: {'https' if ep.tls_ca else 'http'}://{ep.http}/v1 (api_key: your tenant's key)"
                    if ep.http else "")
            click.echo(f"hpcserve is up: Slurm job {job}, {info.model} on {info.num_ranks} rank(s) at "
                       f"{client.address}{http}\n  hpcserve chat --config {config_path}\n"
                       f"  hpcserve submit --config {config_path} prompts.jsonl --wait -o out.jsonl\n"
                       f"  hpcserve down --config {config_path}")
            return
        time.sleep(2.0)
    raise HpcserveError(f"job {job} is not serving after {wait_s:.0f} s (state: {last}); it stays queued: "
                        f"watch it with `squeue -j {job}`, or `hpcserve down --config {config_path}`")


@click.command("down", short_help="Drain the service and end its Slurm job (and its queued successors).")
@click.option("--config", "config_path", required=True, metavar="FILE", type=click.Path(dir_okay=False, exists=True),
              help="Site config TOML of the service (its daemon.state-dir has the endpoint file).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0), default=300.0, show_default=True,
              metavar="SECONDS", help="How long the drain may take before the job is cancelled.")
def down(config_path: str, timeout_s: float) -> None:
    """Drain the running service (batch lines are checkpointed and stay pending for the next `up`;
    chats get drain-timeout-s), end its Slurm job and cancel its queued continuation jobs."""
    from hpcserve.config import load_config
    from hpcserve.daemon.endpoint import read_endpoint

    cfg = load_config(config_path)
    state = cfg.daemon.state_path
    ep = read_endpoint(state)
    successors = []
    if shutil.which("squeue"):
        user = os.environ.get("USER") or ""
        out = _slurm("squeue", "-h", "-n", cfg.slurm.job_name, *(["-u", user] if user else []), "-o", "%i %T")
        jobs = [line.split() for line in out.splitlines() if line.strip()]
        successors = [j for j, st in jobs if st == "PENDING"]
        running = [j for j, st in jobs if st != "PENDING"]
    else:
        running = []
    for j in successors:  # first, so that nothing starts while this one drains
        _slurm("scancel", j)
        click.echo(f"cancelled queued job {j}", err=True)
    job = (ep.slurm_job_id if ep is not None else None) or (running[0] if running else None)
    if job is None:
        if ep is not None and ep.pid:
            try:
                os.kill(ep.pid, signal.SIGTERM)
            except ProcessLookupError:
                raise HpcserveError(f"no hpcserve job on Slurm and no daemon with pid {ep.pid}: nothing to stop "
                                    f"(stale {state / 'endpoint.json'})") from None
            click.echo(f"sent SIGTERM to the daemon (pid {ep.pid})", err=True)
            return
        raise HpcserveError(f"nothing to stop: no endpoint file in {state} and no Slurm job named "
                            f"{cfg.slurm.job_name!r}")
    _slurm("scancel", "-b", "--signal=USR1", job)
    click.echo(f"asked job {job} to drain", err=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = _job_state(job)
        if st is None or st not in ACTIVE or (st == "PENDING"):
            break
        time.sleep(2.0)
    if _job_state(job) in ACTIVE:  # did not drain in time, or requeued itself: end it
        _slurm("scancel", job)
        click.echo(f"cancelled job {job}", err=True)
    click.echo(f"hpcserve is down (job {job}); pending batch lines resume on the next `hpcserve up`")
