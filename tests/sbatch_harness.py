"""Shared by the sbatch tests (test_sbatch_render.py, test_sbatch_jobs.py): the site configs and
extra values every template is rendered with, and ``render_site``. Their ``fixed_env`` fixture (render
as user alice with no HPCSERVE_* overrides, so output is machine-independent) is in conftest.py."""

from __future__ import annotations

from pathlib import Path

from hpcserve.config import load_config
from hpcserve.slurm.render import render

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "site-configs"
CONFIGS = ("ci-single-node", "example-cluster")
HPCSERVE = "/opt/hpcserve/venv/bin/hpcserve"
EXTRA = {
    "serve.sbatch": {},
    "batch.sbatch": {"input": "/data/prompts.jsonl", "output": "/data/results.jsonl"},
    "hetjob.sbatch": {},
}
EXTRA_CI = {"hetjob.sbatch": {"roles": "prefill:1,decode:1"}}  # ci-single-node has no disagg.roles
FAKE_ENV = {"HOME": "/home/alice", "USER": "alice"}  # ~ and $USER in the state dirs expand to these


def render_site(config: str, template: str, **extra) -> str:
    cfg = load_config(SITE / f"{config}.toml")
    ex = {**EXTRA[template], **(EXTRA_CI.get(template, {}) if config == "ci-single-node" else {}), **extra}
    return render(template, cfg, config_path=f"/opt/hpcserve/site-configs/{config}.toml", hpcserve=HPCSERVE, extra=ex)
