"""What a tenant may ask of the batch API beyond the line format: completion windows, batch input
named by a path on a shared file system, and storage. No grpc, no torch.

Interface::

    policy = BatchPolicy(windows=("24h",), default_window="24h")
    policy.window(requested)                  -> the window to use ("" = the default); RequestError
                                                 (field completion_window) listing the allowed ones
    policy.open_input(principal, path)        -> (binary file object, resolved path); AuthError
                                                 ("permission_denied") naming tenants.NAME.input-dirs,
                                                 or RequestError for a relative / unreadable path
    policy.quota_bytes(principal)             -> the tenant's storage quota in bytes (0 = unlimited)

Rules:
- **Windows.** Batches are claimed earliest deadline first, so a short completion window is a
  priority. Only the site's ``[slo] batch-completion-windows`` are granted.
- **Input by path.** The daemon reads the file with its own rights, so a path is a capability: admin
  tenants may name any file the daemon can read; other tenants only files whose resolved path
  (symlinks followed, ``..`` removed) lies under one of their ``input-dirs`` (each also resolved).
  A path outside them is refused before the daemon opens it (so the answer tells nothing about
  files elsewhere), and the file that was opened is checked again through its descriptor, so a
  symlink swapped in between cannot escape. Only regular files are read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from hpcserve.config_tables import window_seconds
from hpcserve.daemon.tenants import AuthError, Principal
from hpcserve.errors import RequestError

INLINE_HINT = "pass the file's content instead (hpcserve submit sends it inline)"


class BatchPolicy:
    """See the module docstring."""

    def __init__(self, windows: tuple[str, ...] = ("24h",), default_window: str = "24h") -> None:
        bad = [w for w in (*windows, default_window) if window_seconds(w) is None]
        if bad or not windows:
            raise ValueError(f"completion windows must look like \"24h\", got {bad or windows!r}")
        self.windows = tuple(windows)
        self.default_window = default_window if default_window in self.windows else self.windows[0]

    # ------------------------------------------------------------------ windows
    def window(self, requested: object) -> str:
        """The completion window of a new batch: ``requested`` if the site grants it, the default if empty."""
        if requested in (None, ""):
            return self.default_window
        if not isinstance(requested, str) or requested.strip() not in self.windows:
            raise RequestError(f"completion_window: must be one of {', '.join(repr(w) for w in self.windows)} "
                               f"(the site's slo.batch-completion-windows), got {requested!r}",
                               field="completion_window")
        return requested.strip()

    # ------------------------------------------------------------------ input by path
    @staticmethod
    def quota_bytes(principal: Principal | None) -> int:
        return principal.policy.storage_quota_bytes if principal is not None else 0

    def open_input(self, principal: Principal | None, path: str) -> tuple[BinaryIO, str]:
        """Open a batch input named by ``path`` for ``principal`` (None: no auth, as in embedding
        tests: treated as admin); see the module docstring."""
        if not isinstance(path, str) or not os.path.isabs(path):
            raise RequestError(f"input_path: {path!r} is relative and the daemon's working directory is not "
                               f"yours; pass an absolute path on a shared file system, or {INLINE_HINT}",
                               field="input_path")
        admin = principal is None or principal.is_admin
        dirs = () if admin else tuple(os.path.realpath(d) for d in principal.policy.input_paths)
        if not admin:
            if not dirs:
                raise AuthError(f"input_path: tenant {principal.tenant} may not name batch input files by path "
                                f"(tenants.{principal.tenant}.input-dirs is empty); {INLINE_HINT}, or ask the site "
                                "admin to list your project directory there", "permission_denied")
            if not _inside(os.path.realpath(path), dirs):
                raise self._outside(principal, path)
        unreadable = RequestError(f"input_path: {path} does not exist or is not readable by the daemon; "
                                  f"{INLINE_HINT}", field="input_path")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            raise unreadable from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise unreadable
            if not admin and not _inside(_fd_path(fd, path), dirs):  # swapped after the check above
                raise self._outside(principal, path)
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb"), path
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _outside(principal: Principal, path: str) -> AuthError:
        allowed = ", ".join(principal.policy.input_dirs)
        return AuthError(f"input_path: {path} is not under tenant {principal.tenant}'s input directories "
                         f"({allowed}; tenants.{principal.tenant}.input-dirs, symlinks followed); {INLINE_HINT}",
                         "permission_denied")


def _inside(real: str, dirs: tuple[str, ...]) -> bool:
    return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)


def _fd_path(fd: int, fallback: str) -> str:
    """The resolved path of an open file (Linux: its /proc/self/fd link; else realpath of the name)."""
    link = Path(f"/proc/self/fd/{fd}")
    try:
        return os.readlink(link)
    except OSError:
        return os.path.realpath(fallback)
