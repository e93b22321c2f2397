"""``hpcserve submit | status | results | cancel``: batch jobs on a running daemon.

Interface: the click commands ``submit``, ``status``, ``results`` and ``cancel`` (registered by
``hpcserve.cli``). Each connects with ``hpcserve.api.client.Client`` (``--endpoint``,
``--state-dir``; see ``_client_opts``), makes a few RPCs and exits: user errors are
``HpcserveError``s (one line, exit 2, printed by the CLI group). Stdout carries only what
scripts capture (the batch id, the status, JSON); progress and summaries go to stderr.
``write_results(client, batch_id, out, err)`` writes a batch's lines through ``*.partial``
files renamed into place, and is shared by ``results`` and ``submit --wait -o``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from hpcserve.commands._client_opts import connect, daemon_options
from hpcserve.errors import HpcserveError

TERMINAL = ("completed", "failed", "cancelled", "expired")
POLL_S = 0.5


# ------------------------------------------------------------------------- helpers

def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _dur(seconds: float) -> str:
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _check_out_dir(*paths: Path | None) -> None:
    for p in paths:
        if p is not None and not p.absolute().parent.is_dir():
            raise HpcserveError(f"cannot write {p}: directory {p.absolute().parent} does not exist")
        if p is not None and p.is_dir():
            raise HpcserveError(f"cannot write {p}: it is a directory")


def write_results(client, batch_id: str, out: Path, err: Path | None = None) -> tuple[int, int]:
    """Write the batch's output lines to ``out`` and its error lines to ``err`` (or also to
    ``out``), each through ``<file>.partial`` and an atomic rename. Returns (outputs, errors)."""
    targets = {False: out, True: err or out}
    partials = {p: p.with_name(p.name + ".partial") for p in dict.fromkeys(targets.values())}
    files: dict[Path, object] = {}
    counts = [0, 0]
    try:
        for p, tmp in partials.items():
            files[p] = open(tmp, "w", encoding="utf-8")
        for _, text, is_error in client.iter_batch_results(batch_id):
            files[targets[is_error]].write(text + "\n")
            counts[is_error] += 1
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        for f in files.values():
            f.close()
        for tmp in partials.values():
            tmp.unlink(missing_ok=True)
        raise
    for f in files.values():
        f.close()
    for p, tmp in partials.items():
        os.replace(tmp, p)
    return counts[0], counts[1]


def _written_summary(n_out: int, n_err: int, out: Path, err: Path | None) -> str:
    if err is not None:
        return f"{n_out} output lines -> {out}, {n_err} error lines -> {err}"
    return f"{n_out + n_err} lines -> {out}" + (f" ({n_err} of them error lines)" if n_err else "")


def _why_not_completed(b: dict) -> str:
    rc, bid = b["request_counts"], b["id"]
    unrun = max(rc["total"] - rc["completed"] - rc["failed"], 0)
    if b["status"] == "failed":
        errs = (b.get("errors") or {}).get("data") or []
        shown = "; ".join((f"line {e['line']}: " if e.get("line") else "") + f"{e['code']}: {e['message']}"
                          for e in errs[:3])
        more = f" (+{len(errs) - 3} more)" if len(errs) > 3 else ""
        return f"batch {bid} failed: {shown or 'no details'}{more}"
    if b["status"] == "cancelled":
        return f"batch {bid} was cancelled; {unrun} of {rc['total']} lines did not run"
    return (f"batch {bid} expired (not finished within its completion window {b.get('completion_window')}, "
            f"or the daemon's allocation ended); {unrun} of {rc['total']} lines did not run")


def _parse_metadata(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE (e.g. --metadata project=abc)")
        out[key] = value
    return out


# ------------------------------------------------------------------------- submit

_SUBMIT_HELP = """Submit an OpenAI Batch JSONL file to the running daemon and print its id.

\b
FILE.jsonl holds one request per line (the format of `hpcserve run-batch --help`):
  {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}

The file is read here and sent to the daemon, which stores it and runs it in spare
capacity; the batch survives daemon restarts. Only the batch id goes to stdout
(BATCH=$(hpcserve submit in.jsonl)); follow it with `hpcserve status BATCH_ID` and
fetch the results with `hpcserve results BATCH_ID -o OUT.jsonl`.

