"""Economic utilization (hpcserve/daemon/utilization.py, docs/utilization.md).

The ratio functions on their own, then a real daemon (2 worker ranks under the venv's mpiexec, a
tiny random model, tenants from a site config): a tenant's delivered work keeps its useful
rank-seconds, a cancelled batch's credits are debited (its tenant's useful seconds go back to what
the delivered work earned), every tenant's economic utilization is in [0, 1] and the tenants' values
sum to the total; ``hpcserve status --tenants`` shows the columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from daemon_harness import TERMINAL, Daemon, chat_line, keys_cli, reap_all

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.daemon.utilization import KEYS, economic_utilization, share, window_utilization


# ------------------------------------------------------------------------------------- the ratios
def test_share_and_economic_utilization():
    assert share(3.0, 12.0) == 0.25
    assert share(1.0, 0.0) == 0.0 and share(-1e-17, 5.0) == 0.0 and share(5.0 + 1e-12, 5.0) == 1.0
    u = economic_utilization(1.0, 3.0, 8.0)
    assert u == {"economic_utilization": 0.5, "economic_utilization_interactive": 0.125,
                 "economic_utilization_batch": 0.375}
    assert set(u) == set(KEYS)


def _snap(alloc, metered, chat, batch) -> dict:
    return {"allocation_gpu_seconds": alloc, "metered_gpu_seconds": metered, "useful_seconds_interactive": chat,
            "useful_seconds_batch": batch}


def test_window_utilization_is_bounded_by_the_steps_metered_in_the_window():
    w = window_utilization(_snap(100.0, 40.0, 5.0, 20.0), _snap(120.0, 55.0, 8.0, 30.0))
    assert w["allocated_rank_seconds"] == 20.0  # 2 ranks x 10 s
    assert w["economic_utilization"] == pytest.approx(13 / 20)
    assert w["economic_utilization_batch"] == pytest.approx(10 / 20)
    assert w["useful_seconds"] == pytest.approx({"interactive": 3.0, "batch": 10.0})
    # a step that began before the window is metered whole inside it: more step time than window
    w = window_utilization(_snap(100.0, 40.0, 0.0, 0.0), _snap(110.0, 51.0, 0.0, 10.5))
    assert w["allocated_rank_seconds"] == 11.0 and w["economic_utilization"] == pytest.approx(10.5 / 11)
    # a debit in the window of work credited before it: floored at 0
    assert window_utilization(_snap(0.0, 0.0, 0.0, 5.0), _snap(10.0, 1.0, 0.0, 1.0))["economic_utilization"] == 0
    # protobuf-style objects work the same; snapshots out of order are refused
    as_obj = pb.UsageReport(allocation_gpu_seconds=120.0, metered_gpu_seconds=55.0, useful_seconds_interactive=8.0,
                            useful_seconds_batch=30.0)
    assert window_utilization(_snap(100.0, 40.0, 5.0, 20.0), as_obj)["economic_utilization"] == pytest.approx(0.65)
    with pytest.raises(ValueError, match="in order"):
        window_utilization(as_obj, _snap(100.0, 40.0, 5.0, 20.0))


# ------------------------------------------------------------------------------------- the daemon
SITE = """
[auth]
keys-file = "{keys}"
endpoint-tenant = "ops"

[tenants.ops]
admin = true

[tenants.alice]

