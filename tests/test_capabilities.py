"""tests/capabilities.py: a missing capability skips with its reason, and fails with it when CI is true.
Each case runs a tiny pytest session in a subprocess with the helper loaded as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

INNER = '''
import pytest
from capabilities import needs, require

def test_require_missing():
    require(False, "no frobnicator here (install frobnicator)")

@needs(False, reason="no widget daemon (start it)")
def test_mark_missing():
    pass

@needs(True, reason="never shown")
def test_mark_present():
    require(True, "never shown either")
'''


def run_inner(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "capabilities", "-rA",
           "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False)


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_capability_skips_with_the_reason_outside_ci(tmp_path, ci):
    r = run_inner(tmp_path, ci)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "1 passed, 2 skipped" in out, out
    assert "no frobnicator here (install frobnicator)" in out and "no widget daemon (start it)" in out
    assert "never shown" not in out


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_missing_capability_fails_with_the_reason_under_ci(tmp_path, ci):
    r = run_inner(tmp_path, ci)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "skipped" not in out, out
    # require() inside the test fails it; the mark fails the test at setup (an error)
    assert "1 failed, 1 passed, 1 error" in out, out
    assert "FAILED test_inner.py::test_require_missing - Failed: no frobnicator here (install frobnicator)" in out
    assert "ERROR test_inner.py::test_mark_missing - Failed: no widget daemon (start it)" in out
    assert f"CI={ci}: a missing capability fails the run" in out
    assert "never shown" not in out
