"""``hpcserve bench mixed``: the pure functions of hpcserve.bench.mixed (no processes), the CLI help,
and one slow end-to-end run of the real command on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hpcserve.bench import mixed
from hpcserve.bench.mixed import ChatRecord, ReplicaCounters

# ------------------------------------------------------------------------------ statistics

def test_percentile_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert mixed.percentile(xs, 0) == 1.0
    assert mixed.percentile(xs, 50) == 3.0
    assert mixed.percentile(xs, 100) == 5.0
    assert mixed.percentile(xs, 25) == 2.0
    assert mixed.percentile(xs, 99) == pytest.approx(4.96)  # 4 + 0.96 * (5 - 4)
    assert mixed.percentile([7.0], 99) == 7.0
    assert mixed.percentile([], 50) is None
    assert mixed.percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_itl_from_multi_token_chunks():
    chunks = [(1.0, 1), (1.5, 3), (1.5, 0), (2.0, 1)]  # a chunk without tokens is ignored
    times = mixed.token_times(chunks)
    assert times == [1.0, 1.5, 1.5, 1.5, 2.0]
    assert mixed.itl_gaps(times) == pytest.approx([0.5, 0.0, 0.0, 0.5])
    rec = ChatRecord(arrival_s=0.75, chunks=chunks)
    assert rec.num_tokens == 5
    assert rec.ttft_s == pytest.approx(0.25)
    assert rec.itls == pytest.approx([0.5, 0.0, 0.0, 0.5])
    first_chunk_multi = ChatRecord(arrival_s=0.0, chunks=[(0.4, 2), (0.6, 1)])
    assert first_chunk_multi.ttft_s == pytest.approx(0.4) and first_chunk_multi.itls == pytest.approx([0.0, 0.2])
    failed = ChatRecord(arrival_s=0.0, chunks=[(0.1, 1), (0.2, 1)], error="UNAVAILABLE: gone")
    assert failed.ttft_s is None and failed.itls == []


def test_meets_slo_uses_ttft_and_own_p99_itl():
    ok = ChatRecord(0.0, [(0.5, 1), (0.6, 1), (0.7, 1)])
    assert mixed.meets_slo(ok, ttft_slo_s=1.0, itl_slo_s=0.2)
    assert not mixed.meets_slo(ok, ttft_slo_s=0.4, itl_slo_s=0.2)      # TTFT 0.5 > 0.4
    assert not mixed.meets_slo(ok, ttft_slo_s=1.0, itl_slo_s=0.05)     # ITL 0.1 > 0.05
    # one slow gap among 50: the request's own p99 (interpolated) is 0.01 + 0.51 * 1.5 > 0.2
    times = [(0.1 + 0.01 * i, 1) for i in range(50)] + [(2.1, 1)]
    assert not mixed.meets_slo(ChatRecord(0.0, times), ttft_slo_s=1.0, itl_slo_s=0.2)
    assert mixed.meets_slo(ChatRecord(0.0, [(0.3, 1)]), 1.0, 0.001)     # one token: no ITL
    assert not mixed.meets_slo(ChatRecord(0.0, [(0.3, 1)], error="x"), 1.0, 1.0)
    assert not mixed.meets_slo(ChatRecord(0.0, []), 1.0, 1.0)           # no token at all


# --------------------------------------------------------------------------------- metrics

def _snap(batch, chat, busy, pre=0):
    return {i: ReplicaCounters(b, c, s, pre) for i, (b, c, s) in enumerate(zip(batch, chat, busy))}


def test_mode_metrics_attainment_counters_and_goodput():
    good = ChatRecord(10.0, [(10.2, 1), (10.3, 2), (10.4, 1)])     # 4 tokens, meets the SLO
    slow = ChatRecord(11.0, [(13.0, 1), (13.1, 1)])                # TTFT 2 s: misses
    failed = ChatRecord(12.0, [(12.1, 1)], error="INTERNAL: boom")  # counts as a miss
    start = _snap([100, 0], [5, 5], [1.0, 2.0])
    end = _snap([500, 0], [15, 25], [6.0, 4.0])  # +400 batch, +30 chat; busy 5 s and 2 s
    m = mixed.mode_metrics([good, slow, failed], start, end, window_s=10.0, ttft_slo_s=1.0, itl_slo_s=0.2,
                           has_chat=True)
    assert m["num_chat_requests"] == 3 and m["num_chat_failed"] == 1
    assert m["slo_attainment"] == pytest.approx(1 / 3)
    assert m["ttft_p50_s"] == pytest.approx((0.2 + 2.0) / 2)
    assert m["batch_tokens_per_s"] == pytest.approx(40.0)
    assert m["chat_tokens_per_s"] == pytest.approx(3.0)
    assert m["total_tokens_per_s"] == pytest.approx(43.0)
    assert m["busy_fraction"] == pytest.approx((0.5 + 0.2) / 2)
    assert m["goodput_tokens_per_s"] == pytest.approx((400 + 4) / 10.0)
    assert m["chat_ttft_slo_s"] == 1.0 and m["chat_itl_slo_s"] == 0.2
    # tokens of a good request received after the window end do not count towards goodput
    m2 = mixed.mode_metrics([good], start, end, 10.0, 1.0, 0.2, has_chat=True, window_end=10.3)
    assert m2["goodput_tokens_per_s"] == pytest.approx((400 + 3) / 10.0)


def test_mode_metrics_without_chat_has_null_chat_fields():
    m = mixed.mode_metrics([], _snap([0], [0], [0.0]), _snap([300], [0], [3.0]), 3.0, 1.0, 0.2, has_chat=False)
    for key in mixed.CHAT_FIELDS:
        assert m[key] is None
    assert m["num_chat_requests"] == 0 and m["batch_tokens_per_s"] == pytest.approx(100.0)
    assert m["goodput_tokens_per_s"] == pytest.approx(100.0)


def test_counters_going_down_mean_a_relaunch():
    with pytest.raises(ValueError, match="relaunched"):
        mixed.window_deltas(_snap([100], [0], [5.0]), _snap([10], [0], [1.0]), 1.0)
    with pytest.raises(ValueError, match="replicas changed"):
        mixed.window_deltas(_snap([0, 0], [0, 0], [0, 0]), _snap([0], [0], [0]), 1.0)


# --------------------------------------------------------------------------------- targets

def _modes(**shared_overrides):
    modes = {
        "chat_only": {"ttft_p99_s": 0.40, "itl_p99_s": 0.10, "busy_fraction": 0.2, "slo_attainment": 1.0,
                      "batch_tokens_per_s": 0.0, "goodput_tokens_per_s": 40.0},
        "batch_only": {"ttft_p99_s": None, "itl_p99_s": None, "busy_fraction": 1.0, "slo_attainment": None,
                       "batch_tokens_per_s": 1000.0, "goodput_tokens_per_s": 1000.0},
        "shared": {"ttft_p99_s": 0.48, "itl_p99_s": 0.12, "busy_fraction": 1.0, "slo_attainment": 0.99,
                   "batch_tokens_per_s": 700.0, "goodput_tokens_per_s": 740.0},
        "split": {"ttft_p99_s": 0.5, "itl_p99_s": 0.1, "busy_fraction": 0.6, "slo_attainment": 0.95,
                  "batch_tokens_per_s": 500.0, "goodput_tokens_per_s": 540.0},
    }
    modes["shared"].update(shared_overrides)
    return modes


def test_targets_pass():
    t = mixed.evaluate_targets(_modes())
    assert t["latency"]["ttft_p99_ratio"] == pytest.approx(1.2)
    assert t["latency"]["itl_p99_ratio"] == pytest.approx(1.2)
    assert t["latency"]["passed"] is True
    assert t["batch_throughput"]["expected_batch_tokens_per_s"] == pytest.approx(800.0)   # 1000 * (1 - 0.2)
    assert t["batch_throughput"]["ratio"] == pytest.approx(700 / 800)
    assert t["batch_throughput"]["passed"] is True                                          # 0.875 >= 0.85
    assert t["goodput"]["goodput_ratio"] == pytest.approx(740 / 540)
    assert t["goodput"]["passed"] is True


def test_targets_fail_and_missing():
    t = mixed.evaluate_targets(_modes(itl_p99_s=0.2, batch_tokens_per_s=600.0, slo_attainment=0.9))
    assert t["latency"]["passed"] is False                 # ITL 2x
    assert t["batch_throughput"]["passed"] is False        # 600 / 800 = 0.75
    assert t["goodput"]["passed"] is False                 # attainment 0.9 < split's 0.95
    t = mixed.evaluate_targets(_modes(goodput_tokens_per_s=600.0))
    assert t["goodput"]["passed"] is False                 # 600 / 540 < 1.3
    t = mixed.evaluate_targets({m: None for m in mixed.MODES})
    assert all(t[k]["passed"] is None for k in ("latency", "batch_throughput", "goodput"))
    lines = mixed.target_lines(mixed.evaluate_targets(_modes(itl_p99_s=0.2)))
    assert lines[0].startswith("FAIL") and "ITL 2.00x" in lines[0]
    assert lines[1].startswith("PASS") and lines[2].startswith("PASS")


def test_render_table_has_a_row_per_metric_and_a_column_per_mode():
    modes = {m: mixed.mode_metrics([ChatRecord(0.0, [(0.1, 1), (0.2, 1)])], _snap([0], [0], [0]),
                                   _snap([100], [2], [0.5]), 1.0, 1.0, 0.2, has_chat=m != "batch_only")
             for m in mixed.MODES}
    modes["shared"]["batch_saturated"] = False
    res = {"modes": modes, "targets": mixed.evaluate_targets(modes),
           "config": {"chat_ttft_slo_s": 1.0, "chat_itl_slo_s": 0.2}}
    text = mixed.render_table(res)
    header = text.splitlines()[0].split()
    assert header == ["metric", *mixed.MODES]
    assert any(line.startswith("TTFT p99 s") for line in text.splitlines())
    assert "economic util." in text and "batch saturated" in text and "ran out of lines" in text
    assert "cached prompt tok" in text
    assert sum(line[:4] in ("PASS", "FAIL", "N/A ") for line in text.splitlines()) == 3


# -------------------------------------------------------------------------------- workload

def test_workload_is_deterministic_and_in_range():
    a = mixed.chat_workload(7, rate=3.0, duration_s=100.0, vocab_size=49152, mode="shared")
    assert a == mixed.chat_workload(7, rate=3.0, duration_s=100.0, vocab_size=49152, mode="shared")
    assert a != mixed.chat_workload(8, rate=3.0, duration_s=100.0, vocab_size=49152, mode="shared")
    assert 240 <= len(a) <= 360                                    # Poisson, mean 300
    assert all(0 <= x.at_s < 100.0 for x in a) and [x.at_s for x in a] == sorted(x.at_s for x in a)
    assert [x.index for x in a] == list(range(len(a)))
    for x in a:
        assert mixed.CHAT_PROMPT_LEN[0] <= len(x.prompt_ids) <= mixed.CHAT_PROMPT_LEN[1]
        assert mixed.CHAT_OUTPUT_LEN[0] <= x.max_tokens <= mixed.CHAT_OUTPUT_LEN[1]
        assert all(100 <= t < 49152 - 100 for t in x.prompt_ids)
    b = mixed.batch_workload(7, 50, vocab_size=49152, mode="shared")
    assert b == mixed.batch_workload(7, 50, vocab_size=49152, mode="shared")
    assert len({ln.custom_id for ln in b}) == 50
    for ln in b:
        assert mixed.BATCH_PROMPT_LEN[0] <= len(ln.prompt_ids) <= mixed.BATCH_PROMPT_LEN[1]
        assert mixed.BATCH_OUTPUT_LEN[0] <= ln.max_tokens <= mixed.BATCH_OUTPUT_LEN[1]
    # drawn in pieces (the batch feed tops up): the same lines as drawn at once
    assert mixed.batch_workload(7, 20, 49152, mode="shared") + mixed.batch_workload(7, 30, 49152, mode="shared",
                                                                                   start=20) == b


def test_modes_get_the_same_load_shape_with_their_own_prompts():
    vocab = 49152
    chats = {m: mixed.chat_workload(3, 2.0, 60.0, vocab, 512, mode=m) for m in mixed.MODES}
    lines = {m: mixed.batch_workload(3, 40, vocab, 512, mode=m) for m in mixed.MODES}
    ref_c, ref_b = chats["chat_only"], lines["batch_only"]
    for m in mixed.MODES:
        assert [(x.at_s, len(x.prompt_ids), x.max_tokens) for x in chats[m]] == \
            [(x.at_s, len(x.prompt_ids), x.max_tokens) for x in ref_c]
        assert [(len(x.prompt_ids), x.max_tokens) for x in lines[m]] == [(len(x.prompt_ids), x.max_tokens) for x in ref_b]
    # no two modes (and no two requests) share a first prefix-cache block (16 tokens)
    blocks = [x.prompt_ids[:16] for m in mixed.MODES for x in chats[m] + lines[m]]
    assert len(set(blocks)) == len(blocks)


def test_unmeasured_prompts_never_share_a_block_with_measured_ones():
    vocab = 1000
    reserved = mixed.reserved_first_id(vocab)
    assert reserved == mixed.token_range(vocab)[0] == 100
    warm = [mixed.unmeasured_ids(f"warmup-{i}", 16, vocab) for i in range(4)]
    assert all(w[0] == reserved and len(w) == 16 for w in warm) and len(set(warm)) == 4
    assert warm[0] == mixed.unmeasured_ids("warmup-0", 16, vocab)            # seeded by the key
    assert mixed.unmeasured_ids("x", 1, vocab) == (reserved,) and mixed.unmeasured_ids("x", 0, vocab) == ()
    measured = ([x.prompt_ids for m in mixed.MODES for x in mixed.chat_workload(0, 20.0, 30.0, vocab, mode=m)]
                + [x.prompt_ids for x in mixed.batch_workload(0, 500, vocab, mode="shared")])
    assert len(measured) > 1000 and all(p[0] != reserved for p in measured)  # the first token rules it out
    assert {t for p in measured for t in p[1:]} >= {reserved}                # it is an ordinary id elsewhere


def test_lengths_fit_the_context():
    assert mixed.fit_lengths(100, 50, 512) == (100, 50)
    assert mixed.fit_lengths(500, 200, 512) == (312, 200)
    assert mixed.fit_lengths(500, 300, 512) == (256, 256)
    assert mixed.fit_lengths(500, 300, None) == (500, 300)
    for ln in mixed.batch_workload(1, 200, vocab_size=512, max_model_len=512, mode="shared"):
        assert len(ln.prompt_ids) + ln.max_tokens <= 512
        assert all(100 <= t < 412 for t in ln.prompt_ids)
    assert mixed.token_range(64) == (16, 48)


def test_batch_jsonl_lines_are_valid_completions():
    from hpcserve.batch.openai_format import parse_line

    lines = mixed.batch_workload(3, 5, vocab_size=1000, max_model_len=512, mode="shared")
    for i, text in enumerate(mixed.batch_jsonl(lines).decode().splitlines()):
        item = parse_line(text, i + 1)
        assert item.url == "/v1/completions" and item.prompt == list(lines[i].prompt_ids)
        assert item.params.max_tokens == lines[i].max_tokens
        assert item.params.ignore_eos and item.params.temperature == 0


def test_generated_daemon_config_merges_the_users(tmp_path):
    from hpcserve.config import load_config

    user = {"engine": {"max-num-seqs": 8}, "slo": {"chat-ttft-p99-s": 9.0}, "daemon": {"state-dir": "/x \"y\""}}
    path = tmp_path / "gen.toml"
    path.write_text(mixed.dump_toml(mixed.daemon_config(user, 0.5, 0.05, 1)))
    cfg = load_config(path, overrides={"daemon.ranks": 2}, env={})
    assert cfg.engine.max_num_seqs == 8 and cfg.daemon.state_dir == '/x "y"'
    assert cfg.slo.chat_ttft_p99_s == 0.5 and cfg.slo.chat_itl_p99_s == 0.05
    assert cfg.daemon.dedicated_chat_replicas == 1
    assert cfg.daemon.chat_pack_limit == load_config(None, env={}).daemon.chat_pack_limit  # the user's (default)
    assert user["slo"] == {"chat-ttft-p99-s": 9.0}  # the caller's dict is not modified


def test_placement_per_mode(tmp_path):
    from hpcserve.config import load_config

    assert mixed.placement("split", 4) == {"dedicated-chat-replicas": 2}
    assert mixed.placement("shared", 4) == mixed.placement("batch_only", 4) == {"dedicated-chat-replicas": 0}
    # chat_only spreads chat: no packing (the router packs only below chat-pack-limit)
    assert mixed.placement("chat_only", 4) == {"dedicated-chat-replicas": 0, "chat-pack-limit": 0}
    user = {"daemon": {"chat-pack-limit": 3}}
    for mode, pack in (("chat_only", 0), ("shared", 3)):
        keys = mixed.placement(mode, 2)
        path = tmp_path / f"{mode}.toml"
        path.write_text(mixed.dump_toml(mixed.daemon_config(user, 1.0, 0.1, keys["dedicated-chat-replicas"],
                                                            keys.get("chat-pack-limit"))))
        assert load_config(path, overrides={"daemon.ranks": 2}, env={}).daemon.chat_pack_limit == pack, mode


def test_rank_threads_do_not_oversubscribe():
    assert mixed.rank_threads(None, 2, 2) == 1 and mixed.rank_threads(None, 2, 16) == 8
    assert mixed.rank_threads(None, 4, 2) == 1 and mixed.rank_threads(None, 2, None) == 1
    assert mixed.rank_threads(4, 2, 16) is None                          # the site's setting wins
    assert mixed.daemon_config({}, 1.0, 0.1, 0, num_threads=3)["engine"]["num-threads"] == 3
    assert mixed.daemon_config({"engine": {"num-threads": 5}}, 1.0, 0.1, 0, num_threads=3)["engine"] == {
        "num-threads": 5}


def test_cached_tokens_per_mode():
    recs = [ChatRecord(0.0, [(0.1, 1)], cached_tokens=16), ChatRecord(0.0, [(0.1, 1)])]
    snap = _snap([0], [0], [0.0])
    m = mixed.mode_metrics(recs, snap, snap, 1.0, 1.0, 0.2, has_chat=True, batch_cached_tokens=32)
    assert (m["num_cached_tokens_chat"], m["num_cached_tokens_batch"], m["num_cached_tokens"]) == (16, 32, 48)
    m = mixed.mode_metrics(recs, snap, snap, 1.0, 1.0, 0.2, has_chat=True)
    assert m["num_cached_tokens_batch"] is None and m["num_cached_tokens"] == 16


def test_cli_help_documents_the_workload():
    from hpcserve.cli import main

    res = CliRunner().invoke(main, ["bench", "mixed", "--help"])
    assert res.exit_code == 0, res.output
    for lo, hi in (mixed.CHAT_PROMPT_LEN, mixed.CHAT_OUTPUT_LEN, mixed.BATCH_PROMPT_LEN, mixed.BATCH_OUTPUT_LEN):
        assert f"{lo}-{hi}" in res.output
    assert "--chat-ttft-slo" in res.output and "dedicated-chat-replicas" in res.output
    res = CliRunner().invoke(main, ["bench", "mixed", "--ranks", "1"])
    assert res.exit_code != 0 and "--ranks" in res.output


# ------------------------------------------------------------------------------ end to end

@pytest.mark.slow
@pytest.mark.timeout(1800)  # five daemons (calibrate + one per mode), one after the other
def test_bench_mixed_end_to_end(tiny_model_factory):
    model = tiny_model_factory("llama")
    proc = subprocess.run(
        [sys.executable, "-m", "hpcserve", "bench", "mixed", "--model", str(model), "--ranks", "2",
         "--duration", "4", "--chat-rate", "2", "--batch-lines", "40", "--json"],
        check=False, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[shared]" in proc.stderr and "[split]" in proc.stderr  # progress went to stderr
    for name in ("calibrate", *mixed.MODES):                      # a fresh daemon per mode
        assert f"starting daemon '{name}'" in proc.stderr, name
    res = json.loads(proc.stdout)
    assert set(res) == {"modes", "targets", "config"}
    modes = res["modes"]
    assert list(modes) == list(mixed.MODES)
    keys = {"ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "slo_attainment", "batch_tokens_per_s",
            "chat_tokens_per_s", "total_tokens_per_s", "busy_fraction", "goodput_tokens_per_s",
            "economic_utilization", "num_chat_requests", "num_chat_failed", "chat_ttft_slo_s", "chat_itl_slo_s"}
    for name, m in modes.items():
        assert keys <= set(m), name
        assert m["chat_ttft_slo_s"] == res["config"]["chat_ttft_slo_s"]
        assert 0.0 <= m["busy_fraction"] <= 1.0
    for key in mixed.CHAT_FIELDS:
        assert modes["batch_only"][key] is None
    assert modes["batch_only"]["num_chat_requests"] == 0
    for name in ("batch_only", "shared", "split"):
        assert modes[name]["batch_tokens_per_s"] > 0, name
        # the feed topped the batch up (the first 40 lines alone would run dry on a fast machine)
        assert modes[name]["batch_saturated"] is True and modes[name]["batch_lines_submitted"] > 40, name
    for name, m in modes.items():  # cold prefix cache per mode, prompts of its own: nothing served from it
        assert m["num_cached_tokens"] == m["num_cached_tokens_chat"] == 0, name
        assert m["num_cached_tokens_batch"] == (None if name == "chat_only" else 0), name
    for name in ("chat_only", "shared", "split"):
        m = modes[name]
        assert m["num_chat_requests"] == res["config"]["num_chat_arrivals"] > 0, name
        assert m["num_chat_failed"] == 0, name
        assert m["ttft_p99_s"] >= m["ttft_p50_s"] > 0 and m["itl_p99_s"] >= m["itl_p50_s"] >= 0
        assert 0.0 <= m["slo_attainment"] <= 1.0
        assert m["chat_tokens_per_s"] > 0
    assert modes["chat_only"]["batch_tokens_per_s"] == 0
    for name, m in modes.items():  # the daemon's useful work over the window: bounded, per class
        econ = [m["economic_utilization"], m["economic_utilization_batch"], m["economic_utilization_interactive"]]
        assert all(0.0 <= v <= 1.0 for v in econ), (name, econ)
        assert econ[0] == pytest.approx(econ[1] + econ[2], abs=1e-9), name
    assert modes["batch_only"]["economic_utilization_batch"] > 0
    assert modes["batch_only"]["economic_utilization_interactive"] == 0
    assert modes["chat_only"]["economic_utilization_batch"] == 0 < modes["chat_only"]["economic_utilization"]
    assert set(res["targets"]) == {"latency", "batch_throughput", "goodput"}
    cfg = res["config"]
    assert cfg["split_dedicated_chat_replicas"] == 1
    assert cfg["daemons"]["chat_only"]["chat-pack-limit"] == 0 and cfg["daemons"]["split"]["dedicated-chat-replicas"] == 1
    assert cfg["daemons"]["shared"]["chat-pack-limit"] > 1                 # shared keeps the site's packing
    # default SLOs: --slo-scale x the unloaded latencies measured on the calibration daemon
    slo, unloaded = cfg["slo"], cfg["slo"]["unloaded"]
    assert slo["ttft_from"] == slo["itl_from"] == "measured" and unloaded["ttft_prompt_tokens"] == 256
    assert unloaded["ttft_s"] > 0 and unloaded["itl_p99_s"] > 0
    assert cfg["chat_ttft_slo_s"] == pytest.approx(slo["scale"] * unloaded["ttft_s"])
    assert cfg["chat_itl_slo_s"] == pytest.approx(slo["scale"] * unloaded["itl_p99_s"])
    assert set(cfg["machine"]["paths"]) == {"gemm", "fused_cpu_ops", "attention"}


# ------------------------------------------------------------------------------ SLOs, batch feed

def test_slos_derived_from_the_unloaded_latencies():
    from hpcserve.bench import slo

    unloaded = {"ttft_s": 0.5, "ttft_samples_s": [0.4, 0.5, 0.7], "ttft_prompt_tokens": 256, "itl_p99_s": 0.04,
                "itl_gaps": 126}
    d = slo.derive(unloaded, 3.0, None, None)
    assert d["chat_ttft_slo_s"] == pytest.approx(1.5) and d["chat_itl_slo_s"] == pytest.approx(0.12)
    assert d["ttft_from"] == d["itl_from"] == "measured" and d["unloaded"] == unloaded
    assert "3 x unloaded 0.5 s" in d["derivation"] and "256 prompt tokens" in d["derivation"]
    d = slo.derive(unloaded, 3.0, 2.0, None)                      # an explicit value overrides its half only
    assert (d["chat_ttft_slo_s"], d["ttft_from"]) == (2.0, "flag")
    assert d["chat_itl_slo_s"] == pytest.approx(0.12) and d["itl_from"] == "measured"
    d = slo.derive(None, 3.0, 2.0, 0.3)                          # both given: nothing measured
    assert (d["chat_ttft_slo_s"], d["chat_itl_slo_s"], d["unloaded"]) == (2.0, 0.3, None)
    with pytest.raises(ValueError):
        slo.derive(None, 3.0, 2.0, None)


def test_batch_feed_reads_cached_tokens_of_output_lines():
    from hpcserve.api.v1 import serving_pb2 as pb
    from hpcserve.batch.openai_format import build_error_line, build_output_line, parse_line
    from hpcserve.bench.batchfeed import cached_tokens_of
    from hpcserve.engine.outputs import RequestOutput

    item = parse_line(mixed.batch_jsonl(mixed.batch_workload(0, 1, 1000, mode="shared")).decode(), 1)
    for cached in (0, 32):
        out = RequestOutput("r", list(item.prompt), [5, 6], "ab", [], "", True, "length", num_cached_tokens=cached)
        line = pb.BatchResultLine(custom_id=item.custom_id, json=json.dumps(build_output_line(item, out, "m", 0)))
        assert cached_tokens_of(line) == cached
    err = build_error_line("line-0", 1, "invalid_request", "bad")
    assert cached_tokens_of(pb.BatchResultLine(json=json.dumps(err), is_error=True)) == 0
