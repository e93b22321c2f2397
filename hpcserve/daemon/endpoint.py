"""The endpoint file: how clients find the service across allocations. No torch.

Lifecycle: the daemon calls ``write_endpoint(state_dir, address, token, http=, tls_ca=)`` once
it listens, ``mark_draining(state_dir)`` when it starts to drain, and ``remove_endpoint`` on a
clean exit. The file is ``$state_dir/endpoint.json``, mode 0600 (it holds the token), replaced
atomically so a reader never sees half a file. ``tls_ca`` (absolute path, or absent) is set
when the daemon serves TLS: the PEM file clients use as the trust root (the daemon's
certificate); files written before it existed still load (``tls_ca`` None: plaintext).

Clients call ``resolve_endpoint(endpoint=None, state_dir=None, env=os.environ)``, which
tries, in order: the explicit ``--endpoint`` value, ``HPCSERVE_ENDPOINT`` (``host:port``),
then the state dir's endpoint file (``--state-dir``, ``HPCSERVE_STATE_DIR``, or
``~/.hpcserve``). It returns an ``Endpoint``; when nothing is found it raises
``EndpointNotFound`` with one line saying where it looked and how to fix it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcserve.errors import HpcserveError

FILE_NAME = "endpoint.json"
DEFAULT_STATE_DIR = "~/.hpcserve"


class EndpointNotFound(HpcserveError):
    """No daemon address could be found."""


@dataclass(frozen=True)
class Endpoint:
    address: str  # host:port
    token: str | None = None
    pid: int | None = None
    http: str | None = None  # host:port of the OpenAI-compatible HTTP API, if served
    draining: bool = False
    started_at: float | None = None
    slurm_job_id: str | None = None  # the allocation serving it (hpcserve down drains that job)
    tls_ca: str | None = None  # path of the PEM trust root for TLS clients; None: the daemon serves plaintext
    source: str = field(default="", compare=False)  # where it was found, for messages


def state_dir_from(state_dir: str | os.PathLike | None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    raw = state_dir or env.get("HPCSERVE_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(os.path.expandvars(os.path.expanduser(str(raw))))


def _check_address(address: str, where: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EndpointNotFound(f"{where}: {address!r} is not host:port (e.g. 127.0.0.1:50051)")
    return address


def write_endpoint(state_dir: str | os.PathLike, address: str, token: str | None = None,
                   http: str | None = None, tls_ca: str | os.PathLike | None = None) -> Path:
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    ep = Endpoint(_check_address(address, "daemon address"), token, os.getpid(), http, False, time.time(),
                  os.environ.get("SLURM_JOB_ID") or None, str(Path(tls_ca).absolute()) if tls_ca else None)
    data = {k: v for k, v in asdict(ep).items() if k != "source"}
    fd, tmp = tempfile.mkstemp(prefix=".endpoint-", dir=state)  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, state / FILE_NAME)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return state / FILE_NAME


def read_endpoint(state_dir: str | os.PathLike) -> Endpoint | None:
    path = Path(state_dir) / FILE_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise EndpointNotFound(f"{path}: unreadable endpoint file ({exc}); remove it and restart the daemon") from exc
    if not isinstance(data, dict) or not isinstance(data.get("address"), str):
        raise EndpointNotFound(f"{path}: endpoint file has no address; remove it and restart the daemon")
    known = {k: data[k] for k in ("address", "token", "pid", "http", "draining", "started_at", "slurm_job_id",
                                  "tls_ca") if k in data}
    return Endpoint(**known, source=str(path))


def mark_draining(state_dir: str | os.PathLike) -> None:
    ep = read_endpoint(state_dir)
    if ep is None:
        return
    path = Path(state_dir) / FILE_NAME
    data = {k: v for k, v in asdict(ep).items() if k != "source"}
    data["draining"] = True
    tmp = path.with_name(f".endpoint-drain-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.chmod(tmp, 0o600)  # a stale temp file from a crash may have kept other bits
    os.replace(tmp, path)


def remove_endpoint(state_dir: str | os.PathLike) -> None:
    try:
        (Path(state_dir) / FILE_NAME).unlink()
    except FileNotFoundError:
        pass


def resolve_endpoint(endpoint: str | None = None, state_dir: str | os.PathLike | None = None,
                     env: Mapping[str, str] | None = None) -> Endpoint:
    env = os.environ if env is None else env
    if endpoint:
        return Endpoint(_check_address(endpoint, "--endpoint"), source="--endpoint")
    if env.get("HPCSERVE_ENDPOINT"):
        return Endpoint(_check_address(env["HPCSERVE_ENDPOINT"], "HPCSERVE_ENDPOINT"), source="HPCSERVE_ENDPOINT")
    state = state_dir_from(state_dir, env)
    ep = read_endpoint(state)
    if ep is None:
        raise EndpointNotFound(
            f"no hpcserve daemon found: no --endpoint, no HPCSERVE_ENDPOINT, and no {state / FILE_NAME}; "
            "start one with `hpcserve serve`, or pass --endpoint HOST:PORT / --state-dir DIR"
        )
    return ep
