"""Shared fixtures. Must not import torch/transformers at import time: some tests
check that modules stay torch-free, so heavy imports happen inside fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # so tests can `from model_factory import ...`
    sys.path.insert(0, _TESTS_DIR)

# the `needs(ok, reason)` mark: skip with the reason, or fail when CI is true (tests/capabilities.py)
from capabilities import pytest_configure, pytest_runtest_setup  # noqa: E402,F401


def _limit_torch_threads() -> None:
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """``tiny_model_factory(family="llama", tie=True, dtype="float32", seed=0, shards=1,
    **config_overrides) -> Path``; each distinct argument set is written once per session."""
    from model_factory import make_tiny_model

    _limit_torch_threads()
    cache: dict = {}

    def make(family: str = "llama", **kwargs) -> Path:
        key = (family, _freeze(kwargs))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = make_tiny_model(out, family, **kwargs)
        return cache[key]

    return make


@pytest.fixture
def fixed_env(monkeypatch, tmp_path_factory):
    """Render sbatch scripts as user alice with no HPCSERVE_* overrides, so the output is
    machine-independent (the sbatch tests; their other shared parts are in sbatch_harness.py)."""
    from sbatch_harness import FAKE_ENV

    from hpcserve.config import ENV_VARS

    tmp_path_factory.getbasetemp()  # named after the real user, before USER changes
    for k, v in FAKE_ENV.items():
        monkeypatch.setenv(k, v)
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