With --wait the command stays until the batch ends, shows progress on stderr (requests
done, output tokens/s, ETA), prints a summary and, with -o, writes the results. Exit
status with --wait: 0 when the batch completed (some lines may still have error lines),
1 when it failed, was cancelled or expired.
"""


@click.command("submit", help=_SUBMIT_HELP, short_help="Submit a batch JSONL file to the daemon.")
@click.argument("input_path", metavar="FILE.jsonl", type=click.Path(path_type=Path))
@click.option("--wait", is_flag=True, help="Wait until the batch ends, with progress on stderr.")
@click.option("-o", "--output", "output_path", metavar="OUT.jsonl", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="With --wait: write the output lines here (error lines too unless --errors).")
@click.option("--errors", "errors_path", metavar="ERR.jsonl", default=None,
              type=click.Path(dir_okay=False, path_type=Path), help="With --wait: write the error lines here.")
@click.option("--completion-window", metavar="WINDOW", default=None,
              help="Deadline like 24h, 90m, 2d (number + s/m/h/d); unfinished lines then expire. "
                   "Default: the daemon's (usually 24h).")
@click.option("--metadata", "metadata", metavar="KEY=VALUE", multiple=True, callback=_parse_metadata,
              help="Label echoed back in `status` (repeatable; up to 16).")
@click.option("--by-path", is_flag=True,
              help="Send the file's absolute path instead of its content; the daemon must be able to read "
                   "it (shared file system). For inputs too big to send.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar with --wait (default: only when stderr is a terminal).")
@daemon_options
def submit(input_path: Path, wait: bool, output_path: Path | None, errors_path: Path | None,
           completion_window: str | None, metadata: dict[str, str], by_path: bool, progress: bool | None,
           endpoint: str | None, state_dir: str | None) -> None:
    if (output_path or errors_path) and not wait:
        raise click.UsageError("-o/--errors need --wait (the results exist once the batch ends); without "
                               "--wait, fetch them later with `hpcserve results BATCH_ID -o OUT.jsonl`")
    if errors_path is not None and output_path is None:
        raise click.UsageError("--errors needs -o OUT.jsonl as well")
    if output_path is not None and errors_path is not None and output_path.absolute() == errors_path.absolute():
        raise click.UsageError("-o and --errors must be different files (leave out --errors to get both in -o)")
    _check_out_dir(output_path, errors_path)
    from hpcserve.api.client import read_input_file

    # a missing file fails before connecting
    if by_path and not input_path.is_file():
        raise HpcserveError(f"input file {input_path} does not exist or is not a file")
    source = input_path if by_path else read_input_file(input_path)
    with connect(endpoint, state_dir) as client:
        batch = client.submit_batch(source, completion_window=completion_window, metadata=metadata or None,
                                    by_path=by_path)
        click.echo(batch["id"])
        if not wait:
            return
        try:
            batch = _wait(client, batch, progress)
        except KeyboardInterrupt:
            click.echo(f"\nhpcserve: stopped waiting; batch {batch['id']} keeps running "
                       f"(`hpcserve status {batch['id']}`)", err=True)
            sys.exit(130)
        if output_path is not None:
            n_out, n_err = write_results(client, batch["id"], output_path, errors_path)
            click.echo(f"hpcserve submit: {_written_summary(n_out, n_err, output_path, errors_path)}", err=True)
    if batch["status"] != "completed":
        click.echo(f"hpcserve: {_why_not_completed(batch)}", err=True)
        sys.exit(1)


def _wait(client, batch: dict, progress: bool | None) -> dict:
    from tqdm import tqdm

    t0 = time.monotonic()
    tok0 = batch["usage"]["output_tokens"]
    rc = batch["request_counts"]
    bar = tqdm(total=rc["total"], unit="req", desc=batch["id"][:16], file=sys.stderr, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    try:
        while True:
            rc = batch["request_counts"]
            done = rc["completed"] + rc["failed"]
            bar.total = rc["total"]
            tps = (batch["usage"]["output_tokens"] - tok0) / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix_str(f"{batch['status']}, {tps:.1f} out tok/s", refresh=False)
            if done != bar.n:
                bar.update(done - bar.n)
            else:
                bar.refresh()
            if batch["status"] in TERMINAL:
                break
            time.sleep(POLL_S)
            batch = client.get_batch(batch["id"])
    finally:
        bar.close()
    elapsed = time.monotonic() - t0
    tokens = batch["usage"]["output_tokens"]
    click.echo(f"hpcserve submit: {batch['id']} {batch['status']}: {rc['completed']} completed, {rc['failed']} "
               f"failed of {rc['total']}; {tokens} output tokens in {elapsed:.1f} s "
               f"({(tokens - tok0) / max(elapsed, 1e-9):.1f} tok/s)", err=True)
    return batch


# ------------------------------------------------------------------------- status

def server_info_to_dict(info) -> dict:
    """``serving_pb2.ServerInfo`` as plain JSON-able values (roles as words, unset allocation None)."""
    from hpcserve.api.v1 import serving_pb2

    def role(r) -> str:
        return serving_pb2.ReplicaRole.Name(r.role).removeprefix("REPLICA_ROLE_").lower()

    alloc = info.allocation if info.HasField("allocation") else None
    return {
        "version": info.version, "model": info.model, "ready": info.is_ready, "num_ranks": info.num_ranks,
        "max_model_len": info.max_model_len or None, "uptime_s": info.uptime_s,
        "num_worker_restarts": info.num_worker_restarts, "state_dir": info.state_dir or None,
        "tenant": info.tenant or None, "is_admin": info.is_admin,
        "replicas": [{"replica_id": r.replica_id, "role": role(r), "ranks": list(r.ranks),
                      "num_running": r.num_running, "num_waiting": r.num_waiting,
                      "num_free_kv_blocks": r.num_free_kv_blocks, "num_kv_blocks": r.num_kv_blocks,
                      "recent_step_time_s": r.recent_step_time_s,
                      "kv_handoff": {f.name: getattr(r.kv, f.name) for f in r.kv.DESCRIPTOR.fields}}
                     for r in info.replicas],
        "allocation": None if alloc is None else {
            "job_id": alloc.job_id, "nodes": list(alloc.nodes), "end_time": alloc.end_time or None,
            "seconds_left": alloc.seconds_left, "num_tasks": alloc.num_tasks or None,
            "gpus_per_node": alloc.gpus_per_node or None},
    }


def _print_server(s: dict, address: str) -> None:
    click.echo(f"hpcserve {s['version']} at {address}: model {s['model'] or '-'}, "
               f"{'ready' if s['ready'] else 'NOT READY'}, {s['num_ranks']} ranks, "
               f"max_model_len {s['max_model_len'] or '?'}, up {_dur(s['uptime_s'])}, "
               f"{s['num_worker_restarts']} worker restarts")
    for r in s["replicas"]:
        step = f", step {r['recent_step_time_s'] * 1000:.0f} ms" if r["recent_step_time_s"] else ""
        click.echo(f"  replica {r['replica_id']} ({r['role']}, ranks {','.join(map(str, r['ranks']))}): "
                   f"{r['num_running']} running, {r['num_waiting']} waiting, "
                   f"{r['num_free_kv_blocks']}/{r['num_kv_blocks']} KV blocks free{step}")
        kv = r["kv_handoff"]
        if r["role"] in ("prefill", "decode"):
            moved = (f"sent {kv['num_sent']} ({kv['bytes_sent'] / 2**20:.1f} MiB)" if r["role"] == "prefill" else
                     f"received {kv['num_received']} ({kv['bytes_received'] / 2**20:.1f} MiB)")
            check = f", {kv['num_checksum_verified']} checksum-verified" if kv["num_checksum_verified"] else ""
            click.echo(f"    KV handoffs: {moved}{check}, {kv['num_failed']} failed, {kv['num_fallbacks']} "
                       f"computed locally after a failure, {kv['num_active']} in flight")
    a = s["allocation"]
    if a is not None:
        ends = f", ends {_when(a['end_time'])} (in {_dur(a['seconds_left'])})" if a["end_time"] else ""
        res = ", ".join(x for x in (f"{a['num_tasks']} tasks" if a["num_tasks"] else "",
                                    f"{a['gpus_per_node']} GPUs/node" if a["gpus_per_node"] else "") if x)
        click.echo(f"  allocation: Slurm job {a['job_id']} on {','.join(a['nodes']) or '?'}"
                   f"{f' ({res})' if res else ''}{ends}")
    if s["state_dir"]:
        click.echo(f"  state dir: {s['state_dir']}")
    if s.get("tenant"):
        click.echo(f"  your key: tenant {s['tenant']}" + (" (admin)" if s["is_admin"] else
                                                          "; replicas and allocation are shown to admin keys"))


def _print_batch_table(batches: list[dict], has_more: bool) -> None:
    if not batches:
        click.echo("no batches yet (submit one with `hpcserve submit FILE.jsonl`)")
        return
    click.echo(f"{'BATCH':<40} {'STATUS':<12} {'DONE/TOTAL':>12}  CREATED")
    for b in batches:
        rc = b["request_counts"]
        done = f"{rc['completed'] + rc['failed']}/{rc['total']}"
        click.echo(f"{b['id']:<40} {b['status']:<12} {done:>12}  {_when(b['created_at'])}")
    if has_more:
        click.echo("(older batches not shown; raise --limit)")


def _print_batch(b: dict) -> None:
    rc, u = b["request_counts"], b["usage"]
    done = rc["completed"] + rc["failed"]
    rows = [("endpoint", b["endpoint"] or "-"),
            ("requests", f"{done}/{rc['total']} done: {rc['completed']} completed, {rc['failed']} failed"
                         + (f", {rc['total'] - done} not done" if done < rc["total"] else "")),
            ("tokens", f"{u['input_tokens']} in, {u['output_tokens']} out"),
            ("created", _when(b["created_at"]))]
    for key, label in (("in_progress_at", "started"), ("finalizing_at", "finalizing"), ("completed_at", "completed"),
                       ("failed_at", "failed"), ("cancelling_at", "cancel asked"), ("cancelled_at", "cancelled"),
                       ("expired_at", "expired")):
        if b.get(key):
            rows.append((label, _when(b[key])))
    if b["status"] not in TERMINAL and b.get("expires_at"):
        rows.append(("expires", f"{_when(b['expires_at'])} (window {b['completion_window']})"))
    rows += [(k, b[f]) for k, f in (("input", "input_file"), ("output", "output_file"), ("error file", "error_file"))
             if b.get(f)]
    if b.get("metadata"):
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in b["metadata"].items())))
    for e in ((b.get("errors") or {}).get("data") or []):
        rows.append(("error", (f"line {e['line']}: " if e.get("line") else "") + f"{e['code']}: {e['message']}"))
    click.echo(f"{b['id']}: {b['status']}")
    for k, v in rows:
        click.echo(f"  {k:<13} {v}")


@click.command("status", short_help="Show the daemon and its batches, or one batch.")
@click.argument("batch_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (OpenAI batch objects) on stdout.")
@click.option("--limit", type=click.IntRange(1, 100), default=10, show_default=True,
              help="Batches listed without BATCH_ID (newest first).")
@click.option("--wait-ready", "wait_ready", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="First wait up to SECONDS for a daemon that is starting (endpoint file written, worker "
                   "ranks loaded); exit 1 if it is not ready by then.")
@click.option("--tenants", is_flag=True, help="Per-tenant usage: requests, tokens in/out, GPU-seconds, "
              "useful rank-seconds (chat, batch), economic utilization (admin keys), today's tokens against "
              "the daily quota, streams in flight.")
@click.option("--since", metavar="YYYY-MM-DD", default=None, help="With --tenants: only days from this UTC day.")
@click.option("--by-day", is_flag=True, help="With --tenants: one row per tenant and UTC day.")
@daemon_options
def status(batch_id: str | None, as_json: bool, limit: int, wait_ready: float | None, tenants: bool,
           since: str | None, by_day: bool, endpoint: str | None, state_dir: str | None) -> None:
    """Without BATCH_ID: the daemon (model, readiness, replicas and their load, allocation) and its
    recent batches. With BATCH_ID: that batch's status, counts, tokens and files. With --tenants:
    per-tenant usage (every tenant for an admin key, else your own).

    --json prints the batch object (OpenAI field names) or {"server": ..., "batches": [...]}.
    """
    if wait_ready is not None:
        _wait_ready(endpoint, state_dir, wait_ready)
    with connect(endpoint, state_dir) as client:
        if tenants:
            from hpcserve.commands.usage import print_usage

            print_usage(client.usage(since_day=since, by_day=by_day), as_json)
            return
        if batch_id is not None:
            b = client.get_batch(batch_id)
            if as_json:
                click.echo(json.dumps(b, indent=2))
            else:
                _print_batch(b)
            return
        server = server_info_to_dict(client.server_info())
        batches, has_more = client.list_batches(limit=limit)
        if as_json:
            click.echo(json.dumps({"server": server, "batches": batches}, indent=2))
            return
        _print_server(server, client.address)
        click.echo("")
        _print_batch_table(batches, has_more)


def _wait_ready(endpoint: str | None, state_dir: str | None, timeout: float) -> None:
    """Poll until the daemon answers and reports ready, tolerating one that is still starting."""
    deadline = time.monotonic() + timeout
    last = "no daemon yet"
    while True:
        try:
            with connect(endpoint, state_dir) as client:
                if client.server_info().is_ready:
                    return
                last = "the worker ranks are still loading"
        except HpcserveError as exc:  # no endpoint file yet, or not listening yet
            last = str(exc)
        if time.monotonic() >= deadline:
            click.echo(f"hpcserve: error: the daemon is not ready after {timeout:.0f} s ({last})", err=True)
            sys.exit(1)
        time.sleep(0.5)


# ------------------------------------------------------------------------- results, cancel

@click.command("results", short_help="Write a batch's output and error lines to files.")
@click.argument("batch_id")
@click.option("-o", "--output", "output_path", metavar="OUT.jsonl", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Output lines (and error lines unless --errors), replaced atomically.")
@click.option("--errors", "errors_path", metavar="ERR.jsonl", default=None,
              type=click.Path(dir_okay=False, path_type=Path), help="Write error lines here instead of into OUT.")
@daemon_options
def results(batch_id: str, output_path: Path, errors_path: Path | None, endpoint: str | None,
            state_dir: str | None) -> None:
    """Write the results of BATCH_ID: output lines (input-line order, match on custom_id) to
    OUT.jsonl and error lines after them or to --errors ERR.jsonl. Files are written to
    *.partial and renamed, so a reader never sees half a file. A batch still running gives the
    lines so far and a warning with the number still pending; run the command again later.
    """
    if errors_path is not None and output_path.absolute() == errors_path.absolute():
        raise click.UsageError("-o and --errors must be different files (leave out --errors to get both in -o)")
    _check_out_dir(output_path, errors_path)
    with connect(endpoint, state_dir) as client:
        b = client.get_batch(batch_id)
        n_out, n_err = write_results(client, batch_id, output_path, errors_path)
    click.echo(f"hpcserve results: {_written_summary(n_out, n_err, output_path, errors_path)}", err=True)
    left = max(b["request_counts"]["total"] - n_out - n_err, 0)
    if b["status"] not in TERMINAL and left:
        click.echo(f"hpcserve results: warning: batch {batch_id} is {b['status']}: {left} of "
                   f"{b['request_counts']['total']} lines still pending; run this again once it has completed "
                   f"(`hpcserve status {batch_id}`)", err=True)
    elif left:
        click.echo(f"hpcserve results: batch {batch_id} is {b['status']}: {left} lines never ran", err=True)


@click.command("cancel", short_help="Cancel a batch.")
@click.argument("batch_id")
@daemon_options
def cancel(batch_id: str, endpoint: str | None, state_dir: str | None) -> None:
    """Cancel BATCH_ID and print its new status: `cancelling` while in-flight lines stop, then
    `cancelled`; results so far stay available (`hpcserve results`). A batch that already ended
    keeps its status.
    """
    with connect(endpoint, state_dir) as client:
        b = client.cancel_batch(batch_id)
    click.echo(b["status"])
