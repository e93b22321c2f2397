"""Per-tenant usage for ``hpcserve status --tenants``, and ``hpcserve drain`` (admin keys).

``print_usage(report, as_json)`` renders a ``serving_pb2.UsageReport``: one row per tenant (or
per tenant and UTC day with ``--by-day``) with requests, tokens in and out, GPU-seconds, today's
tokens against the daily quota and the streams in flight; admin keys also get the allocation's
rank-seconds and the share of them spent in engine steps.
"""

from __future__ import annotations

import json

import click

from hpcserve.commands._client_opts import connect, daemon_options


def usage_to_dict(report) -> dict:
    rows = [{"tenant": t.tenant, "day": t.day or None, "requests": t.requests, "input_tokens": t.input_tokens,
             "output_tokens": t.output_tokens, "gpu_seconds": round(t.gpu_seconds, 3),
             "tokens_today": t.tokens_today, "daily_token_quota": t.daily_token_quota or None,
             "active_streams": t.active_streams} for t in report.tenants]
    out = {"tenants": rows}
    if report.allocation_gpu_seconds:
        out["allocation_gpu_seconds"] = round(report.allocation_gpu_seconds, 1)
        out["busy_gpu_seconds"] = round(report.busy_gpu_seconds, 1)
    return out


def print_usage(report, as_json: bool) -> None:
    d = usage_to_dict(report)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    by_day = any(r["day"] for r in d["tenants"])
    head = f"{'tenant':<16}" + (f" {'day':<10}" if by_day else "") + \
        f" {'requests':>9} {'tokens in':>11} {'tokens out':>11} {'GPU-s':>9} {'today/quota':>17} {'streams':>7}"
    click.echo(head)
    for r in d["tenants"]:
        quota = f"{r['tokens_today']}/{r['daily_token_quota'] or '-'}"
        click.echo(f"{r['tenant']:<16}" + (f" {r['day'] or '':<10}" if by_day else "") +
                   f" {r['requests']:>9} {r['input_tokens']:>11} {r['output_tokens']:>11} {r['gpu_seconds']:>9.1f}"
                   f" {quota:>17} {r['active_streams']:>7}")
    if "allocation_gpu_seconds" in d:
        alloc, busy = d["allocation_gpu_seconds"], d["busy_gpu_seconds"]
        share = f" ({busy / alloc:.0%} busy)" if alloc else ""
        click.echo(f"allocation: {alloc:.0f} rank-seconds since start, {busy:.0f} in engine steps{share}")


@click.command("drain", short_help="Drain the daemon (admin key): batch lines requeued, chats finish, exit.")
@daemon_options
def drain(endpoint: str | None, state_dir: str | None) -> None:
    """Ask the daemon to stop gracefully, as on SIGTERM: new streams are refused, running batch
    lines go back to pending (they resume on the next start), chats get drain-timeout-s to finish.
    Needs a key of an admin tenant (the endpoint.json key of the laptop config is one)."""
    with connect(endpoint, state_dir) as client:
        client.drain()
    click.echo("draining: the daemon stops once its chats finish")
