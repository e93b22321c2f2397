"""File-system helpers for the daemon's state directory. No torch.

The state dir holds every tenant's prompts and outputs (SQLite, uploads, batch files, logs), the
API-key hashes and the endpoint key: it is private to the user running the daemon.

- ``prepare_state_dir(path)``: create it mode 0700, or tighten an existing one to 0700 (logged);
  the daemon also runs with umask 077 (``PRIVATE_UMASK``), so every file it creates there is 0600.
- ``fsync_dir(path)``: make a rename inside ``path`` durable.
- ``lock_state_dir(lock_path)``: an exclusive flock held for the process's lifetime, so two
  daemons never share one state dir (released by the kernel on any exit). A filesystem that
  refuses locks is an error naming the filesystem, never a silent skip: two daemons on one
  store would both feed and finalize the same batches.
- ``filesystem_of(path) -> str``: the type of the filesystem holding ``path`` (from the mount
  table; "unknown" where there is none).
- ``test_pause(phase)``: a test-only hook (``HPCSERVE_TEST_FINALIZE_PAUSE="phase:SECS"``) that
  pauses inside a crash window so tests can SIGKILL there deterministically.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from pathlib import Path

from hpcserve.errors import HpcserveError

log = logging.getLogger("hpcserve.daemon")

PAUSE_ENV = "HPCSERVE_TEST_FINALIZE_PAUSE"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PRIVATE_UMASK = 0o077


def prepare_state_dir(path: Path) -> None:
    """Create ``path`` (and parents) mode 0700, or make an existing state dir 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            path.chmod(0o700)
            log.warning("state directory %s was mode %o (readable by others); made it 0700", path, mode)
    except OSError as exc:
        raise HpcserveError(f"cannot create the state directory {path}: {exc.strerror or exc}; set "
                            "daemon.state-dir (--state-dir) to a directory you own") from None


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` ("nfs", "lustre", "ext4", ...; "unknown" if not found)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields, after = pre.split(), post.split()
                if len(fields) < 5 or not after:
                    continue
                mount = fields[4].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, after[0]
    except OSError:
        pass
    return kind


def lock_state_dir(path: Path):
    """An exclusive flock on ``state_dir/lock`` for this process's lifetime (released by the
    kernel on any exit); see the module docstring."""
    f = open(path, "a+")  # noqa: SIM115 - kept open while the store is
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise HpcserveError(f"state directory {path.parent} is in use by another hpcserve process; "
                            "stop it or use another --state-dir") from None
    except OSError as exc:
        f.close()
        raise HpcserveError(f"state directory {path.parent} is on a {filesystem_of(path.parent)} filesystem that "
                            f"refuses file locks ({exc.strerror or exc}), so hpcserve cannot make sure no other "
                            "daemon uses it; put daemon.state-dir (--state-dir) on a filesystem with locks "
                            "(node-local disk, or Lustre/NFS mounted with locking enabled)") from None
    return f


def test_pause(phase: str) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    if spec.partition(":")[0] == phase:
        sys.stderr.write(f"finalize window {phase}\n")
        sys.stderr.flush()
        time.sleep(float(spec.partition(":")[2] or 1))
