"""The allocation as read from the SLURM_* environment and squeue's end time (pure parts). No torch.
The squeue call itself runs against a real slurmctld in the Slurm tests."""

from __future__ import annotations

from datetime import datetime

from hpcserve.slurm.env import Allocation, AllocationWatcher, expand_nodelist, parse_end_time


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("n1") == ["n1"]
    assert expand_nodelist("a[8-10]b") == ["a8b", "a9b", "a10b"]
    assert expand_nodelist("") == []


def test_parse_end_time():
    assert parse_end_time("2026-11-22T10:00:00\n") == datetime(2026, 11, 22, 10, 0, 0).timestamp()
    for text in ("Unknown", "N/A", "NONE", "", "garbage"):
        assert parse_end_time(text) is None


def test_allocation_from_env():
    assert Allocation.from_env({}) is None
    a = Allocation.from_env({"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "c[1-2]", "SLURM_NTASKS": "4"})
    assert (a.job_id, a.nodes, a.num_tasks) == ("42", ["c1", "c2"], 4)


def test_watcher_asks_slurm_at_most_once_a_minute():
    now = [1000.0]
    asked = []

    def query(job_id):
        asked.append(job_id)
        return 1000.0 + 3600

    w = AllocationWatcher(Allocation("7", ["n"], 1), query=query, clock=lambda: now[0])
    assert w.seconds_left() == 3600
    now[0] += 30
    assert w.seconds_left() == 3570 and asked == ["7"]
    now[0] += 31
    assert w.seconds_left() == 3539 and asked == ["7", "7"]
    w2 = AllocationWatcher(Allocation("8", [], None), query=lambda j: None)
    assert w2.end_time() is None and w2.seconds_left() is None


def test_end_time_backend_is_squeue_without_pyslurm(monkeypatch):
    import sys

    from hpcserve.slurm import env

    monkeypatch.setitem(sys.modules, "pyslurm", None)  # import fails, as on this machine (no matching build)
    assert env.end_time_backend() == ("squeue", env.squeue_end_time)
    assert AllocationWatcher(Allocation("1", [], None)).backend == "squeue"


class _NewPyslurm:
    """The pyslurm >= 23 surface used here (pyslurm cannot be built against this machine's Slurm,
    so its two API shapes are exercised with stand-ins)."""

    class Job:
        @staticmethod
        def load(job_id):
            assert job_id == 42
            return type("J", (), {"end_time": datetime(2026, 11, 22, 12, 0, 0)})()


class _OldPyslurm:
    class job:  # pyslurm's own (lower-case) name
        def find_id(self, job_id):
            assert job_id == "42"
            return [{"end_time": 1795000000}]


def test_pyslurm_backend_both_api_shapes_and_fallback(monkeypatch):
    import sys

    from hpcserve.slurm import env

    assert env.pyslurm_end_time("42", pyslurm=_NewPyslurm) == datetime(2026, 11, 22, 12, 0, 0).timestamp()
    assert env.pyslurm_end_time("42", pyslurm=_OldPyslurm) == 1795000000.0
    monkeypatch.setattr(env, "squeue_end_time", lambda job_id: 123.0)
    assert env.pyslurm_end_time("42", pyslurm=object()) == 123.0  # unknown API: the CLI answers
    monkeypatch.setitem(sys.modules, "pyslurm", _NewPyslurm)
    assert env.end_time_backend()[0] == "pyslurm"


def test_worker_launcher_local_slurm_and_hetjob():
    from hpcserve.config import load_config
    from hpcserve.daemon.workers import launcher_command

    cfg = load_config(None, overrides={"slurm.mpi": "pmix", "slurm.srun-args": "--cpu-bind=cores"})
    assert launcher_command(2, "/venv/bin/mpiexec") == ["/venv/bin/mpiexec", "-n", "2"]
    assert launcher_command(4, "x", cfg.slurm, env={}) == [
        "srun", "--mpi=pmix", "--overlap", "--kill-on-bad-exit=1", "-n", "4", "--cpu-bind=cores"]
    assert launcher_command(4, "x", cfg.slurm, env={"SLURM_HET_SIZE": "2"}) == [
        "srun", "--mpi=pmix", "--overlap", "--kill-on-bad-exit=1", "--het-group=0,1", "--cpu-bind=cores"]


def test_router_starts_no_batch_line_that_cannot_finish_before_the_drain():
    from types import SimpleNamespace

    from hpcserve.daemon.router import Router

    r = Router(None, None, "m", batch_watermark=4)
    rep = SimpleNamespace(load=SimpleNamespace(recent_step_time_s=0.1), hello=SimpleNamespace(block_size=16))
    assert r._finishes_before_drain(rep, 160, 100)  # no allocation limit known: feed
    left = [12.0]
    r.seconds_to_drain = lambda: left[0]
    assert r._finishes_before_drain(rep, 160, 100)  # 0.1 s x (100 tokens + 10 prompt blocks) = 11 s < 12 s
    left[0] = 10.0
    assert not r._finishes_before_drain(rep, 160, 100)
    left[0] = -5.0  # past the drain point
    assert not r._finishes_before_drain(rep, 1, 1)


def test_allocation_gpus_from_the_slurm_environment():
    base = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "g[1-2]", "SLURM_NTASKS": "8"}
    assert Allocation.from_env(base).gpus_per_node is None
    assert Allocation.from_env({**base, "SLURM_GPUS_ON_NODE": "4"}).gpus_per_node == 4
    assert Allocation.from_env({**base, "SLURM_GPUS_PER_NODE": "a100:2"}).gpus_per_node == 2
    assert Allocation.from_env({**base, "SLURM_JOB_GPUS": "0,1,2"}).gpus_per_node == 3
