"""The rendered sbatch scripts as real jobs on a working Slurm (skipped with the reason when there
is none; failed with it under CI=true): ``sbatch --test-only`` of the ci-single-node scripts; jobs
whose hpcserve is a stand-in script (singleton successor queued and drained on USR1, successor
cancelled when the daemon fails, requeue after a drain, the batch flow); batch.sbatch and
serve.sbatch with the real daemon and a tiny model. Rendering itself is tested in
test_sbatch_render.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sbatch_harness import SITE, render_site

from hpcserve.config import load_config
from hpcserve.slurm.render import TEMPLATES, render

# ------------------------------------------------------------------------------------- real Slurm

def _slurm():
    from slurm_harness import require_slurm

    require_slurm()


@pytest.mark.slurm
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_sbatch_test_only_accepts_ci_scripts(fixed_env, tmp_path, template):
    _slurm()
    path = tmp_path / template
    path.write_text(render_site("ci-single-node", template))
    r = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr


FAKE = """#!/bin/bash
# Stands in for hpcserve: logs its arguments; `serve` runs until USR1 or TERM (then exits 0) or
# fails at once when FAKE_FAIL is set; `status` is ready; `submit` copies the input to -o.
log={log}
echo "$* state=$HPCSERVE_STATE_DIR" >> "$log"
case $1 in
serve)
    [ -n "${{FAKE_FAIL:-}}" ] && exit 3
    trap 'echo "got USR1" >> "$log"; exit 0' USR1
    trap 'echo "got TERM" >> "$log"; exit 0' TERM
    echo started >> "$log"
    while :; do sleep 0.1; done ;;
status) exit 0 ;;
submit)
    shift
    while [ $# -gt 0 ]; do
        case $1 in -o) out=$2; shift ;; --errors) err=$2; shift ;; --wait) ;; *) in=$1 ;; esac; shift
    done
    echo batch_fake; cp "$in" "$out"; : > "$err" ;;
