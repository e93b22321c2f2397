"""Runs the real daemon for end-to-end tests: ``hpcserve serve`` as a subprocess with real
worker ranks under the venv's mpiexec, a real SQLite store and gRPC over loopback. No torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.api.v1 import serving_pb2_grpc

TERMINAL = (pb.BATCH_STATUS_COMPLETED, pb.BATCH_STATUS_FAILED, pb.BATCH_STATUS_CANCELLED, pb.BATCH_STATUS_EXPIRED)


def chat_line(custom_id: str, content: str, max_tokens: int = 16, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                                "temperature": 0, **body}})


def keys_cli(config: Path | str, *args: str) -> str:
    """``hpcserve keys ARGS --config CONFIG`` (e.g. ``"add", "--tenant", "alice"``); its stdout, stripped."""
    out = subprocess.run([sys.executable, "-m", "hpcserve", "keys", *args, "--config", str(config)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def worker_rank_pids(daemon_pid: int) -> list[int]:
    return [p for p in descendants(daemon_pid) if "hpcserve worker" in cmdline(p) and "mpiexec" not in cmdline(p)]


STARTED: list[Daemon] = []  # every daemon a test started; ``reap_all`` kills what is left


def reap_all() -> None:
    """Kill every daemon (and its worker ranks) still running: teardown after a failed test."""
    while STARTED:
        d = STARTED.pop()
        if d.proc is not None and d.proc.poll() is None:
            kill_tree(d.proc.pid)
            d.proc.kill()
            d.proc.wait()


class Daemon:
    """One ``hpcserve serve`` process on a state dir. ``start()`` waits until it is ready."""

    def __init__(self, state_dir: Path, model: Path | str, ranks: int = 2, extra_args: tuple = (),
                 env: dict | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.model = str(model)
        self.ranks = ranks
        self.extra_args = list(extra_args)
        self.env = {**os.environ, "HPCSERVE_LOG_LEVEL": "INFO", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-daemon.log"
        self._channel = None
        self.stub = None
        self.md: list[tuple[str, str]] = []
        self.address = ""

    def start(self, timeout: float = 180.0) -> Daemon:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpcserve", "serve", "--model", self.model, "--ranks", str(self.ranks),
             "--listen", "127.0.0.1:0", "--state-dir", str(self.state_dir), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        STARTED.append(self)
        deadline = time.monotonic() + timeout
        ep_path = self.state_dir / "endpoint.json"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready in {timeout} s:\n{self.log_tail()}")
            try:
                ep = json.loads(ep_path.read_text())
            except (OSError, ValueError):
                ep = None
            if ep and ep.get("pid") == self.proc.pid:
                if self.stub is None:
                    self.address = ep["address"]
                    if ep.get("tls_ca"):  # [tls]: trust the daemon's certificate
                        creds = grpc.ssl_channel_credentials(Path(ep["tls_ca"]).read_bytes())
                        self._channel = grpc.secure_channel(self.address, creds)
                    else:
                        self._channel = grpc.insecure_channel(self.address)
                    self.stub = serving_pb2_grpc.ServingStub(self._channel)
                    self.md = [("authorization", f"Bearer {ep['token']}")]
                if self.info().is_ready:
                    return self
            time.sleep(0.2)

    def log_tail(self, n: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        wlog = self.state_dir / "logs" / "workers.log"
        wtext = wlog.read_text(errors="replace") if wlog.exists() else ""
        return "\n".join(text.splitlines()[-n:]) + "\n--- workers.log\n" + "\n".join(wtext.splitlines()[-n:])

    # ---------------------------------------------------------------- calls
    def info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.md, timeout=10)

    def wait_ready(self, timeout: float = 180.0, min_restarts: int = 0) -> pb.ServerInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info.is_ready and info.num_worker_restarts >= min_restarts:
                return info
            time.sleep(0.2)
        raise RuntimeError(f"not ready again in {timeout} s:\n{self.log_tail()}")

    def chat(self, content: str, max_tokens: int = 16, **params):
        req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=content)],
                             sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, **params))
        return self.stub.Chat(req, metadata=self.md, timeout=300)

    def submit(self, jsonl: bytes) -> pb.Batch:
        return self.stub.SubmitBatch(pb.SubmitBatchRequest(input_jsonl=jsonl), metadata=self.md, timeout=60)

    def batch(self, batch_id: str) -> pb.Batch:
        return self.stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id), metadata=self.md, timeout=10)

    def wait_batch(self, batch_id: str, timeout: float = 300.0, until=None) -> pb.Batch:
        """Poll until the batch is terminal (or ``until(batch)`` is true)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            b = self.batch(batch_id)
            if b.status in TERMINAL or (until is not None and until(b)):
                return b
            time.sleep(0.1)
        raise RuntimeError(f"batch {batch_id} not done in {timeout} s:\n{self.log_tail()}")

    # ---------------------------------------------------------------- stop
    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=120)
        self.close_channel()

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.close_channel()
        return code

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self.stub = None


def wait_gone(pids: list[int], timeout: float = 60.0) -> list[int]:
    """Wait until none of ``pids`` is alive (zombies count as gone); returns the survivors."""
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.1)
    return alive


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_tree(pid: int) -> None:
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
