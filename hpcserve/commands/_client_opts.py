"""Shared options of the CLI commands that talk to a running daemon (submit, status, results,
cancel, chat): ``@daemon_options`` adds ``--endpoint``, ``--state-dir`` and ``--config``;
``connect(endpoint, state_dir)`` returns a connected ``hpcserve.api.client.Client`` (grpc is
imported only then, so ``--help`` stays fast) or raises a one-line ``HpcserveError``.

Where the daemon is: ``--endpoint`` > ``HPCSERVE_ENDPOINT`` > ``--state-dir`` > ``--config FILE``
(that site's ``daemon.state-dir``, e.g. on the shared file system: whichever allocation serves
the site today wrote its endpoint there) > ``HPCSERVE_STATE_DIR`` > ``~/.hpcserve``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

if TYPE_CHECKING:
    from hpcserve.api.client import Client

F = TypeVar("F", bound=Callable)


def _remember_config(ctx: click.Context, _param, value: str | None) -> None:
    if value is not None:
        ctx.meta["hpcserve.config"] = value


def daemon_options(f: F) -> F:
    f = click.option(
        "--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False), default=None,
        expose_value=False, callback=_remember_config,
        help="Site config TOML: find the daemon through its daemon.state-dir (what `hpcserve up` and "
             "the sbatch templates use).")(f)
    f = click.option(
        "--state-dir", "state_dir", metavar="DIR", envvar="HPCSERVE_STATE_DIR", default=None,
        help="The daemon's state directory; its endpoint.json gives the address and token "
             "[env HPCSERVE_STATE_DIR; default ~/.hpcserve].")(f)
    f = click.option(
        "--endpoint", metavar="HOST:PORT", default=None,
        help="Daemon address; overrides HPCSERVE_ENDPOINT and the state dir's endpoint.json. "
             "The token then comes from HPCSERVE_TOKEN, or from endpoint.json if it names "
             "the same address.")(f)
    return f


def resolve_state_dir(state_dir: str | None) -> str | None:
    """``--state-dir`` given on the command line wins; else ``--config``'s state dir; else the
    environment's or the default (``state_dir`` as click filled it)."""
    ctx = click.get_current_context(silent=True)
    config = ctx.meta.get("hpcserve.config") if ctx is not None else None
    if config is None:
        return state_dir
    if state_dir is not None and ctx.get_parameter_source("state_dir") == click.core.ParameterSource.COMMANDLINE:
        return state_dir
    from hpcserve.config import load_config

    return str(load_config(config).daemon.state_path)


def connect(endpoint: str | None, state_dir: str | None) -> Client:
    from hpcserve.api.client import Client

    return Client.connect(endpoint, resolve_state_dir(state_dir))
