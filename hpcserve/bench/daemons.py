"""Real daemons for the benchmarks that drive one (``bench mixed``, ``bench disagg``, ``bench api``).

Interface::

    DaemonProcess(name, model, ranks, config_path, workdir)   one ``python -m hpcserve serve`` subprocess
        .start() -> ServerInfo (ready), .metadata, .stop(), .log_tail()
    BenchDaemons(bench, model, ranks, say)                     one daemon at a time under one temp dir
        with BenchDaemons(...) as d:
            result = d.run(name, config_doc, body, what)       body(daemon, info) -> result
    model_vocab_size(model), read_toml(path)

Lifecycle of ``BenchDaemons.run``: write ``config_doc`` (a parsed site TOML, ``mixed.dump_toml``) to
``WORKDIR/NAME.toml`` and validate it (a bad merge fails here, not in the daemon); start the daemon
in its own session on ``WORKDIR/NAME-state`` (log ``WORKDIR/NAME-daemon.log``), wait until every
replica serves; run ``body``; stop it (SIGTERM, SIGKILL to its process group if it hangs), also on
errors and Ctrl-C. A failure becomes one ``HpcserveError`` with the daemon's log tail and the kept
directory. The directory is removed when the ``with`` block ends without an error, kept otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import grpc

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc
from hpcserve.errors import HpcserveError

READY_TIMEOUT_S = 900.0     # daemon start until every replica serves
STOP_TIMEOUT_S = 60.0       # SIGTERM until SIGKILL
GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
T = TypeVar("T")


def model_vocab_size(model: str) -> int:
    """``vocab_size`` from the model's config.json (``demo`` and .gguf are resolved as the daemon does)."""
    from hpcserve.models.loader import resolve_model

    path = resolve_model(model) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HpcserveError(f"cannot read the model's config {path}: {exc}") from None
    vocab = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise HpcserveError(f"{path}: no usable vocab_size")
    return vocab


class DaemonProcess:
    """One ``hpcserve serve`` subprocess on its own state dir under ``workdir``."""

    def __init__(self, name: str, model: str, ranks: int, config_path: Path, workdir: Path) -> None:
        self.name, self.model, self.ranks, self.config_path = name, model, ranks, config_path
        self.state_dir = workdir / f"{name}-state"
        self.log_path = workdir / f"{name}-daemon.log"
        self.proc: subprocess.Popen | None = None
        self.address = self.token = ""

    def start(self, timeout: float = READY_TIMEOUT_S) -> pb.ServerInfo:
        self.state_dir.mkdir(parents=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hpcserve", "serve", "--model", self.model, "--ranks", str(self.ranks),
                 "--listen", "127.0.0.1:0", "--state-dir", str(self.state_dir), "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        channel = None
        try:
            while True:
                if self.proc.poll() is not None:
                    raise HpcserveError(f"the {self.name} daemon exited with {self.proc.returncode} while starting")
                if time.monotonic() > deadline:
                    raise HpcserveError(f"the {self.name} daemon was not ready in {timeout:g} s")
                if channel is None:
                    try:
                        ep = json.loads((self.state_dir / "endpoint.json").read_text())
                    except (OSError, ValueError):
                        ep = None
                    if ep and ep.get("pid") == self.proc.pid:
                        self.address, self.token = ep["address"], ep.get("token") or ""
                        channel = grpc.insecure_channel(self.address, options=GRPC_OPTIONS)
                if channel is not None:
                    stub = serving_pb2_grpc.ServingStub(channel)
                    try:
                        info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.metadata, timeout=10)
                        if info.is_ready:
                            return info
                    except grpc.RpcError:
                        pass
                time.sleep(0.25)
        finally:
            if channel is not None:
                channel.close()

    @property
    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait; SIGKILL the process group if it hangs. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        parts = []
        for path in (self.log_path, self.state_dir / "logs" / "workers.log"):
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                parts.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(parts)


class BenchDaemons:
    """One daemon at a time for one benchmark run, all under one temporary directory (see the module
    docstring)."""

    def __init__(self, bench: str, model: str, ranks: int, say: Callable[[str], None]) -> None:
        self.model, self.ranks, self.say = model, ranks, say
        self.workdir = Path(tempfile.mkdtemp(prefix=f"hpcserve-bench-{bench}-"))

    def __enter__(self):  # -> Self (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self, name: str, config_doc: Mapping, body: Callable[[DaemonProcess, pb.ServerInfo], T],
            what: str = "") -> T:
        from hpcserve.bench.mixed import dump_toml
        from hpcserve.config import load_config

        cfg_path = self.workdir / f"{name}.toml"
        cfg_path.write_text(dump_toml(config_doc))
        load_config(cfg_path, overrides={"daemon.ranks": self.ranks})  # a bad merge fails here, not in the daemon
        daemon = DaemonProcess(name, self.model, self.ranks, cfg_path, self.workdir)
        self.say(f"starting daemon '{name}' ({self.ranks} ranks{', ' + what if what else ''}); "
                 f"logs in {daemon.log_path}")
        try:
            info = daemon.start()
            self.say(f"daemon '{name}' ready (max_model_len {info.max_model_len})")
            return body(daemon, info)
        except (HpcserveError, grpc.RpcError) as exc:
            why = (f"a call to the {name} daemon failed ({exc.code().name}: {exc.details()})"
                   if isinstance(exc, grpc.RpcError) else str(exc))
            raise HpcserveError(f"{why}\n{daemon.log_tail()}\n(benchmark files kept in {self.workdir})") from None
        finally:
            self.say(f"stopping daemon '{name}'")
            daemon.stop()


def read_toml(path: Path) -> dict:
    """A TOML file, parsed (the caller has validated it with ``load_config``)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads(path.read_text(encoding="utf-8"))
