"""The state dir is private and never shared: mode 0700 with 0600 files (the real daemon, after a
chat and a batch), and a state dir whose filesystem refuses locks stops the daemon with one line
naming the filesystem (the refusal is injected: no filesystem without flock can be mounted here)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest
from daemon_harness import Daemon, chat_line, reap_all

from hpcserve.daemon.state_dir import filesystem_of, lock_state_dir, prepare_state_dir
from hpcserve.errors import HpcserveError


def test_prepare_creates_0700_and_tightens_an_open_dir(tmp_path):
    fresh = tmp_path / "a" / "state"
    prepare_state_dir(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    prepare_state_dir(old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o700


def test_filesystem_of_names_the_mount():
    assert filesystem_of("/proc/self") == "proc"
    assert filesystem_of("/") not in ("", "unknown")


def _refuse_locks(*_args, **_kw):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


def test_a_lock_refused_by_the_filesystem_is_an_error(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(fcntl, "flock", _refuse_locks)
    with pytest.raises(HpcserveError) as info:
        lock_state_dir(tmp_path / "lock")
    msg = str(info.value)
    assert f"on a {filesystem_of(tmp_path)} filesystem that refuses file locks" in msg
    assert "daemon.state-dir" in msg and str(tmp_path) in msg


def test_daemon_refuses_to_start_without_the_lock(tmp_path):
    """``hpcserve serve`` itself, with flock failing as on a filesystem without locks: exit 1, one line."""
    code = ("import errno, fcntl, os, sys\n"
            "def refuse(*a, **k): raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))\n"
            "fcntl.flock = refuse\n"
            "from hpcserve.cli import main\n"
            "sys.argv = ['hpcserve'] + sys.argv[1:]\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code, "serve", "--model", "demo", "--listen", "127.0.0.1:0",
                        "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "refuses file locks" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "state" / "endpoint.json").exists()


@pytest.mark.slow
def test_daemon_state_dir_is_private(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # as a careless admin left it
    daemon = Daemon(state, model, ranks=1).start()
    try:
        list(daemon.chat("hello", max_tokens=4))
        b = daemon.submit((chat_line("a", "x", 4) + "\n").encode())
        daemon.wait_batch(b.id)
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        reap_all()
    seen = []
    for root, dirs, files in os.walk(state):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            seen.append(path)
            assert not mode & 0o077, f"{path} is mode {mode:o}"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    names = {os.path.basename(p) for p in seen}
    assert {"batches.sqlite", "lock", "workers.log", "input.jsonl", "output.jsonl"} <= names, names
