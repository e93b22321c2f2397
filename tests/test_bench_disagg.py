"""``hpcserve bench disagg``: the pure functions of hpcserve.bench.disagg (no processes), the CLI help,
and one slow end-to-end run of the real command on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hpcserve.bench import disagg, mixed
from hpcserve.bench.disagg import LONG, PARITY, STREAM, RequestRecord

# ------------------------------------------------------------------------------ workload


def test_long_prompt_workload_is_seeded_poisson_within_the_window():
    a = disagg.long_prompt_workload(1, rate=2.0, duration_s=30.0, vocab_size=1000, mode="colocated")
    assert a == disagg.long_prompt_workload(1, rate=2.0, duration_s=30.0, vocab_size=1000, mode="colocated")
    assert a != disagg.long_prompt_workload(2, rate=2.0, duration_s=30.0, vocab_size=1000, mode="colocated")
    assert 30 <= len(a) <= 90  # 60 expected; a Poisson count this far off would be a bug
    assert [x.index for x in a] == list(range(len(a)))
    assert all(0 < x.at_s < 30.0 for x in a) and [x.at_s for x in a] == sorted(x.at_s for x in a)
    lo, hi = disagg.LONG_PROMPT_LEN
    assert all(lo <= len(x.prompt_ids) <= hi and x.max_tokens == disagg.LONG_OUTPUT_LEN for x in a)
    assert all(100 <= t < 900 for x in a for t in x.prompt_ids)
    clipped = disagg.long_prompt_workload(1, rate=2.0, duration_s=30.0, vocab_size=1000, max_model_len=512,
                                          mode="colocated")
    assert all(len(x.prompt_ids) + x.max_tokens <= 512 for x in clipped)
    assert [x.at_s for x in clipped] == [x.at_s for x in a]  # clipping keeps the schedule
    # the other mode: the same schedule and lengths, its own token ids
    b = disagg.long_prompt_workload(1, rate=2.0, duration_s=30.0, vocab_size=1000, mode="disaggregated")
    assert [(x.at_s, len(x.prompt_ids)) for x in b] == [(x.at_s, len(x.prompt_ids)) for x in a]
    assert all(x.prompt_ids[:16] != y.prompt_ids[:16] for x, y in zip(a, b))


def test_stream_prompts_per_mode_and_parity_prompts_shared():
    p = disagg.stream_prompt(0, 3, 5, vocab_size=1000, mode="colocated")
    assert p == disagg.stream_prompt(0, 3, 5, vocab_size=1000, mode="colocated")  # the n-th request of a slot
    assert p != disagg.stream_prompt(0, 3, 6, vocab_size=1000, mode="colocated")
    assert p != disagg.stream_prompt(0, 4, 5, vocab_size=1000, mode="colocated")
    q = disagg.stream_prompt(0, 3, 5, vocab_size=1000, mode="disaggregated")
    assert len(q[0]) == len(p[0]) and q[0] != p[0]                             # same length, own ids
    ids, n = p
    assert disagg.STREAM_PROMPT_LEN[0] <= len(ids) <= disagg.STREAM_PROMPT_LEN[1] and n == disagg.STREAM_OUTPUT_LEN
    par = disagg.parity_prompts(0, vocab_size=1000)
    assert [len(ids) for ids, _ in par] == list(disagg.PARITY_PROMPT_LENS)
    assert par == disagg.parity_prompts(0, vocab_size=1000)                     # the same in both modes
    small = disagg.parity_prompts(0, vocab_size=1000, max_model_len=256)
    assert all(len(ids) + n <= 256 for ids, n in small)
    assert sum(len(ids) >= 2 for ids, _ in par) >= 10 and any(len(ids) >= 256 for ids, _ in par)
    # parity prompts start with the reserved id, the load's never: they share no prefix-cache block
    reserved = mixed.reserved_first_id(1000)
    assert all(ids[0] == reserved for ids, _ in par)
    load = [disagg.stream_prompt(0, s, k, vocab_size=1000, mode=m)[0] for s in range(8) for k in range(20)
            for m in disagg.MODES]
    load += [x.prompt_ids for x in disagg.long_prompt_workload(0, 2.0, 30.0, 1000, mode="colocated")]
    assert all(ids[0] != reserved for ids in load)


# ------------------------------------------------------------------------------- metrics


def _records():
    """Window [100, 110). Hand-computed expectations in test_mode_metrics_by_hand."""
    a = RequestRecord(100.0, [(100.5, 1), (100.6, 1), (100.8, 1), (111.0, 1), (113.5, 1)], kind=STREAM,
                      key="stream-0-0", prompt_len=20, metrics={"disaggregated": True})
    b = RequestRecord(101.0, [(101.2, 1), (101.3, 2), (101.5, 1)], kind=STREAM, key="stream-1-0", prompt_len=1)
    c = RequestRecord(100.0, [(100.3, 1), (100.4, 1)], kind=STREAM, key="stream-2-0", prompt_len=20,
                      error="UNAVAILABLE: gone", metrics={"disaggregated": True})
    l1 = RequestRecord(102.0, [(102.5, 1), (102.6, 1)], kind=LONG, key="long-0", prompt_len=600,
                       metrics={"disaggregated": True, "kv_handoff_failed": False}, cached_tokens=16)
    l2 = RequestRecord(108.0, [(112.0, 1), (112.5, 1)], kind=LONG, key="long-1", prompt_len=700,
                       metrics={"disaggregated": True, "kv_handoff_failed": True})
    return [a, b, c, l1, l2]


def test_gaps_until_and_load_end():
    assert disagg.gaps_until([1.0, 1.5, 1.5, 3.0], 2.0) == pytest.approx([0.5, 0.0])
    assert disagg.gaps_until([1.0, 1.5, 1.5, 3.0], 3.0) == pytest.approx([0.5, 0.0, 1.5])
    recs = _records()
    assert disagg.load_end(recs, 110.0) == 112.5          # the last long prompt's last token
    assert disagg.load_end(recs[:4], 110.0) == 110.0      # long prompts done inside the window
    assert disagg.load_end([], 110.0) == 110.0


def test_mode_metrics_by_hand():
    m = disagg.mode_metrics(_records(), window_start=100.0, window_s=10.0, ttft_slo_s=1.0, itl_slo_s=0.5)
    assert m["load_end_s"] == pytest.approx(12.5)
    assert m["num_stream_requests"] == 3 and m["num_long_requests"] == 2 and m["num_failed"] == 1
    # stream gaps by the load end (112.5): a [0.1, 0.2, 10.2] (not 2.5 at 113.5), b [0.1, 0, 0.2];
    # the failed stream has none. Sorted [0, 0.1, 0.1, 0.2, 0.2, 10.2]
    assert m["num_itl_gaps"] == 6
    assert m["itl_p50_s"] == pytest.approx(0.15)  # position 2.5
    assert m["itl_p99_s"] == pytest.approx(0.2 + 0.95 * 10.0)  # position 4.95 (with 2.5 in: 9.738)
    assert m["itl_max_s"] == pytest.approx(10.2)
    assert m["stream_ttft_p50_s"] == pytest.approx((0.5 + 0.2) / 2)
    assert m["long_ttft_p50_s"] == pytest.approx((0.5 + 4.0) / 2)
    # meets the SLO (TTFT <= 1, own p99 ITL <= 0.5): b and l1; a's own ITL and l2's TTFT miss; c failed
    assert m["num_good"] == 2
    assert m["goodput"] == pytest.approx(0.2)
    assert m["slo_attainment"] == pytest.approx(2 / 5)
    assert m["stream_slo_attainment"] == pytest.approx(1 / 3) and m["long_slo_attainment"] == pytest.approx(0.5)
    # 2+ prompt tokens and no error: a, l1, l2; all handed off, l2's handoff failed
    assert (m["num_handoff_eligible"], m["num_disaggregated"], m["num_handoff_failed"]) == (3, 3, 1)
    assert m["num_cached_tokens"] == 16
    empty = disagg.mode_metrics([], 0.0, 5.0, 1.0, 0.2)
    assert empty["itl_p99_s"] is None and empty["goodput"] == 0.0 and empty["slo_attainment"] is None


def test_handoff_samples_and_table_by_hand():
    def rec(n, s, nbytes, **kw):
        return RequestRecord(0.0, [(1.0, 1)], kind=PARITY, prompt_len=n,
                             metrics={"disaggregated": True, "kv_handoff_s": s, "kv_handoff_bytes": nbytes, **kw})

    mib = 1 << 20
    recs = [rec(10, 0.03, 3 * mib), rec(2, 0.01, mib), rec(20, 0.5, 2 * mib), rec(600, 0.1, 20 * mib),
            rec(700, 0.3, 40 * mib), rec(1500, 1.0, 64 * mib),
            rec(30, 0.2, mib, kv_handoff_failed=True),                               # failed: not a sample
            RequestRecord(0.0, [], prompt_len=40, error="x", metrics={"disaggregated": True, "kv_handoff_s": 1}),
            RequestRecord(0.0, [(1.0, 1)], prompt_len=50, metrics={"disaggregated": False}),
            RequestRecord(0.0, [(1.0, 1)], prompt_len=50)]                            # no metrics came
    samples = disagg.handoff_samples(recs)
    assert [s["prompt_tokens"] for s in samples] == [2, 10, 20, 600, 700, 1500]
    rows = disagg.handoff_table(samples + [{"prompt_tokens": 1, "kv_handoff_s": 9.0, "kv_handoff_bytes": 0}])
    assert [r["prompt_tokens"] for r in rows] == [[2, 15], [16, 63], [512, 767], [1024, None]]
    assert [r["count"] for r in rows] == [2, 1, 2, 1]
    first = rows[0]
    assert first["median_s"] == pytest.approx(0.02) and first["p90_s"] == pytest.approx(0.028)
    assert first["median_mib"] == pytest.approx(2.0)
    assert first["gib_s"] == pytest.approx(4 / 1024 / 0.04)  # 4 MiB in 0.04 s
    assert rows[2]["gib_s"] == pytest.approx(60 / 1024 / 0.4)
    assert disagg.handoff_table([]) == []


def test_compare_parity():
    ok = disagg.compare_parity([[1, 2, 3], [4]], [[1, 2, 3], [4]], [5, 2])
    assert ok["parity"] is True and ok["num_identical"] == 2 and ok["mismatches"] == []
    bad = disagg.compare_parity([[1, 2, 3], [4], [7, 8], [9]], [[1, 2, 9], [4], [7], None], [5, 2, 3, 4])
    assert bad["parity"] is False and bad["num_identical"] == 1
    assert [(m["index"], m["prompt_tokens"], m["first_difference"], m["failed"]) for m in bad["mismatches"]] == [
        (0, 5, 2, False), (2, 3, 1, False), (3, 4, None, True)]
    assert disagg.compare_parity([], [])["parity"] is False  # nothing compared proves nothing
    with pytest.raises(ValueError):
        disagg.compare_parity([[1]], [])


def test_targets_and_report():
    t = disagg.evaluate_targets(0.85, 0.30, 0.12, True)
    assert [t[k]["passed"] for k in ("handoff_ratio", "itl_p99", "parity")] == [True, True, True]
    t = disagg.evaluate_targets(0.79, 0.10, 0.12, False)
    assert [t[k]["passed"] for k in ("handoff_ratio", "itl_p99", "parity")] == [False, False, False]
    assert disagg.evaluate_targets(0.8, 0.1, 0.1, True)["handoff_ratio"]["passed"] is True  # >= and <=
    assert disagg.evaluate_targets(0.8, 0.1, 0.1, True)["itl_p99"]["passed"] is True
    t = disagg.evaluate_targets(None, None, 0.1, None)
    assert [t[k]["passed"] for k in ("handoff_ratio", "itl_p99", "parity")] == [None, None, None]

    modes = {m: disagg.mode_metrics(_records(), 100.0, 10.0, 1.0, 0.5) for m in disagg.MODES}
    modes["disaggregated"]["itl_p99_s"] = 0.0123
    res = {"handoff_gib_s": 3.5, "mpi_raw_gib_s": 4.5, "handoff_ratio": 0.778, "modes": modes,
           "handoff_latency": disagg.handoff_table([{"prompt_tokens": 600, "kv_handoff_s": 0.25,
                                                     "kv_handoff_bytes": 30 << 20}]),
           "parity_detail": {"num_identical": 14, "num_prompts": 14, "num_disaggregated": 13,
                             "num_handoff_eligible": 13},
           "targets": disagg.evaluate_targets(0.778, modes["colocated"]["itl_p99_s"], 0.0123, True),
           "config": {"chat_ttft_slo_s": 1.0, "chat_itl_slo_s": 0.5}}
    text = disagg.render_table(res)
    assert "FAIL handoff_ratio >= 0.8: 0.778" in text
    assert "PASS itl_p99_s disaggregated <= colocated: 0.0123 vs 9.7000" in text
    assert "PASS parity" in text and "14/14 prompts identical" in text and "13/13" in text
    assert "512-767" in text and "250.00" in text  # the bucket and its median in ms
    assert "3.50 GiB/s" in text and "4.50 GiB/s" in text


def test_daemon_config_and_kv_dtype(tmp_path):
    from hpcserve.config import load_config

    user = {"engine": {"num-threads": 2, "max-num-seqs": 8}, "disagg": {"roles": "mixed:2", "group-mib": 2.0},
            "daemon": {"dedicated-chat-replicas": 1}}
    for roles, ranks in (("", 2), ("prefill:1,decode:2", 3)):
        path = tmp_path / "gen.toml"
        path.write_text(disagg.mixed.dump_toml(disagg.daemon_config(user, 0.5, 0.05, roles, num_threads=1)))
        cfg = load_config(path, overrides={"daemon.ranks": ranks}, env={})
        assert cfg.disagg.roles == roles and cfg.disagg.group_mib == 2.0
        assert cfg.disagg.is_disaggregated == bool(roles)
        assert cfg.engine.num_threads == 2 and cfg.engine.max_num_seqs == 8  # the user's value wins
        assert cfg.daemon.dedicated_chat_replicas == 0
        assert cfg.slo.chat_ttft_p99_s == 0.5 and cfg.slo.chat_itl_p99_s == 0.05
    assert user["disagg"]["roles"] == "mixed:2"  # the caller's dict is not modified
    assert disagg.daemon_config({}, 1.0, 0.2, "", num_threads=1)["engine"]["num-threads"] == 1
    assert "engine" not in disagg.daemon_config({}, 1.0, 0.2, "")
    assert disagg.kv_dtype(4.0) == "float32" and disagg.kv_dtype(2.0) == "bfloat16" and disagg.kv_dtype(None) == \
        "float32"


def test_kv_itemsize_from_handoff_bytes():
    from hpcserve.bench.disagg_run import _kv_itemsize

    per_token = 30 * 2 * 3 * 64  # demo: layers x (K, V) x kv heads x head dim
    # a 17-token prompt hands off 16 tokens = 1 block; 18 tokens -> 2 blocks (the last token is not sent)
    recs = [RequestRecord(0.0, prompt_len=17, metrics={"disaggregated": True, "kv_handoff_bytes": 16 * per_token * 4}),
            RequestRecord(0.0, prompt_len=18,
                          metrics={"disaggregated": True, "kv_handoff_bytes": 32 * per_token * 4}),
            RequestRecord(0.0, prompt_len=40, metrics={"disaggregated": False})]
    assert _kv_itemsize(recs, per_token, 16) == pytest.approx(4.0)
    assert _kv_itemsize(recs[2:], per_token, 16) is None


def test_cli_help_documents_the_bench():
    from hpcserve.cli import main

    res = CliRunner().invoke(main, ["bench", "disagg", "--help"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    for text in ("handoff_ratio >= 0.8", "itl_p99_s disaggregated <= colocated", "parity true", "--duration",
                 "--chat-ttft-slo", "prefill:1,decode:RANKS-1", "512-1024", "bench/README.md", "minutes"):
        assert text in out, text
    res = CliRunner().invoke(main, ["bench", "disagg", "--ranks", "1"])
    assert res.exit_code != 0 and "--ranks" in res.output


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_bench_disagg_end_to_end(tiny_model_factory):
    model = tiny_model_factory("llama")
    proc = subprocess.run(
        [sys.executable, "-m", "hpcserve", "bench", "disagg", "--model", str(model), "--duration", "5", "--json",
         "--chat-ttft-slo", "5", "--chat-itl-slo", "0.5"],  # given: no calibration daemon (bench mixed's test has one)
        check=False, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[colocated]" in proc.stderr and "[disaggregated]" in proc.stderr  # progress went to stderr
    res = json.loads(proc.stdout)
    for key in ("handoff_gib_s", "mpi_raw_gib_s", "handoff_ratio"):
        assert isinstance(res[key], float) and res[key] > 0, key
    for key in ("itl_p99_s", "goodput"):
        assert set(res[key]) == {"colocated", "disaggregated"}, key
        assert all(isinstance(v, float) and v >= 0 for v in res[key].values()), key
    assert res["parity"] is True
    assert set(res["targets"]) == {"handoff_ratio", "itl_p99", "parity"}
    par = res["parity_detail"]
    assert par["num_prompts"] == len(disagg.PARITY_PROMPT_LENS) == par["num_identical"]
    assert par["num_disaggregated"] == par["num_handoff_eligible"] == len(disagg.PARITY_PROMPT_LENS) - 1
    colo, dis = res["modes"]["colocated"], res["modes"]["disaggregated"]
    for m in (colo, dis):
        assert m["num_failed"] == 0 and m["num_stream_requests"] >= 8 and m["num_itl_gaps"] > 0
        assert m["num_long_requests"] == res["config"]["num_long_prompts"]
    assert colo["num_disaggregated"] == 0 and dis["num_handoff_failed"] == 0
    for m in (colo, dis):  # a fresh daemon per mode, load prompts of its own: nothing from the prefix cache
        assert m["num_cached_tokens"] == 0 and m["num_cached_tokens_parity"] == 0
    cfg = res["config"]
    assert (cfg["chat_ttft_slo_s"], cfg["chat_itl_slo_s"]) == (5.0, 0.5)
    assert cfg["slo"]["ttft_from"] == cfg["slo"]["itl_from"] == "flag" and cfg["slo"]["unloaded"] is None
    assert "starting daemon 'calibrate'" not in proc.stderr
    assert set(cfg["machine"]["paths"]) == {"gemm", "fused_cpu_ops", "attention"}
    assert dis["num_disaggregated"] == dis["num_handoff_eligible"] > 0
    assert [r["role"] for r in dis["replica_kv"]] == ["REPLICA_ROLE_PREFILL", "REPLICA_ROLE_DECODE"]
    assert res["handoff_latency"] and sum(r["count"] for r in res["handoff_latency"]) == len(res["handoff_samples"])
    assert all(s["kv_handoff_s"] > 0 and s["kv_handoff_bytes"] > 0 for s in res["handoff_samples"])
    assert res["config"]["kv_geometry"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "block_size": 16,
                                            "dtype": "float32"}
    assert res["transfer_bench"]["verified"] is True