esac
"""


class FakeSite:
    """A site config + stand-in hpcserve under tmp_path; unique job names so that parallel sessions on
    the same Slurm do not collide."""

    def __init__(self, tmp_path: Path, continuation: str) -> None:
        self.tmp = tmp_path
        self.name = f"hpcs-t{os.getpid()}-{continuation}-{int(time.time() * 1000) % 10**6}"
        self.state = tmp_path / "state"
        (self.state / "logs").mkdir(parents=True)
        self.log = tmp_path / "calls.log"
        self.fake = tmp_path / "hpcserve"
        self.fake.write_text(FAKE.format(log=self.log))
        self.fake.chmod(0o755)
        self.config = tmp_path / "site.toml"
        self.config.write_text(f'[daemon]\nstate-dir = "{self.state}"\n[slurm]\nmem = "100M"\ntime = "5"\n'
                               f'drain-s = 60\ncontinuation = "{continuation}"\njob-name = "{self.name}"\n')

    def script(self, template: str, **extra) -> Path:
        path = self.tmp / template
        path.write_text(render(template, load_config(self.config), config_path=str(self.config),
                               hpcserve=str(self.fake), extra=extra))
        return path

    def calls(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.calls():
            assert time.monotonic() < deadline, f"{what!r} not seen; calls: {self.calls()!r}"
            time.sleep(0.2)

    def jobs(self) -> list[tuple[str, str, str]]:
        r = subprocess.run(["squeue", "-h", "-n", self.name, "-o", "%i %T %E"], capture_output=True, text=True,
                           timeout=30, check=False)
        return [tuple((line.split(None, 2) + ["", ""])[:3]) for line in r.stdout.splitlines()]

    def job_log(self, job: str) -> str:
        p = self.state / "logs" / f"slurm-{job}.out"
        return p.read_text() if p.exists() else ""


def _show(job: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30,
                       check=False)
    return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)


@pytest.mark.slurm
def test_singleton_queues_successor_and_drains_on_usr1(tmp_path):
    _slurm()
    from slurm_harness import sbatch, scancel, wait_job_done

    site = FakeSite(tmp_path, "singleton")
    try:
        job = sbatch(site.script("serve.sbatch"))
        site.wait_for("started")
        pending = [j for j in site.jobs() if j[0] != job]
        assert len(pending) == 1 and pending[0][1] == "PENDING" and "singleton" in pending[0][2], site.jobs()
        successor = pending[0][0]
        scancel("-b", "--signal=USR1", job)  # what --signal=B:USR1@60 delivers
        assert wait_job_done(job, timeout=60) == "COMPLETED"
        log = site.job_log(job)
        assert f"queued successor job {successor}" in log and "exited with status 0 (after drain)" in log, log
        assert "got USR1" in site.calls()
        # the successor starts once this job has ended, and queues its own
        deadline = time.monotonic() + 60
        while site.calls().count("started") < 2:
            assert time.monotonic() < deadline, (site.jobs(), site.calls())
            time.sleep(0.3)
        assert [j[0] for j in site.jobs() if j[1] == "RUNNING"] == [successor]
        assert any(j[1] == "PENDING" for j in site.jobs())
    finally:
        scancel(f"--name={site.name}")
    deadline = time.monotonic() + 30
    while site.jobs() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not site.jobs()
    assert "got" in site.calls().split("started")[-1]  # the cancelled daemon was signalled, not just killed


@pytest.mark.slurm
def test_singleton_cancels_successor_when_daemon_fails(tmp_path):
    _slurm()
    from slurm_harness import scancel, wait_job_done

    site = FakeSite(tmp_path, "singleton")
    try:
        r = subprocess.run(["sbatch", "--parsable", str(site.script("serve.sbatch"))], capture_output=True,
                           text=True, timeout=60, check=True, env={**os.environ, "FAKE_FAIL": "1"})
        job = r.stdout.strip().split(";")[0]
        assert wait_job_done(job, timeout=60) == "FAILED"
        assert _show(job).get("ExitCode") == "3:0"
        assert "cancelling successor job" in site.job_log(job), site.job_log(job)
        time.sleep(1)
        assert not site.jobs()
    finally:
        scancel(f"--name={site.name}")


@pytest.mark.slurm
def test_requeue_after_drain(tmp_path):
    _slurm()
    from slurm_harness import sbatch, scancel

    site = FakeSite(tmp_path, "requeue")
    try:
        job = sbatch(site.script("serve.sbatch"))
        site.wait_for("started")
        scancel("-b", "--signal=USR1", job)
        deadline = time.monotonic() + 60
        while _show(job).get("Restarts") != "1":
            assert time.monotonic() < deadline, _show(job)
            time.sleep(0.3)
        assert "requeueing job" in site.job_log(job)
        assert [j[0] for j in site.jobs()] == [job]  # the same job id, back in the queue
    finally:
        scancel(job)


@pytest.mark.slurm
def test_batch_flow_with_stand_in(tmp_path):
    _slurm()
    from slurm_harness import sbatch, wait_job_done

    site = FakeSite(tmp_path, "none")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"custom_id": "a"}\n')
    job = sbatch(site.script("batch.sbatch", input=str(inp), output=str(tmp_path / "out.jsonl")))
    assert wait_job_done(job, timeout=120) == "COMPLETED", site.job_log(job)
    calls = site.calls().splitlines()
    submit = (f"submit --wait -o {tmp_path}/out.jsonl --errors {tmp_path}/out.errors.jsonl {inp} "
              f"state={site.state}")
    for call in (f"serve --slurm --config {site.config} state={site.state}",
                 f"status --wait-ready 10 state={site.state}", submit):
        assert call in calls, calls
    assert calls.index(submit) > calls.index("started")
    assert calls[-1] == "got TERM"  # stopped by the script once the batch was done
    assert (tmp_path / "out.jsonl").read_text() == inp.read_text()
    assert "batch_fake" in site.job_log(job)


@pytest.mark.slow
@pytest.mark.slurm
def test_batch_sbatch_with_the_real_daemon(tiny_model_factory, tmp_path):
    """batch.sbatch end to end: the real daemon (srun worker step, pmi2) on a tiny model, the real
    status/submit clients, the results written and the job COMPLETED."""
    _slurm()
    from daemon_harness import chat_line
    from slurm_harness import sbatch, scancel, wait_job_done

    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    config = tmp_path / "site.toml"
    config.write_text(f'[model]\npath = "{tiny_model_factory("llama")}"\n[engine]\nnum-threads = 1\n'
                      f'kv-cache-gb = 0.05\nmax-num-seqs = 8\n[daemon]\nlisten = "127.0.0.1:0"\nstate-dir = "{state}"\n'
                      f'ranks = 2\n[slurm]\nmem = "3G"\ntime = "10"\ndrain-s = 60\nmpi = "pmi2"\n'
                      f'job-name = "hpcs-t{os.getpid()}-real"\n')
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(chat_line(f"q{i}", f"question {i}", max_tokens=8) for i in range(6)) + "\n")
    out = tmp_path / "out.jsonl"
    script = tmp_path / "batch.sbatch"
    script.write_text(render("batch", load_config(config), config_path=str(config),
                             hpcserve=str(Path(sys.executable).parent / "hpcserve"),
                             extra={"input": str(inp), "output": str(out), "ready_timeout": "300"}))
    job = sbatch(script)
    try:
        state_ = wait_job_done(job, timeout=600)
        log = (state / "logs" / f"slurm-{job}.out").read_text()
        assert state_ == "COMPLETED", log[-4000:]
    finally:
        scancel(job)
    ids = sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines())
    assert ids == sorted(f"q{i}" for i in range(6))
    assert "the daemon exited with status 0" in log
    assert not (state / "endpoint.json").exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_ci_serve_sbatch_with_the_real_daemon(tiny_model_factory, tmp_path, monkeypatch):
    """serve.sbatch rendered from site-configs/ci-single-node.toml (model and state dir swapped in through
    HPCSERVE_MODEL / HPCSERVE_STATE_DIR, a unique job name): the daemon gets ready, drains on USR1 with
    exit 0, and the queued successor starts the service again on the next allocation."""
    _slurm()
    from slurm_harness import sbatch, scancel, wait_job_done

    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    monkeypatch.setenv("HPCSERVE_STATE_DIR", str(state))
    monkeypatch.setenv("HPCSERVE_MODEL", str(tiny_model_factory("llama")))
    name = f"hpcs-t{os.getpid()}-ci"
    config = SITE / "ci-single-node.toml"
    text = render("serve", load_config(config), config_path=str(config),
                  hpcserve=str(Path(sys.executable).parent / "hpcserve"))
    script = tmp_path / "serve.sbatch"
    script.write_text(text.replace("hpcserve-ci", name))
    client = [str(Path(sys.executable).parent / "hpcserve"), "status", "--state-dir", str(state)]

    def names() -> list[tuple[str, str]]:
        r = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, timeout=30,
                           check=False)
        return [tuple(line.split()) for line in r.stdout.splitlines()]

    job = sbatch(script)
    try:
        r = subprocess.run([*client, "--wait-ready", "300"], capture_output=True, text=True, timeout=360, check=False)
        assert r.returncode == 0, (r.stderr, (state / "logs" / f"slurm-{job}.out").read_text()[-3000:])
        assert f"allocation: Slurm job {job} " in r.stdout, r.stdout
        successor = [i for i, st in names() if i != job]
        assert len(successor) == 1
        scancel("-b", "--signal=USR1", job)
        assert wait_job_done(job, timeout=180) == "COMPLETED"
        log = (state / "logs" / f"slurm-{job}.out").read_text()
        assert "SIGUSR1" in log and "the daemon exited with status 0 (after drain)" in log, log[-3000:]
        r = subprocess.run([*client, "--wait-ready", "300"], capture_output=True, text=True, timeout=360, check=False)
        assert r.returncode == 0 and f"allocation: Slurm job {successor[0]} " in r.stdout, r.stdout + r.stderr
    finally:
        scancel(f"--name={name}")
    deadline = time.monotonic() + 120
    while names() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not names()
