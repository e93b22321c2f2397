"""Shared options of the CLI commands that talk to a running daemon (submit, status, results,
cancel, chat): ``@daemon_options`` adds ``--endpoint`` and ``--state-dir``; ``connect(endpoint,
state_dir)`` returns a connected ``hpcserve.api.client.Client`` (grpc is imported only then,
so ``--help`` stays fast) or raises a one-line ``HpcserveError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

if TYPE_CHECKING:
    from hpcserve.api.client import Client

F = TypeVar("F", bound=Callable)


def daemon_options(f: F) -> F:
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


def connect(endpoint: str | None, state_dir: str | None) -> Client:
    from hpcserve.api.client import Client

    return Client.connect(endpoint, state_dir)
