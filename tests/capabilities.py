"""What a test needs from the machine (a Slurm, the venv's MPICH, a C compiler): skip locally, fail in CI.

A developer's machine may lack a capability, and the test says so by skipping with the reason. In CI
(``CI`` set to ``true``, ``1`` or ``yes``, as ``.ci/run`` does) a missing capability means the CI
machine is broken, so the same check fails the test with the same reason instead of letting the run
go green without it.

Interface:
- ``ci_strict() -> bool``: whether ``CI`` asks for missing capabilities to fail;
- ``require(ok, reason)``: inside a test or fixture: return when ``ok``, else skip (fail in CI);
- ``needs(ok, reason)``: the same as a mark, for a test, a class or a module's ``pytestmark``
  (checked at setup by this module's ``pytest_runtest_setup``, which tests/conftest.py re-exports;
  a capability that a test cannot have on this platform at all is a plain ``skipif``, not this);
- ``VENV_MPIEXEC``, ``needs_mpi``: the venv's MPICH ``mpiexec`` and mpi4py (``make install``).
No torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

CI_TRUE = ("true", "1", "yes")
MARK = "needs"


def ci_strict() -> bool:
    return os.environ.get("CI", "").strip().lower() in CI_TRUE


def require(ok: bool, reason: str) -> None:
    if ok:
        return
    if ci_strict():
        pytest.fail(f"{reason} [CI={os.environ['CI']}: a missing capability fails the run]", pytrace=False)
    pytest.skip(reason)


def needs(ok: bool, reason: str) -> pytest.MarkDecorator:
    return getattr(pytest.mark, MARK)(bool(ok), reason=reason)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", f"{MARK}(ok, reason): skip with the reason when not ok; fail when CI is true")


def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers(MARK):
        require(mark.args[0], mark.kwargs["reason"])


VENV_MPIEXEC = Path(sys.prefix) / "bin" / "mpiexec"
needs_mpi = needs(
    VENV_MPIEXEC.exists() and importlib.util.find_spec("mpi4py") is not None,
    reason=f"needs mpi4py and the venv's MPICH mpiexec at {VENV_MPIEXEC} (pip install mpi4py mpich)",
)
