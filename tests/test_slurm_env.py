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
