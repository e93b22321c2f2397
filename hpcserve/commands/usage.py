"""Per-tenant usage for ``hpcserve status --tenants``, and ``hpcserve drain`` (admin keys).

``print_usage(report, as_json)`` renders a ``serving_pb2.UsageReport``: one row per tenant (or
per tenant and UTC day with ``--by-day``) with requests, tokens in and out, GPU-seconds, useful
rank-seconds of interactive and batch work (docs/utilization.md), today's tokens against the daily
quota and the streams in flight; admin keys also get each tenant's share of the economic
utilization since the daemon started, the allocation's rank-seconds, the share of them spent in
engine steps, and the economic utilization per class.
"""

from __future__ import annotations

import json

import click

from hpcserve.commands._client_opts import connect, daemon_options


def usage_to_dict(report) -> dict:
    admin = bool(report.allocation_gpu_seconds)
    rows = []
    for t in report.tenants:
        row = {"tenant": t.tenant, "day": t.day or None, "requests": t.requests, "input_tokens": t.input_tokens,
               "output_tokens": t.output_tokens, "gpu_seconds": round(t.gpu_seconds, 3),
               "useful_seconds_interactive": round(t.useful_seconds_interactive, 3),
               "useful_seconds_batch": round(t.useful_seconds_batch, 3),
               "tokens_today": t.tokens_today, "daily_token_quota": t.daily_token_quota or None,
               "active_streams": t.active_streams}
        if admin and not t.day:
            row["economic_utilization"] = round(t.economic_utilization, 4)
        rows.append(row)
    out = {"tenants": rows}
    if admin:
        out["allocation_gpu_seconds"] = round(report.allocation_gpu_seconds, 1)
        out["busy_gpu_seconds"] = round(report.busy_gpu_seconds, 1)
        out["metered_gpu_seconds"] = round(report.metered_gpu_seconds, 3)
        out["useful_seconds_interactive"] = round(report.useful_seconds_interactive, 3)
        out["useful_seconds_batch"] = round(report.useful_seconds_batch, 3)
        for k in ("economic_utilization", "economic_utilization_interactive", "economic_utilization_batch"):
            out[k] = round(getattr(report, k), 4)
    return out


def print_usage(report, as_json: bool) -> None:
    d = usage_to_dict(report)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    by_day = any(r["day"] for r in d["tenants"])
    util = any("economic_utilization" in r for r in d["tenants"])
    head = f"{'tenant':<16}" + (f" {'day':<10}" if by_day else "") + \
        f" {'requests':>9} {'tokens in':>11} {'tokens out':>11} {'GPU-s':>9} {'useful chat-s':>13}" \
        f" {'useful batch-s':>14}" + (f" {'econ util':>9}" if util else "") + f" {'today/quota':>17} {'streams':>7}"
    click.echo(head)
    for r in d["tenants"]:
        quota = f"{r['tokens_today']}/{r['daily_token_quota'] or '-'}"
        click.echo(f"{r['tenant']:<16}" + (f" {r['day'] or '':<10}" if by_day else "") +
                   f" {r['requests']:>9} {r['input_tokens']:>11} {r['output_tokens']:>11} {r['gpu_seconds']:>9.1f}"
                   f" {r['useful_seconds_interactive']:>13.1f} {r['useful_seconds_batch']:>14.1f}" +
                   (f" {r.get('economic_utilization', 0.0):>9.1%}" if util else "") +
                   f" {quota:>17} {r['active_streams']:>7}")
    if "allocation_gpu_seconds" in d:
        alloc, busy = d["allocation_gpu_seconds"], d["busy_gpu_seconds"]
        share = f" ({busy / alloc:.0%} busy)" if alloc else ""
        click.echo(f"allocation: {alloc:.0f} rank-seconds since start, {busy:.0f} in engine steps{share}")
        click.echo(f"economic utilization since start: {d['economic_utilization']:.1%} (interactive "
                   f"{d['economic_utilization_interactive']:.1%}, batch {d['economic_utilization_batch']:.1%}; "
                   "useful rank-seconds delivered / allocated, see docs/utilization.md)")


@click.command("drain", short_help="Drain the daemon (admin key): batch lines requeued, chats finish, exit.")
@daemon_options
def drain(endpoint: str | None, state_dir: str | None) -> None:
    """Ask the daemon to stop gracefully, as on SIGTERM: new streams are refused, running batch
    lines go back to pending (they resume on the next start), chats get drain-timeout-s to finish.
    Needs a key of an admin tenant (the endpoint.json key of the laptop config is one)."""
    with connect(endpoint, state_dir) as client:
        client.drain()
    click.echo("draining: the daemon stops once its chats finish")
