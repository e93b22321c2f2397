"""``hpcserve keys add | list | revoke``: the site admin's API keys for tenants.

Interface: the click group ``keys`` (registered by ``hpcserve.cli``) with the commands ``add``,
``list`` and ``revoke``. Each works on the keys file (``hpcserve.daemon.keys.KeysFile``), so it
needs no running daemon; a running daemon re-reads the file within about a second. With
``--remote`` they go through the running daemon instead (``CreateKey`` / ``ListKeys`` /
``RevokeKey``, admin keys only: ``HPCSERVE_API_KEY`` or the endpoint.json key), for admins
without write access to the keys file; the daemon is found like every client command finds it
(``--endpoint``, ``HPCSERVE_ENDPOINT``, the state dir of ``--state-dir`` / ``--config``).

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
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click

from hpcserve.errors import HpcserveError

F = TypeVar("F", bound=Callable)


def _file_options(f: F) -> F:
    f = click.option("--remote", is_flag=True, help="Go through the running daemon (admin key from "
                     "HPCSERVE_API_KEY or endpoint.json) instead of editing the keys file.")(f)
    f = click.option("--endpoint", metavar="HOST:PORT", default=None,
                     help="With --remote: the daemon's address (default: its state dir's endpoint.json).")(f)
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


def _client(endpoint: str | None, config_path: str | None, state_dir: str | None):
    """--remote: a client of the running daemon (found through the site config's state dir)."""
    from hpcserve.api.client import Client

    if state_dir is None and config_path is not None:
        from hpcserve.config import load_config

        state_dir = str(load_config(config_path).daemon.state_path)
    return Client.connect(endpoint, state_dir)


@dataclass(frozen=True)
class _Row:  # a key as listed (from the file's KeyRecord or the daemon's ApiKeyInfo)
    key_id: str
    tenant: str
    hint: str
    created_at: float
    revoked_at: float | None
    note: str

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    @classmethod
    def of_info(cls, k) -> _Row:
        return cls(k.key_id, k.tenant, k.hint, float(k.created_at), float(k.revoked_at) or None, k.note)


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
def add(tenant: str, note: str, config_path: str | None, state_dir: str | None, keys_file: Path | None,
        endpoint: str | None, remote: bool) -> None:
    """Issue a new API key for the tenant --tenant NAME and print it on stdout (only the key, so
    KEY=$(hpcserve keys add --tenant NAME) captures it). Store it now: the keys file keeps only
    its SHA-256 digest, so it cannot be shown again (revoke it and add another if lost)."""
    from hpcserve.daemon.keys import KeysFile

    if remote:
        with _client(endpoint, config_path, state_dir) as client:
            resp = client.create_key(tenant, note)
        click.echo(resp.key)
        click.echo(f"hpcserve keys: the daemon added {resp.info.key_id} for tenant {tenant}; store the key now "
                   "(only its hash is kept); it works at once", err=True)
        return

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
              keys_file: Path | None, endpoint: str | None, remote: bool) -> None:
    """List the keys in the keys file: id, tenant, hint (the first characters of the key), creation
    time (UTC), status (active or revoked) and note. The keys themselves are not stored."""
    from hpcserve.daemon.keys import KeysFile

    if remote:
        with _client(endpoint, config_path, state_dir) as client:
            records = [_Row.of_info(k) for k in client.list_keys(tenant)]
        cfg, path = None, "the daemon's keys file"
    else:
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
    orphans = sorted({r.tenant for r in records if r.is_active and r.tenant not in cfg.tenants}) if cfg else []
    if orphans:
        click.echo(f"hpcserve keys: note: tenant(s) {', '.join(orphans)} are not defined in "
                   f"{config_path or 'the built-in site config (pass --config FILE)'}; a daemon with that config "
                   "refuses their keys", err=True)


@keys.command("revoke", short_help="Revoke a key by its id.")
@click.argument("key_id", metavar="KEY_ID")
@_file_options
def revoke(key_id: str, config_path: str | None, state_dir: str | None, keys_file: Path | None,
           endpoint: str | None, remote: bool) -> None:
    """Revoke the key KEY_ID (as shown by `hpcserve keys list`). A running daemon refuses it within
    about a second. Revoking a revoked key changes nothing."""
    from hpcserve.daemon.keys import KeysFile

    if remote:
        with _client(endpoint, config_path, state_dir) as client:
            rec = _Row.of_info(client.revoke_key(key_id))
    else:
        _, path = _site(config_path, state_dir, keys_file)
        rec = KeysFile(path).revoke(key_id)
    click.echo(f"hpcserve keys: {rec.key_id} (tenant {rec.tenant}) is revoked since {_when(rec.revoked_at)} UTC; "
               "a running daemon refuses it within a second", err=True)
