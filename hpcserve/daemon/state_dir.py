"""File-system helpers for the daemon's state directory. No torch.

- ``fsync_dir(path)``: make a rename inside ``path`` durable.
- ``lock_state_dir(lock_path)``: an exclusive flock held for the process's lifetime, so two
  daemons never share one state dir (released by the kernel on any exit).
- ``test_pause(phase)``: a test-only hook (``HPCSERVE_TEST_FINALIZE_PAUSE="phase:SECS"``) that
  pauses inside a crash window so tests can SIGKILL there deterministically.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from hpcserve.errors import HpcserveError

PAUSE_ENV = "HPCSERVE_TEST_FINALIZE_PAUSE"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_state_dir(path: Path):
    """An exclusive flock on ``state_dir/lock`` for this process's lifetime (released by the
    kernel on any exit). Filesystems without flock: no lock."""
    f = open(path, "a+")  # noqa: SIM115 - kept open while the store is
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise HpcserveError(f"state directory {path.parent} is in use by another hpcserve process; "
                            "stop it or use another --state-dir") from None
    except OSError:
        pass
    return f


def test_pause(phase: str) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    if spec.partition(":")[0] == phase:
        sys.stderr.write(f"finalize window {phase}\n")
        sys.stderr.flush()
        time.sleep(float(spec.partition(":")[2] or 1))
