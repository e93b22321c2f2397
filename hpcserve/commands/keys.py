"""``hpcserve keys add | list | revoke``: the site admin's API keys for tenants.

Interface: the click group ``keys`` (registered by ``hpcserve.cli``) with the commands ``add``,
``list`` and ``revoke``. Each works on the keys file only (``hpcserve.daemon.keys.KeysFile``), so
it needs no running daemon; a running daemon re-reads the file within about a second.

Which file: ``--keys-file PATH``; else the site config's ``SiteConfig.keys_path`` (``--config
FILE``: its ``auth.keys-file``, or ``<daemon.state-dir>/keys.json``); else
``<state dir>/keys.json`` with the state dir from ``--state-dir``, ``HPCSERVE_STATE_DIR`` or
``~/.hpcserve``. ``--state-dir`` also overrides the config's ``daemon.state-dir``. The tenants
``add`` accepts are the site config's (without ``--config``: the built-in set, i.e. ``default``).

Stdout carries only what scripts capture (the new key; the table or JSON of ``list``); notes go to
stderr. Errors are one-line ``HpcserveError``s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from hpcserve.errors import HpcserveError

F = TypeVar("F", bound=Callable)


def _file_options(f: F) -> F:
    f = click.option("--keys-file", "keys_file", metavar="PATH", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="The keys file itself; overrides the config's auth.keys-file and the "
                                        "state dir.")(f)
    f = click.option("--state-dir", "state_dir", metavar="DIR", default=None,
                     help="State directory whose keys.json to use (when the config sets no auth.keys-file) "
                          "[env HPCSERVE_STATE_DIR; default ~/.hpcserve].")(f)
    f = click.option("--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False), default=None,
                     help="Site config TOML: its [tenants.NAME] tables are the valid tenants, and its "
                          "auth.keys-file (or daemon.state-dir) locates the keys file.")(f)
    return f


def _site(config_path: str | None, state_dir: str | None, keys_file: Path | None):
    """(SiteConfig, keys file path) from the options (see the module docstring)."""
    from hpcserve.config import load_config

    cfg = load_config(config_path, overrides={"daemon.state-dir": state_dir})
    return cfg, (keys_file.expanduser() if keys_file is not None else cfg.keys_path)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts is not None else "-"


@click.group("keys", short_help="Manage tenants' API keys (add, list, revoke).")
def keys() -> None:
    """Manage the API keys of the site's tenants (the [tenants.NAME] tables of the site config).

    Keys are stored hashed in the keys file (the config's auth.keys-file, default
    <daemon.state-dir>/keys.json); a new key is shown once, by `add`. A running daemon picks
    up added and revoked keys within about a second, without a restart.

    \b
      KEY=$(hpcserve keys add --config site.toml --tenant alice-lab --note "alice's laptop")
      hpcserve keys list --config site.toml
      hpcserve keys revoke --config site.toml key_0123456789ab
    """


@keys.command("add", short_help="Issue a new key for a tenant (printed once).")
@click.option("--tenant", required=True, metavar="NAME", help="Tenant of the key: a [tenants.NAME] table of the "
                                                              "site config.")
@click.option("--note", default="", metavar="TEXT", help="Free text shown by `keys list`, e.g. who holds the key.")
@_file_options
def add(tenant: str, note: str, config_path: str | None, state_dir: str | None, keys_file: Path | None) -> None:
    """Issue a new API key for the tenant --tenant NAME and print it on stdout (only the key, so
    KEY=$(hpcserve keys add --tenant NAME) captures it). Store it now: the keys file keeps only
    its SHA-256 digest, so it cannot be shown again (revoke it and add another if lost)."""
    from hpcserve.daemon.keys import KeysFile

    cfg, path = _site(config_path, state_dir, keys_file)
    if tenant not in cfg.tenants:
        where = config_path or "the built-in site config (no --config given)"
        fix = f"add a [tenants.{tenant}] table to the site config" + ("" if config_path else " and pass --config FILE")
        raise HpcserveError(f"tenant {tenant!r} is not defined in {where}; defined tenants: "
                            f"{', '.join(cfg.tenants)}; {fix}")
    key, rec = KeysFile(path).add(tenant, note)
    click.echo(key)
    click.echo(f"hpcserve keys: added {rec.key_id} for tenant {tenant} to {path}; store the key now (only its "
               "hash is kept); a running daemon accepts it within a second", err=True)


@keys.command("list", short_help="Show the keys (ids, tenants, hints, status).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--tenant", default=None, metavar="NAME", help="Only this tenant's keys.")
@_file_options
def list_keys(as_json: bool, tenant: str | None, config_path: str | None, state_dir: str | None,
              keys_file: Path | None) -> None:
    """List the keys in the keys file: id, tenant, hint (the first characters of the key), creation
    time (UTC), status (active or revoked) and note. The keys themselves are not stored."""
    from hpcserve.daemon.keys import KeysFile

    cfg, path = _site(config_path, state_dir, keys_file)
    records = [r for r in KeysFile(path).records() if tenant is None or r.tenant == tenant]
    if as_json:
        rows = [{"key_id": r.key_id, "tenant": r.tenant, "hint": r.hint, "created_at": r.created_at,
                 "revoked_at": r.revoked_at, "status": "active" if r.is_active else "revoked", "note": r.note}
                for r in records]
        click.echo(json.dumps(rows, indent=1, ensure_ascii=False))
    elif records:
        table = [("KEY ID", "TENANT", "HINT", "CREATED (UTC)", "STATUS", "NOTE")]
        table += [(r.key_id, r.tenant, r.hint, _when(r.created_at), "active" if r.is_active else "revoked", r.note)
                  for r in records]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
        for row in table:
            click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    else:
        click.echo(f"hpcserve keys: no keys{f' of tenant {tenant}' if tenant else ''} in {path}", err=True)
    orphans = sorted({r.tenant for r in records if r.is_active and r.tenant not in cfg.tenants})
    if orphans:
        click.echo(f"hpcserve keys: note: tenant(s) {', '.join(orphans)} are not defined in "
                   f"{config_path or 'the built-in site config (pass --config FILE)'}; a daemon with that config "
                   "refuses their keys", err=True)


@keys.command("revoke", short_help="Revoke a key by its id.")
@click.argument("key_id", metavar="KEY_ID")
@_file_options
def revoke(key_id: str, config_path: str | None, state_dir: str | None, keys_file: Path | None) -> None:
    """Revoke the key KEY_ID (as shown by `hpcserve keys list`). A running daemon refuses it within
    about a second. Revoking a revoked key changes nothing."""
    from hpcserve.daemon.keys import KeysFile

    _, path = _site(config_path, state_dir, keys_file)
    rec = KeysFile(path).revoke(key_id)
    click.echo(f"hpcserve keys: {rec.key_id} (tenant {rec.tenant}) is revoked since {_when(rec.revoked_at)} UTC; "
               "a running daemon refuses it within a second", err=True)