[tenants.bob]
"""


@pytest.fixture(autouse=True, scope="module")
def _reap_daemons():
    yield
    reap_all()


@pytest.fixture(scope="module")
def site(tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("utilization")
    config = root / "site.toml"
    config.write_text(SITE.format(keys=root / "keys.json"))
    keys = {t: keys_cli(config, "add", "--tenant", t) for t in ("alice", "bob")}
    # a long context, so a batch line of thousands of tokens is still running when it is cancelled
    model = tiny_model_factory("llama", max_position_embeddings=8192)
    d = Daemon(root / "state", model, ranks=2, extra_args=("--config", str(config))).start()
    yield {"daemon": d, "keys": keys, "config": config}
    assert d.stop() == 0, d.log_tail()


def _md(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _usage(d) -> pb.UsageReport:
    return d.stub.GetUsage(pb.GetUsageRequest(), metadata=d.md, timeout=30)  # the endpoint key: ops, admin


def _row(report, tenant: str) -> pb.TenantUsage:
    return next(t for t in report.tenants if t.tenant == tenant)


def _wait_idle(d, timeout: float = 120.0) -> None:
    deadline, seen = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        reps = d.info().replicas
        seen = seen + 1 if all(r.num_running == 0 and r.num_waiting == 0 for r in reps) else 0
        if seen >= 3:
            return
        time.sleep(0.3)
    raise AssertionError(f"replicas not idle:\n{d.log_tail()}")


def _wait_batch(d, key: str, batch_id: str, timeout: float = 300.0) -> pb.Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = d.stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id), metadata=_md(key), timeout=10)
        if b.status in TERMINAL:
            return b
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} not done in {timeout} s:\n{d.log_tail()}")


def _check_bounds(report) -> None:
    useful = report.useful_seconds_interactive + report.useful_seconds_batch
    assert 0 < useful <= report.metered_gpu_seconds + 1e-9 <= report.allocation_gpu_seconds + 1e-9
    assert report.economic_utilization == pytest.approx(useful / report.allocation_gpu_seconds)
    assert 0 < report.economic_utilization <= 1
    for t in report.tenants:
        assert 0 <= t.economic_utilization <= 1, t.tenant
    assert sum(t.economic_utilization for t in report.tenants) == pytest.approx(report.economic_utilization)
    # a fresh state dir: the stored rows (every day) are this run's, so they add up to the live totals
    assert sum(t.useful_seconds_interactive for t in report.tenants) == pytest.approx(report.useful_seconds_interactive)
    assert sum(t.useful_seconds_batch for t in report.tenants) == pytest.approx(report.useful_seconds_batch)


@pytest.mark.slow
def test_cancelled_batch_is_debited_and_tenants_sum_to_the_total(site):
    d, keys = site["daemon"], site["keys"]
    for i in range(3):  # alice chats: delivered as they stream
        req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=f"hello {i}")],
                             sampling_params=pb.SamplingParams(max_tokens=8, temperature=0))
        assert list(d.stub.Chat(req, metadata=_md(keys["alice"]), timeout=120))
    # bob: a batch that completes (delivered) ...
    done = d.stub.SubmitBatch(pb.SubmitBatchRequest(input_jsonl="\n".join(
        chat_line(f"d{i}", f"short line {i}", max_tokens=6) for i in range(4)).encode()),
        metadata=_md(keys["bob"]), timeout=60)
    assert _wait_batch(d, keys["bob"], done.id).status == pb.BATCH_STATUS_COMPLETED
    _wait_idle(d)
    before = _usage(d)
    bob0 = _row(before, "bob").useful_seconds_batch
    assert bob0 > 0 and _row(before, "bob").useful_seconds_interactive == 0
    assert _row(before, "alice").useful_seconds_interactive > 0 and _row(before, "alice").useful_seconds_batch == 0
    _check_bounds(before)

    # ... and one cancelled while its (long) lines run: what they earned is taken back
    long = d.stub.SubmitBatch(pb.SubmitBatchRequest(input_jsonl="\n".join(
        chat_line(f"l{i}", f"long line {i}", max_tokens=6000, ignore_eos=True) for i in range(3)).encode()),
        metadata=_md(keys["bob"]), timeout=60)
    deadline = time.monotonic() + 120
    while _row(_usage(d), "bob").useful_seconds_batch <= bob0:  # the long lines are earning credit
        assert time.monotonic() < deadline, d.log_tail()
        time.sleep(0.05)
    d.stub.CancelBatch(pb.CancelBatchRequest(batch_id=long.id), metadata=_md(keys["bob"]), timeout=30)
    final = _wait_batch(d, keys["bob"], long.id)
    assert final.status == pb.BATCH_STATUS_CANCELLED and final.request_counts.completed == 0
    _wait_idle(d)
    after = _usage(d)
    assert _row(after, "bob").useful_seconds_batch == pytest.approx(bob0, rel=1e-9, abs=1e-9)
    assert after.useful_seconds_batch == pytest.approx(before.useful_seconds_batch, rel=1e-9, abs=1e-9)
    assert after.metered_gpu_seconds > before.metered_gpu_seconds  # the cancelled work took step time
    assert _row(after, "alice").useful_seconds_interactive == _row(before, "alice").useful_seconds_interactive
    _check_bounds(after)
    assert after.economic_utilization_interactive + after.economic_utilization_batch == pytest.approx(
        after.economic_utilization)
    mine = d.stub.GetUsage(pb.GetUsageRequest(), metadata=_md(keys["bob"]), timeout=30)
    assert [t.tenant for t in mine.tenants] == ["bob"] and mine.tenants[0].useful_seconds_batch == pytest.approx(bob0)
    assert not mine.economic_utilization and not mine.tenants[0].economic_utilization  # admin only


@pytest.mark.slow
def test_status_tenants_shows_useful_seconds_and_utilization(site):
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="status probe")],
                         sampling_params=pb.SamplingParams(max_tokens=4, temperature=0))
    assert list(site["daemon"].stub.Chat(req, metadata=_md(site["keys"]["alice"]), timeout=120))
    env = {k: v for k, v in os.environ.items() if k not in ("HPCSERVE_API_KEY", "HPCSERVE_TOKEN")}
    args = [sys.executable, "-m", "hpcserve", "status", "--tenants", "--state-dir", str(site["daemon"].state_dir)]
    text = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert text.returncode == 0, text.stderr
    assert "useful chat-s" in text.stdout and "econ util" in text.stdout
    assert "economic utilization since start:" in text.stdout
    js = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120, env=env, check=False)
    d = json.loads(js.stdout)
    assert 0 < d["economic_utilization"] <= 1 and d["useful_seconds_interactive"] > 0
    assert sum(t["economic_utilization"] for t in d["tenants"]) == pytest.approx(d["economic_utilization"], abs=1e-3)
    assert {"useful_seconds_interactive", "useful_seconds_batch"} <= set(d["tenants"][0])
